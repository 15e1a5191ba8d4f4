"""Exact top-k neighbours by cosine: a bfloat16 screen, then float64 scores for the few rows it keeps.

Measuring a coarse scheme's recall scores every dequantized row against every query
(about a thousand queries x the vocabulary x dim multiply-adds), which in float32 was most
of the quantize stage. Where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX) the
same product runs about four times faster, and the error of each of its scores has a bound
that holds for every (query, row) pair:

    |screen score - cosine| <= E + c |screen score|

A row can then be among query q's k best only if its screen score plus that bound reaches
L_q, a lower bound on q's k-th best cosine (from the exact scores kept so far and this
chunk's best screen scores minus their bound). The rows that pass, a few dozen per query
over the whole vocabulary, are scored in float64 straight away and merged into the
query's running top k, so the result is the exact top k by cosine, not an approximation.
Without native bfloat16 the screen runs in float32, where the bound is nearly zero and this
is the plain exact search.

The bound, for a float32 unit query u and a row r of direction w = r / |r|:

* the query is rounded to the screen's type once: e_q = |round(u) - u|, measured;
* the row is scaled by its float32 inverse norm (relative error below 2^-23 per value) and
  rounded: |round(r * inv) - w| <= f, the largest rounding residual of the chunk's rows,
  measured, plus 2^-22;
* so the exact product of the rounded vectors is within e_q (1 + f) + |u| f of the cosine;
* accumulated in float32 over dim terms in any order, the computed product is within
  gamma (|u| + e_q)(1 + f) of the exact one, gamma = dim 2^-24 / (1 - dim 2^-24);
* a bfloat16 result is rounded once more, relative error c' <= 2^-7 (one more bit than
  round-to-nearest needs, so truncation is covered too): c = c' / (1 - c').

Every pair scored exactly is checked against its bound; a kernel that broke it (one that
does not accumulate in float32) makes :meth:`ScreenedTopK.finish` report failure, and the
caller runs the plain float32 search instead.

Asked to ``keep`` more, it also keeps each query's best rows by screen score, with the
bound: every row left out has a cosine of at most the lowest kept score plus its bound.
The quantize stage prunes the recall of fine schemes with those lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.quant.measure import row_norms

FLOAT32_UNIT = 2.0**-24
SCALING = 2.0**-22  # |r * inv - w| / |w| for float32 inv and products, with margin
TINY = 1e-30  # flushed subnormal products and inputs: at most dim * 2^-126 in all
DIRECTION_ROWS = 512  # rows scaled and rounded at a time: 4 MB of float32 at dim 2048
RESCORE_PAIRS = 1024  # (query, row) pairs gathered at a time for their float64 score
RESCORE_ROWS = 2048  # rows restored at a time to score pairs after the pass


def native_bfloat16() -> bool:
    """Whether torch multiplies bfloat16 natively here (else it emulates it, slower than float32)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


@dataclass(frozen=True)
class ScreenPrecision:
    """The screen's number type and the constants of its error bound."""

    dtype: Any  # torch.bfloat16 or torch.float32
    rounds: bool  # whether float32 values change when stored as dtype
    out: float  # c: relative error of a result, against its own magnitude

    @staticmethod
    def choose() -> ScreenPrecision:
        import torch

        if native_bfloat16():
            output = 2.0**-7
            return ScreenPrecision(torch.bfloat16, True, output / (1 - output))
        return ScreenPrecision(torch.float32, False, 0.0)


def _inverse_norms(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n] inverse norms, bool [n] rows without a direction) from float64 ``norms`` [n].

    Zero rows keep inverse 0 (cosine 0 with everything, as before); rows with an infinite
    or NaN value, or a norm too small for a float32 inverse, have no usable direction and
    are never anyone's neighbour.
    """
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)  # [n]
    broken = ~np.isfinite(norms) | ~np.isfinite(inverse)  # [n]
    inverse[broken] = 0
    return inverse, broken


def _rounded_directions(
    rows: np.ndarray, inverse: np.ndarray, broken: np.ndarray, precision: ScreenPrecision, target: Any
) -> float:
    """Fill ``target`` (torch [n, dim]) with each row times its inverse norm, rounded to the
    screen's type (broken rows zero); return the largest rounding residual |round(x) - x| of a row.

    Done a few hundred rows at a time, so the float32 product never exists whole and the
    residual is measured while the piece is in cache.
    """
    import torch

    n = len(rows)
    source, scale = torch.from_numpy(rows), torch.from_numpy(inverse)
    largest = 0.0
    for start in range(0, n, DIRECTION_ROWS):
        stop = min(start + DIRECTION_ROWS, n)
        part = source[start:stop] * scale[start:stop, None]  # [b, dim] float32
        part[torch.from_numpy(broken[start:stop])] = 0  # inf * 0 is NaN
        target[start:stop] = part
        if precision.rounds:
            # x - round(x) is exact in float32 (the two are within a factor of two); the
            # float32 norm of it is within 1e-3 of the true one.
            part -= target[start:stop].float()
            largest = max(largest, float(torch.linalg.vector_norm(part, dim=1).max()) * (1 + 1e-3))
    return largest


@dataclass
class ScreenedTopK:
    """Running exact top-k by cosine of each query over the rows added so far.

    ``queries`` [q, dim] are unit vectors (zero for a query without a direction);
    ``self_rows`` [q] is the matrix row a query came from (-1 for none), never its own
    neighbour. :meth:`add` takes rows chunk by chunk; :meth:`finish` fills ``ids`` [q, k]
    and ``scores`` [q, k] (float64 cosines), best first, the lower row id first on a tie.
    """

    queries: np.ndarray
    self_rows: np.ndarray
    k: int
    precision: ScreenPrecision | None = None
    keep: int = 0  # best rows by screen score to keep per query (candidate_* after finish)
    ids: np.ndarray = field(init=False)
    scores: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        import torch

        q = len(self.queries)
        self.precision = self.precision or ScreenPrecision.choose()
        self.ids = np.full((q, self.k), -1, dtype=np.int64)
        self.scores = np.full((q, self.k), -np.inf)
        norms = row_norms(self.queries)  # [q]
        # A query without a direction scores 0 against every row: nothing to screen.
        self.screened = np.flatnonzero(np.isfinite(norms) & (norms > 0))  # [s] query indices
        self.units = np.ascontiguousarray(self.queries[self.screened])  # [s, dim] float32
        self.wide_units = self.units.astype(np.float64)  # [s, dim], for the exact scores
        self.rounded = torch.from_numpy(self.units).to(self.precision.dtype)  # [s, dim]
        shift = self.rounded.double() - torch.from_numpy(self.units).double()
        self.query_error = torch.linalg.vector_norm(shift, dim=1).numpy()  # [s] e_q
        self.query_norms = norms[self.screened]  # [s] |u|
        self.own = self.self_rows[self.screened]  # [s]
        self.best_ids = np.full((len(self.screened), self.k), -1, dtype=np.int64)  # [s, k]
        self.best_scores = np.full((len(self.screened), self.k), -np.inf)  # [s, k] float64 cosines
        self.rows_seen = 0
        self.broken_rows: list[np.ndarray] = []
        self.bound_held = True
        # Reused by every chunk, so no chunk leaves freed copies in the allocator.
        self._directions = torch.empty(0, dtype=self.precision.dtype)
        self._screen = torch.empty(0, dtype=self.precision.dtype)
        self.kept_ids = np.full((len(self.screened), self.keep), -1, dtype=np.int64)  # [s, keep]
        self.kept_scores = np.full((len(self.screened), self.keep), -np.inf, dtype=np.float32)  # [s, keep] screen scores
        self.kept_slack = np.zeros(len(self.screened))  # [s]: the largest E of the chunks

    def _buffers(self, n: int, dim: int) -> tuple[Any, Any]:
        """(directions [n, dim], screen [s, n]) views of the reused buffers, grown when needed."""
        import torch

        s = len(self.screened)
        if self._directions.numel() < n * dim:
            self._directions = torch.empty(n * dim, dtype=self.precision.dtype)
        if self._screen.numel() < s * n:
            self._screen = torch.empty(s * n, dtype=self.precision.dtype)
        return self._directions[: n * dim].view(n, dim), self._screen[: s * n].view(s, n)

    def _slack(self, row_residual: float, dim: int) -> np.ndarray:
        """E [s] of the bound for a chunk whose largest row residual is ``row_residual`` (module docstring)."""
        f = row_residual + SCALING
        e, u = self.query_error, self.query_norms
        gamma = dim * FLOAT32_UNIT / (1 - dim * FLOAT32_UNIT)
        slack = e * (1 + f) + u * f + gamma * (u + e) * (1 + f) + TINY
        return slack * (1 + 1e-12)  # the float64 rounding of the terms above

    def add(self, start: int, rows: np.ndarray, norms: np.ndarray | None = None) -> None:
        """Fold in matrix rows ``start .. start + len(rows)`` (not normalised); ``norms`` [n] float64 if known."""
        import torch

        n = len(rows)
        self.rows_seen = max(self.rows_seen, start + n)
        if not n or not len(self.queries):
            return
        if norms is None:
            norms = row_norms(rows)  # [n]
        inverse, broken = _inverse_norms(norms)  # [n], [n]
        if broken.any():
            self.broken_rows.append(np.flatnonzero(broken) + start)
        if not len(self.screened):
            return
        directions, screen = self._buffers(n, rows.shape[1])  # [n, dim], [s, n]
        residual = _rounded_directions(rows, inverse, broken, self.precision, directions)
        torch.matmul(self.rounded, directions.T, out=screen)
        self._exclude(screen, start, broken)
        slack = self._slack(residual, rows.shape[1])  # [s]
        if self.keep:
            self._keep_best(screen, start, slack)
        query, column, approx = self._candidates(screen, slack)
        exact = self._exact(query, column, rows, norms)  # [m] float64
        self._check(approx, exact, slack[query])
        self._merge(query, column + start, exact)

    def _exclude(self, screen: Any, start: int, broken: np.ndarray) -> None:
        """A query's own row and rows without a direction score -inf: never a neighbour."""
        import torch

        n = screen.shape[1]
        own = np.flatnonzero((self.own >= start) & (self.own < start + n))
        screen[torch.from_numpy(own), torch.from_numpy(self.own[own] - start)] = -torch.inf
        if broken.any():
            screen[:, torch.from_numpy(np.flatnonzero(broken))] = -torch.inf

    def _keep_best(self, screen: Any, start: int, slack: np.ndarray) -> None:
        """Merge this chunk's screen scores into each query's ``keep`` best.

        One partition over the kept scores and the chunk's together (numpy's is four times
        cheaper here than torch.topk).
        """
        scores = np.concatenate([self.kept_scores, screen.float().numpy()], axis=1)  # [s, keep + n]
        best = np.argpartition(-scores, self.keep - 1, axis=1)[:, : self.keep]  # [s, keep]
        was_kept = best < self.keep
        ids = np.where(was_kept, np.take_along_axis(self.kept_ids, np.minimum(best, self.keep - 1), axis=1), best - self.keep + start)
        self.kept_scores = np.take_along_axis(scores, best, axis=1)
        self.kept_ids = np.where(self.kept_scores > -np.inf, ids, -1)
        np.maximum(self.kept_slack, slack, out=self.kept_slack)

    def _candidates(self, screen: Any, slack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([m] query, [m] column, [m] screen score) of the pairs whose score plus the bound reaches L_q."""
        import torch

        lower = self._lower(screen, slack)  # [s] L_q
        threshold = self._score_threshold(lower - slack)  # [s]
        where = torch.nonzero(screen >= torch.from_numpy(threshold)[:, None])  # [m, 2]
        approx = screen[where[:, 0], where[:, 1]].float().numpy()  # [m]
        query, column = where[:, 0].numpy(), where[:, 1].numpy()
        real = approx > -np.inf  # a query itself and broken rows pass only while L_q is -inf
        return query[real], column[real], approx[real]

    def _lower(self, screen: Any, slack: np.ndarray) -> np.ndarray:
        """float64 [s] L_q: the k-th best of the exact cosines kept and of this chunk's screen
        scores minus their bound; each is a cosine some distinct row reaches, so k rows do.

        Once every query has k exact cosines, they alone give L_q: a chunk's own best rows
        would raise it a little, but finding them costs more than scoring the few extra
        rows that pass without them.
        """
        import torch

        if np.all(self.best_scores[:, -1] > -np.inf):
            return self.best_scores[:, -1].copy()
        take = min(self.k, screen.shape[1])
        best = torch.topk(screen, take, dim=1).values.double().numpy()  # [s, take]
        with np.errstate(invalid="ignore"):
            reached = best - self.precision.out * np.abs(best) - slack[:, None]  # -inf stays -inf
        merged = np.concatenate([self.best_scores, reached], axis=1)  # [s, k + take]
        return -np.partition(-merged, self.k - 1, axis=1)[:, self.k - 1]

    def _score_threshold(self, target: np.ndarray) -> np.ndarray:
        """float32 [s]: the lowest screen score s with s + c |s| >= ``target`` [s], rounded down."""
        c = self.precision.out
        with np.errstate(invalid="ignore"):
            threshold = np.where(target >= 0, target / (1 + c), target / (1 - c))
        threshold = threshold - np.abs(threshold) * 1e-12
        rounded = threshold.astype(np.float32)
        return np.where(rounded > threshold, np.nextafter(rounded, np.float32(-np.inf)), rounded)

    def _exact(self, query: np.ndarray, column: np.ndarray, rows: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """float64 [m] cosine of each (screened query, chunk row) pair, a block of pairs at a time."""
        exact = np.empty(len(query))  # [m]
        for at in range(0, len(query), RESCORE_PAIRS):
            some, where = query[at : at + RESCORE_PAIRS], column[at : at + RESCORE_PAIRS]
            dots = np.einsum("ij,ij->i", self.wide_units[some], rows[where].astype(np.float64))  # [b]
            with np.errstate(invalid="ignore", divide="ignore"):
                exact[at : at + RESCORE_PAIRS] = np.where(norms[where] > 0, dots / norms[where], 0.0)
        return exact

    def _check(self, approx: np.ndarray, exact: np.ndarray, slack: np.ndarray) -> None:
        """Note a pair whose screen score lies outside its bound (1e-9 for the float64 score's own error)."""
        allowed = slack + self.precision.out * np.abs(approx.astype(np.float64)) + 1e-9
        if len(exact) and not np.all(np.abs(approx - exact) <= allowed):
            self.bound_held = False

    def _merge(self, query: np.ndarray, row: np.ndarray, exact: np.ndarray) -> None:
        """Each screened query's k best of its kept pairs and the new ones."""
        held = self.best_ids >= 0  # [s, k]
        self.best_ids, self.best_scores = best_pairs(
            np.concatenate([np.nonzero(held)[0], query]),
            np.concatenate([self.best_ids[held], row]),
            np.concatenate([self.best_scores[held], exact]),
            len(self.screened),
            self.k,
        )

    def finish(self) -> bool:
        """Fill ``ids`` and ``scores`` (and ``candidate_*``); False when a screen score broke its
        bound (then do not trust them)."""
        self.ids[self.screened] = self.best_ids
        self.scores[self.screened] = self.best_scores
        self._fill_directionless()
        q = len(self.queries)
        # A query not screened has no list: its +inf lowest score never lets a window fit.
        self.candidate_ids = np.full((q, self.keep), -1, dtype=np.int64)  # [q, keep]
        self.candidate_scores = np.full((q, self.keep), np.inf, dtype=np.float32)  # [q, keep]
        self.candidate_slack = np.zeros(q)  # [q]
        self.candidate_ids[self.screened] = self.kept_ids
        self.candidate_scores[self.screened] = self.kept_scores
        self.candidate_slack[self.screened] = self.kept_slack
        return self.bound_held

    def _fill_directionless(self) -> None:
        """Queries without a direction tie at cosine 0 with every row: the lowest row ids win."""
        lost = np.setdiff1d(np.arange(len(self.queries)), self.screened)
        if not len(lost):
            return
        broken = np.concatenate(self.broken_rows) if self.broken_rows else np.empty(0, np.int64)
        usable = np.setdiff1d(np.arange(min(self.rows_seen, self.k + len(broken) + 1)), broken)
        for query in lost:
            ids = usable[usable != self.self_rows[query]][: self.k]
            self.ids[query, : len(ids)] = ids
            self.scores[query, : len(ids)] = 0.0


def best_pairs(query: np.ndarray, row: np.ndarray, score: np.ndarray, queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [queries, k], scores [queries, k]): each query's k best (query, row, score) pairs,
    best first, the lower row id first on a tie; -1 and -inf where a query has fewer."""
    from pipeline.core.determinism import top_k_pairs

    return top_k_pairs(query, row, score, queries, k)


def exact_best(
    units: np.ndarray, query: np.ndarray, row: np.ndarray, self_rows: np.ndarray, k: int, rows_of: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_pairs` of the (query, row) pairs by float64 cosine, a query never its own neighbour.

    ``units`` [q, dim] are the queries' unit vectors; ``rows_of(ids) -> rows`` gives the
    rows, a block of them at a time, so a few thousand rows are in memory at once.
    """
    mine = row != self_rows[query]
    query, row = query[mine], row[mine]
    cosine = np.empty(len(query))  # [m]
    order = np.argsort(row, kind="stable")
    unique, first = np.unique(row[order], return_index=True)
    bounds = np.append(first, len(order))
    for block in range(0, len(unique), RESCORE_ROWS):
        ids = unique[block : block + RESCORE_ROWS]
        rows = rows_of(ids)  # [b, dim]
        norms = row_norms(rows)  # [b]
        pairs = order[bounds[block] : bounds[min(block + RESCORE_ROWS, len(unique))]]
        where = np.searchsorted(ids, row[pairs])
        for at in range(0, len(pairs), RESCORE_PAIRS):
            some, place = pairs[at : at + RESCORE_PAIRS], where[at : at + RESCORE_PAIRS]
            dots = np.einsum("ij,ij->i", units[query[some]].astype(np.float64), rows[place].astype(np.float64))  # [b]
            with np.errstate(invalid="ignore", divide="ignore"):
                cosine[some] = np.where(norms[place] > 0, dots / norms[place], 0.0)
    return best_pairs(query, row, cosine, len(units), k)
