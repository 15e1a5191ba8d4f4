"""The numpy dequantizers that :mod:`pipeline.formats.fused` replaced, kept as the reference
its kernels are held to bit for bit (tests/test_fused_kernels.py).

Each writes ``out`` [rows, dim] float32 from the raw blocks ``raw`` [rows, bytes per row]
in whole-array passes, with the ``gguf`` package's formulas, operation for operation.
"""

from __future__ import annotations

import numpy as np

# numpy's float16 cast of a block field, which Q8_0 still uses
from pipeline.formats.gguf import _scales


def _nibbles(out: np.ndarray, codes: np.ndarray, offset: float) -> np.ndarray:
    """[n, 32] float32 in ``out``: low nibbles of ``codes`` [n, 16] first, then the high ones, minus ``offset``."""
    blocks = out.reshape(-1, 32)
    np.subtract(codes & np.uint8(15), np.float32(offset), out=blocks[:, :16], dtype=np.float32)
    np.subtract(codes >> np.uint8(4), np.float32(offset), out=blocks[:, 16:], dtype=np.float32)
    return blocks


def q4_0(out: np.ndarray, raw: np.ndarray) -> None:
    blocks = raw.reshape(-1, 18)  # fp16 d, 16 bytes of nibbles
    values = _nibbles(out, blocks[:, 2:], 8.0)
    np.multiply(values, _scales(blocks, 0), out=values)


def q4_1(out: np.ndarray, raw: np.ndarray) -> None:
    blocks = raw.reshape(-1, 20)  # fp16 d, fp16 m, 16 bytes of nibbles
    values = _nibbles(out, blocks[:, 4:], 0.0)
    np.multiply(values, _scales(blocks, 0), out=values)
    np.add(values, _scales(blocks, 2), out=values)


def f16(out: np.ndarray, raw: np.ndarray) -> None:
    np.copyto(out, raw.view(np.float16).reshape(out.shape), casting="unsafe")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, 8] scales, [n, 8] mins), uint8, of Q4_K's 12 bytes [n, 12] of packed 6-bit fields."""
    low, high, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & np.uint8(0x3F), (mixed & np.uint8(0x0F)) | ((low >> np.uint8(2)) & np.uint8(0x30))], axis=1)
    mins = np.concatenate([high & np.uint8(0x3F), (mixed >> np.uint8(4)) | ((high >> np.uint8(2)) & np.uint8(0x30))], axis=1)
    return scales, mins


def q4_k(out: np.ndarray, raw: np.ndarray) -> None:
    """256 values a block: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
    value = (d * scale) * q - dmin * min for each 32-value sub-block, as gguf computes it."""
    blocks = raw.reshape(-1, 144)
    n = len(blocks)
    scales, mins = _k_scales(blocks[:, 4:16])
    step = (_scales(blocks, 0) * scales.astype(np.float32)).reshape(n, 4, 2, 1)  # [n, 4, 2, 1]
    low = (_scales(blocks, 2) * mins.astype(np.float32)).reshape(n, 4, 2, 1)
    values = out.reshape(n, 4, 2, 32)  # sub-block 2i: low nibbles of bytes 32i.., 2i + 1: high ones
    codes = blocks[:, 16:].reshape(n, 4, 32)
    np.multiply(codes & np.uint8(15), step[:, :, 0], out=values[:, :, 0], dtype=np.float32)
    np.multiply(codes >> np.uint8(4), step[:, :, 1], out=values[:, :, 1], dtype=np.float32)
    np.subtract(values, low, out=values)


def q6_k(out: np.ndarray, raw: np.ndarray) -> None:
    """256 values a block: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d;
    value = (d * scale) * (q - 32) for each 16-value sub-block, as gguf computes it."""
    blocks = raw.reshape(-1, 210)
    n = len(blocks)
    low = blocks[:, :128].reshape(n, 2, 2, 32)  # [n, half, 64-byte part, byte]
    high = blocks[:, 128:192].reshape(n, 2, 32)  # [n, half, byte]
    step = (_scales(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 2, 4, 2, 1)
    values = out.reshape(n, 2, 4, 2, 16)  # [n, half, quarter, sub-block in it, value]
    for quarter in range(4):
        codes = ((low[:, :, quarter % 2] >> np.uint8(4 * (quarter // 2))) & np.uint8(15)) | (
            ((high >> np.uint8(2 * quarter)) & np.uint8(3)) << np.uint8(4)
        )  # [n, 2, 32], 0..63
        q = np.subtract(codes.view(np.int8), np.int8(32)).reshape(n, 2, 2, 16)
        np.multiply(q, step[:, :, quarter], out=values[:, :, quarter], dtype=np.float32)


REFERENCE = {"Q4_0": q4_0, "Q4_1": q4_1, "Q4_K": q4_k, "Q6_K": q6_k, "F16": f16}
