"""fp16 and bf16 casts, the references the integer schemes are measured against.

Their codes are the rounded values in 16 bits, as the quant file stores them
(:mod:`pipeline.quant.layout`): fp16 as IEEE float16, bf16 as its uint16 bit pattern (the high
half of the float32 value; numpy has no bfloat16). Decoding widens them back, exactly.
"""

from __future__ import annotations

import numpy as np

from pipeline.quant.base import Encoded, Scheme, count_outside

FP16_MAX = np.float32(np.finfo(np.float16).max)  # 65504
BF16_MAX = np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0]  # 3.3895e38


class FloatCast(Scheme):
    code_bits = 16
    scale_bits = 0  # no scale at all
    max_finite: np.float32

    @property
    def tensor_scale(self) -> float:
        return 1.0

    def encode(self, rows: np.ndarray) -> Encoded:
        return Encoded(codes=self.narrow(rows), scales=None, clipped=self.beyond_range(rows))

    def beyond_range(self, rows: np.ndarray) -> int:
        """How many of ``rows`` lie beyond the largest finite value of the format."""
        return count_outside(rows, -self.max_finite, self.max_finite)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        return self.widen(encoded.codes, out)

    def round(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``rows`` rounded to the format, as float32."""
        return self.widen(self.narrow(rows))

    def narrow(self, rows: np.ndarray) -> np.ndarray:
        """The 16-bit codes of float32 ``rows``, rounded to nearest even."""
        raise NotImplementedError

    def widen(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 values of 16-bit ``codes`` (exact), into ``out`` when given."""
        raise NotImplementedError


class FP16(FloatCast):
    name = "fp16"
    description = "IEEE half precision, round to nearest even (stored as float16)"
    max_finite = FP16_MAX
    float_format = "float16"

    def narrow(self, rows: np.ndarray) -> np.ndarray:
        # torch's cast is numpy's (IEEE round to nearest even, subnormals kept, beyond 65504
        # inf, counted as clipped) on the CPU's conversion instructions, where numpy's
        # converts one value at a time.
        import torch

        source = torch.from_numpy(_writable(np.ascontiguousarray(rows, dtype=np.float32)))
        return source.to(torch.float16).numpy()

    def widen(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        import torch

        halves = torch.from_numpy(_writable(np.ascontiguousarray(codes, dtype=np.float16)))
        if out is None:
            return halves.float().numpy()
        torch.from_numpy(out).copy_(halves)
        return out


def _writable(values: np.ndarray) -> np.ndarray:
    """``values``, copied if read-only (a memory-mapped matrix, codes read from a file):
    torch warns on a read-only array even where it only reads it."""
    return values if values.flags.writeable else values.copy()


class BF16(FloatCast):
    name = "bf16"
    description = "bfloat16, round to nearest even as torch does (stored as its uint16 bit pattern)"
    max_finite = BF16_MAX
    float_format = "bfloat16"

    def narrow(self, rows: np.ndarray) -> np.ndarray:
        return bf16_bits(rows)

    def widen(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return widen_bf16_bits(codes, out)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16: the bit patterns of float32 ``values`` rounded to the nearest bfloat16 (ties to even).

    Like torch's float -> bfloat16: add 0x7FFF plus the lowest kept bit, keep the high 16
    bits; NaN becomes the quiet NaN 0x7FC0 (:mod:`pipeline.core.bfloat16`, one pass).
    """
    from pipeline.core.bfloat16 import bfloat16_bits_of

    source = np.ascontiguousarray(values, dtype=np.float32)
    high = np.empty(source.shape, dtype=np.uint16)
    bfloat16_bits_of(source, high)
    return high


def widen_bf16_bits(codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of bfloat16 bit patterns ``codes`` (uint16), exactly; into ``out`` when given."""
    wide = np.empty(codes.shape, np.float32) if out is None else out
    np.left_shift(codes, np.uint32(16), out=wide.view(np.uint32), dtype=np.uint32)
    return wide


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32 (see :func:`bf16_bits`)."""
    return widen_bf16_bits(bf16_bits(values))
