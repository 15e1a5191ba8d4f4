"""drift stage: Procrustes, neighbour Jaccard, alignment by text, dequantized variants, end to end."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.stages.drift import (
    align_by_key,
    compare,
    DriftSettings,
    jaccard,
    procrustes,
    procrustes_residuals,
    read_side,
    pair_paths,
    run,
)
from pipeline.core.paths import DriftPaths
from pipeline.core.settings import read_section
from pipeline.quant.layout import dequantize_file
from pipeline.core.errors import DissectError
from pipeline.core.io import read_json
from pipeline.core.parquet import read_vectors
from pipeline.report.sections import drift_section, drift_story

from builders import write_embeddings, write_quantized


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def test_procrustes_recovers_a_known_rotation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)).astype(np.float32)
    rotation = random_rotation(16, rng)
    b = (a @ rotation).astype(np.float32)
    found = procrustes(a, b, block_rows=64)
    assert np.allclose(found, rotation, atol=1e-5)
    residual, relative = procrustes_residuals(a, b, found)
    assert residual.max() < 1e-5 and relative.max() < 1e-5


def test_jaccard_by_hand():
    a = np.array([[1, 2, 3], [1, 2, 3], [5, 6, -1], [7, 8, 9]])
    b = np.array([[2, 3, 4], [3, 2, 1], [5, -1, -1], [1, 2, 3]])
    # {1,2,3} vs {2,3,4}: 2 / 4; same set in another order: 1; {5,6} vs {5}: 1 / 2; disjoint: 0
    assert jaccard(a, b).tolist() == [0.5, 1.0, 0.5, 0.0]


def test_alignment_by_key_with_permuted_ids():
    base = ["a", "b", "c", None, "d"]
    other = ["d", "c", "a", "e", "b"]
    found = align_by_key(base, other)
    assert found.base_rows.tolist() == [0, 1, 2, 4] and found.other_rows.tolist() == [2, 4, 1, 0]
    assert (found.only_base, found.only_other, found.ambiguous, found.ids_differ) == (0, 1, 0, 4)
    with pytest.raises(DissectError, match="share only"):
        align_by_key(["a", "b", "c"], ["x", "y", "c"])


def test_a_repeated_key_is_left_out_and_counted():
    # Files written before token_key existed: byte-fallback "\n" (id 3) repeats the piece "\n" (id 1).
    base = ["a", "\n", "b", "\n", "c"]
    other = ["a", "\n", "b", "\n", "c"]
    found = align_by_key(base, other)
    assert found.base_rows.tolist() == [0, 2, 4] and found.other_rows.tolist() == [0, 2, 4]
    assert (found.only_base, found.only_other, found.ambiguous) == (0, 0, 2)
    # With token_key the byte piece keeps its name and every row lines up.
    keyed = align_by_key(["a", "\n", "b", "<0x0A>", "c"], ["a", "\n", "b", "<0x0A>", "c"])
    assert keyed.base_rows.tolist() == [0, 1, 2, 3, 4] and keyed.ambiguous == 0


def test_synthetic_pair_rotated_noised_and_permuted(tmp_path):
    """Two 'models' with one vocabulary in different id orders: the second is the first rotated plus noise."""
    rng = np.random.default_rng(1)
    n, dim = 600, 24
    base = rng.normal(size=(n, dim)).astype(np.float32)
    tokens = [f"tok{i}" for i in range(n)]
    order = rng.permutation(n)  # other's row j is base's token order[j]
    moved = 17
    other = base @ random_rotation(dim, rng) + rng.normal(size=(n, dim)) * 0.01
    other[moved] += rng.normal(size=dim) * 3  # one token really changed
    write_embeddings(tmp_path / "a" / "embeddings.parquet", base, tokens)
    write_embeddings(tmp_path / "b" / "embeddings.parquet", other[order].astype(np.float32), [tokens[i] for i in order])
    result = compare(read_side(tmp_path / "a" / "embeddings.parquet"), read_side(tmp_path / "b" / "embeddings.parquet"),
                     DriftSettings(k=5, top_moved=3, block_rows=128))
    m = result.metrics
    assert m["aligned"] == n and m["ids_differ"] == int((order != np.arange(n)).sum())
    assert m["cosine"]["mean"] < 0.5  # raw rows point elsewhere: the bases differ ...
    assert m["procrustes"]["relative_residual"] < 0.1  # ... but one rotation explains nearly all of it
    assert m["top_moved"][0]["token"] == f"tok{moved}" and m["top_moved"][0]["moved_rank"] == 1
    assert m["knn_jaccard"]["median"] == 1.0  # rotation keeps cosines, so the neighbours
    aligned_other = other.astype(np.float32).astype(np.float64)  # row i is base's token i
    expected = np.linalg.norm(base.astype(np.float64) - aligned_other) / np.linalg.norm(base.astype(np.float64))
    assert m["relative_frobenius"] == pytest.approx(expected, rel=1e-5) and m["identical_rows"] == 0
    story = drift_story(m)
    assert "Most of that change is a rotation of the whole space" in story and "`\"tok17\"`" in story
    table = result.table
    other_ids = table.column("other_id").to_numpy()
    assert np.array_equal(order[other_ids], table.column("base_id").to_numpy())


def story_metrics(**changes) -> dict:
    """drift.json of a pair, with only what the plain-words summary reads."""
    metrics = {"pair": "p", "base": "a", "other": "b", "aligned": 1000, "ids_differ": 0, "only_in_base": 0, "only_in_other": 0,
               "dim_base": 8, "dim_other": 8, "relative_frobenius": 0.0073, "identical_rows": 0,
               "cosine": {"mean": 0.99997, "min": 0.9995, "p01": 1, "median": 1, "max": 1},
               "l2_change_relative": {"mean": 0.007, "min": 0.005, "p01": 0.005, "median": 0.007, "max": 0.033},
               "procrustes": {"relative_residual": 0.0072, "rotation_distance_from_identity": 0.01},
               "knn_jaccard": {"mean": 0.985, "min": 0.5, "p01": 0.8, "median": 1, "max": 1, "k": 10, "identical_fraction": 0.917},
               "moved_by": "procrustes_residual_relative", "top_moved": [
                   {"moved_rank": 1, "token": ".", "cosine": 0.9995, "procrustes_residual_relative": 0.03, "knn_jaccard": 1.0}]}
    full = {"mean": 0.0, "min": 0.0, "p01": 0.0, "median": 0.0, "max": 0.0}
    return {**metrics, **{key: {**full, **value} if isinstance(value, dict) and key != "procrustes" else value
                          for key, value in changes.items()}}


@pytest.mark.parametrize(
    "changes, sentences",
    [
        ({}, ["differs from the first by 0.73% of its norm", "every token kept its direction", "It is not a rotation",
              "Neighbourhoods held: a token shares on average 98.50%", "The tokens that moved most: `\".\"`."]),
        ({"relative_frobenius": 2.5e-5, "identical_rows": 990, "l2_change_relative": {"max": 0.0022}},
         ["practically the same values: 990 of 1,000 rows are identical and the others differ by at most 0.220% of their norm"]),
        ({"relative_frobenius": 0.49, "cosine": {"mean": 0.88, "min": 0.56}, "procrustes": {"relative_residual": 0.5},
          "knn_jaccard": {"mean": 0.46, "k": 10, "identical_fraction": 0.035, "min": 0, "p01": 0, "median": 0.4, "max": 1}},
         ["by 49.00% of its norm", "tokens changed direction: row cosine mean 0.88, lowest 0.56", "It is not a rotation",
          "Neighbourhoods did not hold: a token shares on average 46.00%"]),
        ({"relative_frobenius": 0.11, "cosine": {"mean": 0.994, "min": 0.988}},
         ["tokens kept their direction closely: row cosine mean 0.994, lowest 0.988"]),
        ({"relative_frobenius": 0.8, "procrustes": {"relative_residual": 0.05}, "cosine": {"mean": 0.3, "min": -0.5}},
         ["Most of that change is a rotation of the whole space: after the best orthogonal rotation (Procrustes) only 5.00% is left"]),
    ],
)
def test_the_report_says_in_plain_words_what_changed(changes, sentences):
    section = drift_section("p", story_metrics(**changes))
    for sentence in sentences:
        assert sentence in section


def test_different_dims_compare_neighbours_only(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(200, 8)).astype(np.float32)
    tokens = [f"t{i}" for i in range(200)]
    wider = np.concatenate([base, np.zeros((200, 4), np.float32)], axis=1)  # same geometry, more dims
    write_embeddings(tmp_path / "a" / "embeddings.parquet", base, tokens)
    write_embeddings(tmp_path / "b" / "embeddings.parquet", wider, tokens)
    result = compare(read_side(tmp_path / "a" / "embeddings.parquet"), read_side(tmp_path / "b" / "embeddings.parquet"),
                     DriftSettings(k=5))
    assert result.table.column("cosine").null_count == 200 and "procrustes" not in result.metrics
    assert result.metrics["moved_by"] == "knn_jaccard" and result.metrics["knn_jaccard"]["min"] == 1.0


@pytest.mark.parametrize("name", ["q4_0", "int8_tensor", "int8_row", "nf4", "q8_0", "bf16"])
def test_dequantize_file_equals_scheme_decode(tmp_path, name):
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(300, 64)).astype(np.float32) * 0.1
    write_embeddings(tmp_path / "m" / "embeddings.parquet", matrix, [str(i) for i in range(300)])
    path = tmp_path / "m" / "quant" / f"{name}.parquet"
    expected = write_quantized(path, tmp_path / "m" / "embeddings.parquet", matrix, name)
    recipe = json.loads(pq.read_schema(path).metadata[b"embedding_dissect"])["dequantize"]
    assert np.array_equal(dequantize_file(path, recipe), expected)


def test_pair_names_and_paths_are_checked(tmp_path):
    with pytest.raises(DissectError, match="not in drift.pairs"):
        pair_paths({"drift": {"pairs": {"x": {"base": "a", "other": "b"}}}}, "nope")
    with pytest.raises(DissectError, match="drift pair name '../x' is not a name"):
        read_section(DriftSettings, {"pairs": {"../x": {"base": "a", "other": "b"}}}, "drift")
    with pytest.raises(DissectError, match="drift.pairs.x must set `base:` and `other:`"):
        read_section(DriftSettings, {"pairs": {"x": {"base": "a"}}}, "drift")
    paths = DriftPaths("x", tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "out")
    with pytest.raises(DissectError, match="does not exist"):
        run(paths, DriftSettings())


def test_smollm2_against_its_own_q4_0(smollm2_artifacts, tmp_path):
    embeddings = smollm2_artifacts / "embeddings.parquet"
    _, matrix = read_vectors(embeddings)
    quantized = tmp_path / "smollm2" / "quant" / "q4_0.parquet"
    write_quantized(quantized, embeddings, matrix, "q4_0")
    paths = DriftPaths("smollm2-q4_0", embeddings, quantized, tmp_path / "drift" / "smollm2-q4_0")
    metrics = run(paths, DriftSettings(k=10, top_moved=20))
    assert metrics["aligned"] == 49152 and metrics["ids_differ"] == 0
    assert 0.99 < metrics["cosine"]["mean"] < 0.999 and metrics["cosine"]["min"] > 0.98
    assert 0.6 < metrics["knn_jaccard"]["mean"] < 0.9
    table = pq.read_table(tmp_path / "drift" / "smollm2-q4_0" / "drift.parquet")
    assert table.num_rows == 49152 and table.column("moved_rank").to_numpy().min() == 1
    section = drift_section("smollm2-q4_0", read_json(tmp_path / "drift" / "smollm2-q4_0" / "drift.json"))
    assert "49,152 tokens aligned" in section and "Procrustes" in section
