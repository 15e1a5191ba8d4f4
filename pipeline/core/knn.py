"""Exact cosine nearest neighbours by blocked float32 matmul, with bounded memory.

Cosine similarity here is the dot product of L2-normalised rows, clipped to [-1, 1]
(rounding can push it a hair past 1). A row of norm zero (padding, say) has no
direction: its cosine with every row, itself included, is defined as 0. NaN or Inf in
the matrix is refused (:func:`unit_rows` raises), so no table ever holds NaN.

Neighbours are ordered by cosine, highest first, and equal cosines by token id, lowest
first. That is a total order, so "the k nearest" is one well-defined set, and the blocked
search returns exactly what sorting the full cosine matrix would: it is not an
approximate index. The float32 matmul only screens: besides its running top-k, each
query keeps every key whose float32 cosine comes within twice a rigorous bound on the
float32 error (:func:`pipeline.core.determinism.float32_dot_error`) of its k-th; any key left out
is then provably below k others. The kept keys' cosines are recomputed in float64 from the
same unit rows in a fixed order (:func:`pipeline.core.determinism.row_dots`, no BLAS) and the k
best by that cosine, then id, are the answer (the float32 of it is what is published). So
the result does not depend on the BLAS kernel, the thread count or ``block_rows``, nor on
the device the float32 products run on (:mod:`pipeline.core.device`: a CUDA GPU summing in
float32 is one more summation order the bound covers).

How the search stays fast: the cosines are computed tile by tile (``block_rows`` x
``block_rows``), and a running top-k per query keeps its current worst entry. A tile
entry can only enter the top-k if it beats that worst entry, so after the first tile
most of a tile is discarded by one comparison pass, and only the few survivors are
sorted. For the kNN graph of a whole vocabulary the cosine matrix is symmetric, so only
the tiles on and above the diagonal are multiplied (and of a diagonal tile only its
sub-tiles on and above its own diagonal) and each serves both its rows and its columns,
which halves the matmul work; there one compiled pass tests each entry against its row's
and its column's worst, and the survivors are inserted into the sorted lists one by one
(:mod:`pipeline.core.knn_kernels`), with the same result as the numpy path. Each product
runs on one BLAS thread per core (:func:`pipeline.core.device.cpu_product`), so no BLAS
thread is left spinning while those passes run.

The entry points: :class:`TopK` streams keys chunk by chunk (raw or unit rows) against fixed
queries, :func:`nearest_keys` is one pass of it over a matrix, and :func:`knn_graph` is the
symmetric search of a whole vocabulary. All rank with
:func:`pipeline.core.determinism.top_k_pairs` and, given a ``desc``, show their own progress
bar. :class:`TopK` may screen in bfloat16 instead (``screen="bfloat16"``, the quantize stage's
recall; :mod:`pipeline.core.screen`), with the same cosine and the same exact answer, and
:func:`best_of_pairs` ranks given candidate pairs by that cosine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.core.device import Resident
from pipeline.core.errors import DissectError
from pipeline.core.progress import progress_bar

# Bounds of the search settings (similarity.k, drift.k, export.neighbors_k, *.block_rows):
# past them a search would ask for more memory than any machine has, not a bigger answer.
# A tile is block_rows x block_rows float32 cosines: 1 GiB at the bound.
MAX_K = 10_000
MAX_BLOCK_ROWS = 1 << 14

EMPTY_ID = np.iinfo(np.int64).max  # id of an unfilled slot: it loses every tie


def iter_blocks(matrix: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, matrix.shape[0], block_rows):
        yield start, matrix[start : start + block_rows]


# float64 bytes unit_rows widens at a time (16 rows at dim 2048): its passes over a block
# then run in cache, at about half the time of blocks of thousands of rows. Each row's
# norm and scaling are the same whatever the block, so no bit depends on it.
UNIT_BLOCK_BYTES = 1 << 18


def unit_rows(matrix: np.ndarray, block_rows: int | None = None, inplace: bool = False, what: str = "the matrix") -> np.ndarray:
    """Rows of ``matrix`` scaled to unit L2 norm (float32); zero rows stay zero.

    The norm is taken in float64 so tiny and huge rows normalise without under- or
    overflow. ``inplace`` reuses ``matrix``'s memory when it is a writable float32 array,
    which saves a whole copy of the matrix. Raises :class:`DissectError` on NaN or Inf.
    """
    reuse = inplace and matrix.dtype == np.float32 and matrix.flags.writeable and matrix.flags.c_contiguous
    out = matrix if reuse else np.empty(matrix.shape, dtype=np.float32)  # [rows, dim]
    block_rows = block_rows or max(1, UNIT_BLOCK_BYTES // (8 * max(matrix.shape[-1], 1)))
    for start, block in iter_blocks(matrix, block_rows):
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise DissectError(
                f"{what} has NaN or Inf in row {bad}; cosines of such rows are undefined: "
                "re-extract the embeddings from intact weights"
            )
        wide = block.astype(np.float64)  # [block, dim]
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))  # [block]
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        out[start : start + len(block)] = np.multiply(wide, scale[:, None], out=wide)
    return out


@dataclass(frozen=True)
class Neighbors:
    """The k nearest keys of each query, nearest first (cosine down, then id up)."""

    ids: np.ndarray  # [queries, k] int64; -1 where a query has fewer than k candidates
    cosines: np.ndarray  # [queries, k] float32; -inf where ids is -1

    def valid(self) -> np.ndarray:
        return self.ids >= 0


class RunningTopK:
    """The best k (cosine, id) pairs seen so far for each of ``n_queries`` queries.

    With a ``margin`` [n_queries] (float64), entries that fall out of a query's top-k, or
    never enter it, are still kept aside (``near_*``) while they are within ``margin`` of
    its k-th cosine, and a candidate needs only to reach the k-th minus the margin. A query
    with margin 0 works as without: exact ties go to the lower id.
    """

    def __init__(self, n_queries: int, k: int, margin: np.ndarray | None = None, compiled: bool = False):
        self.k = k
        # Merge by the compiled insertion (:mod:`pipeline.core.knn_kernels`): the same state, for
        # searches large enough to pay for loading numba.
        self.compiled = compiled
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)  # [queries, k]
        self.ids = np.full((n_queries, k), EMPTY_ID, dtype=np.int64)  # [queries, k]
        # The worst kept entry: a candidate must beat it to get in.
        self.worst_score = np.full(n_queries, -np.inf, dtype=np.float32)  # [queries]
        self.worst_id = np.full(n_queries, EMPTY_ID, dtype=np.int64)  # [queries]
        self.margin = np.zeros(n_queries) if margin is None else np.asarray(margin, np.float64)  # [queries]
        self.near_q, self.near_i, self.near_s = [], [], []  # kept aside, within the margin

    def merge(self, queries: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Add candidate triples (a query may appear many times, a (query, id) pair once)."""
        if queries.size == 0:
            return
        if self.compiled:
            self._insert(queries, ids, scores)
            return
        touched = np.unique(queries)  # [t]
        k = self.k
        all_q = np.concatenate([np.repeat(touched, k), queries])
        all_i = np.concatenate([self.ids[touched].ravel(), ids])
        all_s = np.concatenate([self.scores[touched].ravel(), scores])
        order = np.lexsort((all_i, -all_s, all_q))
        sorted_q = all_q[order]
        starts = np.flatnonzero(np.r_[True, sorted_q[1:] != sorted_q[:-1]])  # [t]
        sizes = np.diff(np.r_[starts, sorted_q.size])
        rank = np.arange(sorted_q.size) - np.repeat(starts, sizes)
        # Every touched query has its k slots in the pool, so each keeps exactly k.
        kept = order[rank < k]
        self.scores[touched] = all_s[kept].reshape(-1, k)
        self.ids[touched] = all_i[kept].reshape(-1, k)
        self._set_worst(touched)
        out = order[rank >= k]
        self._keep_near(all_q[out], all_i[out], all_s[out])

    def _insert(self, queries: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """:meth:`merge` by inserting each candidate into its query's sorted list, compiled."""
        from pipeline.core.knn_kernels import insert_candidates

        left_out = np.empty(queries.size, np.int64), np.empty(queries.size, np.int64), np.empty(queries.size, np.float32)
        insert_candidates(
            self.scores, self.ids, np.ascontiguousarray(queries, np.int64), np.ascontiguousarray(ids, np.int64),
            np.ascontiguousarray(scores, np.float32), *left_out,
        )
        self._set_worst(np.unique(queries))
        self._keep_near(*left_out)

    def _keep_near(self, q: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Keep aside the entries a merge left out ([m] each) that are within their query's margin of its k-th."""
        margin = self.margin[q]
        near = (margin > 0) & (scores >= self.scores[q, -1] - margin) & (ids != EMPTY_ID)
        if near.any():
            self.near_q.append(q[near])
            self.near_i.append(ids[near])
            self.near_s.append(scores[near])

    def _set_worst(self, touched: np.ndarray) -> None:
        """What a candidate must reach: the k-th score, less the margin (rounded down to float32)."""
        kth = self.scores[touched, -1]
        wide = kth.astype(np.float64) - self.margin[touched]
        low = wide.astype(np.float32)
        self.worst_score[touched] = np.where(low > wide, np.nextafter(low, np.float32(-np.inf)), low)
        # Within a margin ties need no id order: all of them are kept.
        self.worst_id[touched] = np.where(self.margin[touched] > 0, EMPTY_ID, self.ids[touched, -1])

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(query, id) of every kept pair: the top-k and what is within the margin of the final k-th."""
        query, slot = np.nonzero(self.ids != EMPTY_ID)
        ids = self.ids[query, slot]
        if not self.near_q:
            return query, ids
        near_q, near_i, near_s = (np.concatenate(part) for part in (self.near_q, self.near_i, self.near_s))
        near = near_s >= self.scores[near_q, -1] - self.margin[near_q]
        return np.concatenate([query, near_q[near]]), np.concatenate([ids, near_i[near]])

    def result(self) -> Neighbors:
        ids = np.where(self.ids == EMPTY_ID, -1, self.ids)
        # +0.0 turns a -0.0 cosine into 0.0, so equal tables are equal bytes
        return Neighbors(ids=ids, cosines=self.scores + np.float32(0.0))


Excluder = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _candidates_per_row(
    tile: np.ndarray, queries: np.ndarray, key_start: int, state: RunningTopK, slack: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of ``tile`` [rows = queries, cols = keys key_start..] that may enter the top-k.

    Returns (query, key id, cosine) triples, a superset of what the top-k will keep.
    ``slack`` is the most keys any query may later exclude, so that many extra
    candidates are kept to stand in for them.
    """
    worst = state.worst_score[queries]
    full = worst > -np.inf
    parts = []
    if full.any():
        parts.append(_beating_worst(tile, queries, key_start, state, np.flatnonzero(full)))
    if not full.all():
        rows = np.flatnonzero(~full)
        parts.append(_tile_top_on_cores(tile, queries, key_start, state.k + slack, rows, state.margin[queries[rows]]))
    return _joined_triples(parts)


def _joined_triples(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, key id, cosine) parts joined in their order into one set of triples."""
    if len(parts) < 2:
        return parts[0] if parts else _no_triples()
    return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


def _beating_worst(
    tile: np.ndarray, queries: np.ndarray, key_start: int, state: RunningTopK, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries that beat the worst kept entry of their query (cosine higher, or equal with a lower id)."""
    sub = tile if rows.size == tile.shape[0] else tile[rows]  # [rows, cols]
    r, c = _nonzero(sub >= _unclipped_threshold(state.worst_score[queries[rows]])[:, None])
    return _beating(state, queries[rows[r]], c.astype(np.int64) + key_start, _clipped(sub[r, c]))


def _unclipped_threshold(worst: np.ndarray) -> np.ndarray:
    """What a tile entry x must reach so that its cosine clip(x, -1, 1) reaches ``worst``: ``worst``
    itself above -1, and -inf at or below it (where every cosine does). So a tile need not be
    clipped as a whole: only the entries taken are."""
    return np.where(worst > -1.0, worst, np.float32(-np.inf))


def _clipped(values: np.ndarray) -> np.ndarray:
    return np.clip(values, -1.0, 1.0, out=values)


def _beating(
    state: RunningTopK, q: np.ndarray, ids: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The triples (cosine >= the worst kept) that win against it, ties going to the lower id."""
    keep = (s > state.worst_score[q]) | (ids < state.worst_id[q])
    return q[keep], ids[keep], s[keep]


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a mostly-False C-contiguous 2-D mask, about 8x faster.

    Scans the mask eight bytes at a time and looks inside only the words that are not
    zero; once a top-k has settled, almost all are.
    """
    flat = mask.reshape(-1)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))  # [nonzero words]
    positions = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    positions = np.concatenate([positions[flat[positions]], whole + np.flatnonzero(flat[whole:])])
    return np.divmod(positions, mask.shape[1])


def _tile_top(
    tile: np.ndarray, queries: np.ndarray, key_start: int, m: int, rows: np.ndarray, margin: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For queries with an unfilled top-k: each row's m best entries of the tile, ties included.

    Anything below a row's m-th largest cosine is beaten by m entries; among entries tied
    with it only the m lowest ids can matter. With a ``margin`` [rows] (float64), entries
    within it of the m-th are kept too.
    """
    sub = np.clip(tile if rows.size == tile.shape[0] else tile[rows], -1.0, 1.0)  # [rows, cols] cosines
    cols = sub.shape[1]
    if m >= cols:
        r, c = np.nonzero(np.ones(sub.shape, dtype=bool))
    else:
        kth = np.partition(sub, cols - m, axis=1)[:, cols - m]  # [rows], the m-th largest
        if margin is None or not (margin > 0).any():
            keep = _best_with_ties(sub, kth, m)
        else:
            wide = kth.astype(np.float64) - margin
            low = wide.astype(np.float32)
            low = np.where(low > wide, np.nextafter(low, np.float32(-np.inf)), low)
            # Within the margin of the m-th: a superset of the m best, ties and all.
            keep = sub >= low[:, None]
            if not (margin > 0).all():  # rows without a margin (zero queries) keep the m best only
                keep &= (margin > 0)[:, None]
                keep |= _best_with_ties(sub, kth, m) & (margin == 0)[:, None]
        r, c = _nonzero(keep)
    return queries[rows[r]], c.astype(np.int64) + key_start, sub[r, c]


def _tile_top_on_cores(
    tile: np.ndarray, queries: np.ndarray, key_start: int, m: int, rows: np.ndarray, margin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_tile_top`, the ``rows`` shared among the cores (each row's entries are taken
    alone, and the parts joined in row order, so the triples are the same)."""
    from pipeline.core.parallel import span_map

    parts = span_map(lambda span: _tile_top(tile, queries, key_start, m, rows[span[0] : span[1]], margin[span[0] : span[1]]), len(rows))
    return _joined_triples(parts)


def _best_with_ties(sub: np.ndarray, kth: np.ndarray, m: int) -> np.ndarray:
    """[rows, cols] mask of each row's entries above its m-th largest ``kth``, and of the m
    lowest-column entries tied with it."""
    above = sub > kth[:, None]
    tied = sub == kth[:, None]
    for row in np.flatnonzero(tied.sum(axis=1) > m):
        tied[row, np.flatnonzero(tied[row])[m:]] = False
    return above | tied


def _no_triples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


def _merge_excluding(
    state: RunningTopK, triples: tuple[np.ndarray, np.ndarray, np.ndarray], exclude: Excluder | None
) -> None:
    q, ids, s = triples
    if exclude is not None and q.size:
        keep = ~exclude(q, ids)
        q, ids, s = q[keep], ids[keep], s[keep]
    state.merge(q, ids, s)




SCREENS = ("float32", "bfloat16")
RESCORE_ROWS = 2048  # rows restored and normalised at a time by :func:`scored_pairs`


@dataclass(frozen=True)
class ScreenedChunk:
    """A chunk of rows as the bounded screen left it, before it is folded into a search:
    rows ``start .. start + rows``, which of them are ``broken`` (NaN or Inf) and, unless
    nothing was screened, their ``screen`` scores (torch [s, rows], in a reused buffer) with
    the bound's ``slack`` [s]."""

    start: int
    rows: int
    broken: np.ndarray
    screen: Any = None
    slack: np.ndarray | None = None


class TopK:
    """The k nearest rows of each query, over rows added chunk by chunk: the streaming engine.

    ``queries`` [q, dim] are unit rows (:func:`unit_rows`); ``exclude[i]`` lists the row ids
    query i may not return (its own row, a word's own tokens). :meth:`add` screens a chunk
    and scores the rows that survive in float64 at once
    (:func:`pipeline.core.determinism.row_dots` of the unit rows), so the rows need not be
    kept; :meth:`finish` ranks the scored pairs by that cosine, then id
    (:func:`pipeline.core.determinism.top_k_pairs`), exactly as :func:`exact_top_k` does.
    Rows with NaN or Inf have no direction and are never returned. With a ``desc`` it shows
    a progress bar of that name over ``total`` rows, closed by :meth:`finish`.

    Two screens give the same exact answer:

    * ``"float32"``: a float32 product against the running top-k with its margin
      (:func:`screen_margin`);
    * ``"bfloat16"``: a bfloat16 product (float32 where the CPU has no native bfloat16) whose
      proven error bound decides what may still rank (:mod:`pipeline.core.screen`), about
      four times cheaper where it runs natively. Asked to ``keep`` more, it also keeps each
      query's ``keep`` best rows by screen score (``candidate_ids``, ``candidate_scores``,
      ``candidate_slack`` after :meth:`finish`: every row left out has a cosine of at most
      the lowest kept score plus ``candidate_slack + precision.out * |score|``). A kernel
      that broke the bound leaves ``bound_held`` False: then the answer is not to be trusted
      and the caller searches again with ``"float32"``.

    A bounded search whose answer is all but known (a dequantized matrix's, from the
    original's) can be started from those pairs (:meth:`seed`), so its screens pass few rows.

    After :meth:`finish`, ``scores`` [q, k] holds the float64 cosines of the answer.
    """

    def __init__(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None,
        desc: str | None = None, total: int | None = None,
        screen: str = "float32", keep: int = 0, precision: object | None = None,
    ):
        if screen not in SCREENS:
            raise ValueError(f"screen must be one of {SCREENS}, got {screen!r}")
        self.queries, self.k, self.exclude = queries, k, exclude
        self.slack = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        self.excluder = _pair_excluder(exclude, EXCLUDE_SPAN) if self.slack else None
        self.query_ids = np.arange(len(queries))
        self.bar = progress_bar(total=total, desc=desc or "", unit="rows", enabled=desc is not None)
        self.bound_held = True
        self.scores: np.ndarray | None = None
        self.screen = None
        if screen == "float32":
            self.resident = Resident(queries)  # [q, dim], where the products run
            self.state = RunningTopK(len(queries), k, screen_margin(queries))
            self.scored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, id, float64 cosine)
        else:
            self._start_bounded(keep, precision)

    def add(self, start: int, rows: np.ndarray, unit: bool = False, norms: np.ndarray | None = None) -> None:
        """Fold in rows ``start .. start + len(rows)`` [n, dim]; ``unit`` when they are unit rows
        already; ``norms`` [n] their float64 norms (:func:`pipeline.core.determinism.row_norms`) if known."""
        if self.screen is not None:
            self._add_bounded(start, rows, unit, norms)
        elif len(rows) and len(self.queries):
            finite = np.ones(len(rows), bool) if unit else np.isfinite(rows).all(axis=1)  # [n]
            keys = rows if unit else unit_rows(np.where(finite[:, None], rows, 0))  # [n, dim]
            tile = self.resident.times(keys)  # [q, n]
            np.clip(tile, -1.0, 1.0, out=tile)
            q, ids, s = _candidates_per_row(tile, self.query_ids, start, self.state, self.slack)
            keep = finite[ids - start] if self.excluder is None else finite[ids - start] & ~self.excluder(q, ids)
            q, ids, s = q[keep], ids[keep], s[keep]
            self.state.merge(q, ids, s)
            self.scored.append((q, ids, _cosines(self.queries, q, keys, ids - start)))
        self.bar.update(len(rows))

    def finish(self) -> Neighbors:
        """The k nearest rows of each query, nearest first (cosine down, then id up)."""
        from pipeline.core.determinism import top_k_pairs

        self.bar.close()
        if self.screen is not None:
            return self._finish_bounded()
        query, found = self.state.candidates()
        if self.scored:
            q, ids, exact = (np.concatenate(part) for part in zip(*self.scored))
        else:
            q, ids, exact = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        # Every kept pair was scored when its chunk came: find it among the scored pairs.
        scored_keys, wanted = q * EXCLUDE_SPAN + ids, query * EXCLUDE_SPAN + found
        order = np.argsort(scored_keys, kind="stable")
        at = order[np.searchsorted(scored_keys, wanted, sorter=order)]
        ids, self.scores = top_k_pairs(query, found, exact[at], len(self.queries), self.k)
        return _published(ids, self.scores)

    # The bounded screen ------------------------------------------------------------------

    def _start_bounded(self, keep: int, precision: object | None) -> None:
        from pipeline.core.screen import BoundedScreen

        self.screen = BoundedScreen(self.queries, keep, precision)  # type: ignore[arg-type]
        self.precision = self.screen.precision
        screened = self.screen.screened  # [s] query indices
        self.best_ids = np.full((len(screened), self.k), -1, dtype=np.int64)  # [s, k]
        self.best_scores = np.full((len(screened), self.k), -np.inf)  # [s, k] float64 cosines
        self.rows_seen = 0
        self.broken_rows: list[np.ndarray] = []
        # Excluded (screened query, row) pairs, by row, for each chunk to mask its own.
        position = np.full(len(self.queries), -1, np.int64)
        position[screened] = np.arange(len(screened))
        lists = self.exclude or []
        owner = position[np.repeat(np.arange(len(lists), dtype=np.int64), [len(e) for e in lists])]
        rows = np.concatenate([np.asarray(e, np.int64) for e in lists]) if lists else np.empty(0, np.int64)
        order = np.argsort(rows[owner >= 0], kind="stable")
        self.excluded_rows, self.excluded_queries = rows[owner >= 0][order], owner[owner >= 0][order]

    def seed(self, query: np.ndarray, row: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray]) -> None:
        """Score the (query, row) pairs given ([m] each, a pair once) before any chunk is added.

        Their k-th best exact cosine is a lower bound on each query's final k-th from the
        first chunk on, so a chunk's screen passes only the rows that may still beat it,
        not the many a search that starts empty scores before its top k settles (for a
        query whose neighbours are all but known, as a dequantized matrix's are from the
        original's). The answer is the same: each seeded pair is masked from the screens
        of the chunks to come, so every row still counts once. ``rows_of(ids) -> rows``
        gives the (raw) rows; one with NaN or Inf is left to its chunk. Bounded screen
        without ``keep`` only, before the first :meth:`add`.
        """
        from pipeline.core.determinism import top_k_pairs

        if self.screen is None or self.screen.keep or self.rows_seen:
            raise ValueError("seed() needs a bounded screen without keep, before the first add()")
        position = np.full(len(self.queries), -1, np.int64)
        position[self.screen.screened] = np.arange(len(self.screen.screened))
        query, row = position[query], np.asarray(row, np.int64)
        # A pair the query may not return is no neighbour of it, seeded or not.
        excluded = np.isin(query * EXCLUDE_SPAN + row, self.excluded_queries * EXCLUDE_SPAN + self.excluded_rows)
        usable = (query >= 0) & ~excluded
        query, row = query[usable], row[usable]
        query, row, exact = scored_pairs(self.queries, self.screen.screened[query], row, rows_of)
        query = position[query]
        self.best_ids, self.best_scores = top_k_pairs(query, row, exact, len(self.best_ids), self.k)
        rows = np.concatenate([self.excluded_rows, row])
        owners = np.concatenate([self.excluded_queries, query])
        order = np.argsort(rows, kind="stable")
        self.excluded_rows, self.excluded_queries = rows[order], owners[order]

    def add_chunks(self, chunks: Iterable[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        """:meth:`add` of each ``(start, rows, norms)`` in turn. With the bounded screen, the next
        chunk's screen scores are computed on a thread of their own while this one is folded
        in (the same folds in the same order, so the same answer): the product and the fold
        each leave a core idle otherwise. Not to be called from the thread that computes them,
        so it makes its own."""
        if self.screen is None:
            for start, rows, norms in chunks:
                self.add(start, rows, norms=norms)
            return
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.core.screen import SLOTS

        def fold(screened: Any, rows: np.ndarray) -> None:
            self._fold_chunk(screened.result(), rows, unit=False)
            self.bar.update(len(rows))

        ahead = None  # (the future of a chunk's screen, its rows)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="screen") as screening:
            for slot, (start, rows, norms) in zip(itertools.cycle(range(SLOTS)), chunks):
                # A slot's scores are folded in before the slot is screened into again.
                following = screening.submit(self._screened_chunk, start, rows, norms, slot)
                if ahead is not None:
                    fold(*ahead)
                ahead = (following, rows)
            if ahead is not None:
                fold(*ahead)

    def _add_bounded(self, start: int, rows: np.ndarray, unit: bool, norms: np.ndarray | None) -> None:
        self._fold_chunk(self._screened_chunk(start, rows, norms, 0), rows, unit)

    def _screened_chunk(self, start: int, rows: np.ndarray, norms: np.ndarray | None, slot: int) -> ScreenedChunk:
        """What the bounded screen makes of rows ``start .. start + n`` [n, dim], the search's state
        untouched (so it can run ahead of :meth:`_fold_chunk`), in ``slot``'s buffers."""
        from pipeline.core.determinism import row_norms
        from pipeline.core.screen import inverse_norms

        n = len(rows)
        if not n or not len(self.queries):
            return ScreenedChunk(start, n, np.zeros(n, bool))
        norms = row_norms(rows) if norms is None else norms  # [n]
        broken = ~np.isfinite(norms)  # a value that is NaN or Inf: never a neighbour
        if not len(self.screen.screened):
            return ScreenedChunk(start, n, broken)
        _, unscaled = inverse_norms(norms)
        tiny = np.flatnonzero(unscaled & ~broken)  # too small for a float32 inverse: scaled in float64
        screen, slack = self.screen.scores(rows, norms, dict(zip(tiny.tolist(), unit_rows(rows[tiny]))), slot)  # [s, n], [s]
        return ScreenedChunk(start, n, broken, screen, slack)

    def _fold_chunk(self, chunk: ScreenedChunk, rows: np.ndarray, unit: bool) -> None:
        """Fold a screened chunk of ``rows`` [n, dim] into the running top k (and the candidate lists)."""
        import torch

        from pipeline.core.determinism import top_k_pairs

        start, n, broken = chunk.start, chunk.rows, chunk.broken
        self.rows_seen = max(self.rows_seen, start + n)
        if broken.any():
            self.broken_rows.append(np.flatnonzero(broken) + start)
        if chunk.screen is None:
            return
        screen, slack = chunk.screen, chunk.slack
        lo, hi = np.searchsorted(self.excluded_rows, [start, start + n])
        masked = self.excluded_queries[lo:hi], self.excluded_rows[lo:hi] - start
        screen[torch.from_numpy(masked[0]), torch.from_numpy(masked[1])] = -torch.inf
        if broken.any():
            screen[:, torch.from_numpy(np.flatnonzero(broken))] = -torch.inf
        if self.screen.keep:
            self.screen.keep_best(screen, start, slack)
        query, column, approx = self.screen.candidates(screen, slack, self.best_scores)
        unique, where = np.unique(column, return_inverse=True)
        keys = rows[unique] if unit else _unit_rows_on_cores(rows[unique])  # [u, dim]
        exact = _cosines_on_cores(self.queries, self.screen.screened[query], keys, where, compiled=True)  # [m] float64
        self.screen.check(approx, exact, slack[query])
        held = self.best_ids >= 0  # [s, k]
        self.best_ids, self.best_scores = top_k_pairs(
            np.concatenate([np.nonzero(held)[0], query]),
            np.concatenate([self.best_ids[held], column + start]),
            np.concatenate([self.best_scores[held], exact]),
            len(self.best_ids),
            self.k,
        )

    def _finish_bounded(self) -> Neighbors:
        screened, q = self.screen.screened, len(self.queries)
        ids = np.full((q, self.k), -1, dtype=np.int64)  # [q, k]
        self.scores = np.full((q, self.k), -np.inf)  # [q, k]
        ids[screened], self.scores[screened] = self.best_ids, self.best_scores
        # Queries without a direction tie at cosine 0 with every row: the lowest row ids win.
        broken = np.concatenate(self.broken_rows) if self.broken_rows else np.empty(0, np.int64)
        for query in np.setdiff1d(np.arange(q), screened):
            own = self.exclude[query] if self.exclude is not None else np.empty(0, np.int64)
            usable = np.setdiff1d(np.arange(min(self.rows_seen, self.k + len(broken) + len(own))), np.concatenate([broken, own]))
            ids[query, : len(usable[: self.k])] = usable[: self.k]
            self.scores[query, : len(usable[: self.k])] = 0.0
        # A query not screened has no list: its +inf lowest score never lets a window fit.
        keep = self.screen.keep
        self.candidate_ids = np.full((q, keep), -1, dtype=np.int64)  # [q, keep]
        self.candidate_scores = np.full((q, keep), np.inf, dtype=np.float32)  # [q, keep]
        self.candidate_slack = np.zeros(q)  # [q]
        self.candidate_ids[screened] = self.screen.kept_ids
        self.candidate_scores[screened] = self.screen.kept_scores
        self.candidate_slack[screened] = self.screen.kept_slack
        self.bound_held = self.screen.bound_held
        return _published(ids, self.scores)


def _cosines(queries: np.ndarray, query: np.ndarray, keys: np.ndarray, key: np.ndarray, compiled: bool = False) -> np.ndarray:
    """float64 [m]: the cosine of unit rows ``queries[query]`` and ``keys[key]``, the engine's one
    formula: their float64 dot in a fixed order (no BLAS), clipped to [-1, 1].

    ``compiled``: by :func:`pipeline.core.knn_kernels.pair_dots`, the same numbers twice as fast,
    for searches that have loaded numba already (float32 rows; others take numpy's loop).
    """
    from pipeline.core.determinism import row_dots_at

    if compiled and queries.dtype == keys.dtype == np.float32 and len(query):
        from pipeline.core.knn_kernels import pair_dots

        dots = np.empty(len(query))  # [m]
        pair_dots(
            np.ascontiguousarray(queries), np.ascontiguousarray(query, np.int64),
            np.ascontiguousarray(keys), np.ascontiguousarray(key, np.int64), dots,
        )
    else:
        dots = row_dots_at(queries, query, keys, key)
    return np.clip(dots, -1.0, 1.0, out=dots)


# The rescoring of a chunk's candidates is numpy that runs on one core at a time; each row
# and each pair is computed alone, so sharing them among the cores changes no value.


def _unit_rows_on_cores(rows: np.ndarray) -> np.ndarray:
    from pipeline.core.parallel import split_map

    parts = split_map(unit_rows, rows)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _cosines_on_cores(queries: np.ndarray, query: np.ndarray, keys: np.ndarray, key: np.ndarray, compiled: bool = False) -> np.ndarray:
    from pipeline.core.parallel import span_map

    parts = span_map(lambda span: _cosines(queries, query[span[0] : span[1]], keys, key[span[0] : span[1]], compiled), len(query))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _published(ids: np.ndarray, cosines: np.ndarray) -> Neighbors:
    # +0.0 turns a -0.0 cosine into 0.0, so equal tables are equal bytes
    return Neighbors(ids=ids, cosines=cosines.astype(np.float32) + np.float32(0.0))


def best_of_pairs(
    queries: np.ndarray, query: np.ndarray, row: np.ndarray, k: int, rows_of: Callable[[np.ndarray], np.ndarray]
) -> Neighbors:
    """Each query's k best of the (query, row) pairs given ([m] each, a pair once), by the
    engine's cosine, then row id (:func:`pipeline.core.determinism.top_k_pairs`); ``queries``
    and ``rows_of`` as :func:`scored_pairs`."""
    from pipeline.core.determinism import top_k_pairs

    query, row, cosine = scored_pairs(queries, query, row, rows_of)
    ids, scores = top_k_pairs(query, row, cosine, len(queries), k)
    return _published(ids, scores)


def scored_pairs(
    queries: np.ndarray, query: np.ndarray, row: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, row, float64 cosine) of the (query, row) pairs given ([m] each), by the engine's
    cosine; pairs whose row has NaN or Inf (no direction, never a neighbour) are left out.

    ``queries`` [q, dim] are unit rows; ``rows_of(ids) -> rows`` gives the (raw) rows,
    RESCORE_ROWS of them at a time, so a few thousand rows are in memory at once.
    """
    cosine = np.full(len(query), np.nan)  # [m]; NaN: the row has no direction
    unique, where = np.unique(row, return_inverse=True)
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(0, len(unique) + RESCORE_ROWS, RESCORE_ROWS))
    for block, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        first = block * RESCORE_ROWS
        raw = rows_of(unique[first : first + RESCORE_ROWS])  # [b, dim]
        finite = np.isfinite(raw).all(axis=1)  # [b]
        keys = _unit_rows_on_cores(np.where(finite[:, None], raw, 0))  # [b, dim]
        pairs = order[lo:hi]
        scored = pairs[finite[where[pairs] - first]]
        cosine[scored] = _cosines(queries, query[scored], keys, where[scored] - first, compiled=True)
    kept = ~np.isnan(cosine)
    return query[kept], row[kept], cosine[kept]


EXCLUDE_SPAN = 1 << 32  # (query, row) pairs are keyed query * EXCLUDE_SPAN + row


def excluding_own(self_rows: np.ndarray) -> list[np.ndarray]:
    """The ``exclude`` lists of queries that are rows themselves: ``self_rows`` [q], -1 for none."""
    return [np.array([row], np.int64) if row >= 0 else np.empty(0, np.int64) for row in self_rows]


def nearest_keys(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    block_rows: int = 4096,
    exclude: list[np.ndarray] | None = None,
    desc: str | None = None,
) -> Neighbors:
    """The k nearest rows of ``keys`` [n, dim] for each row of ``queries`` [q, dim].

    Both must already be unit rows (:func:`unit_rows`). ``exclude[i]`` lists key ids query
    i may not return (a word's own tokens). One pass of :class:`TopK` over ``keys``: each
    block of ``block_rows`` keys is multiplied against all queries at once. With a ``desc``
    the search shows a progress bar of that name, in rows.
    """
    top = TopK(queries, k, exclude, desc, keys.shape[0])
    for start, block in iter_blocks(keys, block_rows):
        top.add(start, block, unit=True)
    return top.finish()


def _pair_excluder(exclude: list[np.ndarray], n_keys: int) -> Excluder:
    pairs = np.concatenate([np.asarray(e, np.int64) + i * n_keys for i, e in enumerate(exclude)])  # [pairs]

    def excluded(q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.isin(q * n_keys + ids, pairs)

    return excluded


def knn_graph(unit: np.ndarray, k: int, block_rows: int = 4096, desc: str | None = None) -> Neighbors:
    """The k nearest other rows of every row of ``unit`` [n, dim] (unit rows), self excluded.

    Tiles ``block_rows`` x ``block_rows`` on and above the diagonal are each multiplied
    once; a tile offers candidates to the queries of its rows and of its columns. A tile on
    the diagonal is itself cut into sub-tiles (:func:`diagonal_parts`), of which only those
    on and above its diagonal are multiplied. The diagonal sub-tiles go first so every row
    has a full top-k (a threshold) before the rest, which are then mostly discarded by one
    comparison. With a ``desc`` the search shows a progress bar of that name, in tiles.
    """
    n = unit.shape[0]
    state = RunningTopK(n, k, screen_margin(unit), compiled=True)
    resident = Resident(unit)  # [n, dim], where the products run
    starts = list(range(0, n, block_rows))
    not_self: Excluder = lambda q, ids: q == ids  # noqa: E731
    spans = [np.arange(start, min(start + block_rows, n)) for start in starts]
    parts = [diagonal_parts(rows, k) for rows in spans]
    scratch = np.empty(min(block_rows, n) ** 2, np.float32)  # every tile's products, in turn
    # Diagonal sub-tiles first, then the others inside the diagonal tiles, then the tiles above
    # the diagonal, row of tiles by row of tiles.
    pairs = (
        [(rows, rows) for cut in parts for rows in cut]
        + [(a, b) for cut in parts for i, a in enumerate(cut) for b in cut[i + 1 :]]
        + [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :]]
    )
    with progress_bar(total=len(pairs), desc=desc or "", unit="tiles", enabled=desc is not None) as bar:
        for rows_a, rows_b in pairs:
            if rows_a[0] == rows_b[0]:
                tile = _product(resident, rows_a, rows_b, scratch)  # [a rows, b rows], entries not yet clipped
                _merge_excluding(state, _candidates_per_row(_clipped(tile), rows_a, rows_a[0], state, 1), not_self)
            else:
                _merge_off_diagonal(state, resident, rows_a, rows_b, scratch)
            bar.update(1)
    return exact_top_k(state, unit, unit)


# A diagonal tile is multiplied as the sub-tiles on and above the diagonal of its
# DIAGONAL_PARTS x DIAGONAL_PARTS grid: 10 of 16 for 4, where the whole square would compute
# every pair twice. Parts keep at least MIN_PART_ROWS rows (and more than k), so each diagonal
# sub-tile still fills its rows' top k and the products stay large enough to run at the GEMM
# rate. On the first 32768 rows of the 1B (k = 10, blocks of 4096; Intel Xeon, OpenBLAS
# SkylakeX, 2 cores) a diagonal tile's products took 0.13-0.14 s against 0.18-0.24 s whole, and
# the per-row selection of the eight diagonal tiles 0.07 s against 0.46-0.51 s (a row's best of
# 1024 entries instead of 4096).
DIAGONAL_PARTS = 4
MIN_PART_ROWS = 512


def diagonal_parts(rows: np.ndarray, k: int) -> list[np.ndarray]:
    """The row spans a diagonal tile over ``rows`` is cut into: up to DIAGONAL_PARTS equal ones."""
    count = max(1, min(DIAGONAL_PARTS, len(rows) // max(MIN_PART_ROWS, k + 1)))
    return np.array_split(rows, count)


def _product(unit: Resident, rows_a: np.ndarray, rows_b: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    return unit.times_rows(slice(rows_a[0], rows_a[-1] + 1), slice(rows_b[0], rows_b[-1] + 1), scratch)  # [a, b] float32


def _merge_off_diagonal(state: RunningTopK, unit: Resident, rows_a: np.ndarray, rows_b: np.ndarray, scratch: np.ndarray) -> None:
    """Offer the tile of ``rows_a`` times ``rows_b`` (above the diagonal) to the queries of its rows,
    then to those of its columns (the two sets are disjoint, so neither offer moves the other's
    thresholds). On a torch device only the entries that reach a threshold leave it."""
    worst_a, worst_b = state.worst_score[rows_a], state.worst_score[rows_b]
    if not ((worst_a > -np.inf).all() and (worst_b > -np.inf).all()):
        # Only with blocks smaller than k + 1 rows: some top-k is still unfilled.
        tile = _product(unit, rows_a, rows_b, scratch)  # [a rows, b rows], entries not yet clipped
        state.merge(*_candidates_per_row(tile, rows_a, int(rows_b[0]), state, 0))
        state.merge(*_candidates_per_column(tile, int(rows_a[0]), rows_b, state))
        return
    floors = _unclipped_threshold(worst_a), _unclipped_threshold(worst_b)
    if unit.on_device is not None:
        span_a, span_b = slice(rows_a[0], rows_a[-1] + 1), slice(rows_b[0], rows_b[-1] + 1)
        (r, c, value), (column_r, column_c, column_value) = unit.hits_between(span_a, span_b, *floors)
    else:
        from pipeline.core.knn_kernels import tile_hits

        tile = _product(unit, rows_a, rows_b, scratch)  # [a rows, b rows], entries not yet clipped
        (r, c), (column_r, column_c) = tile_hits(tile, *floors)
        value, column_value = tile[r, c], tile[column_r, column_c]
    state.merge(*_beating(state, rows_a[r], c + int(rows_b[0]), _clipped(value)))
    state.merge(*_beating(state, rows_b[column_c], column_r + int(rows_a[0]), _clipped(column_value)))


def _candidates_per_column(
    tile: np.ndarray, key_start: int, queries: np.ndarray, state: RunningTopK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`_candidates_per_row` for the queries along the columns of ``tile``."""
    worst = state.worst_score[queries]
    if not (worst > -np.inf).all():
        # Only with blocks smaller than k + 1 rows: take the simple path on a transposed copy.
        return _candidates_per_row(np.ascontiguousarray(tile.T), queries, key_start, state, 0)
    # Comparing against a row of thresholds keeps the pass over the tile contiguous.
    r, c = _nonzero(tile >= _unclipped_threshold(worst)[None, :])
    return _beating(state, queries[c], r.astype(np.int64) + key_start, _clipped(tile[r, c]))


def brute_force_neighbors(unit: np.ndarray, k: int, exclude_self: bool = True) -> Neighbors:
    """The reference: every pair's float64 cosine, sorted row by row (small inputs only)."""
    from pipeline.core.determinism import row_dots

    n = len(unit)
    a, b = np.divmod(np.arange(n * n), n)
    cos = np.clip(row_dots(unit[a], unit[b]), -1.0, 1.0).reshape(n, n)  # [n, n] float64
    ids = np.broadcast_to(np.arange(n), (n, n))
    order = np.lexsort((ids, -cos), axis=-1)
    if exclude_self:
        order = np.array([row[row != i] for i, row in enumerate(order)]).reshape(n, n - 1)
    order = order[:, :k]
    cosines = np.take_along_axis(cos, order, axis=-1).astype(np.float32) + np.float32(0.0)
    return Neighbors(ids=order.astype(np.int64), cosines=cosines)


# --------------------------------------------------------------------------------------
# The exact decision after the float32 screen

def screen_margin(queries: np.ndarray) -> np.ndarray:
    """float64 [q]: how far below its k-th float32 cosine a query keeps keys: twice the float32
    error bound, so whatever is left out is below k others in float64 too; 0 for a zero query,
    whose float32 cosines are all exactly 0."""
    from pipeline.core.determinism import float32_dot_error

    margin = np.full(len(queries), 2 * float32_dot_error(queries.shape[1]))
    margin[~queries.any(axis=1)] = 0.0
    return margin


def exact_top_k(state: RunningTopK, queries: np.ndarray, keys: np.ndarray) -> Neighbors:
    """The k nearest keys of each query by float64 cosine, from a float32 screen.

    ``state`` holds each query's best keys by float32 cosine and those within its margin
    (:func:`screen_margin`); ``queries`` [q, dim] and ``keys`` [n, dim] are the unit rows it
    multiplied. Those keys are rescored in float64 (:func:`pipeline.core.determinism.row_dots`,
    a fixed order) and ranked by cosine, then id.

    Why nothing else can rank: every key left out has a float32 cosine below the final
    k-th float32 cosine minus twice the bound, so a float64 cosine below that k-th minus the
    bound, which each of the k keys with the best float32 cosines reaches.
    """
    from pipeline.core.determinism import top_k_pairs

    query, found = state.candidates()
    ids, cosines = top_k_pairs(query, found, _cosines_on_cores(queries, query, keys, found, compiled=True), len(state.ids), state.k)
    return _published(ids, cosines)
