"""The stats stage's 64-bit row hash, compiled with numba: each value read once.

A row's hash is sum_j bits_j * w_j modulo 2**64, ``bits`` the float32 bits of the row after
adding 0.0 (which folds -0.0 into 0.0, as the exact comparison that confirms a match does)
and ``w`` fixed odd weights. In numpy that was a folded copy, a widening to uint64 and an
integer matmul that numpy runs without BLAS, three passes of eight bytes a value. Integer
addition modulo 2**64 is associative, so LLVM may vectorise and reorder the sum freely:
the hash is the same number on every CPU and in any order.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _row_hashes(rows, weights, out):  # pragma: no cover - compiled
    for i in range(rows.shape[0]):
        total = np.uint64(0)
        for j in range(rows.shape[1]):
            folded = np.float32(rows[i, j] + np.float32(0.0))  # -0.0 + 0.0 == +0.0
            total += np.uint64(folded.view(np.uint32)) * weights[j]
        out[i] = total


def row_hashes(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[n] uint64: the hash of each row of ``rows`` [n, dim] float32 under ``weights`` [dim] uint64."""
    out = np.empty(rows.shape[0], np.uint64)
    _row_hashes(np.ascontiguousarray(rows, dtype=np.float32), np.ascontiguousarray(weights, dtype=np.uint64), out)
    return out
