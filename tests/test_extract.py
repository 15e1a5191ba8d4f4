"""extract: weights + tokenizer -> embeddings.parquet, on hand-made and real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file

from pipeline.core.errors import DissectError
from pipeline.core.paths import ModelPaths
from pipeline.stages import extract, fetch
from pipeline.core.hashing import matrix_sha256
from pipeline.core.params import model_config
from pipeline.core.parquet import read_provenance, read_vectors
from tests.conftest import model_conf

WORDPIECE = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"},
    "post_processor": None,
    "decoder": None,
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
              "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "##ing": 3}},
}


def run_extract(tmp_path: Path, entry: dict, name: str = "m") -> dict:
    params = {"models": {name: entry}, "extract": {"row_group_size": 2, "compression_level": 3}}
    paths = ModelPaths.in_project(name, tmp_path)
    fetch.run(paths, model_config(params, name))
    return extract.run(paths, extract.read_settings(params, name))


@pytest.fixture
def tiny_hf_model(tmp_path) -> Path:
    """A 6x3 safetensors embedding with a 4-token WordPiece tokenizer: 2 padding rows."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    matrix = np.arange(18, dtype=np.float32).reshape(6, 3)  # [vocab=6, dim=3]
    save_file({"embeddings.word_embeddings.weight": matrix}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(json.dumps(WORDPIECE))
    return folder


def test_padded_vocabulary_rows_have_no_token(tmp_path, tiny_hf_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = run_extract(tmp_path, {"format": "safetensors", "source": {"path": str(tiny_hf_model)}})
    parquet = tmp_path / "artifacts" / "m" / "embeddings.parquet"
    table = pq.read_table(parquet)
    assert table.column("token").to_pylist() == ["[UNK]", "hello", "world", "##ing", None, None]
    assert table.column("token_bytes").null_count == 6
    _, matrix = read_vectors(parquet)
    assert np.array_equal(matrix, np.arange(18, dtype=np.float32).reshape(6, 3))
    assert record["tokenizer"]["padded_rows"] == 2
    assert record["tokenizer"]["vocab_size"] == 4
    assert read_provenance(parquet) == record
    assert pq.ParquetFile(parquet).metadata.num_row_groups == 3
    assert json.loads((tmp_path / "artifacts" / "m" / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


def test_tokenizer_larger_than_matrix_is_an_error_and_writes_nothing(tmp_path, tiny_hf_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file({"embeddings.word_embeddings.weight": np.ones((3, 3), np.float32)}, tiny_hf_model / "model.safetensors")
    with pytest.raises(DissectError, match="has 4 tokens but the embedding has only 3 rows"):
        run_extract(tmp_path, {"format": "safetensors", "source": {"path": str(tiny_hf_model)}})
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.parquet"))


def test_two_runs_give_byte_identical_files(tmp_path, tiny_hf_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = {"format": "safetensors", "source": {"path": str(tiny_hf_model)}}
    run_extract(tmp_path, entry)
    first = (tmp_path / "artifacts" / "m" / "embeddings.parquet").read_bytes()
    run_extract(tmp_path, entry)
    assert (tmp_path / "artifacts" / "m" / "embeddings.parquet").read_bytes() == first


def test_synthetic_llama_shape_with_the_real_tokenizer(tmp_path, monkeypatch):
    """The generator at small size: vocab 128256 like Llama 3.2, with its real tokenizer."""
    monkeypatch.chdir(tmp_path)
    entry = {**model_conf("llama-3-2-1b-synthetic"), "source": {"synthetic": "llama-3.2-1b-small", "seed": 0}}
    record = run_extract(tmp_path, entry, name="llama-small")
    parquet = tmp_path / "artifacts" / "llama-small" / "embeddings.parquet"
    assert record["shape"] == [128256, 64]
    assert record["source_dtype"] == "bfloat16"
    assert record["tokenizer"]["kind"] == "tiktoken"
    assert record["tokenizer"]["vocab_size"] == 128256
    tokens = pq.read_table(parquet, columns=["token"]).column("token")
    assert tokens[9906].as_py() == "Hello"
    assert tokens[128000].as_py() == "<|begin_of_text|>"
    # The Parquet holds exactly the checkpoint's bf16 values, widened to float32.
    checkpoint = torch.load(tmp_path / "models" / "llama-small" / "checkpoint" / "consolidated.00.pth", weights_only=True, mmap=True)
    expected = checkpoint["tok_embeddings.weight"].float().numpy()
    _, matrix = read_vectors(parquet)
    assert matrix_sha256(matrix) == matrix_sha256(expected) == record["matrix_sha256"]


def test_minilm_extract(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = run_extract(tmp_path, {"format": "safetensors", "source": {"path": str(minilm_dir)}}, name="minilm")
    assert record["shape"] == [30522, 384]
    assert record["tokenizer"]["padded_rows"] == 0
    tokens = pq.read_table(tmp_path / "artifacts" / "minilm" / "embeddings.parquet", columns=["token"]).column("token").to_pylist()
    assert tokens[101] == "[CLS]" and "##ing" in tokens and "hello" in tokens


def test_byte_fallback_vocabulary_gets_a_unique_key_and_a_kind(tmp_path, monkeypatch):
    """A SentencePiece vocabulary whose byte <0x0A> and piece "\\n" share a text: one row each by key."""
    import duckdb
    from builders import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer()
    folder = tmp_path / "sp"
    folder.mkdir()
    rows = tok.get_vocab_size() + 2  # two padding rows
    save_file({"model.embed_tokens.weight": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(tok.to_str())
    monkeypatch.chdir(tmp_path)
    run_extract(tmp_path, {"format": "safetensors", "source": {"path": str(folder)}})
    parquet = tmp_path / "artifacts" / "m" / "embeddings.parquet"
    table = pq.read_table(parquet)
    assert table.column_names == ["token_id", "token", "token_key", "kind", "token_bytes", "vector"]
    keys = table.column("token_key").to_pylist()
    assert len({key for key in keys if key is not None}) == rows - 2 and keys[-2:] == [None, None]
    assert table.column("kind").to_pylist() == ["special"] * 3 + ["byte"] * 3 + ["normal"] * 5 + ["unused"] * 3 + ["padding"] * 2
    duck = duckdb.connect()
    assert duck.execute(f"SELECT count(*) FROM '{parquet}' WHERE token = chr(10)").fetchone()[0] == 2
    assert duck.execute(f"SELECT token_id, kind FROM '{parquet}' WHERE token_key = chr(10)").fetchall() == [(6, "normal")]
    assert duck.execute(f"SELECT token_id, kind FROM '{parquet}' WHERE token_key = '<0x0A>'").fetchall() == [(3, "byte")]


def onnx_model(path: Path, matrix: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Gather", ["word_embeddings", "input_ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(matrix, "word_embeddings")])
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def test_onnx_model_with_the_tokenizer_of_another_model(tmp_path, tiny_hf_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3) / 8  # [vocab=4, dim=3]: the lender's 4 tokens
    lender = {"format": "safetensors", "source": {"path": str(tiny_hf_model)}}
    borrower = {"format": "onnx", "source": {"path": str(onnx_model(tmp_path / "m.onnx", matrix))}, "tokenizer": {"from": "lender"}}
    params = {"models": {"lender": lender, "m": borrower}, "extract": {"row_group_size": 2, "compression_level": 3}}
    paths = ModelPaths.in_project("m", tmp_path)
    fetch.run(paths, model_config(params, "m"))
    record = extract.run(paths, extract.read_settings(params, "m"))
    assert record["tokenizer"]["from"] == "lender" and record["tokenizer"]["vocab_size"] == 4
    assert record["source_dtype"] == "float32" and record["tensor_key"] == "word_embeddings"
    table = pq.read_table(paths.embeddings)
    assert table.column("token").to_pylist() == ["[UNK]", "hello", "world", "##ing"]
    assert np.array_equal(read_vectors(paths.embeddings)[1], matrix)


def test_borrowed_tokenizer_that_does_not_fit_names_the_lender(tmp_path, tiny_hf_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lender = {"format": "safetensors", "source": {"path": str(tiny_hf_model)}}
    borrower = {"format": "onnx", "source": {"path": str(onnx_model(tmp_path / "m.onnx", np.ones((3, 2), np.float32)))},
                "tokenizer": {"from": "lender"}}
    params = {"models": {"lender": lender, "m": borrower}, "extract": {"row_group_size": 2, "compression_level": 3}}
    paths = ModelPaths.in_project("m", tmp_path)
    fetch.run(paths, model_config(params, "m"))
    with pytest.raises(DissectError, match=r"\(taken from lender\) has 4 tokens but the embedding has only 3 rows; "
                                           r"lender's vocabulary is not this model's: set models.m.tokenizer.from"):
        extract.run(paths, extract.read_settings(params, "m"))
    assert not paths.embeddings.exists()
