"""GGML's Q8_0 and Q4_0 block formats, bit-exact with the ``gguf`` package's encoder.

Both cut each row into blocks of 32 values with one fp16 scale ``d`` per block:

* Q8_0: ``d = max|x| / 127``, code ``round(x / d)`` with ties away from zero, int8;
* Q4_0: ``d = x_peak / -8`` where ``x_peak`` is the value of largest magnitude (signed, first
  one on ties), code ``trunc(x / d + 8.5)`` clamped to 0..15, stored as ``code - 8``
  steps. The peak sits at code 0 (-8 steps) and the opposite side only reaches +7 steps,
  so values beyond ``7 |d|`` on that side clip.

Codes are computed with the float32 ``d`` and then ``d`` is rounded to fp16, as GGML does;
dequantization is ``fp16(d) * code``. The encoders run as compiled kernels
(:mod:`pipeline.quant.kernels`) that compute those float32 expressions exactly, rounding
half away from zero as C's ``roundf`` (GGML's rounding).
:func:`ggml_blocks` lays codes and scales out as the bytes GGUF stores.
"""

from __future__ import annotations

import numpy as np

from pipeline.quant.base import (
    Encoded,
    Scheme,
    as_float32,
    scale_blocks,
    unpack_nibbles,
)

GGML_BLOCK = 32


class Q8_0(Scheme):
    name = "q8_0"
    description = "GGML Q8_0: blocks of 32, fp16 scale max|x|/127, int8 codes rounded half away from zero"
    code_bits = 8
    block = GGML_BLOCK
    scale_bits = 16
    scale_format = "float16"

    def encode(self, rows: np.ndarray) -> Encoded:
        from pipeline.quant.kernels import q8_0_blocks

        n, dim = rows.shape
        blocks = _blocks(rows)  # [n * dim / 32, 32]
        codes = np.empty(blocks.shape, dtype=np.int8)  # [blocks, 32]
        d = np.empty(len(blocks), dtype=np.float32)  # [blocks]
        q8_0_blocks(blocks, codes, d)
        return Encoded(codes=codes.reshape(n, dim), scales=_fp16_exact(d).reshape(n, -1), clipped=0)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        return scale_blocks(as_float32(encoded.codes, out), encoded.scales)


class Q4_0(Scheme):
    name = "q4_0"
    description = "GGML Q4_0: blocks of 32, fp16 scale d = x_peak/-8, codes trunc(x/d + 8.5) clamped to 0..15, x = (code - 8) d"
    code_bits = 4
    block = GGML_BLOCK
    scale_bits = 16
    scale_format = "float16"
    offset = 8
    low_nibble_first = True  # byte j of a block holds code j (low nibble) and code j + 16 (high)
    nibble_span = GGML_BLOCK // 2

    def encode(self, rows: np.ndarray) -> Encoded:
        from pipeline.quant.kernels import q4_0_blocks

        n, dim = rows.shape
        blocks = _blocks(rows)  # [n * dim / 32, 32]
        packed = np.empty((len(blocks), GGML_BLOCK // 2), dtype=np.uint8)  # [blocks, 16]
        d = np.empty(len(blocks), dtype=np.float32)  # [blocks], signed
        clipped = q4_0_blocks(blocks, packed, d)
        return Encoded(codes=packed.reshape(n, -1), scales=_fp16_exact(d).reshape(n, -1), clipped=int(clipped))

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        codes = unpack_nibbles(encoded.codes, self.nibble_span, self.low_nibble_first)
        values = as_float32(codes, out)  # [n, dim]
        values -= np.float32(self.offset)
        return scale_blocks(values, encoded.scales)


def ggml_blocks(encoded: Encoded, scheme: Scheme) -> np.ndarray:
    """uint8 [n, bytes per row]: each block's fp16 scale then its codes, as GGUF stores them."""
    n = encoded.codes.shape[0]
    scales = encoded.scales.astype(np.float16).view(np.uint8).reshape(n, -1, 2)  # [n, blocks, 2]
    codes = encoded.codes.view(np.uint8).reshape(n, scales.shape[1], -1)  # [n, blocks, code bytes]
    return np.concatenate([scales, codes], axis=2).reshape(n, -1)


def _blocks(rows: np.ndarray) -> np.ndarray:
    """float32 [n * dim / 32, 32]: the GGML blocks of ``rows`` [n, dim]."""
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, GGML_BLOCK)


def _fp16_exact(d: np.ndarray) -> np.ndarray:
    """The fp16 scales GGML stores, widened to float32 without loss."""
    return d.astype(np.float16).astype(np.float32)
