"""The GGUF reader on every storage type: files written with the gguf package's own writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding

QT = gguf.GGMLQuantizationType
VOCAB, DIM = 40, 256  # 256 = one K-quant super-block per row


def write_gguf(path: Path, data: np.ndarray, qtype: QT, name: str = "token_embd.weight") -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor(name, data, raw_dtype=qtype)
    writer.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def k_quant_blocks(qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant rows [vocab, bytes] with sane fp16 scales (the package cannot encode these types)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(VOCAB, DIM // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == QT.Q4_K:  # d and dmin lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    elif qtype == QT.Q6_K:  # d closes the block
        raw[..., -2:] = scale
    return raw.reshape(VOCAB, -1)


@pytest.fixture
def values() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((VOCAB, DIM)).astype(np.float32)  # [vocab, dim]


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1])
def test_encodable_types_equal_gguf_dequantize(tmp_path, values, qtype):
    stored = values if qtype == QT.F32 else quantize(values, qtype)
    path = write_gguf(tmp_path / "m.gguf", stored, qtype)
    embedding = read_embedding("gguf", path)
    reference = values if qtype == QT.F32 else dequantize(stored, qtype)
    assert embedding.source.source_dtype == qtype.name
    assert embedding.matrix.shape == (VOCAB, DIM)
    assert np.array_equal(embedding.matrix, reference)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K])
def test_k_quants_equal_gguf_dequantize(tmp_path, qtype):
    blocks = k_quant_blocks(qtype, np.random.default_rng(3))
    path = write_gguf(tmp_path / "m.gguf", blocks, qtype)
    embedding = read_embedding("gguf", path)
    assert embedding.matrix.shape == (VOCAB, DIM)
    assert np.array_equal(embedding.matrix, dequantize(blocks, qtype).reshape(VOCAB, DIM))


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K])
def test_k_quant_kernels_equal_gguf_bit_for_bit_with_varied_scales(qtype):
    from pipeline.formats.gguf import dequantize_rows

    blocks = k_quant_blocks(qtype, np.random.default_rng(5))
    rng = np.random.default_rng(6)
    per_row = blocks.reshape(VOCAB, -1, gguf.GGML_QUANT_SIZES[qtype][1])
    for at in ((0, 2) if qtype == QT.Q4_K else (per_row.shape[2] - 2,)):
        scales = (rng.standard_normal(per_row.shape[:2]) * 0.05).astype(np.float16)  # signed, varied
        per_row[..., at : at + 2] = scales.view(np.uint8).reshape(*per_row.shape[:2], 2)
    rows = dequantize_rows(per_row.reshape(VOCAB, -1), int(qtype), (VOCAB, DIM), "token_embd.weight")
    reference = dequantize(per_row.reshape(VOCAB, -1), qtype).reshape(VOCAB, DIM)
    assert np.array_equal(rows.view(np.uint32), reference.view(np.uint32))


def test_gguf_without_embedding_names_the_closest_tensors(tmp_path, values):
    path = write_gguf(tmp_path / "m.gguf", values, QT.F32, name="tok_embd_v2.weight")
    with pytest.raises(DissectError, match=r"closest names: 'tok_embd_v2.weight'"):
        read_embedding("gguf", path)


def test_truncated_gguf_is_a_clear_error(tmp_path, values):
    path = write_gguf(tmp_path / "m.gguf", values, QT.F32)
    data = path.read_bytes()
    for cut in (8, 40, len(data) // 2, len(data) - 100):
        path.write_bytes(data[:cut])
        with pytest.raises(DissectError):
            read_embedding("gguf", path)
