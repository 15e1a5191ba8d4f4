"""The neighbour searches' inner loops, compiled with numba: finding a tile's candidates,
merging them into the running top-k, screening a chunk's scores and scoring candidate pairs
in float64 (:func:`pair_dots`, the engine's cosine to the bit).

:func:`pipeline.core.knn.knn_graph` offers each tile above the diagonal to the queries of its
rows and to those of its columns. Once every query holds a top-k, few entries reach either
threshold, so what costs is looking: in numpy that was two comparison passes over the tile,
each writing a mask and scanning it, on one core. :func:`tile_hits` has each core read its
band of rows once, test a run of entries against both thresholds in one vectorised sum, and
look at single entries only in runs that hold a hit. The hits come out in row-major order, as
``np.nonzero`` of each mask lists them.

A tile's candidates are a few per query, each to be placed among the query's k kept ones:
sorting all of them with every touched query's k (numpy's lexsort) cost more than the
screen. :func:`insert_candidates` inserts them one by one into the sorted lists instead. The
lists end as the sort left them, and what falls out is the same set, so the search's answer
does not change by a bit.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np

from pipeline.core.parallel import span_map

RUN = 64  # entries tested together before any is looked at alone
FIRST_CAPACITY = 1 << 12  # hits a band's buffers hold before the band is scanned again, larger


# The test of a whole run is a sum of 0.0s and 1.0s that may be added in any order (every
# partial sum is exact), so the compiler may vectorise it: tile_hits on a 4096 x 4096 tile of
# the 1B took 14-16 ms on two cores against 34 ms with a count of booleans (Intel Xeon,
# AVX-512). Nothing else is reordered: "reassoc" and "nsz" only, no assumption that values
# are finite (the floors may be -inf, the values NaN).
RUN_TEST = {"reassoc", "nsz"}


@numba.njit(nogil=True, cache=True, fastmath=RUN_TEST)
def _run_reaches(row, start, stop, floor, column_floor):  # pragma: no cover - compiled
    """Whether any of ``row[start:stop]`` (float32) reaches ``floor`` or its column's ``column_floor``."""
    found = np.float32(0.0)
    for j in range(start, stop):
        value = row[j]
        found += np.float32(value >= floor) + np.float32(value >= column_floor[j])
    return found != 0


@numba.njit(nogil=True, cache=True)
def _band_hits(tile, row_floor, column_floor, first, last, row_r, row_c, column_r, column_c):  # pragma: no cover - compiled
    """Scan rows ``first`` to ``last`` of ``tile`` [a, b] float32; write (row, column) of the entries
    >= their row's ``row_floor`` [a] into ``row_r``/``row_c`` and of those >= their column's
    ``column_floor`` [b] into ``column_r``/``column_c``, as far as the buffers reach; return both
    counts (a count above a buffer's length means the band must be scanned again)."""
    capacity = row_r.shape[0]
    rows_found = 0
    columns_found = 0
    width = tile.shape[1]
    for i in range(first, last):
        floor = row_floor[i]
        row = tile[i]
        for start in range(0, width, RUN):
            stop = min(start + RUN, width)
            if not _run_reaches(row, start, stop, floor, column_floor):
                continue
            for j in range(start, stop):
                value = row[j]
                if value >= floor:
                    if rows_found < capacity:
                        row_r[rows_found] = i
                        row_c[rows_found] = j
                    rows_found += 1
                if value >= column_floor[j]:
                    if columns_found < capacity:
                        column_r[columns_found] = i
                        column_c[columns_found] = j
                    columns_found += 1
    return rows_found, columns_found


def _band(tile: np.ndarray, row_floor: np.ndarray, column_floor: np.ndarray, span: tuple[int, int]):
    capacity = FIRST_CAPACITY
    while True:
        buffers = [np.empty(capacity, np.int64) for _ in range(4)]  # row_r, row_c, column_r, column_c
        rows_found, columns_found = _band_hits(tile, row_floor, column_floor, span[0], span[1], *buffers)
        if max(rows_found, columns_found) <= capacity:
            row_r, row_c, column_r, column_c = buffers
            return row_r[:rows_found], row_c[:rows_found], column_r[:columns_found], column_c[:columns_found]
        capacity = max(rows_found, columns_found)


def tile_hits(
    tile: np.ndarray, row_floor: np.ndarray, column_floor: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((r, c) where ``tile >= row_floor[:, None]``, (r, c) where ``tile >= column_floor[None, :]``),
    each as ``np.nonzero`` gives it (int64, row-major), for a C-contiguous float32 ``tile`` [a, b]
    and float32 floors [a] and [b]; the cores share the rows."""
    tile = np.ascontiguousarray(tile, dtype=np.float32)
    row_floor = np.ascontiguousarray(row_floor, dtype=np.float32)
    column_floor = np.ascontiguousarray(column_floor, dtype=np.float32)
    bands = span_map(lambda span: _band(tile, row_floor, column_floor, span), tile.shape[0])
    row_r, row_c, column_r, column_c = (np.concatenate(part) for part in zip(*bands))
    return (row_r, row_c), (column_r, column_c)


@numba.njit(nogil=True, cache=True)
def insert_candidates(scores, ids, queries, candidate_ids, candidate_scores, out_q, out_i, out_s):  # pragma: no cover - compiled
    """Insert each candidate (``queries``, ``candidate_ids``, ``candidate_scores`` [m]) into its query's
    row of ``scores`` / ``ids`` [n, k], kept sorted by score down, then id up; write the entry each
    insertion leaves out (the candidate itself, or the k-th it displaced) at the same place of
    ``out_q`` / ``out_i`` / ``out_s`` [m]. A (query, id) pair may come once."""
    last = scores.shape[1] - 1
    for e in range(queries.shape[0]):
        q, i, s = queries[e], candidate_ids[e], candidate_scores[e]
        out_q[e] = q
        if not (s > scores[q, last] or (s == scores[q, last] and i < ids[q, last])):
            out_i[e], out_s[e] = i, s
            continue
        out_i[e], out_s[e] = ids[q, last], scores[q, last]
        place = last
        while place > 0 and (s > scores[q, place - 1] or (s == scores[q, place - 1] and i < ids[q, place - 1])):
            scores[q, place], ids[q, place] = scores[q, place - 1], ids[q, place - 1]
            place -= 1
        scores[q, place], ids[q, place] = s, i


# The bounded screen's pass over a chunk's scores (pipeline.core.screen): which (query, row)
# pairs reach their query's threshold. torch's comparison and nonzero over the bfloat16
# scores took longer than the product that made them.


def widen(value):  # pragma: no cover - replaced by the overload below in compiled code
    raise NotImplementedError


@numba.extending.overload(widen, inline="always")
def _widen(value):  # pragma: no cover - compiled
    """A score as float32: a float32 as it is, a uint16 as the bfloat16 whose bits it holds (exact)."""
    if isinstance(value, numba.types.Float):
        return lambda value: np.float32(value)
    if isinstance(value, numba.types.Integer):
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    return None


@numba.njit(nogil=True, cache=True)
def _screen_hits(scores, threshold, query, column, approx):  # pragma: no cover - compiled
    """Write (query, column, score as float32) of the entries of ``scores`` [s, n] (float32, or
    uint16 bfloat16 bits) that are >= their query's ``threshold`` [s] float32 and above -inf,
    row-major, as far as the buffers reach; return how many there are."""
    capacity = query.shape[0]
    found = 0
    width = scores.shape[1]
    for i in range(scores.shape[0]):
        floor = threshold[i]
        for start in range(0, width, RUN):
            stop = min(start + RUN, width)
            hits = 0
            for j in range(start, stop):
                hits += widen(scores[i, j]) >= floor
            if hits == 0:
                continue
            for j in range(start, stop):
                value = widen(scores[i, j])
                if value >= floor and value > -np.inf:
                    if found < capacity:
                        query[found], column[found], approx[found] = i, j, value
                    found += 1
    return found


def screen_hits(scores: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([m] query, [m] column, [m] float32 score) where ``scores`` [s, n] (C-contiguous float32,
    or uint16 holding bfloat16 bits) >= ``threshold[query]`` (float32 [s]) and is above -inf,
    in the order of ``np.nonzero``."""
    threshold = np.ascontiguousarray(threshold, dtype=np.float32)
    capacity = FIRST_CAPACITY * 16
    while True:
        query, column, approx = np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.float32)
        found = _screen_hits(scores, threshold, query, column, approx)
        if found <= capacity:
            return query[:found], column[:found], approx[:found]
        capacity = found


# The engine's float64 cosine of candidate pairs (pipeline.core.determinism.row_dots_at), reading
# the rows in place. row_dots is numpy's einsum "ij,ij->i", whose loop for two contiguous float64
# operands adds in one fixed order at numpy's 128-bit baseline, on every x86 CPU: two lanes (even
# and odd terms), each updated per eight terms as t0 + (t2 + (t4 + (t6 + lane))), the last terms
# two at a time (a missing odd one counts +0.0), then 0.0 + (even + odd). The kernel below adds
# in exactly that order (a test holds it to row_dots bit for bit), so the cosines are the same
# numbers; it runs four pairs side by side, whose chains do not wait for one another, and gathers
# no rows: on the 327 680 pairs of the 1B's first 32768 rows (k = 10) one core took 0.41 s
# against 0.83 s for row_dots_at.


@numba.njit(nogil=True, cache=True, inline="always")
def _term(x, y, i):  # pragma: no cover - compiled
    return np.float64(x[i]) * np.float64(y[i])


@numba.njit(nogil=True, cache=True, inline="always")
def _lane_step(x, y, i, lane):  # pragma: no cover - compiled
    """One lane's update over terms i, i + 2, i + 4, i + 6."""
    return _term(x, y, i) + (_term(x, y, i + 2) + (_term(x, y, i + 4) + (_term(x, y, i + 6) + lane)))


@numba.njit(nogil=True, cache=True, inline="always")
def _lanes_end(x, y, i, even, odd):  # pragma: no cover - compiled
    """The terms from i on, two at a time, then the two lanes added."""
    n = x.shape[0]
    while i < n:
        even = _term(x, y, i) + even
        odd = (_term(x, y, i + 1) if i + 1 < n else 0.0) + odd
        i += 2
    return 0.0 + (even + odd)


@numba.njit(nogil=True, cache=True)
def pair_dots(a, a_rows, b, b_rows, out):  # pragma: no cover - compiled
    """``out[p]`` = the dot of ``a[a_rows[p]]`` and ``b[b_rows[p]]`` in float64 ([m] each; rows
    float32 or float64 of one width), in row_dots' order."""
    m = a_rows.shape[0]
    n = a.shape[1]
    p = 0
    while m - p >= 4:
        x0, y0 = a[a_rows[p]], b[b_rows[p]]
        x1, y1 = a[a_rows[p + 1]], b[b_rows[p + 1]]
        x2, y2 = a[a_rows[p + 2]], b[b_rows[p + 2]]
        x3, y3 = a[a_rows[p + 3]], b[b_rows[p + 3]]
        e0 = o0 = e1 = o1 = e2 = o2 = e3 = o3 = 0.0
        i = 0
        while n - i >= 8:
            e0, o0 = _lane_step(x0, y0, i, e0), _lane_step(x0, y0, i + 1, o0)
            e1, o1 = _lane_step(x1, y1, i, e1), _lane_step(x1, y1, i + 1, o1)
            e2, o2 = _lane_step(x2, y2, i, e2), _lane_step(x2, y2, i + 1, o2)
            e3, o3 = _lane_step(x3, y3, i, e3), _lane_step(x3, y3, i + 1, o3)
            i += 8
        out[p] = _lanes_end(x0, y0, i, e0, o0)
        out[p + 1] = _lanes_end(x1, y1, i, e1, o1)
        out[p + 2] = _lanes_end(x2, y2, i, e2, o2)
        out[p + 3] = _lanes_end(x3, y3, i, e3, o3)
        p += 4
    while p < m:
        x, y = a[a_rows[p]], b[b_rows[p]]
        even = odd = 0.0
        i = 0
        while n - i >= 8:
            even, odd = _lane_step(x, y, i, even), _lane_step(x, y, i + 1, odd)
            i += 8
        out[p] = _lanes_end(x, y, i, even, odd)
        p += 1
