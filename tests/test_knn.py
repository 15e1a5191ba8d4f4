"""Exact blocked cosine top-k: hand-checked cases and the brute-force reference."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core.errors import DissectError
from pipeline.core import knn, knn_kernels
from pipeline.core.knn import RunningTopK, TopK, _nonzero, _tile_top, _tile_top_on_cores, brute_force_neighbors, diagonal_parts, excluding_own, knn_graph, nearest_keys, unit_rows

# Rows 0..3 of a 4x3 matrix, worked out by hand:
#   r0 = (1, 0, 0)  unit (1, 0, 0)
#   r1 = (0, 2, 0)  unit (0, 1, 0)
#   r2 = (3, 3, 0)  unit (1/sqrt2, 1/sqrt2, 0)
#   r3 = (0, 0, 0)  norm 0: no direction, cosine 0 with everything
# cos(r0, r1) = 0, cos(r0, r2) = cos(r1, r2) = 1/sqrt2 = 0.70710677 (the same float32,
# since both are 1 * 0.70710677), cos(r3, *) = 0.
# Nearest 2 (self excluded; equal cosines go to the lower id):
#   r0: r2 (0.7071), then r1 and r3 tie at 0 -> r1
#   r1: r2 (0.7071), then r0 and r3 tie at 0 -> r0
#   r2: r0 and r1 tie at 0.7071 -> r0, r1
#   r3: all tie at 0 -> r0, r1
HAND = np.array([[1, 0, 0], [0, 2, 0], [3, 3, 0], [0, 0, 0]], dtype=np.float32)
S = np.float32(1 / np.sqrt(2))
HAND_IDS = [[2, 1], [2, 0], [0, 1], [0, 1]]
HAND_COS = [[S, 0], [S, 0], [S, S], [0, 0]]


@pytest.mark.parametrize("block_rows", [1, 2, 3, 4, 4096])
def test_hand_matrix_graph(block_rows):
    result = knn_graph(unit_rows(HAND), k=2, block_rows=block_rows)
    assert result.ids.tolist() == HAND_IDS
    assert np.array_equal(result.cosines, np.array(HAND_COS, dtype=np.float32))


def test_hand_matrix_word_query_excludes_own_tokens():
    # The query (2, 2, 0) points like r2; excluding r2 (its "own token") leaves r0 and r1 at
    # 1/sqrt2 each, lower id first, then the zero row r3 at 0.
    query = unit_rows(np.array([[2, 2, 0]], dtype=np.float32))
    result = nearest_keys(query, unit_rows(HAND), k=3, block_rows=2, exclude=[np.array([2])])
    assert result.ids.tolist() == [[0, 1, 3]]
    assert np.array_equal(result.cosines, np.array([[S, S, 0]], dtype=np.float32))


def test_unit_rows_keeps_zero_rows_and_handles_extremes():
    matrix = np.array([[3, 4], [0, 0], [1e-42, 0], [3e38, 3e38]], dtype=np.float32)
    unit = unit_rows(matrix)
    assert np.allclose(unit, [[0.6, 0.8], [0, 0], [1, 0], [S, S]])
    assert not np.isnan(unit).any()


def test_unit_rows_in_place_reuses_the_matrix():
    matrix = np.array([[3, 4], [0, 5]], dtype=np.float32)
    unit = unit_rows(matrix, inplace=True)
    assert np.shares_memory(unit, matrix)
    assert np.allclose(matrix, [[0.6, 0.8], [0, 1]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_refused(bad):
    matrix = np.ones((5, 3), dtype=np.float32)
    matrix[3, 1] = bad
    with pytest.raises(DissectError, match="row 3"):
        unit_rows(matrix, block_rows=2, what="embeddings.parquet")




# --------------------------------------------------------------------------------------
# The brute-force reference


@st.composite
def exact_matrices(draw, max_rows: int = 40):
    """Rows whose cosines float32 computes exactly, in any summation order.

    Each row has 0, 1 or 4 entries of +-1 (times a power of two), so its unit row holds
    0, +-1 or +-0.5 and every dot product is a multiple of 1/4. Exact ties are everywhere,
    which is the hard case for a blocked top-k.
    """
    rows = draw(st.integers(1, max_rows))
    dim = draw(st.integers(4, 8))
    matrix = np.zeros((rows, dim), dtype=np.float32)
    for row in range(rows):
        count = draw(st.sampled_from([0, 1, 4]))
        places = draw(st.permutations(range(dim)))[:count]
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=count, max_size=count))
        scale = draw(st.sampled_from([0.25, 1.0, 8.0]))
        matrix[row, places] = np.array(signs, dtype=np.float32) * scale
    return matrix


@settings(max_examples=60, deadline=None)
@given(matrix=exact_matrices(), k=st.integers(1, 12), block_rows=st.sampled_from([1, 2, 3, 5, 16, 64]))
def test_graph_equals_brute_force_exactly(matrix, k, block_rows):
    unit = unit_rows(matrix)
    expected = brute_force_neighbors(unit, k)
    got = knn_graph(unit, k, block_rows)
    width = expected.ids.shape[1]  # fewer than k when the matrix has <= k rows
    assert np.array_equal(got.ids[:, :width], expected.ids)
    assert np.array_equal(got.cosines[:, :width], expected.cosines)
    assert (got.ids[:, width:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(matrix=exact_matrices(), k=st.integers(1, 12), block_rows=st.sampled_from([2, 5, 16, 64]))
def test_graph_with_cut_diagonal_tiles_equals_brute_force_exactly(matrix, k, block_rows):
    # Parts of a single row upward: diagonal tiles cut into up to 4 x 4 sub-tiles, some of
    # them too small to fill a top k, with exact ties everywhere.
    unit = unit_rows(matrix)
    expected = brute_force_neighbors(unit, k)
    with mock.patch.object(knn, "MIN_PART_ROWS", 1):
        got = knn_graph(unit, k, block_rows)
    width = expected.ids.shape[1]
    assert np.array_equal(got.ids[:, :width], expected.ids)
    assert np.array_equal(got.cosines[:, :width], expected.cosines)
    assert (got.ids[:, width:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 40), pairs=st.integers(0, 30), wide=st.booleans())
def test_pair_dots_are_row_dots_bit_for_bit(seed, dim, pairs, wide):
    # Random floats of mixed scale: any other order of the additions shows in the last bits.
    from pipeline.core.determinism import row_dots_at

    rng = np.random.default_rng(seed)
    dtype = np.float64 if wide else np.float32
    a = (rng.standard_normal((7, dim)) * rng.choice([1e-3, 1.0, 1e3], size=(7, dim))).astype(dtype)
    b = (rng.standard_normal((5, dim)) * rng.choice([1e-3, 1.0, 1e3], size=(5, dim))).astype(dtype)
    a_rows, b_rows = rng.integers(0, 7, pairs), rng.integers(0, 5, pairs)
    got = np.empty(pairs)
    knn_kernels.pair_dots(a, a_rows, b, b_rows, got)
    assert got.tobytes() == row_dots_at(a, a_rows, b, b_rows).tobytes()


@pytest.mark.parametrize("dim", [576, 2048, 2051])
def test_compiled_cosines_are_the_engines_at_model_widths(dim):
    rng = np.random.default_rng(dim)
    unit = unit_rows(rng.standard_normal((300, dim)).astype(np.float32))
    query, key = rng.integers(0, 300, 1001), rng.integers(0, 300, 1001)
    assert knn._cosines(unit, query, unit, key, compiled=True).tobytes() == knn._cosines(unit, query, unit, key).tobytes()


def test_diagonal_parts_by_hand():
    # 4096 rows, k = 10: four parts of 1024; 1000 rows: one (two would be under 512 rows);
    # 2048 rows with k = 700: two, each with more than k rows.
    assert [len(part) for part in diagonal_parts(np.arange(4096), 10)] == [1024] * 4
    assert [len(part) for part in diagonal_parts(np.arange(1000), 10)] == [1000]
    assert [len(part) for part in diagonal_parts(np.arange(2048), 700)] == [1024, 1024]
    assert np.concatenate(diagonal_parts(np.arange(5, 4101), 3)).tolist() == list(range(5, 4101))


def test_graph_with_diagonal_tiles_cut_as_in_a_vocabulary_is_the_uncut_graph():
    # 1100 clustered rows with duplicates and a zero row: blocks of 1100 are cut in two parts
    # of 550 (MIN_PART_ROWS as it is), blocks of 256 are not cut; the answer is the same to the byte.
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 8))
    rows = (centres[rng.integers(0, 20, 1100)] + 0.05 * rng.standard_normal((1100, 8))).astype(np.float32)
    rows[100:110] = rows[7]
    rows[500] = 0.0
    unit = unit_rows(rows)
    assert len(diagonal_parts(np.arange(1100), 6)) == 2
    cut, uncut = knn_graph(unit, 6, 1100), knn_graph(unit, 6, 256)
    assert np.array_equal(cut.ids, uncut.ids) and cut.cosines.tobytes() == uncut.cosines.tobytes()
    assert np.array_equal(cut.ids, brute_force_neighbors(unit, 6).ids)


@settings(max_examples=40, deadline=None)
@given(
    matrix=arrays(np.float32, st.tuples(st.integers(2, 50), st.integers(1, 6)), elements=st.floats(-4, 4, width=32)),
    k=st.integers(1, 8),
    block_rows=st.sampled_from([1, 3, 7, 32]),
)
def test_graph_matches_brute_force_on_arbitrary_floats(matrix, k, block_rows):
    """On arbitrary floats BLAS may round a cosine differently per block shape (1 ulp): the
    neighbours must then be as good as the reference's, rank by rank, and truly that close."""
    unit = unit_rows(matrix)
    exact = np.clip(unit.astype(np.float64) @ unit.T.astype(np.float64), -1, 1)  # [n, n]
    expected = brute_force_neighbors(unit, k)
    got = knn_graph(unit, k, block_rows)
    width = expected.ids.shape[1]
    ids, cosines = got.ids[:, :width], got.cosines[:, :width]
    assert (ids != np.arange(len(unit))[:, None]).all()
    assert np.allclose(cosines, expected.cosines, atol=1e-6)
    assert np.allclose(np.take_along_axis(exact, ids, axis=1), cosines, atol=1e-6)
    assert (np.diff(cosines, axis=1) <= 0).all()  # nearest first
    assert all(len(set(row)) == width for row in ids.tolist())


@settings(max_examples=60, deadline=None)
@given(matrix=exact_matrices(max_rows=45), k=st.integers(1, 10), block_rows=st.sampled_from([1, 2, 7, 64]), data=st.data())
def test_word_queries_equal_brute_force(matrix, k, block_rows, data):
    n_queries = data.draw(st.integers(0, min(5, len(matrix) - 1)))
    keys, queries = matrix[n_queries:], matrix[:n_queries]  # the same exact family, same dim
    n = len(keys)
    exclude = [np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True)), dtype=np.int64) for _ in queries]
    unit_keys, unit_queries = unit_rows(keys), unit_rows(queries)
    got = nearest_keys(unit_queries, unit_keys, k, block_rows, exclude)
    cosines = np.clip(unit_queries @ unit_keys.T, -1, 1)  # [q, n]
    assert got.ids.shape == (n_queries, k)
    for q in range(n_queries):
        allowed = np.setdiff1d(np.arange(n), exclude[q])
        expected = allowed[np.lexsort((allowed, -cosines[q, allowed]))][:k]
        width = len(expected)
        assert got.ids[q, :width].tolist() == expected.tolist()
        assert np.array_equal(got.cosines[q, :width], cosines[q, expected] + np.float32(0))
        assert (got.ids[q, width:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(mask=arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_fast_nonzero_equals_numpy(mask):
    rows, cols = _nonzero(mask)
    expected_rows, expected_cols = np.nonzero(mask)
    assert rows.tolist() == expected_rows.tolist()
    assert cols.tolist() == expected_cols.tolist()


def test_tile_hits_by_hand():
    # Row floors 0.5 and -inf, column floors 0.2, 0.9, 0.0: row 0 reaches its floor at
    # columns 1 and 2 (0.5 counts: >=), row 1 everywhere; the columns are reached at
    # (0, 1) 0.9 >= 0.9, (0, 2) 0.5 >= 0.0, (1, 0) 0.3 >= 0.2, (1, 2) 0.0 >= 0.0.
    tile = np.array([[0.1, 0.9, 0.5], [0.3, -0.2, 0.0]], dtype=np.float32)
    (r, c), (cr, cc) = knn_kernels.tile_hits(tile, np.array([0.5, -np.inf], np.float32), np.array([0.2, 0.9, 0.0], np.float32))
    assert list(zip(r.tolist(), c.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert list(zip(cr.tolist(), cc.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2)]


FLOOR_LEVELS = st.sampled_from([-np.inf, -1.0, -0.25, 0.0, 0.25, 0.5, 1.0, np.inf])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 600), cols=st.integers(1, 300), capacity=st.sampled_from([1, 7, 4096]))
def test_tile_hits_equal_numpy_nonzero(data, rows, cols, capacity):
    # Entries on a coarse grid tie with the floors often; 600 rows are split among the cores;
    # a small first capacity makes the bands scan again with room for every hit.
    seed = data.draw(st.integers(0, 2**32 - 1))
    tile = (np.random.default_rng(seed).integers(-4, 5, size=(rows, cols)) / 4).astype(np.float32)
    row_floor = np.array(data.draw(st.lists(FLOOR_LEVELS, min_size=rows, max_size=rows)), np.float32)
    column_floor = np.array(data.draw(st.lists(FLOOR_LEVELS, min_size=cols, max_size=cols)), np.float32)
    with mock.patch.object(knn_kernels, "FIRST_CAPACITY", capacity):
        (r, c), (cr, cc) = knn_kernels.tile_hits(tile, row_floor, column_floor)
    expected_r, expected_c = np.nonzero(tile >= row_floor[:, None])
    expected_cr, expected_cc = np.nonzero(tile >= column_floor[None, :])
    assert r.tolist() == expected_r.tolist() and c.tolist() == expected_c.tolist()
    assert cr.tolist() == expected_cr.tolist() and cc.tolist() == expected_cc.tolist()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 80), cols=st.integers(1, 300), bfloat16=st.booleans(), capacity=st.sampled_from([1, 7, 4096]))
def test_screen_hits_equal_torch_nonzero(data, rows, cols, bfloat16, capacity):
    # The bounded screen's scores, bfloat16 or float32, with masked (-inf) and NaN entries,
    # against thresholds that may be -inf (a query before any top k); a small first capacity
    # makes the pass run again with room for every hit.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = torch.from_numpy((rng.integers(-4, 5, size=(rows, cols)) / 4).astype(np.float32))
    scores[torch.from_numpy(rng.random((rows, cols)) < 0.1)] = -torch.inf
    scores[torch.from_numpy(rng.random((rows, cols)) < 0.02)] = torch.nan
    scores = scores.to(torch.bfloat16) if bfloat16 else scores
    threshold = np.array(data.draw(st.lists(FLOOR_LEVELS, min_size=rows, max_size=rows)), np.float32)
    raw = scores.view(torch.int16).numpy().view(np.uint16) if bfloat16 else scores.numpy()
    with mock.patch.object(knn_kernels, "FIRST_CAPACITY", capacity):
        query, column, approx = knn_kernels.screen_hits(raw, threshold)
    where = torch.nonzero((scores >= torch.from_numpy(threshold)[:, None]) & (scores > -torch.inf))  # [m, 2]
    assert query.tolist() == where[:, 0].tolist() and column.tolist() == where[:, 1].tolist()
    assert approx.dtype == np.float32 and approx.tolist() == scores[where[:, 0], where[:, 1]].float().tolist()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), rows=st.one_of(st.integers(1, 40), st.integers(800, 1500)), cols=st.integers(1, 40), m=st.integers(1, 45))
def test_tile_top_on_the_cores_takes_what_one_core_takes(data, rows, cols, m):
    # Entries on a coarse grid tie often, at the m-th too; some queries have no margin; from
    # 512 rows on (taken from 800 and more) the rows are split among three workers.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tile = (rng.integers(-4, 5, size=(rows, cols)) / 4).astype(np.float32)  # [rows, cols]
    taken = np.flatnonzero(rng.random(rows) < 0.8)  # the queries with an unfilled top-k
    margin = np.where(rng.random(taken.size) < 0.5, 0.0, 0.3)  # [taken]
    queries = np.arange(rows) + 100
    with mock.patch("pipeline.core.parallel.worker_count", return_value=3):
        shared = _tile_top_on_cores(tile, queries, 7, m, taken, margin)
    alone = _tile_top(tile, queries, 7, m, taken, margin)
    assert all(np.array_equal(a, b) for a, b in zip(shared, alone))
    assert all(len(part) == len(alone[0]) for part in shared)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), queries=st.integers(1, 6), k=st.integers(1, 5), batches=st.integers(1, 4))
def test_compiled_merge_keeps_the_state_the_sorting_merge_keeps(data, queries, k, batches):
    # Scores on a coarse grid tie often (ties go to the lower id); query 0 has no margin, the
    # others keep what falls within 0.25 of their k-th aside.
    margin = np.where(np.arange(queries) == 0, 0.0, 0.25)
    sorting, compiled = RunningTopK(queries, k, margin), RunningTopK(queries, k, margin, compiled=True)
    pairs = data.draw(st.permutations([(q, i) for q in range(queries) for i in range(12)]))
    sizes = data.draw(st.lists(st.integers(0, 12), min_size=batches, max_size=batches))
    for start, stop in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)):
        batch = pairs[start:stop]
        q = np.array([p[0] for p in batch], np.int64)
        ids = np.array([p[1] for p in batch], np.int64)
        scores = np.array(data.draw(st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0]), min_size=len(batch), max_size=len(batch))), np.float32)
        for state in (sorting, compiled):
            state.merge(q, ids, scores)
    assert np.array_equal(sorting.scores, compiled.scores) and np.array_equal(sorting.ids, compiled.ids)
    assert np.array_equal(sorting.worst_score, compiled.worst_score) and np.array_equal(sorting.worst_id, compiled.worst_id)
    assert sorted(zip(*map(np.ndarray.tolist, sorting.candidates()))) == sorted(zip(*map(np.ndarray.tolist, compiled.candidates())))


def test_streaming_topk_on_raw_rows_excludes_own_rows_and_rows_without_direction():
    # Raw (not unit) rows in chunks of 3: the zero query ties at cosine 0 with every row, so
    # its k are the lowest ids, never its own row (0) nor the row with a NaN (1).
    matrix = np.random.default_rng(5).standard_normal((20, 6)).astype(np.float32)
    matrix[1, 0] = np.nan
    queries = np.zeros((2, 6), np.float32)
    top = TopK(queries, 4, excluding_own(np.array([0, -1])))
    for start in range(0, 20, 3):
        top.add(start, matrix[start : start + 3])
    found = top.finish()
    assert found.ids.tolist() == [[2, 3, 4, 5], [0, 2, 3, 4]]
    assert (found.cosines == 0).all()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_streaming_topk_is_nearest_keys_to_the_byte(chunk):
    rng = np.random.default_rng(9)
    keys = unit_rows(rng.standard_normal((200, 12)).astype(np.float32))
    queries = unit_rows(np.concatenate([keys[[4, 150]], rng.standard_normal((3, 12)).astype(np.float32)]))
    exclude = excluding_own(np.array([4, 150, -1, -1, -1]))
    top = TopK(queries, 6, exclude)
    for start in range(0, 200, chunk):
        top.add(start, keys[start : start + chunk], unit=True)
    found, expected = top.finish(), nearest_keys(queries, keys, 6, 4096, exclude)
    assert found.ids.tobytes() == expected.ids.tobytes()
    assert found.cosines.tobytes() == expected.cosines.tobytes()


@pytest.mark.parametrize("chunk", [7, 64])
def test_seeded_bounded_search_is_the_unseeded_one_to_the_byte(chunk):
    # Seeds: some of the true neighbours, rows far from the query, a query's own row (which
    # it may not return) and a row with a NaN (left to its chunk, never returned).
    rng = np.random.default_rng(11)
    matrix = rng.standard_normal((300, 16)).astype(np.float32)
    matrix[17, 3] = np.nan
    query_rows = np.array([4, 120, 250])
    units = unit_rows(np.concatenate([matrix[query_rows], rng.standard_normal((2, 16)).astype(np.float32)]))
    exclude = excluding_own(np.r_[query_rows, -1, -1])

    def search(seed: bool):
        top = TopK(units, 5, exclude, screen="bfloat16")
        if seed:
            plain = nearest_keys(units, unit_rows(np.nan_to_num(matrix)), 5, exclude=exclude)
            query = np.r_[np.repeat(np.arange(5), 3), 0, 1, 2, 3]
            row = np.r_[plain.ids[:, [0, 2, 4]].ravel(), 4, 17, 299, 17]  # 4 is query 0's own row
            top.seed(query, row, lambda ids: matrix[ids])
        for start in range(0, 300, chunk):
            top.add(start, matrix[start : start + chunk])
        return top.finish(), top

    (seeded, top), (unseeded, _) = search(True), search(False)
    assert seeded.ids.tobytes() == unseeded.ids.tobytes() and seeded.cosines.tobytes() == unseeded.cosines.tobytes()
    assert 4 not in seeded.ids[0] and 17 not in seeded.ids
    with pytest.raises(ValueError, match="before the first add"):
        top.seed(np.array([0]), np.array([1]), lambda ids: matrix[ids])


def test_seed_needs_the_bounded_screen():
    units = unit_rows(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="bounded screen"):
        TopK(units, 1).seed(np.array([0]), np.array([1]), lambda ids: units[ids])


@pytest.mark.parametrize(("screen", "keep"), [("bfloat16", 0), ("bfloat16", 30), ("float32", 0)])
def test_chunks_screened_ahead_give_what_they_give_one_at_a_time(screen, keep):
    # add_chunks screens a chunk on its own thread while the one before is folded in: the
    # answer, the candidate lists and their bounds are those of add() chunk by chunk.
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((900, 24)).astype(np.float32)
    rows[5] = np.nan  # never a neighbour
    rows[400] *= np.float32(1e-38)  # too small for a float32 inverse norm
    rows[600] = 0.0
    queries = unit_rows(rng.standard_normal((6, 24)).astype(np.float32))
    exclude = excluding_own(np.array([0, 1, 2, 401, -1, -1]))

    def search(add_all):
        top = TopK(queries, 7, exclude, screen=screen, keep=keep)
        add_all(top, [(start, rows[start : start + 128], None) for start in range(0, 900, 128)])
        return top, top.finish()

    one_by_one, expected = search(lambda top, chunks: [top.add(start, part) for start, part, _ in chunks])
    ahead, found = search(lambda top, chunks: top.add_chunks(iter(chunks)))
    assert np.array_equal(found.ids, expected.ids)
    assert np.array_equal(found.cosines, expected.cosines)
    assert not np.isin(5, found.ids)
    if keep:
        assert np.array_equal(ahead.candidate_ids, one_by_one.candidate_ids)
        assert np.array_equal(ahead.candidate_scores, one_by_one.candidate_scores)
        assert np.array_equal(ahead.candidate_slack, one_by_one.candidate_slack)
