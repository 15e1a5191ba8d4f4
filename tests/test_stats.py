"""stats: hand-computed matrices, numpy's float64 answers, non-finite values, duplicates, real models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.core.errors import DissectError
from pipeline.core.parquet import read_provenance, read_vectors
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.stages.stats import StatsSettings, duplicate_of, matrix_stats, run, tokens_table

from builders import write_params

ROOT = Path(__file__).resolve().parent.parent

# Rows: norm 3, the zero row, norm 5, and row 0 again.
HAND = np.array([[1, 2, 2], [0, 0, 0], [3, 0, 4], [1, 2, 2]], dtype=np.float32)  # [4, 3]


def project_with(artifacts: Path, root: Path) -> Path:
    """``root/artifacts/<name>/`` linking to a fixture's files, so outputs land in ``root``."""
    model_dir = root / "artifacts" / artifacts.name
    model_dir.mkdir(parents=True)
    for name in ("embeddings.parquet", "tokenizer.json"):
        (model_dir / name).symlink_to(artifacts / name)
    return model_dir


def test_hand_matrix_by_hand():
    stats = matrix_stats(HAND, histogram_bins=5, rows_per_chunk=3)
    values = stats.summary["values"]
    # 12 values summing to 17, squares summing to 43: var = 43/12 - (17/12)^2 = 227/144.
    assert values["count"] == 12
    assert values["mean"] == pytest.approx(17 / 12, rel=1e-15)
    assert values["std"] == pytest.approx(math.sqrt(227) / 12, rel=1e-15)
    assert (values["min"], values["max"], values["max_abs"]) == (0.0, 4.0, 4.0)
    assert (values["nan_count"], values["inf_count"]) == (0, 0)

    dims = stats.dims.to_pydict()
    assert dims["dim"] == [0, 1, 2]
    assert dims["mean"] == pytest.approx([5 / 4, 1, 2], rel=1e-15)
    assert dims["std"] == pytest.approx([math.sqrt(19) / 4, 1, math.sqrt(2)], rel=1e-15)
    assert dims["min"] == [0, 0, 0] and dims["max"] == [3, 2, 4]

    # Norms 3, 0, 5, 3: mean 11/4, var 43/4 - (11/4)^2 = 51/16; percentiles interpolate [0, 3, 3, 5].
    norms = stats.summary["row_norm"]
    assert stats.l2_norm.tolist() == [3, 0, 5, 3]
    assert norms["mean"] == pytest.approx(11 / 4) and norms["std"] == pytest.approx(math.sqrt(51) / 4)
    assert (norms["min"], norms["max"], norms["p50"]) == (0, 5, 3)
    assert norms["p01"] == pytest.approx(0.09) and norms["p99"] == pytest.approx(4.94)
    assert stats.max_abs.tolist() == [2, 0, 4, 2]

    # Mean row (5/4, 1, 2), norm sqrt(105)/4; cosines 29/(3 sqrt 105) and 47/(5 sqrt 105); the zero row has none.
    anisotropy = stats.summary["anisotropy"]
    assert anisotropy["mean_vector_norm"] == pytest.approx(math.sqrt(105) / 4, rel=1e-15)
    root = math.sqrt(105)
    assert stats.cos_to_mean[[0, 2, 3]] == pytest.approx([29 / (3 * root), 47 / (5 * root), 29 / (3 * root)], rel=1e-14)
    assert np.isnan(stats.cos_to_mean[1])
    assert anisotropy["mean_cos_to_mean"] == pytest.approx(431 / (45 * root), rel=1e-14)

    assert stats.summary["rows"] == {"total": 4, "nonfinite": 0, "zero": 1, "duplicate": 2, "duplicate_groups": 1}
    assert stats.duplicate_of.tolist() == [-1, -1, -1, 0]  # row 3 copies row 0, the first of their group
    assert [bin_["count"] for bin_ in stats.histogram] == [1, 0, 0, 2, 1]  # bins of width 1 over [0, 5]
    assert stats.histogram[0] == {"norm": 0.5, "bin_start": 0.0, "bin_end": 1.0, "count": 1}


def test_random_matrix_matches_numpy_float64():
    rng = np.random.default_rng(7)
    matrix = rng.normal(0.3, 2.0, size=(3001, 37)).astype(np.float32)  # [vocab, dim]
    wide = matrix.astype(np.float64)
    stats = matrix_stats(matrix, histogram_bins=20, rows_per_chunk=256)
    values = stats.summary["values"]
    assert values["mean"] == pytest.approx(wide.mean(), rel=1e-9)
    assert values["std"] == pytest.approx(wide.std(), rel=1e-9)
    assert values["min"] == matrix.min() and values["max"] == matrix.max()
    np.testing.assert_allclose(stats.dims.column("mean").to_numpy(), wide.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.dims.column("std").to_numpy(), wide.std(axis=0), rtol=1e-9)
    norms = np.linalg.norm(wide, axis=1)
    np.testing.assert_allclose(stats.l2_norm, norms, rtol=1e-12)
    summary = stats.summary["row_norm"]
    assert summary["mean"] == pytest.approx(norms.mean(), rel=1e-9)
    assert summary["std"] == pytest.approx(norms.std(), rel=1e-9)
    assert [summary["p01"], summary["p50"], summary["p99"]] == pytest.approx(np.percentile(norms, [1, 50, 99]), rel=1e-12)
    mean_row = wide.mean(axis=0)
    cos = wide @ mean_row / (norms * np.linalg.norm(mean_row))
    np.testing.assert_allclose(stats.cos_to_mean, cos, rtol=1e-9)
    assert stats.summary["anisotropy"]["mean_cos_to_mean"] == pytest.approx(cos.mean(), rel=1e-9)
    assert sum(bin_["count"] for bin_ in stats.histogram) == 3001 and len(stats.histogram) == 20


def test_nan_and_inf_are_counted_and_left_out():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(50, 6)).astype(np.float32)  # [vocab, dim]
    matrix[3, 1] = np.nan
    matrix[7, 0] = np.inf
    matrix[7, 2] = -np.inf
    matrix[9, :] = np.nan
    stats = matrix_stats(matrix, histogram_bins=4, rows_per_chunk=8)
    values = stats.summary["values"]
    assert (values["nan_count"], values["inf_count"]) == (7, 2)
    finite = np.where(np.isfinite(matrix), matrix, np.nan).astype(np.float64)
    assert values["count"] == 50 * 6 - 9
    assert values["mean"] == pytest.approx(np.nanmean(finite), rel=1e-12)
    assert values["std"] == pytest.approx(np.nanstd(finite), rel=1e-12)
    assert values["max_abs"] == np.nanmax(np.abs(finite))
    np.testing.assert_allclose(stats.dims.column("mean").to_numpy(), np.nanmean(finite, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.dims.column("std").to_numpy(), np.nanstd(finite, axis=0), rtol=1e-12)

    good = np.ones(50, bool)
    good[[3, 7, 9]] = False
    assert stats.summary["rows"]["nonfinite"] == 3
    assert stats.summary["row_norm"]["max"] == pytest.approx(np.linalg.norm(matrix[good].astype(np.float64), axis=1).max())
    mean_row = matrix[good].astype(np.float64).mean(axis=0)
    assert stats.summary["anisotropy"]["mean_vector_norm"] == pytest.approx(np.linalg.norm(mean_row), rel=1e-12)
    assert sum(bin_["count"] for bin_ in stats.histogram) == 47
    json.dumps(stats.summary, allow_nan=False)  # no NaN anywhere in stats.json

    table = tokens_table(np.arange(50, dtype=np.int32), pa.array([str(i) for i in range(50)]), stats)
    for column in ("l2_norm", "max_abs", "cos_to_mean"):
        assert table.column(column).null_count == 3
        assert table.column(column).to_pylist()[7] is None


def test_no_finite_value_gives_nulls_not_nan():
    matrix = np.full((4, 3), np.nan, dtype=np.float32)
    matrix[0, 0] = 1.5  # one finite value; dimensions 1 and 2 have none
    stats = matrix_stats(matrix, histogram_bins=3)
    text = json.dumps(stats.summary, allow_nan=False)
    assert stats.summary["values"]["mean"] == 1.5 and stats.summary["values"]["std"] == 0.0
    assert stats.summary["row_norm"]["mean"] is None and stats.summary["anisotropy"]["mean_cos_to_mean"] is None
    assert stats.summary["rows"]["nonfinite"] == 4 and stats.histogram == []
    assert stats.dims.column("mean").to_pylist() == [1.5, None, None]
    assert "NaN" not in text


def one_hash_for_every_row():
    """Zero hash weights: every row hashes to 0, so rows unequal to row 0 are told apart by their digests."""
    return mock.patch("pipeline.stages.stats._hash_weights", lambda dim: np.zeros(dim, np.uint64))


@pytest.mark.parametrize("colliding", [False, True], ids=["seeded hash", "one hash for every row"])
def test_duplicates_are_exact_across_chunks(colliding):
    weights = one_hash_for_every_row() if colliding else nullcontext()
    matrix = np.arange(40, dtype=np.float32).reshape(10, 4)  # [vocab, dim], all rows distinct
    matrix[[2, 5, 9]] = 7.0  # three equal rows in three chunks
    matrix[6] = 0.0
    matrix[8] = -0.0  # equal to row 6 as values
    matrix[0, 0] = np.nan
    matrix[1] = matrix[0]  # NaN rows with the same bits are duplicates too
    matrix[3] = np.nextafter(matrix[4], np.float32(np.inf))  # one ulp apart: not a duplicate
    # Groups {0, 1}, {2, 5, 9}, {6, 8}: every copy names its group's first row, which has none.
    with weights:
        assert duplicate_of(matrix, rows_per_chunk=3).tolist() == [-1, 0, -1, -1, -1, 2, -1, -1, 6, 2]
        rows = matrix_stats(matrix, rows_per_chunk=4).summary["rows"]
    assert rows["duplicate"] == 7 and rows["duplicate_groups"] == 3


def duplicates_by_brute_force(matrix: np.ndarray) -> list[int]:
    bits = (matrix + np.float32(0.0)).view(np.uint32)  # -0.0 as 0.0
    lowest = [next(j for j in range(len(bits)) if np.array_equal(bits[j], row)) for row in bits]
    return [-1 if j == i else j for i, j in enumerate(lowest)]


@settings(max_examples=60, deadline=None)
@given(
    matrix=hnp.arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 3)), elements=st.sampled_from([0.0, -0.0, 1.0, np.nan, -np.inf])),
    chunk=st.integers(1, 31),
    colliding=st.booleans(),
)
def test_duplicates_equal_brute_force(matrix, chunk, colliding):
    with one_hash_for_every_row() if colliding else nullcontext():
        assert duplicate_of(matrix, rows_per_chunk=chunk).tolist() == duplicates_by_brute_force(matrix)


@settings(max_examples=40, deadline=None)
@given(
    matrix=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 6)),
        elements=st.one_of(
            st.floats(-1e3, 1e3, width=32),
            st.sampled_from([0.0, 1.0, np.nan, np.inf]),
        ),
    ),
    chunk=st.integers(1, 45),
)
def test_chunk_size_does_not_change_results(matrix, chunk):
    whole = matrix_stats(matrix, histogram_bins=7, rows_per_chunk=len(matrix) + 1)
    chunked = matrix_stats(matrix, histogram_bins=7, rows_per_chunk=chunk)
    scale = float(np.nanmax(np.abs(np.where(np.isfinite(matrix), matrix, 0)), initial=1.0))
    assert _flat(chunked.summary).keys() == _flat(whole.summary).keys()
    for key, value in _flat(whole.summary).items():
        other = _flat(chunked.summary)[key]
        if value is None or isinstance(value, int):
            assert other == value, key
        else:
            assert other == pytest.approx(value, rel=1e-9, abs=1e-12 * scale), key
    assert np.array_equal(chunked.duplicate_of, whole.duplicate_of)
    np.testing.assert_array_equal(chunked.l2_norm, whole.l2_norm)
    np.testing.assert_allclose(chunked.cos_to_mean, whole.cos_to_mean, rtol=1e-9, atol=1e-12)
    assert chunked.dims.column("min").equals(whole.dims.column("min"))
    assert [b["count"] for b in chunked.histogram] == [b["count"] for b in whole.histogram]


def _flat(summary: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_bad_bins_and_missing_input_are_clear_errors(tmp_path):
    with pytest.raises(DissectError, match="stats.norm_histogram_bins must be a whole number from 1 to 100000, got 0"):
        read_section(StatsSettings, {"norm_histogram_bins": 0}, "stats")
    with pytest.raises(DissectError, match="embeddings.parquet does not exist"):
        run(ModelPaths.for_artifacts(tmp_path / "artifacts" / "m"), StatsSettings(norm_histogram_bins=10))


def test_stage_on_smollm2(smollm2_artifacts, tmp_path):
    model_dir = project_with(smollm2_artifacts, tmp_path)
    summary = run(ModelPaths.for_artifacts(model_dir), StatsSettings(norm_histogram_bins=50))
    token_ids, matrix = read_vectors(model_dir / "embeddings.parquet")
    wide = matrix.astype(np.float64)
    assert (summary["vocab_size"], summary["dim"]) == (49152, 576)
    assert summary["values"]["mean"] == pytest.approx(wide.mean(), rel=1e-9)
    assert summary["values"]["std"] == pytest.approx(wide.std(), rel=1e-9)
    assert json.loads((model_dir / "stats.json").read_text()) == summary

    _, counts = np.unique(matrix, axis=0, return_counts=True)
    assert summary["rows"]["duplicate"] == int(counts[counts > 1].sum()) > 0  # untrained special tokens

    tokens = pq.read_table(model_dir / "tokens.parquet")
    assert tokens.column_names == ["token_id", "token", "l2_norm", "max_abs", "cos_to_mean", "duplicate_of"]
    assert tokens.column("token").equals(pq.read_table(model_dir / "embeddings.parquet", columns=["token"]).column("token"))
    np.testing.assert_allclose(tokens.column("l2_norm").to_numpy(), np.linalg.norm(wide, axis=1), rtol=1e-12)
    assert np.array_equal(tokens.column("max_abs").to_numpy(), np.abs(matrix).max(axis=1))
    dims = pq.read_table(model_dir / "dims.parquet")
    assert dims.num_rows == 576 and dims.column("max").to_pylist() == matrix.max(axis=0).tolist()

    histogram = json.loads((model_dir / "norm_hist.json").read_text())
    assert len(histogram) == 50 and sum(b["count"] for b in histogram) == 49152
    provenance = read_provenance(model_dir / "tokens.parquet")
    assert provenance["stage"] == "stats" and provenance["model"] == "smollm2-135m"
    assert provenance["input"]["matrix_sha256"] == read_provenance(model_dir / "embeddings.parquet")["matrix_sha256"]
    assert provenance["params"] == {"stats": {"norm_histogram_bins": 50}}


def test_command_line_on_minilm(minilm_artifacts, tmp_path):
    project_with(minilm_artifacts, tmp_path)
    write_params(tmp_path, ["minilm-l6", "nope"], stats={"norm_histogram_bins": 8})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.stats", "minilm-l6"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "artifacts" / "minilm-l6"
    assert json.loads((out / "stats.json").read_text())["vocab_size"] == 30522
    assert len(json.loads((out / "norm_hist.json").read_text())) == 8

    done = subprocess.run([sys.executable, "-m", "pipeline.stages.stats", "nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {Path('artifacts/nope/embeddings.parquet')} does not exist; run `dvc repro` to build it"]


def test_compiled_row_hash_is_the_numpy_formula_on_hostile_bits():
    from pipeline.core.row_hash import row_hashes
    from pipeline.stages.stats import _hash_weights, _row_bits

    rows = np.random.default_rng(4).standard_normal((9, 37)).astype(np.float32)
    bits = rows.view(np.uint32)
    rows[0, :5] = -0.0
    rows[1, 3] = np.nan
    bits[2, 7] = 0x7F800001  # a signaling NaN
    bits[3, 9] = 0xFFC12345  # a negative NaN with a payload
    rows[4] = rows[5]
    rows[4, 0], rows[5, 0] = 0.0, -0.0  # equal rows once -0.0 is folded
    weights = _hash_weights(37)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the signaling NaN is folded without a RuntimeWarning
        expected = _row_bits(rows).astype(np.uint64) @ weights  # the sum modulo 2**64
    hashes = row_hashes(rows, weights)
    assert hashes.tolist() == expected.tolist() and hashes[4] == hashes[5] and len(set(hashes[[0, 1, 2, 3, 6]].tolist())) == 5
