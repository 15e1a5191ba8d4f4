"""Model and pair names are names: every name params.yaml gives is checked when params are
loaded, before any stage writes, with one line saying what a name may hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError
from pipeline.core.params import NAME_PATTERN, NAME_RULE, check_names, load_params, model_paths
from pipeline.core.paths import RESERVED_NAMES
from pipeline.core.settings import no_settings

ROOT = Path(__file__).resolve().parent.parent

BAD_NAMES = ["", "/tmp/x", "/", "a/b", "a\\b", "..", "../up", "a..", "my model", " m", "m\t", "a\nb", "nul\x00", "bell\x07",
             "$(touch x)", "a;b", "a|b", "a&b", "`id`", "a>b", "a*", "-leading", "_leading", "a.b", "x" * 101, "é"]


def params_with(models=(), exported=None, pairs=None) -> dict:
    params: dict = {"models": {name: {"format": "gguf", "source": {"path": "w.gguf"}} for name in models}}
    if exported is not None:
        params["export"] = {"models": exported}
    if pairs is not None:
        params["drift"] = {"pairs": {name: {"base": "a.parquet", "other": "b.parquet"} for name in pairs}}
    return params


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("where", ["models", "export.models", "drift.pairs"])
def test_every_bad_name_is_refused_wherever_it_is_given(name, where):
    params = {"models": params_with(models=[name]), "export.models": params_with(["ok"], exported=[name]),
              "drift.pairs": params_with(["ok"], pairs=[name])}[where]
    with pytest.raises(DissectError) as error:
        check_names(params)
    message = str(error.value)
    assert f"name {name!r} in {where} is not {NAME_RULE}" in message
    assert "\n" not in message


def test_names_that_yaml_reads_as_numbers_say_to_quote_them():
    with pytest.raises(DissectError, match="YAML reads it as a number: quote it"):
        check_names({"models": {123: {}}})


def test_models_that_is_not_a_mapping():
    with pytest.raises(DissectError, match="models must map each model name to its config"):
        check_names({"models": ["a", "b"]})


@given(st.text(max_size=12))
@example("drift")
@example("series")
def test_a_name_passes_exactly_when_it_matches_the_pattern(name):
    params = params_with(models=[name], exported=[name], pairs=[name])
    if name in RESERVED_NAMES:  # a name, but the folder is taken: see the test below
        with pytest.raises(DissectError, match="is reserved"):
            check_names(params)
    elif NAME_PATTERN.fullmatch(name):
        check_names(params)
        assert model_paths(params, name).artifacts.name == name  # a folder of its own, one level down
    else:
        with pytest.raises(DissectError, match="is not a name of letters"):
            check_names(params)


@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_a_model_may_not_take_the_name_of_a_shared_folder(name):
    with pytest.raises(DissectError) as error:
        check_names(params_with(models=["ok", name]))
    assert str(error.value) == (f"model name {name!r} in models is reserved (artifacts/{name}/ holds every {name} output); "
                                "rename the model")
    check_names(params_with(["ok"], pairs=[name]))  # a drift pair may share the word: it is not a folder beside the models


def test_load_params_checks_the_names(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with(["good", "../../escape"])))
    with pytest.raises(DissectError, match="model name '../../escape' in models"):
        load_params(path)


def test_a_name_split_at_a_space_by_dvc_says_so(monkeypatch):
    called = []
    stage = Stage("extract", "MODEL", lambda params, name: called.append(name), no_settings, lambda paths, settings: None)
    with pytest.raises(DissectError) as error:
        stage.main(["my", "model"])
    assert str(error.value).startswith("model name 'my model' holds a space; use a name of letters")
    assert not called
    pair_stage = Stage("drift", "PAIR", lambda params, name: None, no_settings, lambda paths, settings: None)
    with pytest.raises(DissectError, match="drift pair name 'a b c' holds a space"):
        pair_stage.main(["a", "b", "c"])
    series_stage = Stage("series", "SERIES", lambda params, name: None, no_settings, lambda paths, settings: None)
    with pytest.raises(DissectError, match="series name 'llama 3' holds a space"):
        series_stage.main(["llama", "3"])
    with pytest.raises(DissectError, match="usage: python -m pipeline.stages.extract MODEL"):
        stage.main([])


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_runs_nothing(capsys, flag):
    called = []
    stage = Stage("stats", "MODEL", lambda params, name: called.append(name), no_settings, lambda paths, settings: None)
    stage.main([flag])
    whole = Stage("compare", None, lambda params, name: called.append(name), no_settings, lambda paths, settings: None)
    whole.main([flag])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "usage: python -m pipeline.stages.stats MODEL" and "`dvc repro stats@MODEL`" in printed[1]
    assert printed[2] == "usage: python -m pipeline.stages.compare" and "`dvc repro compare`" in printed[3]
    assert not called


@pytest.mark.parametrize("name", ["", "/tmp/x", "..", "my model"])
def test_no_stage_writes_anything_for_a_bad_name(tmp_path, name):
    """Today's failure: an empty name wrote into models/ and artifacts/ themselves, an absolute
    one outside the project. A bad name anywhere in params.yaml now stops every stage."""
    project = tmp_path / "project"
    project.mkdir()
    outside = tmp_path / "outside"
    target = str(outside) if name == "/tmp/x" else name
    (project / "params.yaml").write_text(yaml.safe_dump(params_with(["good", target])))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1"}
    for stage, argv in (("fetch", [target]), ("fetch", ["good"]), ("stats", [target]), ("compare", [])):
        result = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}", *argv], cwd=project, env=environment,
                                capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "is not a name of letters" in lines[0] or "holds a space" in lines[0], lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]
    assert not outside.exists()


DVC_FETCH = """stages:
  fetch:
    foreach: ${models}
    do:
      cmd: python -m pipeline.stages.fetch ${key}
      params:
        - models.${key}
      outs:
        - models/${key}:
            cache: false
            persist: true
"""


def test_under_dvc_a_name_with_a_space_says_so(tmp_path):
    """DVC splits `cmd: ... ${key}` at the space: the stage names the space, not its usage."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=environment)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_with(["my model"])))
    (tmp_path / "dvc.yaml").write_text(DVC_FETCH)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: model name 'my model' holds a space; use a name of letters" in result.stdout + result.stderr
    assert "usage:" not in result.stdout + result.stderr
    assert not (tmp_path / "models").exists()
