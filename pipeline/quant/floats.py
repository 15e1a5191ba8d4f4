"""fp16 and bf16 casts, the references the integer schemes are measured against.

Their "codes" are the rounded values themselves (float32 in memory, with scale 1); the
quant file stores them in 16 bits (:mod:`pipeline.quant.layout`): fp16 as Parquet float16,
bf16 as its uint16 bit pattern (Parquet has no bfloat16).
"""

from __future__ import annotations

import numpy as np

from pipeline.quant.base import Encoded, Scheme, count_outside

FP16_MAX = np.float32(np.finfo(np.float16).max)  # 65504
BF16_MAX = np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0]  # 3.3895e38
BF16_QUIET_NAN = np.uint32(0x7FC00000)


class FloatCast(Scheme):
    code_bits = 16
    scale_bits = 0  # no scale at all
    max_finite: np.float32

    @property
    def tensor_scale(self) -> float:
        return 1.0

    def encode(self, rows: np.ndarray) -> Encoded:
        return Encoded(codes=self.round(rows), scales=None, clipped=self.beyond_range(rows))

    def beyond_range(self, rows: np.ndarray) -> int:
        """How many of ``rows`` lie beyond the largest finite value of the format."""
        return count_outside(rows, -self.max_finite, self.max_finite)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        return encoded.codes  # the rounded values themselves: nothing to write

    def round(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class FP16(FloatCast):
    name = "fp16"
    description = "IEEE half precision, round to nearest even (stored as float16)"
    max_finite = FP16_MAX
    float_format = "float16"

    def round(self, rows: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # beyond 65504 becomes inf, counted as clipped
            return rows.astype(np.float16).astype(np.float32)


class BF16(FloatCast):
    name = "bf16"
    description = "bfloat16, round to nearest even as torch does (stored as its uint16 bit pattern)"
    max_finite = BF16_MAX
    float_format = "bfloat16"

    def round(self, rows: np.ndarray) -> np.ndarray:
        return round_to_bf16(rows)


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32.

    Like torch's float -> bfloat16: add 0x7FFF plus the lowest kept bit, drop the low 16
    bits; NaN becomes the quiet NaN 0x7FC0.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    rounded &= np.uint32(0xFFFF0000)
    rounded[np.isnan(values)] = BF16_QUIET_NAN
    return rounded.view(np.float32)
