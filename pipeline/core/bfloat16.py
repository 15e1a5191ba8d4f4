"""Rounding float32 to bfloat16, compiled with numba: the quantize stage's bf16 codes and
the bounded screen's row directions, each value read once.

Rounding is to nearest, ties to even, on the bits, as torch's float -> bfloat16 cast does
(:func:`bfloat16_bits`). For the screen (:mod:`pipeline.core.screen`) a chunk's rows are
scaled to unit length, rounded and their rounding residual measured in one pass, which in
torch took five (scale, round, widen, subtract, norm), about as long as the bfloat16
product they feed; the residual is used only for the screen's error bound (a bound on it).
"""

from __future__ import annotations

import numba
import numpy as np

# Covers the float64 rounding of residual_bound's own division and square root.
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


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def bfloat16_directions(rows, inverse, bits):  # pragma: no cover - compiled
    """Fill ``bits`` [n, dim] (uint16, bfloat16 patterns) with ``rows`` [n, dim] float32 times
    their float32 ``inverse`` [n], rounded; return an upper bound on the largest rounding
    residual |round(x) - x| of a row (NaN rows, whose bound nothing uses, left out).

    The squared residuals are summed in float32 in whatever order LLVM vectorises them
    (``reassoc``; a strict float64 chain ran at a seventh of the speed). The bits do not
    depend on it; the bound covers every order (:func:`residual_bound`) and is the only use
    of the sum, so no output does either.
    """
    largest = 0.0
    dim = rows.shape[1]
    for i in range(rows.shape[0]):
        scale = inverse[i]
        squares = np.float32(0.0)
        for j in range(dim):
            x = rows[i, j] * scale  # float32
            b = bfloat16_bits(x)
            bits[i, j] = b
            # round(x) - x is exact in float32: the two are within a factor of two.
            r = np.uint32(np.uint32(b) << np.uint32(16)).view(np.float32) - x
            squares += r * r
        residual = residual_bound(squares, dim)
        if residual > largest:
            largest = residual
    return largest


@numba.njit(nogil=True, cache=True, inline="always")
def residual_bound(squares, terms):  # pragma: no cover - compiled
    """An upper bound on sqrt(sum of ``terms`` exact squares) from their float32 sum ``squares``
    taken in any order: each rounding (of a square, of an addition) loses at most a factor
    (1 - u), u = 2**-24, on these non-negative terms, at most ``terms`` times on any of them,
    so the true sum is at most squares / (1 - terms * u); a square that underflows loses at
    most 2**-150 more. RESIDUAL_MARGIN covers the float64 division and square root."""
    total = np.float64(squares) + terms * 2.0**-149
    return np.sqrt(total / (1.0 - terms * 2.0**-24)) * RESIDUAL_MARGIN


@numba.njit(nogil=True, cache=True)
def bfloat16_bits_of(values, bits):  # pragma: no cover - compiled
    """Fill ``bits`` (uint16) with the :func:`bfloat16_bits` of each of ``values`` (float32, both C-contiguous)."""
    flat, out = values.reshape(-1), bits.reshape(-1)
    for j in range(flat.size):
        out[j] = bfloat16_bits(flat[j])
