"""What a scheme loses: element error, row cosine, and nearest-neighbour recall.

Everything accumulates chunk by chunk, so the full dequantized matrix never exists at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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
        error = restored - original  # [n, dim]
        self.elements += original.size
        self.clipped += clipped
        self.sum_sq_error += float(np.einsum("ij,ij->", error, error, dtype=np.float64))
        self.sum_sq_signal += float(np.einsum("ij,ij->", original, original, dtype=np.float64))
        if error.size:
            self.max_abs_error = max(self.max_abs_error, float(np.abs(error, out=error).max()))
        cosines = row_cosines(original, restored)
        self.rows += len(cosines)
        self.cosine_sum += float(cosines.sum(dtype=np.float64))
        if len(cosines):
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


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [n] cosine of each row of ``a`` with the same row of ``b``; 1 for two zero rows, 0 for one."""
    dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    norm_a = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    norm_b = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    both = norm_a * norm_b
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(both > 0, dot / both, np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0))
    return np.clip(cosines, -1.0, 1.0)


def inverse_norms(rows: np.ndarray) -> np.ndarray:
    """float32 [n]: 1 / L2 norm of each row, 0 for zero rows (their cosine with anything is 0)."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    with np.errstate(divide="ignore"):
        return np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows * inverse_norms(rows)[:, None]


@dataclass
class TopK:
    """Running exact top-k by cosine of each query over the rows seen so far.

    ``queries`` [q, dim] are unit vectors; ``self_rows`` [q] is the matrix row a query
    came from (-1 for none), which is never its own neighbour.
    """

    queries: np.ndarray
    self_rows: np.ndarray
    k: int
    ids: np.ndarray = field(init=False)  # [q, k] int64 row indices
    scores: np.ndarray = field(init=False)  # [q, k] float32 cosines

    def __post_init__(self) -> None:
        q = len(self.queries)
        self.ids = np.full((q, self.k), -1, dtype=np.int64)
        self.scores = np.full((q, self.k), -np.inf, dtype=np.float32)

    def add(self, start: int, rows: np.ndarray) -> None:
        """Fold in matrix rows ``start .. start + len(rows)`` (not normalised)."""
        n = len(rows)
        if not len(self.queries) or not n:
            return
        # [q, n] rather than [n, q]: the partition below then runs along contiguous memory.
        scores = self.queries @ rows.T
        scores *= inverse_norms(rows)[None, :]
        inside = (self.self_rows >= start) & (self.self_rows < start + n)
        scores[np.nonzero(inside)[0], self.self_rows[inside] - start] = -np.inf
        take = min(self.k, n)
        best = np.argpartition(scores, n - take, axis=1)[:, n - take :]  # [q, take], unordered
        candidate_scores = np.concatenate([self.scores, np.take_along_axis(scores, best, axis=1)], axis=1)  # [q, k + take]
        candidate_ids = np.concatenate([self.ids, best + start], axis=1)
        keep = np.argpartition(candidate_scores, -self.k, axis=1)[:, -self.k :]  # [q, k]
        self.scores = np.take_along_axis(candidate_scores, keep, axis=1)
        self.ids = np.take_along_axis(candidate_ids, keep, axis=1)


def recall(expected: np.ndarray, found: np.ndarray) -> float | None:
    """Mean over queries of |expected ∩ found| / k, for id arrays [q, k]; None without queries."""
    if not len(expected):
        return None
    k = expected.shape[1]
    hits = [len(np.intersect1d(a, b, assume_unique=False)) for a, b in zip(expected, found)]
    return float(np.mean(hits)) / k


def similarity_table(vectors: np.ndarray) -> np.ndarray:
    """float64 [n, n] cosine similarity of every pair of ``vectors`` [n, dim]."""
    unit = unit_rows(vectors.astype(np.float64))
    return unit @ unit.T
