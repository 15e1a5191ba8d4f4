"""similarity stage: word-word cosines, word neighbours, the kNN graph."""

from __future__ import annotations

import dataclasses

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core.errors import run_stage
from pipeline.core.errors import DissectError
from pipeline.core.knn import brute_force_neighbors, unit_rows
from pipeline.core.parquet import read_provenance, read_vectors
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.stages.similarity import SimilaritySettings, main, run, word_cosines

from builders import write_embeddings, write_params, write_words

S = np.float32(1 / np.sqrt(2))


# --------------------------------------------------------------------------------------
# A small project on disk: embeddings.parquet and words.parquet as the earlier stages write them


def project(root: Path, matrix: np.ndarray, entries: list[tuple[str, str, list[int]]], name: str = "toy") -> Path:
    model_dir = root / "artifacts" / name
    model_dir.mkdir(parents=True)
    write_embeddings(model_dir / "embeddings.parquet", matrix)
    write_words(model_dir, matrix, entries)
    return model_dir


OUTPUTS = ("similarity.parquet", "neighbors.parquet", "knn.parquet")
SETTINGS = SimilaritySettings(k=3, scope="all", block_rows=7)


# --------------------------------------------------------------------------------------
# Hand-checked


def test_hand_word_cosines():
    # Word vectors r0 = (1,0,0), r1 = (0,2,0), r2 = (3,3,0), r3 = 0 (see test_knn.py):
    # cos(r0, r1) = 0, cos(r0, r2) = cos(r1, r2) = 1/sqrt2; the zero vector has cosine 0
    # with everything, its own diagonal included; the others have 1 on the diagonal.
    vectors = np.array([[1, 0, 0], [0, 2, 0], [3, 3, 0], [0, 0, 0]], dtype=np.float32)
    expected = [[1, 0, S, 0], [0, 1, S, 0], [S, S, 1, 0], [0, 0, 0, 0]]
    assert np.allclose(word_cosines(vectors), expected, atol=1e-12)


def test_hand_project_tables(tmp_path):
    # Tokens: the 4x3 matrix of test_knn.py plus t4 = (1, 1, 0), which points like t2.
    matrix = np.array([[1, 0, 0], [0, 2, 0], [3, 3, 0], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
    # "diag" is t2 alone; "pair" is split into t0 + t1, pooled to (0.5, 1, 0).
    model_dir = project(tmp_path, matrix, [("diag", "diag", [2]), ("pair", " pair", [0, 1])])
    run(ModelPaths.for_artifacts(model_dir), SimilaritySettings(k=2, scope="all", block_rows=2))

    similarity = pq.read_table(model_dir / "similarity.parquet").to_pylist()
    # cos((1,1,0), (0.5,1,0)) = 1.5 / (sqrt2 * sqrt1.25) = 0.9486833
    assert [(r["variant_a"], r["variant_b"]) for r in similarity] == [
        ("diag", "diag"), ("diag", " pair"), (" pair", "diag"), (" pair", " pair")
    ]  # fmt: skip
    assert np.allclose([r["cosine"] for r in similarity], [1, 0.9486833, 0.9486833, 1])

    neighbors = pq.read_table(model_dir / "neighbors.parquet").to_pylist()
    # diag: own token t2 excluded -> t4 (cosine 1), then t0 and t1 tie at 1/sqrt2 -> t0.
    # pair: own t0, t1 excluded -> t2 and t4 tie at 0.9486833 -> t2, t4.
    assert [(r["variant"], r["rank"], r["token_id"], r["token"]) for r in neighbors] == [
        ("diag", 1, 4, "t4"), ("diag", 2, 0, "t0"), (" pair", 1, 2, "t2"), (" pair", 2, 4, "t4")
    ]  # fmt: skip
    assert np.allclose([r["cosine"] for r in neighbors], [1, S, 0.9486833, 0.9486833])

    knn = pq.read_table(model_dir / "knn.parquet").to_pydict()
    # t2 and t4 are the same direction: each other's first neighbour at cosine 1.
    graph = {(t, r): (n, c) for t, r, n, c in zip(knn["token_id"], knn["rank"], knn["neighbor_id"], knn["cosine"])}
    assert graph[(2, 1)] == (4, pytest.approx(1.0)) and graph[(4, 1)] == (2, pytest.approx(1.0))
    assert graph[(0, 1)][0] == 2 and graph[(0, 2)][0] == 4  # ties at 1/sqrt2 to the lower id
    assert graph[(3, 1)] == (0, 0.0) and graph[(3, 2)] == (1, 0.0)  # zero row: all 0, lowest ids
    assert len(knn["token_id"]) == 5 * 2


# --------------------------------------------------------------------------------------
# Invariants


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 8)), elements=st.floats(-1e3, 1e3, width=32)))
def test_word_cosines_symmetric_unit_diagonal_bounded(vectors):
    cosines = word_cosines(vectors)
    nonzero = np.linalg.norm(vectors.astype(np.float64), axis=1) > 0
    assert np.array_equal(cosines, cosines.T)
    assert np.array_equal(np.diag(cosines), nonzero.astype(float))
    assert (np.abs(cosines) <= 1).all()
    assert (cosines[~nonzero] == 0).all()


def test_word_cosines_refuse_nan():
    with pytest.raises(DissectError, match="NaN or Inf"):
        word_cosines(np.array([[1, np.nan]], dtype=np.float32))


# --------------------------------------------------------------------------------------
# The stage


def random_project(root: Path, rows: int = 60, dim: int = 5, seed: int = 0) -> tuple[Path, np.ndarray]:
    matrix = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    matrix[7] = 0  # a padding-like row
    entries = [("a", "a", [1]), ("a", " a", [2]), ("b", "b", [3, 4, 5]), ("z", "z", [7])]
    return project(root, matrix, entries), matrix


def test_stage_tables_match_references(tmp_path):
    model_dir, matrix = random_project(tmp_path)
    run(ModelPaths.for_artifacts(model_dir), SETTINGS)
    unit = unit_rows(matrix)

    knn = pq.read_table(model_dir / "knn.parquet")
    assert knn.schema.names == ["token_id", "rank", "neighbor_id", "cosine"]
    reference = brute_force_neighbors(unit, 3)
    assert np.allclose(knn.column("cosine").to_numpy().reshape(60, 3), reference.cosines, atol=1e-6)
    assert knn.column("rank").to_pylist() == [1, 2, 3] * 60
    assert (knn.column("token_id").to_numpy() != knn.column("neighbor_id").to_numpy()).all()

    neighbors = pq.read_table(model_dir / "neighbors.parquet")
    assert neighbors.schema.names == ["word", "variant", "rank", "token_id", "token", "cosine"]
    words = pq.read_table(model_dir / "words.parquet")
    for row in words.to_pylist():
        mine = neighbors.filter(pa.compute.equal(neighbors.column("variant"), row["variant"]))
        vector = np.array(row["vector"], dtype=np.float64)
        norm = np.linalg.norm(vector)
        cosines = unit.astype(np.float64) @ (vector / norm if norm else vector)  # [vocab]
        cosines[row["token_ids"]] = -np.inf  # its own tokens are excluded
        expected = np.lexsort((np.arange(60), -cosines))[:3]
        assert mine.column("token_id").to_pylist() == expected.tolist()
        assert np.allclose(mine.column("cosine").to_numpy(), cosines[expected], atol=1e-6)
        assert mine.column("token").to_pylist() == [f"t{i}" for i in expected]
    # The zero-vector word "z" has cosine 0 with every token: the 3 lowest ids.
    zero = neighbors.filter(pa.compute.equal(neighbors.column("word"), "z"))
    assert zero.column("token_id").to_pylist() == [0, 1, 2] and zero.column("cosine").to_pylist() == [0, 0, 0]

    similarity = pq.read_table(model_dir / "similarity.parquet")
    assert similarity.num_rows == 16
    assert not np.isnan(similarity.column("cosine").to_numpy()).any()
    assert read_provenance(model_dir / "knn.parquet")["params"] == {"similarity": {"k": 3, "scope": "all", "block_rows": 7}}


def test_scope_words_writes_an_empty_graph(tmp_path):
    model_dir, _ = random_project(tmp_path)
    run(ModelPaths.for_artifacts(model_dir), dataclasses.replace(SETTINGS, scope="words"))
    knn = pq.read_table(model_dir / "knn.parquet")
    assert knn.num_rows == 0 and knn.schema.names == ["token_id", "rank", "neighbor_id", "cosine"]
    assert read_provenance(model_dir / "knn.parquet")["params"]["similarity"]["scope"] == "words"


def test_two_runs_give_identical_bytes(tmp_path):
    model_dir, _ = random_project(tmp_path)
    run(ModelPaths.for_artifacts(model_dir), SETTINGS)
    first = {name: (model_dir / name).read_bytes() for name in OUTPUTS}
    run(ModelPaths.for_artifacts(model_dir), SETTINGS)
    assert first == {name: (model_dir / name).read_bytes() for name in OUTPUTS}


def test_main_reads_params_yaml(tmp_path, monkeypatch):
    model_dir, _ = random_project(tmp_path)
    write_params(tmp_path, ["toy"], similarity={"k": 3, "scope": "words", "block_rows": 7})
    monkeypatch.chdir(tmp_path)
    main(["toy"])
    assert pq.read_table(model_dir / "neighbors.parquet").num_rows == 4 * 3


@pytest.mark.parametrize(
    "settings_, message",
    [
        ({"k": 0}, "similarity.k"),
        ({"block_rows": -1}, "similarity.block_rows"),
        ({"scope": "everything"}, "similarity.scope"),
    ],
)
def test_bad_settings(settings_, message):
    with pytest.raises(DissectError, match=message):
        read_section(SimilaritySettings, {"k": 3, "scope": "all", "block_rows": 7, **settings_}, "similarity")


def test_nan_row_is_an_error_and_nothing_is_written(tmp_path):
    matrix = np.ones((10, 3), dtype=np.float32)
    matrix[6, 2] = np.nan
    model_dir = project(tmp_path, matrix, [("a", "a", [1])])
    with pytest.raises(DissectError, match="NaN or Inf in row 6"):
        run(ModelPaths.for_artifacts(model_dir), SETTINGS)
    assert not any((model_dir / name).exists() for name in OUTPUTS)


def test_missing_words_names_the_stage(tmp_path, capsys, monkeypatch):
    model_dir, _ = random_project(tmp_path)
    (model_dir / "words.parquet").unlink()
    write_params(tmp_path, ["toy"], similarity={"k": 3, "scope": "all", "block_rows": 7})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMBEDDING_DISSECT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(main, ["toy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dvc repro words@toy" in err


def test_words_from_another_model_are_refused(tmp_path):
    model_dir, _ = random_project(tmp_path)
    write_words(model_dir, np.ones((100, 4), dtype=np.float32), [("a", "a", [90])])
    with pytest.raises(DissectError, match="not 5-dim like the matrix"):
        run(ModelPaths.for_artifacts(model_dir), SETTINGS)
    write_words(model_dir, np.ones((100, 5), dtype=np.float32), [("a", "a", [90])])
    with pytest.raises(DissectError, match="token id 90, outside the matrix's 60 rows"):
        run(ModelPaths.for_artifacts(model_dir), SETTINGS)


# --------------------------------------------------------------------------------------
# The real SmolLM2 matrix

SMOLLM2_WORDS = [("Hello", "Hello", [19556]), ("Hello", " Hello", [38699]), ("Apple", "Apple", [39080])]


def test_smollm2_end_to_end(smollm2_artifacts, tmp_path):
    model_dir = tmp_path / "artifacts" / "smollm2-135m"
    model_dir.mkdir(parents=True)
    os.symlink(smollm2_artifacts / "embeddings.parquet", model_dir / "embeddings.parquet")
    _, matrix = read_vectors(model_dir / "embeddings.parquet")
    tokens = pq.read_table(model_dir / "embeddings.parquet", columns=["token"]).column("token")
    assert [tokens[ids[0]].as_py() for _, _, ids in SMOLLM2_WORDS] == ["Hello", " Hello", "Apple"]
    write_words(model_dir, matrix, SMOLLM2_WORDS)

    run(ModelPaths.for_artifacts(model_dir), SimilaritySettings(k=10, scope="words", block_rows=4096))

    unit = unit_rows(matrix).astype(np.float64)  # [vocab, dim]
    neighbors = pq.read_table(model_dir / "neighbors.parquet").to_pylist()
    assert len(neighbors) == 3 * 10
    for _, variant, own in SMOLLM2_WORDS:
        mine = [row for row in neighbors if row["variant"] == variant]
        assert [row["rank"] for row in mine] == list(range(1, 11))
        cosines = unit @ unit[own[0]]  # [vocab], float64 reference
        cosines[own] = -np.inf
        got_ids = [row["token_id"] for row in mine]
        assert own[0] not in got_ids
        assert np.allclose([row["cosine"] for row in mine], np.sort(cosines)[::-1][:10], atol=1e-6)
        assert np.allclose(cosines[got_ids], [row["cosine"] for row in mine], atol=1e-6)
    # "Hello" and " Hello" are each other's nearest token, at the same cosine.
    first = {row["variant"]: row for row in neighbors if row["rank"] == 1}
    assert first["Hello"]["token"] == " Hello" and first[" Hello"]["token"] == "Hello"
    assert first["Hello"]["cosine"] == first[" Hello"]["cosine"]

    similarity = pq.read_table(model_dir / "similarity.parquet").to_pylist()
    pairs = {(r["variant_a"], r["variant_b"]): r["cosine"] for r in similarity}
    assert len(pairs) == 9 and pairs[("Hello", "Hello")] == 1.0
    assert pairs[("Hello", " Hello")] == pairs[(" Hello", "Hello")] == pytest.approx(first["Hello"]["cosine"], abs=1e-6)
    assert pairs[("Hello", " Hello")] > pairs[("Hello", "Apple")]
