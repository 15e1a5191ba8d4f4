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
the result does not depend on the BLAS kernel, the thread count or ``block_rows``.

How the search stays fast: the cosines are computed tile by tile (``block_rows`` x
``block_rows``), and a running top-k per query keeps its current worst entry. A tile
entry can only enter the top-k if it beats that worst entry, so after the first tile
most of a tile is discarded by one comparison pass, and only the few survivors are
sorted. For the kNN graph of a whole vocabulary the cosine matrix is symmetric, so only
the tiles on and above the diagonal are multiplied and each serves both its rows and its
columns, which halves the matmul work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pipeline.core.errors import DissectError

# Bounds of the search settings (similarity.k, drift.k, export.neighbors_k, *.block_rows):
# past them a search would ask for more memory than any machine has, not a bigger answer.
# A tile is block_rows x block_rows float32 cosines: 1 GiB at the bound.
MAX_K = 10_000
MAX_BLOCK_ROWS = 1 << 14

EMPTY_ID = np.iinfo(np.int64).max  # id of an unfilled slot: it loses every tie


def iter_blocks(matrix: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, matrix.shape[0], block_rows):
        yield start, matrix[start : start + block_rows]


def unit_rows(matrix: np.ndarray, block_rows: int = 8192, inplace: bool = False, what: str = "the matrix") -> np.ndarray:
    """Rows of ``matrix`` scaled to unit L2 norm (float32); zero rows stay zero.

    The norm is taken in float64 so tiny and huge rows normalise without under- or
    overflow. ``inplace`` reuses ``matrix``'s memory when it is a writable float32 array,
    which saves a whole copy of the matrix. Raises :class:`DissectError` on NaN or Inf.
    """
    reuse = inplace and matrix.dtype == np.float32 and matrix.flags.writeable and matrix.flags.c_contiguous
    out = matrix if reuse else np.empty(matrix.shape, dtype=np.float32)  # [rows, dim]
    for start, block in iter_blocks(matrix, block_rows):
        wide = block.astype(np.float64)  # [block, dim]
        if not np.isfinite(wide).all():
            bad = start + int(np.flatnonzero(~np.isfinite(wide).all(axis=1))[0])
            raise DissectError(
                f"{what} has NaN or Inf in row {bad}; cosines of such rows are undefined: "
                "re-extract the embeddings from intact weights"
            )
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))  # [block]
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        out[start : start + len(block)] = wide * scale[:, None]
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

    def __init__(self, n_queries: int, k: int, margin: np.ndarray | None = None):
        self.k = k
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
        out = out[self.margin[all_q[out]] > 0]
        if out.size:
            q = all_q[out]
            near = (all_s[out] >= self.scores[q, -1] - self.margin[q]) & (all_i[out] != EMPTY_ID)
            self.near_q.append(q[near])
            self.near_i.append(all_i[out][near])
            self.near_s.append(all_s[out][near])

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
        parts.append(_tile_top(tile, queries, key_start, state.k + slack, rows, state.margin[queries[rows]]))
    if len(parts) < 2:
        return parts[0] if parts else _no_triples()
    return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


def _beating_worst(
    tile: np.ndarray, queries: np.ndarray, key_start: int, state: RunningTopK, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries that beat the worst kept entry of their query (cosine higher, or equal with a lower id)."""
    sub = tile if rows.size == tile.shape[0] else tile[rows]  # [rows, cols]
    r, c = _nonzero(sub >= state.worst_score[queries[rows]][:, None])
    return _beating(state, queries[rows[r]], c.astype(np.int64) + key_start, sub[r, c])


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
    sub = tile if rows.size == tile.shape[0] else tile[rows]  # [rows, cols]
    cols = sub.shape[1]
    if m >= cols:
        r, c = np.nonzero(np.ones(sub.shape, dtype=bool))
    else:
        kth = np.partition(sub, cols - m, axis=1)[:, cols - m]  # [rows], the m-th largest
        above = sub > kth[:, None]
        tied = sub == kth[:, None]
        for row in np.flatnonzero(tied.sum(axis=1) > m):
            tied[row, np.flatnonzero(tied[row])[m:]] = False
        keep = above | tied
        if margin is not None and (margin > 0).any():
            wide = kth.astype(np.float64) - margin
            low = wide.astype(np.float32)
            low = np.where(low > wide, np.nextafter(low, np.float32(-np.inf)), low)
            keep |= (sub >= low[:, None]) & (margin > 0)[:, None]
        r, c = np.nonzero(keep)
    return queries[rows[r]], c.astype(np.int64) + key_start, sub[r, c]


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




def nearest_keys(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    block_rows: int = 4096,
    exclude: list[np.ndarray] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Neighbors:
    """The k nearest rows of ``keys`` [n, dim] for each row of ``queries`` [q, dim].

    Both must already be unit rows (:func:`unit_rows`). ``exclude[i]`` lists key ids query
    i may not return (a word's own tokens). One pass over ``keys``: each block of
    ``block_rows`` keys is multiplied against all queries at once.
    """
    exclude = exclude if exclude is not None else [np.empty(0, np.int64)] * len(queries)
    slack = max((len(e) for e in exclude), default=0)
    excluder = _pair_excluder(exclude, keys.shape[0]) if slack else None
    state = RunningTopK(len(queries), k, screen_margin(queries))
    query_ids = np.arange(len(queries))
    for start, block in iter_blocks(keys, block_rows):
        tile = queries @ block.T  # [q, block]
        np.clip(tile, -1.0, 1.0, out=tile)
        _merge_excluding(state, _candidates_per_row(tile, query_ids, start, state, slack), excluder)
        if progress is not None:
            progress(len(block))
    return exact_top_k(state, queries, keys)


def _pair_excluder(exclude: list[np.ndarray], n_keys: int) -> Excluder:
    pairs = np.concatenate([np.asarray(e, np.int64) + i * n_keys for i, e in enumerate(exclude)])  # [pairs]

    def excluded(q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.isin(q * n_keys + ids, pairs)

    return excluded


def knn_graph(
    unit: np.ndarray, k: int, block_rows: int = 4096, progress: Callable[[int], object] | None = None
) -> Neighbors:
    """The k nearest other rows of every row of ``unit`` [n, dim] (unit rows), self excluded.

    Tiles ``block_rows`` x ``block_rows`` on and above the diagonal are each multiplied
    once; a tile offers candidates to the queries of its rows and of its columns. Diagonal
    tiles go first so every row has a full top-k (a threshold) before the off-diagonal
    tiles, which are then mostly discarded by one comparison. ``progress`` is called with
    the number of tiles done.
    """
    n = unit.shape[0]
    state = RunningTopK(n, k, screen_margin(unit))
    starts = list(range(0, n, block_rows))
    not_self: Excluder = lambda q, ids: q == ids  # noqa: E731
    for start in starts:
        rows = np.arange(start, min(start + block_rows, n))
        tile = _tile(unit, rows, rows)
        _merge_excluding(state, _candidates_per_row(tile, rows, start, state, 1), not_self)
        if progress is not None:
            progress(1)
    for a, start_a in enumerate(starts):
        rows_a = np.arange(start_a, min(start_a + block_rows, n))
        for start_b in starts[a + 1 :]:
            rows_b = np.arange(start_b, min(start_b + block_rows, n))
            tile = _tile(unit, rows_a, rows_b)  # [a rows, b rows]
            state.merge(*_candidates_per_row(tile, rows_a, start_b, state, 0))
            state.merge(*_candidates_per_column(tile, start_a, rows_b, state))
            if progress is not None:
                progress(1)
    return exact_top_k(state, unit, unit)


def _tile(unit: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    tile = unit[rows_a[0] : rows_a[-1] + 1] @ unit[rows_b[0] : rows_b[-1] + 1].T  # [a, b]
    return np.clip(tile, -1.0, 1.0, out=tile)


def _candidates_per_column(
    tile: np.ndarray, key_start: int, queries: np.ndarray, state: RunningTopK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`_candidates_per_row` for the queries along the columns of ``tile``."""
    worst = state.worst_score[queries]
    if not (worst > -np.inf).all():
        # Only with blocks smaller than k + 1 rows: take the simple path on a transposed copy.
        return _candidates_per_row(np.ascontiguousarray(tile.T), queries, key_start, state, 0)
    # Comparing against a row of thresholds keeps the pass over the tile contiguous.
    r, c = _nonzero(tile >= worst[None, :])
    return _beating(state, queries[c], r.astype(np.int64) + key_start, tile[r, c])


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
    from pipeline.core.determinism import row_dots_at, top_k_pairs

    query, found = state.candidates()
    exact = np.clip(row_dots_at(queries, query, keys, found), -1.0, 1.0)  # [m] float64
    ids, cosines = top_k_pairs(query, found, exact, len(state.ids), state.k)
    # +0.0 turns a -0.0 cosine into 0.0, so equal tables are equal bytes
    return Neighbors(ids=ids, cosines=cosines.astype(np.float32) + np.float32(0.0))
