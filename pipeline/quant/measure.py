"""What a scheme loses: element error, row cosine, and nearest-neighbour recall.

Everything accumulates chunk by chunk, so the full dequantized matrix never exists at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.determinism import row_norms


@dataclass(frozen=True)
class OriginalSums:
    """What the error of every scheme needs from a chunk of original rows, computed once."""

    sum_sq: float  # sum of squares, float64
    norms: np.ndarray  # [n] float64 L2 norm of each row


def original_sums(original: np.ndarray) -> OriginalSums:
    return OriginalSums(sum_sq=float(np.einsum("ij,ij->", original, original, dtype=np.float64)), norms=row_norms(original))


@dataclass(frozen=True)
class RowErrors:
    """What a chunk of dequantized rows [n, dim] loses against its original rows, row by row."""

    dots: np.ndarray  # [n] float64 original . restored
    squares: np.ndarray  # [n] float64 |restored| ** 2
    squared_error: np.ndarray  # [n] float64 sum of (restored - original) ** 2, differences in float32
    largest_error: np.ndarray  # [n] float32 max |restored - original|
    values: int  # n * dim

    @staticmethod
    def empty(n: int, dim: int) -> RowErrors:
        return RowErrors(np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.float32), n * dim)

    @property
    def norms(self) -> np.ndarray:
        """[n] float64 |restored|."""
        return np.sqrt(self.squares)

    def fill(self, original: np.ndarray, restored: np.ndarray, span: tuple[int, int]) -> None:
        """Measure rows ``span`` of [n, dim] float32 ``original`` and ``restored``, each value read
        once; the sums are float64 in a fixed order (:mod:`pipeline.quant.kernels`), so a row's
        values do not depend on the CPU, the thread count or how the rows are split."""
        from pipeline.quant.kernels import row_error_sums

        rows = slice(*span)
        row_error_sums(
            np.ascontiguousarray(original[rows], dtype=np.float32), np.ascontiguousarray(restored[rows], dtype=np.float32),
            self.dots[rows], self.squares[rows], self.squared_error[rows], self.largest_error[rows],
        )


def row_errors(original: np.ndarray, restored: np.ndarray) -> RowErrors:
    """:class:`RowErrors` of two [n, dim] float32 arrays, the row spans on every core."""
    from pipeline.core.parallel import span_map

    errors = RowErrors.empty(*original.shape)
    span_map(lambda span: errors.fill(original, restored, span), len(original))
    return errors


@dataclass
class ErrorStats:
    """Running error of dequantized rows against the original rows."""

    elements: int = 0
    clipped: int = 0
    sum_sq_error: float = 0.0
    sum_sq_signal: float = 0.0
    max_abs_error: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    rows: int = 0

    def add(self, original: np.ndarray, restored: np.ndarray, clipped: int) -> np.ndarray:
        """Fold in a chunk: ``original`` and ``restored`` [n, dim] float32; returns the row cosines [n]."""
        return self.add_chunk(row_errors(original, restored), clipped, original_sums(original))

    def add_chunk(self, errors: RowErrors, clipped: int, sums: OriginalSums) -> np.ndarray:
        """:meth:`add` with the chunk's :func:`row_errors` and the original's ``sums`` already known."""
        n = len(errors.dots)
        self.elements += errors.values
        self.clipped += clipped
        self.sum_sq_error += float(errors.squared_error.sum())
        self.sum_sq_signal += sums.sum_sq
        if n:
            self.max_abs_error = max(self.max_abs_error, float(errors.largest_error.max()))
        cosines = cosines_of(errors.dots, sums.norms, errors.norms)
        self.rows += n
        self.cosine_sum += float(cosines.sum(dtype=np.float64))
        if n:
            self.cosine_min = min(self.cosine_min, float(cosines.min()))
        return cosines

    def summary(self) -> dict[str, float | int | None]:
        n = max(self.elements, 1)
        return {
            "rmse": math.sqrt(self.sum_sq_error / n),
            "max_abs_error": self.max_abs_error,
            # null when nothing was lost (an infinite ratio has no JSON number)
            "snr_db": 10 * math.log10(self.sum_sq_signal / self.sum_sq_error) if self.sum_sq_error > 0 else None,
            "row_cosine_mean": self.cosine_sum / max(self.rows, 1),
            "row_cosine_min": self.cosine_min,
            "clipped_values": self.clipped,
            "clipped_fraction": self.clipped / n,
        }


def cosines_of(dot: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """float64 [n] cosine of each row of a with the same row of b, from their dot products and
    norms (all [n] float64); 1 for two zero rows, 0 for one."""
    both = norm_a * norm_b
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(both > 0, dot / both, np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0))
    return np.clip(cosines, -1.0, 1.0)


def inverse_of_norms(norms: np.ndarray) -> np.ndarray:
    """float32 [n]: 1 / ``norms`` (float64 [n]), 0 where a norm is 0."""
    with np.errstate(divide="ignore"):
        return np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)


def recall(expected: np.ndarray, found: np.ndarray) -> float | None:
    """Mean over queries of |expected ∩ found| / k, for id arrays [q, k]; None without queries."""
    if not len(expected):
        return None
    k = expected.shape[1]
    hits = [len(np.intersect1d(a, b, assume_unique=False)) for a, b in zip(expected, found)]
    return float(np.mean(hits)) / k


def similarity_table(vectors: np.ndarray) -> np.ndarray:
    """float64 [n, n] cosine similarity of every pair of ``vectors`` [n, dim], in a fixed order (no BLAS)."""
    from pipeline.core.determinism import cosine_table

    return cosine_table(vectors)
