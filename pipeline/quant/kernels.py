"""The quantize stage's per-chunk error pass, compiled with numba: one read of both matrices.

What a scheme loses is measured on every chunk of rows: each row's dot product with its
dequantized self, the dequantized row's squared norm, the squared error, and the largest
error. Done in numpy, that was a float64 widening of both arrays, an error array and five
passes over them (about half of a coarse scheme's measuring time). Here each value is read
once.

The sums are float64 in a fixed order, so their bits do not depend on the CPU: element j of
a row goes to accumulator ``j % LANES`` in increasing j, and the accumulators are added
left to right. Without fastmath, LLVM may not reorder those additions; whether it packs the
lanes into one vector register (AVX2, AVX-512) or runs them one by one, each lane sees the
same operations, so the bits are the same (a float32 times a float32 is exact in float64,
so a fused multiply-add would change nothing either). LLVM does not pack a row's lanes, so
rows whose width is a multiple of the lanes are measured ROWS_TOGETHER at a time, their runs
of LANES values transposed side by side, and one vector instruction serves the same lane of
many rows (0.9 ns a value against 1.5 one row at a time, on an Intel Xeon with AVX-512,
rows in cache). ``nogil`` lets the row spans of
:func:`pipeline.core.parallel.span_map` run on every core; ``cache`` keeps the compiled code
beside this file.
"""

from __future__ import annotations

import numba
import numpy as np

LANES = 4


@numba.njit(nogil=True, cache=True, inline="always")
def _larger(kept, value):  # pragma: no cover - compiled
    """The larger of two float32 magnitudes, a NaN kept once it is met (as numpy's max keeps it)."""
    return value if (value > kept or value != value) else kept


def row_error_sums(original, restored, dots, squares, errors, largest):
    """Fill, for each row i of ``original`` and ``restored`` ([n, dim] float32, C-contiguous):
    ``dots[i]`` the float64 sum of original * restored, ``squares[i]`` of restored ** 2,
    ``errors[i]`` of the squared float32 difference restored - original, and ``largest[i]``
    (float32) the largest |difference| (NaN if one is NaN); the sums in the order above."""
    if original.shape[1] % LANES or not original.shape[1]:
        _row_error_sums_by_row(original, restored, dots, squares, errors, largest)
        return
    # Each run of LANES float32 values moved as one 16-byte unit (bits unchanged).
    _row_error_sums_by_rows(original.view(np.complex128), restored.view(np.complex128), dots, squares, errors, largest)


ROWS_TOGETHER = 32  # rows whose lanes are summed side by side: 128 float64 accumulators per sum


@numba.njit(nogil=True, cache=True)
def _row_error_sums_by_rows(original, restored, dots, squares, errors, largest):  # pragma: no cover - compiled
    """:func:`row_error_sums` of rows whose width is a multiple of LANES, given as complex128
    [n, dim / LANES] views (one unit per run of LANES float32 values).

    Summed one row at a time, the lanes stay scalar (LLVM does not pack them). Here
    ROWS_TOGETHER rows are transposed first, so that run g of every row lies side by side;
    then each (row, lane) accumulator adds its values in increasing g, as before, and a
    vector instruction serves many accumulators at once: the same operations in the same
    order for each, so the same bits.
    """
    n, runs = original.shape
    width = ROWS_TOGETHER * LANES
    moved_original = np.empty((runs, ROWS_TOGETHER), np.complex128)  # [runs, rows]
    moved_restored = np.empty((runs, ROWS_TOGETHER), np.complex128)
    side_original = moved_original.view(np.float32)  # [runs, rows * LANES]
    side_restored = moved_restored.view(np.float32)
    d = np.empty(width)
    s = np.empty(width)
    e = np.empty(width)
    m = np.empty(width, np.float32)
    for first in range(0, n, ROWS_TOGETHER):
        rows = min(ROWS_TOGETHER, n - first)
        for g in range(runs):
            for i in range(rows):
                moved_original[g, i] = original[first + i, g]
                moved_restored[g, i] = restored[first + i, g]
        used = rows * LANES
        d[:] = 0.0
        s[:] = 0.0
        e[:] = 0.0
        m[:] = 0.0
        for g in range(runs):
            for k in range(used):
                o, r = side_original[g, k], side_restored[g, k]
                x = r - o  # float32 difference
                d[k] += np.float64(o) * np.float64(r)
                s[k] += np.float64(r) * np.float64(r)
                e[k] += np.float64(x) * np.float64(x)
                m[k] = _larger(m[k], abs(x))
        for i in range(rows):
            k = i * LANES
            dots[first + i] = ((d[k] + d[k + 1]) + d[k + 2]) + d[k + 3]
            squares[first + i] = ((s[k] + s[k + 1]) + s[k + 2]) + s[k + 3]
            errors[first + i] = ((e[k] + e[k + 1]) + e[k + 2]) + e[k + 3]
            largest[first + i] = _larger(_larger(_larger(m[k], m[k + 1]), m[k + 2]), m[k + 3])


@numba.njit(nogil=True, cache=True)
def _row_error_sums_by_row(original, restored, dots, squares, errors, largest):  # pragma: no cover - compiled
    """:func:`row_error_sums` one row at a time, for any width."""
    n, dim = original.shape
    for i in range(n):
        d0 = d1 = d2 = d3 = 0.0
        s0 = s1 = s2 = s3 = 0.0
        e0 = e1 = e2 = e3 = 0.0
        m0 = m1 = m2 = m3 = np.float32(0.0)
        whole = dim - dim % LANES
        for j in range(0, whole, LANES):
            o0, o1, o2, o3 = original[i, j], original[i, j + 1], original[i, j + 2], original[i, j + 3]
            r0, r1, r2, r3 = restored[i, j], restored[i, j + 1], restored[i, j + 2], restored[i, j + 3]
            x0, x1, x2, x3 = r0 - o0, r1 - o1, r2 - o2, r3 - o3  # float32 differences
            d0 += np.float64(o0) * np.float64(r0)
            d1 += np.float64(o1) * np.float64(r1)
            d2 += np.float64(o2) * np.float64(r2)
            d3 += np.float64(o3) * np.float64(r3)
            s0 += np.float64(r0) * np.float64(r0)
            s1 += np.float64(r1) * np.float64(r1)
            s2 += np.float64(r2) * np.float64(r2)
            s3 += np.float64(r3) * np.float64(r3)
            e0 += np.float64(x0) * np.float64(x0)
            e1 += np.float64(x1) * np.float64(x1)
            e2 += np.float64(x2) * np.float64(x2)
            e3 += np.float64(x3) * np.float64(x3)
            m0, m1, m2, m3 = _larger(m0, abs(x0)), _larger(m1, abs(x1)), _larger(m2, abs(x2)), _larger(m3, abs(x3))
        for j in range(whole, dim):  # the last dim % LANES values, into lanes 0, 1, 2 in turn
            o, r = original[i, j], restored[i, j]
            x = r - o
            lane = j - whole
            if lane == 0:
                d0 += np.float64(o) * np.float64(r)
                s0 += np.float64(r) * np.float64(r)
                e0 += np.float64(x) * np.float64(x)
                m0 = _larger(m0, abs(x))
            elif lane == 1:
                d1 += np.float64(o) * np.float64(r)
                s1 += np.float64(r) * np.float64(r)
                e1 += np.float64(x) * np.float64(x)
                m1 = _larger(m1, abs(x))
            else:
                d2 += np.float64(o) * np.float64(r)
                s2 += np.float64(r) * np.float64(r)
                e2 += np.float64(x) * np.float64(x)
                m2 = _larger(m2, abs(x))
        dots[i] = ((d0 + d1) + d2) + d3
        squares[i] = ((s0 + s1) + s2) + s3
        errors[i] = ((e0 + e1) + e2) + e3
        largest[i] = _larger(_larger(_larger(m0, m1), m2), m3)


# Block encoders. Each computes exactly the float32 expressions of the scheme's numpy
# formulas (pipeline/quant/ggml.py, nf4.py), operation by operation, without fastmath, so
# the codes and scales are bit-identical to them; a block's values are read once.


@numba.njit(nogil=True, cache=True)
def q8_0_blocks(blocks, codes, scales):  # pragma: no cover - compiled
    """GGML Q8_0 of ``blocks`` [b, 32] float32: ``codes`` [b, 32] int8 and the float32
    ``scales`` [b] (d = max|x| / 127, before its fp16 rounding)."""
    # Round half away from zero (C's roundf): adding the float just below one half, then
    # truncating, is exact for every float32 below 2**22 in magnitude (adding 0.5 itself
    # would carry 0.49999997 up to 1).
    half = np.float32(0.5 - 2.0**-25)
    for i in range(blocks.shape[0]):
        peak = np.float32(0.0)
        for j in range(blocks.shape[1]):
            peak = _larger(peak, abs(blocks[i, j]))
        d = peak / np.float32(127.0)
        inverse = np.float32(0.0) if d == 0 else np.float32(1.0) / d
        scales[i] = d
        for j in range(blocks.shape[1]):
            scaled = blocks[i, j] * inverse
            scaled = scaled + half if scaled >= 0 else scaled - half
            codes[i, j] = np.int8(int(scaled))  # int() truncates toward zero, as np.trunc


@numba.njit(nogil=True, cache=True)
def q4_0_blocks(blocks, packed, scales):  # pragma: no cover - compiled
    """GGML Q4_0 of ``blocks`` [b, 32] float32: ``packed`` [b, 16] uint8 (byte j holds code j
    in its low nibble and code j + 16 in its high one), the float32 ``scales`` [b]
    (d = x_peak / -8, before its fp16 rounding); returns how many values clipped."""
    clipped = 0
    span = blocks.shape[1] // 2
    for i in range(blocks.shape[0]):
        at, best = 0, np.float32(-1.0)
        for j in range(blocks.shape[1]):  # the first value of largest magnitude, as argmax
            a = abs(blocks[i, j])
            if a > best or (a != a and best == best):
                at, best = j, a
        d = blocks[i, at] / np.float32(-8.0)
        inverse = np.float32(0.0) if d == 0 else np.float32(1.0) / d
        scales[i] = d
        for j in range(span):
            low = _q4_0_code(blocks[i, j] * inverse)
            high = _q4_0_code(blocks[i, j + span] * inverse)
            # Beyond +7 steps (code 15 - 8), the most the side opposite the peak reaches.
            clipped += (blocks[i, j] * inverse > np.float32(7.0)) + (blocks[i, j + span] * inverse > np.float32(7.0))
            packed[i, j] = low | (high << np.uint8(4))
    return clipped


@numba.njit(nogil=True, cache=True, inline="always")
def _q4_0_code(scaled):  # pragma: no cover - compiled
    """min(trunc(scaled + 8.5), 15) as uint8, in float32."""
    return np.uint8(min(int(scaled + np.float32(8.5)), 15))


@numba.njit(nogil=True, cache=True)
def nf4_blocks(blocks, thresholds, packed, scales):  # pragma: no cover - compiled
    """NF4 of ``blocks`` [b, 64] float32: ``packed`` [b, 32] uint8 (the first code of each pair
    in the high nibble) and the absmax ``scales`` [b]; ``thresholds`` [15] are the decision
    thresholds (pipeline.quant.nf4.NF4_THRESHOLDS): a code is how many of them the scaled
    value exceeds (NaN exceeds none). The clip to [-1, 1] bitsandbytes applies first changes
    no code, every threshold being inside."""
    width = blocks.shape[1]
    codes = np.empty(width, dtype=np.uint8)  # one block's codes, before packing
    for i in range(blocks.shape[0]):
        peak = np.float32(0.0)
        for j in range(width):
            peak = _larger(peak, abs(blocks[i, j]))
        inverse = np.float32(1.0) / peak if peak > 0 else np.float32(0.0)
        scales[i] = peak
        for j in range(width):
            scaled = blocks[i, j] * inverse
            code = 0
            for t in range(15):
                code += scaled > thresholds[t]
            codes[j] = code
        for j in range(width // 2):
            packed[i, j] = (codes[2 * j] << np.uint8(4)) | codes[2 * j + 1]


@numba.njit(nogil=True, cache=True)
def nf4_decode_blocks(packed, scales, table, out):  # pragma: no cover - compiled
    """The float32 values [b, 64] of NF4 ``packed`` [b, 32] codes with absmax ``scales`` [b]:
    ``table[code] * scale``, as the numpy lookup and product compute them."""
    for i in range(packed.shape[0]):
        scale = scales[i]
        for j in range(packed.shape[1]):
            byte = packed[i, j]
            out[i, 2 * j] = table[byte >> 4] * scale
            out[i, 2 * j + 1] = table[byte & 15] * scale
