"""params.yaml is the composition of conf/, and stays so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import compose

ROOT = Path(__file__).resolve().parent.parent


def test_params_yaml_equals_the_composition_of_conf():
    committed = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert committed == compose(conf_dir=ROOT / "conf"), "params.yaml is stale: run `python -m pipeline.core.params`"


def test_adding_a_model_is_one_override():
    default = list(yaml.safe_load(compose(conf_dir=ROOT / "conf"))["models"])
    steps = [f"run-step-{step}" for step in range(6)]
    assert default == ["smollm2-135m", "minilm-l6", "minilm-l6-int8", "paraphrase-minilm-l3", *steps]
    composed = yaml.safe_load(compose(["+model@models.llama-3-2-1b-synthetic=llama-3-2-1b-synthetic"], conf_dir=ROOT / "conf"))
    assert list(composed["models"]) == [*default, "llama-3-2-1b-synthetic"]
    assert composed["models"]["llama-3-2-1b-synthetic"]["format"] == "meta"


def test_each_version_of_the_demo_series_is_its_own_step():
    composed = yaml.safe_load(compose(conf_dir=ROOT / "conf"))
    versions = composed["series"]["run-demo"]
    assert [composed["models"][v]["source"]["step"] for v in versions] == list(range(6))
    assert {composed["models"][v]["source"]["synthetic"] for v in versions} == {"small-30522"}


def test_every_shipped_model_config_composes():
    default_models = yaml.safe_load(compose(conf_dir=ROOT / "conf"))["models"]
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        overrides = [] if path.stem in default_models else [f"+model@models.{path.stem}={path.stem}"]
        composed = yaml.safe_load(compose(overrides, conf_dir=ROOT / "conf"))
        assert composed["models"][path.stem]["format"] in {"meta", "safetensors", "gguf", "onnx"}, path.name


def recompose(project: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.core.params OVERRIDES`` in ``project``."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.core.params", *overrides], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project_with_conf(tmp_path: Path) -> Path:
    """A folder holding a copy of conf/ and no params.yaml."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    return tmp_path


def test_recomposing_writes_what_dvc_composes(project_with_conf):
    result = recompose(project_with_conf, "quantize.recall_k=20")
    assert result.returncode == 0, result.stderr
    written = (project_with_conf / "params.yaml").read_text(encoding="utf-8")
    assert written == compose(["quantize.recall_k=20"], conf_dir=project_with_conf / "conf")
    assert yaml.safe_load(written)["quantize"]["recall_k"] == 20


@pytest.mark.parametrize(
    "override, said",
    [
        ("nosuchkey.a=1", "Could not override 'nosuchkey.a'; To append to your config use +nosuchkey.a=1"),
        ("quantize.recall_k==2", "Error parsing override 'quantize.recall_k==2'; an override is key=value"),
        ("+model@models.x=nonexistent", "Could not find 'model/nonexistent'; a config group's options are the .yaml files"),
    ],
)
def test_a_bad_override_is_one_line_and_writes_nothing(project_with_conf, override, said):
    result = recompose(project_with_conf, override)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: cannot compose conf/ with {override!r}: ") and said in lines[0], lines[0]
    assert not (project_with_conf / "params.yaml").exists()


def test_help_prints_the_usage_and_writes_nothing(project_with_conf):
    result = recompose(project_with_conf, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m pipeline.core.params [OVERRIDE ...]")
    assert not (project_with_conf / "params.yaml").exists()
