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
so a fused multiply-add would change nothing either). ``nogil`` lets the row spans of
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


@numba.njit(nogil=True, cache=True)
def row_error_sums(original, restored, dots, squares, errors, largest):  # pragma: no cover - compiled
    """Fill, for each row i of ``original`` and ``restored`` ([n, dim] float32): ``dots[i]`` the
    float64 sum of original * restored, ``squares[i]`` of restored ** 2, ``errors[i]`` of the
    squared float32 difference restored - original, and ``largest[i]`` (float32) the largest
    |difference| (NaN if one is NaN)."""
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
