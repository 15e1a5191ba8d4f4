"""Readers of the three weight formats: tiny hand-made files, then the real packaged models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding, weight_files
from pipeline.formats.convert import bf16_bits_to_float32
from pipeline.core.hashing import matrix_sha256

# A 4x3 embedding whose values are exact in bf16, so every format must give them back exactly.
SMALL = np.array(
    [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, -1.0], [-3.0, 0.25, 4.0]], dtype=np.float32
)  # [vocab=4, dim=3]


def write_meta(folder: Path, shards: list[dict[str, torch.Tensor]], dim: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, state in enumerate(shards):
        torch.save(state, folder / f"consolidated.{index:02d}.pth")
    if dim is not None:
        (folder / "params.json").write_text(json.dumps({"dim": dim, "n_layers": 1, "vocab_size": -1}))
    return folder


# ---- hand-checkable -----------------------------------------------------------------------


def test_bf16_widening_is_exact():
    values = np.array([1.0, -2.5, 0.15625, -(2.0**100)], dtype=np.float32)  # all exact in bf16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(bf16_bits_to_float32(bits), values)
    # and the same as torch's own widening, on every one of the 65536 bit patterns
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    reference = torch.from_numpy(every.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(bf16_bits_to_float32(every).view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_single_file_gives_values_and_dtype(tmp_path, dtype):
    folder = write_meta(tmp_path / "ckpt", [{"tok_embeddings.weight": torch.from_numpy(SMALL).to(dtype), "norm.weight": torch.ones(3)}], 3)
    embedding = read_embedding("meta", folder)
    assert embedding.matrix.dtype == np.float32
    assert np.array_equal(embedding.matrix, SMALL)
    assert embedding.source.tensor_key == "tok_embeddings.weight"
    assert embedding.source.source_dtype == str(dtype).removeprefix("torch.")
    assert embedding.source.shape == (4, 3)


def test_meta_shards_split_by_vocabulary_are_stacked(tmp_path):
    tensor = torch.from_numpy(SMALL).to(torch.bfloat16)
    folder = write_meta(tmp_path / "ckpt", [{"tok_embeddings.weight": tensor[:2].clone()}, {"tok_embeddings.weight": tensor[2:].clone()}], 3)
    assert np.array_equal(read_embedding("meta", folder).matrix, SMALL)


def test_meta_shards_split_by_dimension_are_joined_side_by_side(tmp_path):
    padded = np.concatenate([SMALL, SMALL[:, :1] * 2], axis=1)  # [4, 4] so it splits 2+2
    tensor = torch.from_numpy(padded)
    folder = write_meta(tmp_path / "ckpt", [{"tok_embeddings.weight": tensor[:, :2].clone()}, {"tok_embeddings.weight": tensor[:, 2:].clone()}], 4)
    assert np.array_equal(read_embedding("meta", folder).matrix, padded)


def test_meta_shards_without_params_json_are_ambiguous(tmp_path):
    tensor = torch.from_numpy(SMALL)
    folder = write_meta(tmp_path / "ckpt", [{"tok_embeddings.weight": tensor[:2].clone()}, {"tok_embeddings.weight": tensor[2:].clone()}], None)
    with pytest.raises(DissectError, match="params.json"):
        read_embedding("meta", folder)


def test_meta_missing_tensor_lists_closest_names(tmp_path):
    folder = write_meta(tmp_path / "ckpt", [{"embedding.tokens": torch.from_numpy(SMALL), "norm.weight": torch.ones(3)}], 3)
    with pytest.raises(DissectError, match=r"closest names: 'embedding.tokens'.*set `tensor:`"):
        read_embedding("meta", folder)


def test_meta_explicit_tensor_key(tmp_path):
    folder = write_meta(tmp_path / "ckpt", [{"embedding.tokens": torch.from_numpy(SMALL)}], 3)
    assert np.array_equal(read_embedding("meta", folder, tensor="embedding.tokens").matrix, SMALL)


def test_meta_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL), "x": Exploit()}, folder / "consolidated.00.pth")
    with pytest.raises(DissectError, match="refused"):
        read_embedding("meta", folder)
    assert not marker.exists()


def test_safetensors_single_file(tmp_path):
    save_numpy({"model.embed_tokens.weight": SMALL, "lm_head.weight": SMALL.T.copy()}, tmp_path / "model.safetensors")
    embedding = read_embedding("safetensors", tmp_path)
    assert embedding.source.tensor_key == "model.embed_tokens.weight"
    assert np.array_equal(embedding.matrix, SMALL)


def test_safetensors_bf16(tmp_path):
    save_file({"transformer.wte.weight": torch.from_numpy(SMALL).to(torch.bfloat16)}, tmp_path / "m.safetensors")
    embedding = read_embedding("safetensors", tmp_path / "m.safetensors")
    assert embedding.source.source_dtype == "bfloat16"
    assert np.array_equal(embedding.matrix, SMALL)


def test_safetensors_index_opens_only_the_shard_with_the_tensor(tmp_path):
    save_numpy({"model.norm.weight": np.ones(3, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    save_numpy({"model.embed_tokens.weight": SMALL}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # Corrupt the shard that is not needed: a reader that opened it would fail.
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"garbage")
    embedding = read_embedding("safetensors", tmp_path)
    assert np.array_equal(embedding.matrix, SMALL)
    assert [p.name for p in embedding.source.files] == ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"e.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}, b"\0" * 40, "outside the file"),
        ({"e.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 48]}}, b"\0" * 48, "does not match"),
        ({"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
          "embed_tokens.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]}}, b"\0" * 36, "overlap"),
    ],
)
def test_safetensors_lying_headers_are_rejected(tmp_path, header, data, message):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(DissectError, match=message):
        read_embedding("safetensors", path)


def test_safetensors_header_longer_than_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(DissectError, match="exceeds the file size"):
        read_embedding("safetensors", path)


def test_wrong_format_is_a_clear_error(tmp_path):
    png = tmp_path / "model.gguf"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(DissectError, match="not a GGUF file"):
        read_embedding("gguf", png)
    with pytest.raises(DissectError, match="not a valid safetensors"):
        read_embedding("safetensors", png)
    with pytest.raises(DissectError, match="not a readable PyTorch checkpoint"):
        read_embedding("meta", png)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(DissectError, match="does not exist"):
        read_embedding("meta", tmp_path / "nowhere")
    with pytest.raises(DissectError, match="unknown format"):
        read_embedding("tflite", tmp_path)


# ---- the real packaged models --------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_matrix(smollm2_gguf) -> np.ndarray:
    embedding = read_embedding("gguf", smollm2_gguf)
    assert embedding.source.tensor_key == "token_embd.weight"
    assert embedding.source.source_dtype == "Q8_0"
    assert embedding.matrix.shape == (49152, 576)
    return embedding.matrix


def test_gguf_matches_gguf_package_dequantize(smollm2_gguf, smollm2_matrix):
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    (info,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    reference = gguf.quants.dequantize(info.data, info.tensor_type)  # [vocab, dim]
    assert np.array_equal(smollm2_matrix, reference)


def _resaved_variants(root: Path, matrix: np.ndarray) -> dict[str, tuple[str, Path]]:
    """The same matrix re-saved in every layout the readers support."""
    tensor = torch.from_numpy(matrix)
    half = matrix.shape[0] // 2
    variants: dict[str, tuple[str, Path]] = {}

    single = root / "st-single"
    single.mkdir()
    save_file({"model.embed_tokens.weight": tensor, "model.norm.weight": torch.ones(576)}, single / "model.safetensors")
    variants["safetensors single"] = ("safetensors", single)

    sharded = root / "st-sharded"
    sharded.mkdir()
    save_file({"model.norm.weight": torch.ones(576)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"model.embed_tokens.weight": tensor}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors", "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    variants["safetensors sharded"] = ("safetensors", sharded)

    variants["meta single"] = ("meta", write_meta(root / "meta-1", [{"tok_embeddings.weight": tensor}], 576))
    variants["meta 2 shards, vocab split (Llama 3)"] = (
        "meta", write_meta(root / "meta-vocab", [{"tok_embeddings.weight": tensor[:half].clone()}, {"tok_embeddings.weight": tensor[half:].clone()}], 576))
    variants["meta 2 shards, dim split (Llama 2)"] = (
        "meta", write_meta(root / "meta-dim", [{"tok_embeddings.weight": tensor[:, :288].clone()}, {"tok_embeddings.weight": tensor[:, 288:].clone()}], 576))
    return variants


def test_smollm2_resaved_in_every_layout_is_bit_identical(tmp_path, smollm2_matrix):
    expected = matrix_sha256(smollm2_matrix)
    for label, (fmt, path) in _resaved_variants(tmp_path, smollm2_matrix).items():
        embedding = read_embedding(fmt, path)
        assert embedding.matrix.shape == (49152, 576), label
        assert matrix_sha256(embedding.matrix) == expected, label


def test_minilm_matrix_equals_the_safetensors_library(minilm_dir):
    embedding = read_embedding("safetensors", minilm_dir)
    assert embedding.source.tensor_key == "embeddings.word_embeddings.weight"
    assert embedding.matrix.shape == (30522, 384)
    reference = load_file(minilm_dir / "model.safetensors")["embeddings.word_embeddings.weight"].numpy()
    assert np.array_equal(embedding.matrix, reference)


def test_weight_files_of_a_sharded_folder(tmp_path):
    save_numpy({"a": SMALL}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    assert [p.name for p in weight_files("safetensors", tmp_path)] == ["model.safetensors.index.json", "s1.safetensors"]
