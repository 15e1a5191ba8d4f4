"""Rounding float32 to bfloat16, compiled with numba: the quantize stage's bf16 codes and
the bounded screen's row directions, each value read once.

Rounding is to nearest, ties to even, on the bits, as torch's float -> bfloat16 cast does
(:func:`bfloat16_bits`). For the screen (:mod:`pipeline.core.screen`) a chunk's rows are
scaled to unit length, rounded and their rounding residual measured in one pass, which in
torch took five (scale, round, widen, subtract, norm), about as long as the bfloat16
product they feed; the residual is used only for the screen's error bound, summed in float64.
"""

from __future__ import annotations

import numba
import numpy as np

# The float64 sum of a row's squared residuals is within dim * 2**-53 of the true one;
# this margin covers that, and the square root's rounding, for any row width in use.
RESIDUAL_MARGIN = 1 + 1e-9


@numba.njit(nogil=True, cache=True, inline="always")
def bfloat16_bits(value):  # pragma: no cover - compiled
    """The bit pattern (uint16) of float32 ``value`` rounded to the nearest bfloat16, ties to
    even: add 0x7FFF plus the lowest kept bit, keep the high half; NaN becomes 0x7FC0."""
    if value != value:
        return np.uint16(0x7FC0)
    word = np.uint32(np.float32(value).view(np.uint32))
    rounded = word + np.uint32(0x7FFF) + ((word >> np.uint32(16)) & np.uint32(1))
    return np.uint16(rounded >> np.uint32(16))


@numba.njit(nogil=True, cache=True)
def bfloat16_directions(rows, inverse, bits):  # pragma: no cover - compiled
    """Fill ``bits`` [n, dim] (uint16, bfloat16 patterns) with ``rows`` [n, dim] float32 times
    their float32 ``inverse`` [n], rounded; return the largest rounding residual
    |round(x) - x| of a row (NaN rows, whose bound nothing uses, left out)."""
    largest = 0.0
    for i in range(rows.shape[0]):
        scale = inverse[i]
        squares = 0.0
        for j in range(rows.shape[1]):
            x = rows[i, j] * scale  # float32
            b = bfloat16_bits(x)
            bits[i, j] = b
            # round(x) - x is exact in float32: the two are within a factor of two.
            r = np.float64(np.uint32(np.uint32(b) << np.uint32(16)).view(np.float32) - x)
            squares += r * r
        residual = np.sqrt(squares) * RESIDUAL_MARGIN
        if residual > largest:
            largest = residual
    return largest


@numba.njit(nogil=True, cache=True)
def bfloat16_bits_of(values, bits):  # pragma: no cover - compiled
    """Fill ``bits`` (uint16) with the :func:`bfloat16_bits` of each of ``values`` (float32, both C-contiguous)."""
    flat, out = values.reshape(-1), bits.reshape(-1)
    for j in range(flat.size):
        out[j] = bfloat16_bits(flat[j])
