"""pca stage: exact, deterministic PCA of the whole vocabulary, and the word views."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from pipeline.core.errors import DissectError
from pipeline.core.hashing import matrix_sha256
from pipeline.core.parquet import read_provenance, read_vectors, vector_array, write_table
from pipeline.core.pca import _symmetric_float32, fit_pca
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.report.figures import label_text
from pipeline.stages.pca import PcaSettings, main, run

from builders import write_params

# Rows of a 4x3 matrix, worked out by hand:
#   (3,1,1), (-1,1,1), (1,2,1), (1,0,1): mean (1,1,1)
#   centred: (2,0,0), (-2,0,0), (0,1,0), (0,-1,0)
#   covariance (n - 1 = 3): diag(8/3, 2/3, 0)
#   PC1 = (1,0,0), variance 8/3, ratio 0.8;  PC2 = (0,1,0), 2/3, 0.2;  PC3 = (0,0,1), 0, 0
#   (signs: each axis's largest-|loading| element positive)
#   coordinates: pc1 = (2, -2, 0, 0), pc2 = (0, 0, 1, -1)
HAND = np.array([[3, 1, 1], [-1, 1, 1], [1, 2, 1], [1, 0, 1]], dtype=np.float32)


def test_hand_matrix():
    pca = fit_pca(HAND, block_rows=3)  # blocks of 3 + 1 rows: the accumulation is exercised
    assert np.allclose(pca.mean, [1, 1, 1])
    assert np.allclose(pca.components, np.eye(3), atol=1e-12)
    assert np.allclose(pca.explained_variance, [8 / 3, 2 / 3, 0], atol=1e-12)
    assert np.allclose(pca.explained_variance_ratio, [0.8, 0.2, 0], atol=1e-12)
    assert np.allclose(pca.transform(HAND), [[2, 0], [-2, 0], [0, 1], [0, -1]], atol=1e-12)


def test_sign_rule_is_applied_to_flipped_data():
    # Mirroring the data flips eigh's raw vectors, not ours: the largest loading stays positive.
    flipped = fit_pca(-HAND)
    assert np.allclose(flipped.components, np.eye(3), atol=1e-12)
    assert np.allclose(flipped.transform(-HAND), [[-2, 0], [2, 0], [0, -1], [0, 1]], atol=1e-12)


# --------------------------------------------------------------------------------------
# The scikit-learn reference and invariants


def separated_matrix(seed: int, rows: int, dim: int) -> np.ndarray:
    """Random rows whose principal variances are well apart (column scales 1.6^-i, then rotated)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, dim)) * 1.6 ** -np.arange(dim)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (data @ rotation + rng.standard_normal(dim) * 3).astype(np.float32)


def agrees_with_sklearn(ours, matrix: np.ndarray, variance_rtol: float) -> None:
    """Same leading axes as sklearn's full SVD in float64; variances within ``variance_rtol`` of the largest."""
    reference = PCA(svd_solver="full").fit(matrix.astype(np.float64))
    # Compare the axes that are well determined: the centred rank is at most rows - 1.
    n = min(matrix.shape[1], matrix.shape[0] - 1, 4)
    agreement = np.abs(np.sum(ours.components[:n] * reference.components_[:n], axis=1))
    assert (agreement >= 0.9999).all()
    largest = reference.explained_variance_[0]
    assert np.allclose(ours.explained_variance[:n], reference.explained_variance_[:n], rtol=0, atol=variance_rtol * largest + 1e-12)
    assert np.allclose(ours.explained_variance_ratio[:n], reference.explained_variance_ratio_[:n], rtol=0, atol=variance_rtol + 1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(3, 300), dim=st.integers(2, 12), block_rows=st.integers(1, 64))
def test_float32_matches_sklearn_full_svd(seed, rows, dim, block_rows):
    # A float32 matrix is multiplied in float32 and summed in float64: by Weyl's inequality
    # each eigenvalue moves by at most the norm of the rounding error, a few float32 epsilons
    # of the largest eigenvalue, so that is the bound, not a fraction of each eigenvalue.
    matrix = separated_matrix(seed, rows, dim)
    agrees_with_sklearn(fit_pca(matrix, block_rows=block_rows), matrix, variance_rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(3, 300), dim=st.integers(2, 12), block_rows=st.integers(1, 64))
def test_float64_matches_sklearn_full_svd_to_float64_precision(seed, rows, dim, block_rows):
    matrix = separated_matrix(seed, rows, dim).astype(np.float64)
    ours = fit_pca(matrix, block_rows=block_rows)
    agrees_with_sklearn(ours, matrix, variance_rtol=1e-12)
    reference = PCA(svd_solver="full").fit(matrix)
    n = min(dim, rows - 1, 4)
    assert np.allclose(ours.explained_variance[:n], reference.explained_variance_[:n], rtol=1e-9, atol=0)


def test_top_components_equal_the_full_fit():
    matrix = separated_matrix(7, 400, 12)
    full, top = fit_pca(matrix), fit_pca(matrix, n_components=3)
    assert top.components.shape == (3, 12) and len(full.components) == 12
    assert np.allclose(top.components, full.components[:3], atol=1e-9)
    assert np.allclose(top.explained_variance, full.explained_variance[:3], rtol=1e-9)
    # Ratios are of the total variance over all axes, not of the kept ones.
    assert np.allclose(top.explained_variance_ratio, full.explained_variance_ratio[:3], rtol=1e-9)
    assert top.explained_variance_ratio.sum() < 1
    assert len(fit_pca(matrix[:5], n_components=3).components) == 3  # fewer rows than dims: the SVD path


def test_wide_matrices_solve_in_float32_and_publish_the_same(monkeypatch):
    import pipeline.core.pca as pca_module

    matrix = separated_matrix(11, 600, 24)
    narrow = fit_pca(matrix, n_components=6)
    monkeypatch.setattr(pca_module, "FLOAT32_EIGH_DIM", 16)  # this width now takes the float32 solve
    # 24 columns: Lanczos's first block of 24 would pass half the width, so the dense solve runs
    wide = fit_pca(matrix, n_components=6)
    # The refined axes, and so every published coordinate, are the float64 ones.
    assert np.allclose(wide.components[:2], narrow.components[:2], atol=1e-12)
    assert np.array_equal(wide.transform(matrix), narrow.transform(matrix))
    # The other variances within float32's reach of the largest: far inside a ratio's 4 decimals.
    assert np.allclose(wide.explained_variance, narrow.explained_variance, rtol=0, atol=1e-6 * narrow.explained_variance[0])
    assert np.array_equal(np.round(wide.explained_variance_ratio, 4), np.round(narrow.explained_variance_ratio, 4))


def test_wide_matrices_solved_by_lanczos_publish_the_same(monkeypatch):
    import pipeline.core.lanczos as lanczos
    import pipeline.core.pca as pca_module

    matrix = separated_matrix(13, 3000, 64)
    narrow = fit_pca(matrix, n_components=6)
    monkeypatch.setattr(pca_module, "FLOAT32_EIGH_DIM", 16)
    monkeypatch.setattr(lanczos, "BLOCK", 4)  # so the basis stays below half the width

    def no_dense_solve(*args, **kwargs):
        raise AssertionError("the dense solve ran: Lanczos did not converge")

    monkeypatch.setattr(pca_module, "_top_eigh", no_dense_solve)
    wide = fit_pca(matrix, n_components=6)
    assert np.allclose(wide.components[:2], narrow.components[:2], atol=1e-12)
    assert np.array_equal(wide.transform(matrix), narrow.transform(matrix))
    assert np.allclose(wide.explained_variance, narrow.explained_variance, rtol=0, atol=1e-6 * narrow.explained_variance[0])
    assert np.array_equal(np.round(wide.explained_variance_ratio, 4), np.round(narrow.explained_variance_ratio, 4))


def test_covariance_has_the_same_bits_on_any_number_of_cores(monkeypatch):
    import pipeline.core.parallel as parallel
    import pipeline.core.pca as pca_module

    # 600-row blocks are centred by every core; 300 columns are summed in two tasks of ADD_COLUMNS.
    matrix = separated_matrix(5, 700, 300)
    found = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(parallel, "worker_count", lambda workers=workers: workers)
        mean = pca_module._column_mean(matrix, 600)
        scatter, spare = pca_module._scatter(matrix, mean, 600, lambda rows: None)
        found.append((mean, scatter, pca_module._symmetric_float32(scatter, spare)))
    for mean, scatter, screen in found[1:]:
        assert np.array_equal(mean, found[0][0])
        assert np.array_equal(scatter, found[0][1])
        assert np.array_equal(screen, found[0][2]) and screen.dtype == np.float32 and screen.flags.f_contiguous
    wide = matrix.astype(np.float64)
    centred = wide - wide.mean(axis=0)
    expected = centred.T @ centred  # [dim, dim], float64 throughout
    scatter = found[0][1]
    # float32 products summed in float64: within float32 rounding of the largest entry
    assert np.allclose(np.triu(scatter), np.triu(expected), rtol=0, atol=1e-5 * np.abs(expected).max())
    assert not np.tril(scatter, -1).any()  # only the upper triangle is ever written


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 80), dim=st.integers(2, 10))
def test_invariants(seed, rows, dim):
    matrix = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32) * 5
    pca = fit_pca(matrix, block_rows=16)
    wide = matrix.astype(np.float64)
    # Coordinates are the projection onto the first two axes.
    axes = np.zeros((2, dim))
    axes[: min(2, len(pca.components))] = pca.components[:2]
    assert np.allclose(pca.transform(matrix, published=False), (wide - wide.mean(axis=0)) @ axes.T, atol=1e-9)
    # Published: on a grid 2^-20 below each axis's standard deviation.
    grid = 2.0 ** -19 * np.sqrt(pca.explained_variance[: len(axes)].max(initial=0)) + 1e-12
    assert np.allclose(pca.transform(matrix), pca.transform(matrix, published=False), atol=grid, rtol=0)
    # Orthonormal axes, variance descending and non-negative, ratios summing to 1 (or all 0).
    assert np.allclose(pca.components @ pca.components.T, np.eye(len(pca.components)), atol=1e-9)
    assert (np.diff(pca.explained_variance) <= 1e-12).all() and (pca.explained_variance >= 0).all()
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0 if rows > 1 else 0.0)
    # The sign rule.
    pivot = np.argmax(np.abs(pca.components), axis=1)
    assert (pca.components[np.arange(len(pivot)), pivot] > 0).all()


def test_constant_rows_have_zero_ratios_not_nan():
    pca = fit_pca(np.ones((20, 3), dtype=np.float32))
    assert np.array_equal(pca.explained_variance_ratio, [0, 0, 0])


def test_nan_is_refused():
    matrix = np.ones((20, 3), dtype=np.float32)
    matrix[13, 0] = np.inf
    with pytest.raises(DissectError, match="NaN or Inf in row 13"):
        fit_pca(matrix, block_rows=4)


@pytest.mark.parametrize("settings_", [{"n_components": 0}, {"n_components": "5"}, {"n_components": True}])
def test_bad_settings(settings_):
    with pytest.raises(DissectError, match="pca\\."):
        read_section(PcaSettings, {"n_components": 50, **settings_}, "pca")


# --------------------------------------------------------------------------------------
# Labels

def test_labels_show_spaces_and_escape_what_the_font_cannot_draw():
    assert label_text(" Hello") == '" Hello"'
    assert label_text("naïve café") == '"naïve café"'  # DejaVu Sans has these
    assert label_text("日本") == '"\\u65e5\\u672c"'  # it has no CJK glyphs
    assert label_text("a\nb") == '"a\\u000ab"'
    assert label_text("🙂") == '"\\U0001f642"'


# --------------------------------------------------------------------------------------
# The stage

OUTPUTS = ("pca.parquet", "pca_words.parquet", "pca_variance.json", "figures/pca_words.png", "figures/pca_vocab.png")
WORDS = [("Hello", "Hello", [1]), ("Hello", " Hello", [2]), ("日本", "日本", [3, 4]), ("price", "$5 \n", [5])]


def project(root: Path, matrix: np.ndarray, entries: list[tuple[str, str, list[int]]], name: str = "toy") -> Path:
    """artifacts/<name>/ with embeddings.parquet and words.parquet as the earlier stages write them."""
    model_dir = root / "artifacts" / name
    model_dir.mkdir(parents=True)
    embeddings = pa.table(
        {
            "token_id": pa.array(np.arange(len(matrix), dtype=np.int32)),
            "token": pa.array([f"t{i}" for i in range(len(matrix))]),
            "vector": vector_array(matrix),
        }
    )
    write_table(model_dir / "embeddings.parquet", embeddings, {"stage": "extract", "matrix_sha256": matrix_sha256(matrix)})
    write_words(model_dir, matrix, entries)
    return model_dir


def write_words(model_dir: Path, matrix: np.ndarray, entries: list[tuple[str, str, list[int]]]) -> None:
    vectors = np.stack([matrix[ids].mean(axis=0) for _, _, ids in entries]).astype(np.float32)  # [w, dim]
    words = pa.table(
        {
            "word": [word for word, _, _ in entries],
            "variant": [variant for _, variant, _ in entries],
            "token_ids": pa.array([ids for _, _, ids in entries], pa.list_(pa.int32())),
            "tokens": pa.array([[f"t{i}" for i in ids] for _, _, ids in entries], pa.list_(pa.string())),
            "n_tokens": pa.array([len(ids) for _, _, ids in entries], pa.int32()),
            "split": [len(ids) > 1 for _, _, ids in entries],
            "pooling": ["mean"] * len(entries),
            "vector": vector_array(vectors),
        }
    )
    write_table(model_dir / "words.parquet", words, {"stage": "words"})


SETTINGS = {"n_components": 5}


def test_stage_outputs(tmp_path):
    matrix = separated_matrix(1, 500, 8)
    model_dir = project(tmp_path, matrix, WORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would warn
        run(ModelPaths.for_artifacts(model_dir), read_section(PcaSettings, SETTINGS, "pca"))

    reference = PCA(n_components=2, svd_solver="full").fit(matrix.astype(np.float64))
    table = pq.read_table(model_dir / "pca.parquet")
    assert table.schema.names == ["token_id", "token", "pc1", "pc2"]
    assert table.schema.field("pc1").type == pa.float32()
    xy = np.column_stack([table.column("pc1").to_numpy(), table.column("pc2").to_numpy()])
    expected = reference.transform(matrix.astype(np.float64))
    assert np.allclose(np.abs(xy), np.abs(expected), atol=1e-4)

    variance = json.loads((model_dir / "pca_variance.json").read_text())
    assert [row["component"] for row in variance] == [1, 2, 3, 4, 5]
    # Published to 4 decimals (README, Reproducibility).
    assert variance[0]["explained_variance_ratio"] == pytest.approx(reference.explained_variance_ratio_[0], abs=5e-5)
    assert variance[-1]["cumulative"] == pytest.approx(sum(row["explained_variance_ratio"] for row in variance), abs=3e-4)

    words = pq.read_table(model_dir / "pca_words.parquet")
    assert words.schema.names == ["word", "variant", "vocab_pc1", "vocab_pc2", "words_pc1", "words_pc2"]
    # A single-token word sits exactly where its token does in the vocabulary basis.
    assert words.column("vocab_pc1")[1].as_py() == pytest.approx(xy[2, 0], abs=1e-6)
    assert words.column("vocab_pc2")[1].as_py() == pytest.approx(xy[2, 1], abs=1e-6)
    # The words-only basis is centred on the words: their coordinates sum to 0.
    assert abs(float(np.sum(words.column("words_pc1").to_numpy()))) < 1e-5
    for name in ("figures/pca_words.png", "figures/pca_vocab.png"):
        assert (model_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_provenance(model_dir / "pca.parquet")["params"] == {"pca": SETTINGS}


def test_two_runs_give_identical_bytes(tmp_path, monkeypatch):
    model_dir = project(tmp_path, separated_matrix(2, 300, 6), WORDS)
    write_params(tmp_path, [model_dir.name], pca=SETTINGS)
    monkeypatch.chdir(tmp_path)
    main(["toy"])
    first = {name: (model_dir / name).read_bytes() for name in OUTPUTS}
    main(["toy"])
    assert first == {name: (model_dir / name).read_bytes() for name in OUTPUTS}


def test_more_components_than_dimensions_lists_them_all(tmp_path):
    model_dir = project(tmp_path, separated_matrix(3, 100, 4), WORDS[:1])  # a single word too
    run(ModelPaths.for_artifacts(model_dir), PcaSettings(n_components=50))
    variance = json.loads((model_dir / "pca_variance.json").read_text())
    assert len(variance) == 4 and variance[-1]["cumulative"] == pytest.approx(1.0)
    words = pq.read_table(model_dir / "pca_words.parquet").to_pylist()
    assert words[0]["words_pc1"] == 0 and words[0]["words_pc2"] == 0  # one word: no spread


def test_smollm2_end_to_end(smollm2_artifacts, tmp_path):
    model_dir = tmp_path / "artifacts" / "smollm2-135m"
    model_dir.mkdir(parents=True)
    os.symlink(smollm2_artifacts / "embeddings.parquet", model_dir / "embeddings.parquet")
    _, matrix = read_vectors(model_dir / "embeddings.parquet")
    write_words(model_dir, matrix, [("Hello", "Hello", [19556]), ("Hello", " Hello", [38699]), ("Apple", "Apple", [39080])])

    run(ModelPaths.for_artifacts(model_dir), PcaSettings(n_components=50))

    table = pq.read_table(model_dir / "pca.parquet")
    assert table.num_rows == 49152
    assert table.column("token")[19556].as_py() == "Hello"
    variance = json.loads((model_dir / "pca_variance.json").read_text())
    assert len(variance) == 50
    assert 0 < variance[0]["explained_variance_ratio"] < 1 and variance[-1]["cumulative"] < 1
    # Real rows against scikit-learn's full SVD (a slice: its SVD of all 49152 rows takes ~40 s here).
    rows = matrix[:6000]
    reference = PCA(n_components=3, svd_solver="full").fit(rows.astype(np.float64))
    ours = fit_pca(rows)
    assert (np.abs(np.sum(ours.components[:3] * reference.components_, axis=1)) >= 0.9999).all()
    assert np.allclose(ours.explained_variance_ratio[:3], reference.explained_variance_ratio_, rtol=1e-6)
    words = pq.read_table(model_dir / "pca_words.parquet").to_pylist()
    hello = words[0]
    assert hello["vocab_pc1"] == pytest.approx(table.column("pc1")[19556].as_py(), abs=1e-5)
    assert hello["vocab_pc2"] == pytest.approx(table.column("pc2")[19556].as_py(), abs=1e-5)


def test_the_float32_covariance_reuses_only_a_float32_fortran_buffer():
    # The upper triangle of [[1, 2], [., 3]]; the lower entry is never read.
    scatter = np.asfortranarray([[1.0, 2.0], [-7.0, 3.0]])
    buffer = np.zeros((2, 2), dtype=np.float32, order="F")
    assert _symmetric_float32(scatter, buffer) is buffer and buffer.tolist() == [[1.0, 2.0], [2.0, 3.0]]
    for unusable in (np.zeros((2, 2), order="F"), np.zeros((2, 2), dtype=np.float32), np.zeros((3, 3), np.float32, order="F"), None):
        copied = _symmetric_float32(scatter, unusable)
        assert copied is not unusable and copied.dtype == np.float32 and copied.flags.f_contiguous
        assert copied.tolist() == [[1.0, 2.0], [2.0, 3.0]]
        if unusable is not None:
            assert not unusable.any()  # left as it was


def test_the_float32_covariance_mirrors_the_upper_triangle_across_panels(monkeypatch):
    import pipeline.core.pca as pca_module

    # 7 columns in panels of 3: two whole panels and one of a single column, each with its diagonal square.
    monkeypatch.setattr(pca_module, "SYMMETRIC_PANEL_COLUMNS", 3)
    upper = np.triu(np.arange(1.0, 50.0).reshape(7, 7))
    scatter = np.asfortranarray(upper - np.tril(np.full((7, 7), 99.0), -1))  # the lower triangle is junk
    symmetric = _symmetric_float32(scatter)
    assert np.array_equal(symmetric, (upper + np.triu(upper, 1).T).astype(np.float32))
