"""What a scheme loses: element error, row cosine, and nearest-neighbour recall.

Everything accumulates chunk by chunk, so the full dequantized matrix never exists at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.determinism import row_norms


@dataclass(frozen=True)
class OriginalSums:
    """What the error of every scheme needs from a chunk of original rows, computed once."""

    sum_sq: float  # sum of squares, float64
    norms: np.ndarray  # [n] float64 L2 norm of each row


def original_sums(original: np.ndarray) -> OriginalSums:
    return OriginalSums(sum_sq=float(np.einsum("ij,ij->", original, original, dtype=np.float64)), norms=row_norms(original))


CAST_ROWS = 256  # rows widened to float64 at a time: 4 MB at dim 2048


def row_dots_and_norms(original: np.ndarray, restored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ([n] original . restored, [n] |restored|) of the rows of two [n, dim] float32 arrays.

    Each block of rows is widened to float64 once and shared by both sums, where
    ``np.einsum(..., dtype=np.float64)`` would widen restored three times; a row's sum does
    not depend on the blocks, so the values are those of that call to the bit.
    """
    dots, squares = np.empty(len(original)), np.empty(len(original))  # [n], [n]
    for start in range(0, len(original), CAST_ROWS):
        block = slice(start, start + CAST_ROWS)
        wide = restored[block].astype(np.float64)  # [b, dim]
        dots[block] = np.einsum("ij,ij->i", original[block].astype(np.float64), wide)
        squares[block] = np.einsum("ij,ij->i", wide, wide)
    return dots, np.sqrt(squares)


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
    # One error buffer for every chunk: a fresh one per chunk would leave a freed copy in
    # each thread's malloc arena that measures.
    _scratch: np.ndarray | None = field(default=None, repr=False, compare=False)

    def add(self, original: np.ndarray, restored: np.ndarray, clipped: int) -> np.ndarray:
        """Fold in a chunk: ``original`` and ``restored`` [n, dim] float32; returns the row cosines [n]."""
        return self.add_chunk(original, restored, clipped, original_sums(original), *row_dots_and_norms(original, restored))

    def add_chunk(
        self, original: np.ndarray, restored: np.ndarray, clipped: int, sums: OriginalSums, dots: np.ndarray, norms: np.ndarray
    ) -> np.ndarray:
        """:meth:`add` with the original's ``sums`` and :func:`row_dots_and_norms` already known."""
        error = np.subtract(restored, original, out=self._error_buffer(original.shape))  # [n, dim]
        self.elements += original.size
        self.clipped += clipped
        self.sum_sq_error += float(np.einsum("ij,ij->", error, error, dtype=np.float64))
        self.sum_sq_signal += sums.sum_sq
        if error.size:
            self.max_abs_error = max(self.max_abs_error, float(np.abs(error, out=error).max()))
        cosines = cosines_of(dots, sums.norms, norms)
        self.rows += len(cosines)
        self.cosine_sum += float(cosines.sum(dtype=np.float64))
        if len(cosines):
            self.cosine_min = min(self.cosine_min, float(cosines.min()))
        return cosines

    def _error_buffer(self, shape: tuple[int, int]) -> np.ndarray:
        """float32 ``shape`` [n, dim], reusing the buffer of earlier (as large) chunks."""
        size = shape[0] * shape[1]
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=np.float32)
        return self._scratch[:size].reshape(shape)

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
