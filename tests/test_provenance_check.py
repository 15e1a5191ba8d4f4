"""Provenance never lies: extract reads only the bytes fetch hashed into the manifest.

Cheap when nothing changed (the size and times fetch recorded when it hashed a file), the
sha256 again when they differ; a file edited after fetch is an error naming the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from pipeline.core.errors import DissectError
from pipeline.core.params import model_config
from pipeline.core.paths import ModelPaths
from pipeline.stages import extract, fetch

VOCAB = 8
TOKENIZER = (
    '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
    '"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,'
    '"model":{"type":"WordLevel","vocab":' + json.dumps({f"t{i}": i for i in range(VOCAB)}) + ',"unk_token":"t0"}}'
)
FIX = "run `dvc repro fetch@m`"


def project_with(tmp_path: Path, monkeypatch, entry: dict) -> tuple[ModelPaths, dict]:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    params = {"models": {"m": {"tokenizer": None, "tensor": None, **entry}}, "extract": {}}
    return ModelPaths.in_project("m"), params


@pytest.fixture
def fetched(tmp_path, monkeypatch) -> tuple[ModelPaths, dict, Path]:
    """A tiny safetensors model fetched from a folder outside the project."""
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": np.arange(VOCAB * 4, dtype=np.float32).reshape(VOCAB, 4)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(TOKENIZER)
    paths, params = project_with(tmp_path, monkeypatch, {"format": "safetensors", "source": {"path": str(folder)}})
    fetch.run(paths, model_config(params, "m"))
    return paths, params, folder / "model.safetensors"


def run_extract(paths: ModelPaths, params: dict) -> dict:
    return extract.run(paths, extract.read_settings(params, "m"))


def edit_in_place(path: Path) -> None:
    """Same size, other bytes, the old modification time put back (as `touch -d` would)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def test_unchanged_files_are_trusted_without_hashing_them_again(fetched, monkeypatch):
    paths, params, _ = fetched

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again though nothing changed")

    monkeypatch.setattr(extract, "file_sha256", no_hashing)
    assert run_extract(paths, params)["shape"] == [VOCAB, 4]


def test_without_fetchs_record_every_file_is_hashed_once(fetched, monkeypatch):
    paths, params, _ = fetched
    paths.hashed.unlink()  # another machine, or an older fetch
    hashed = []
    real = extract.file_sha256
    monkeypatch.setattr(extract, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    run_extract(paths, params)
    assert sorted(hashed) == ["model.safetensors", "tokenizer.json"]


def test_a_file_edited_after_fetch_is_refused_even_with_its_old_mtime(fetched):
    paths, params, weights = fetched
    edit_in_place(weights)
    with pytest.raises(DissectError) as error:
        run_extract(paths, params)
    assert str(error.value) == f"{weights} changed after fetch hashed it (its sha256 is not the manifest's); {FIX} (or `python -m pipeline.stages.fetch m`)"
    assert not paths.embeddings.exists()


def test_a_file_that_grew_is_refused_without_hashing(fetched, monkeypatch):
    paths, params, weights = fetched
    with open(weights, "ab") as handle:
        handle.write(b"\0" * 16)
    monkeypatch.setattr(extract, "file_sha256", lambda path: pytest.fail("the size alone tells"))
    with pytest.raises(DissectError, match=rf"changed after fetch hashed it \(\d+ bytes, the manifest says \d+\); {FIX}"):
        run_extract(paths, params)


def test_an_edited_tokenizer_is_refused_too(fetched, tmp_path):
    paths, params, _ = fetched
    edit_in_place(tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(DissectError, match="tokenizer.json changed after fetch hashed it"):
        run_extract(paths, params)


def test_a_removed_file_names_the_fix(fetched):
    paths, params, weights = fetched
    weights.unlink()
    with pytest.raises(DissectError, match=f"model.safetensors is gone since fetch hashed it; {FIX}"):
        run_extract(paths, params)


def test_a_touched_file_with_the_same_bytes_is_hashed_and_accepted(fetched):
    paths, params, weights = fetched
    os.utime(weights, ns=(0, 10**18))
    assert run_extract(paths, params)["shape"] == [VOCAB, 4]


def test_a_record_whose_sha256_is_not_the_manifests_is_not_trusted(fetched):
    """A record vouches for the manifest's sha256 only: one left by another fetch is ignored."""
    paths, params, weights = fetched
    edit_in_place(weights)
    record = json.loads(paths.hashed.read_text())
    record["files"][str(weights)] = {**extract.file_stat(weights), "sha256": "0" * 64}  # the stat matches today's file
    paths.hashed.write_text(json.dumps(record))
    with pytest.raises(DissectError, match="its sha256 is not the manifest's"):
        run_extract(paths, params)


def test_a_shard_added_after_fetch_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.ones(VOCAB, 2)}, folder / "consolidated.00.pth")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(TOKENIZER)
    paths, params = project_with(tmp_path, monkeypatch, {"format": "meta", "source": {"path": str(folder)}, "tokenizer": {"path": str(tokenizer)}})
    fetch.run(paths, model_config(params, "m"))
    torch.save({"tok_embeddings.weight": torch.ones(VOCAB, 2)}, folder / "consolidated.01.pth")
    with pytest.raises(DissectError, match=f"consolidated.01.pth is read with the model but was not there when fetch hashed .*; {FIX}"):
        run_extract(paths, params)


def test_a_file_written_while_extract_reads_it(fetched, monkeypatch):
    paths, params, weights = fetched
    real = extract.read_embedding

    def read_then_someone_writes(*args, **kwargs):
        embedding = real(*args, **kwargs)
        edit_in_place(weights)
        return embedding

    monkeypatch.setattr(extract, "read_embedding", read_then_someone_writes)
    with pytest.raises(DissectError, match=f"changed while extract read it; {FIX}"):
        run_extract(paths, params)
    assert not paths.embeddings.exists()


def test_the_record_stays_out_of_the_manifest_and_of_models_name(fetched):
    """The manifest is in DVC's hash of models/<name> (extract's input): it holds no times,
    so two machines' manifests agree; the times live beside the folder."""
    paths, _, _ = fetched
    manifest = json.loads(paths.manifest.read_text())
    assert all(set(entry) == {"path", "bytes", "sha256"} for entry in manifest["files"])
    assert paths.hashed.parent == paths.models.parent and paths.hashed.exists()
    assert sorted(p.name for p in paths.models.iterdir()) == ["manifest.json"]
    record = json.loads(paths.hashed.read_text())["files"]
    assert {entry["path"]: entry["sha256"] for entry in manifest["files"]} == {path: r["sha256"] for path, r in record.items()}
