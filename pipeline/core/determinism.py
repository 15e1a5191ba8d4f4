"""Numbers that come out the same from every BLAS kernel, thread count and run.

A BLAS product (``@``, gemm, syrk, gemv) adds its terms in an order chosen by the kernel
the library picked for this CPU (``OPENBLAS_CORETYPE``) and by how it split the work among
threads, so its last bits differ between machines. What the pipeline publishes is kept
free of that in one of two ways:

* **exact**: the value is computed by numpy's own loops, which add in one fixed order
  whatever the CPU or thread count (:func:`row_dots`, :func:`dot_rows`, :func:`cosine_table`),
  and rankings are decided on those float64 values with a total tie rule. A float32 or
  bfloat16 BLAS product may still *screen* candidates, as long as a rigorous bound on its
  error (:func:`float32_dot_error`) proves that nothing it left out could have ranked;
* **rounded**: where a LAPACK solver is unavoidable (eigenvectors, an SVD), its last bits
  vary with the kernel; the pipeline first makes those last bits as small as float64 allows
  and then publishes the value on a fixed grid (:func:`quantize`, :func:`scale_quantum`:
  ``PUBLISHED_BITS`` binary digits below the values' scale) or to stated decimal digits
  (:func:`round_decimal`). Two machines then write different bytes only if their results
  fall on either side of a midpoint between grid points, which for a variation of ~1e-15 and a grid of ~1e-6
  happens about once in 10^9 values.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32
PAIR_ROWS = 1024  # pairs scored at a time by :func:`row_dots`: bounded temporaries (8 MB at dim 2048)


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [n]: the dot product of row i of ``a`` with row i of ``b`` (both [n, dim]).

    Summed by numpy's einsum loop (no BLAS): the same bits on every CPU and thread count.
    float32 inputs are multiplied exactly in float64 (24 + 24 bits fit in 53).
    """
    out = np.empty(len(a), np.float64)
    for start in range(0, len(a), PAIR_ROWS):
        stop = start + PAIR_ROWS
        out[start:stop] = np.einsum("ij,ij->i", a[start:stop], b[start:stop], dtype=np.float64)
    return out


def row_dots_at(a: np.ndarray, a_rows: np.ndarray, b: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
    """float64 [m]: ``row_dots(a[a_rows], b[b_rows])``, gathering a few thousand rows at a time."""
    out = np.empty(len(a_rows), np.float64)
    for start in range(0, len(a_rows), PAIR_ROWS):
        stop = start + PAIR_ROWS
        out[start:stop] = row_dots(a[a_rows[start:stop]], b[b_rows[start:stop]])
    return out


def row_norms(rows: np.ndarray) -> np.ndarray:
    """float64 [n]: the L2 norm of each row of ``rows`` [n, dim], in a fixed order (no BLAS)."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))


def dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """float64 [n]: ``rows @ vector`` ([n, dim] times [dim]) in a fixed order (no BLAS)."""
    return np.einsum("ij,j->i", rows, np.asarray(vector, np.float64), dtype=np.float64)


def cosine_table(vectors: np.ndarray) -> np.ndarray:
    """float64 [w, w]: cosine of every pair of rows of a small ``vectors`` [w, dim], in a fixed order.

    Exactly symmetric, clipped to [-1, 1], 1 on the diagonal; a zero row has cosine 0 with
    everything, itself included. For a handful of word vectors, not for a vocabulary.
    """
    wide = np.asarray(vectors, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))  # [w]
    unit = wide * np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)[:, None]
    upper_a, upper_b = np.triu_indices(len(unit))
    dots = row_dots(unit[upper_a], unit[upper_b])
    table = np.zeros((len(unit), len(unit)))
    table[upper_a, upper_b] = dots
    table[upper_b, upper_a] = dots
    np.fill_diagonal(table, (norms > 0).astype(np.float64))
    return np.clip(table, -1.0, 1.0)


def float32_dot_error(dim: int) -> float:
    """A bound on |float32 BLAS dot - exact dot| for two float32 vectors of norm <= 1 + 2^-20.

    Any summation order, with or without FMA: |error| <= gamma_dim * sum |x_i y_i| with
    gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 3.1), and sum |x_i y_i| <=
    |x| |y| by Cauchy-Schwarz; the result's own rounding to float32 adds u. Bigger than any
    error seen in practice by a factor of ~sqrt(dim), which is what makes it safe.
    """
    n_u = dim * FLOAT32_UNIT
    if n_u >= 0.5:
        return math.inf
    return n_u / (1 - n_u) * (1 + 2.0**-20) ** 2 + FLOAT32_UNIT + 1e-12


PUBLISHED_BITS = 20  # values that went through a LAPACK solver keep this many bits below their scale


def quantize(values: np.ndarray, quantum: np.ndarray | float) -> np.ndarray:
    """float64 ``values`` rounded to the nearest multiple of ``quantum`` (powers of two, scalar or
    broadcast), ties to even: exact arithmetic, so the result depends on the value alone."""
    return np.rint(np.asarray(values, np.float64) / quantum) * quantum


def scale_quantum(scale: np.ndarray | float, bits: int = PUBLISHED_BITS) -> np.ndarray:
    """2^(e - bits) where 2^(e-1) <= |scale| < 2^e: a grid ``bits`` binary digits below ``scale``
    (1 where the scale is 0 or not finite)."""
    scale = np.abs(np.asarray(scale, np.float64))
    _, exponent = np.frexp(np.where(np.isfinite(scale) & (scale > 0), scale, 1.0))
    return np.ldexp(1.0, exponent - bits)


def round_decimal(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant decimal digits, as JSON writes it (inf, NaN unchanged)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def top_k_pairs(query: np.ndarray, row: np.ndarray, score: np.ndarray, queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [queries, k], scores [queries, k]): each query's k best (query, row, score) triples.

    The tie rule of every ranking the pipeline publishes: higher score first, then the lower
    row id. -1 and -inf where a query has fewer than k. A (query, row) pair must appear once.
    """
    order = np.lexsort((row, -score, query))
    query, row, score = query[order], row[order], score[order]
    rank = np.arange(len(query)) - np.searchsorted(query, query)  # position within its query
    top = rank < k
    ids = np.full((queries, k), -1, dtype=np.int64)
    scores = np.full((queries, k), -np.inf)
    ids[query[top], rank[top]] = row[top]
    scores[query[top], rank[top]] = score[top]
    return ids, scores
