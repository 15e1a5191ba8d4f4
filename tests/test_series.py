"""The series stage: trajectories checked by hand on a 4-token model, the planted movers of
the synthetic checkpoint series found at their steps, and the checks on `series:`."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.drift import read_side
from pipeline.core.errors import DissectError
from pipeline.core.io import read_json
from pipeline.core.paths import ModelPaths, SeriesPaths
from pipeline.sources.synthetic import MOVER_STEPS, PLANTED_MOVERS, planted_movers, series_embedding
from pipeline.report.series import series_page
from pipeline.stages import stats
from pipeline.stages.series import SeriesSettings, align_versions, read_settings, run, series_paths, trajectories

from builders import write_embeddings

SQRT_HALF = 0.5**0.5


def write_version(root, name: str, matrix: np.ndarray, tokens: list[str], ids=None) -> ModelPaths:
    """A version's embeddings.parquet and stats.json (the stats stage's own), under ``root``."""
    paths = ModelPaths.in_project(name, root)
    write_embeddings(paths.embeddings, matrix.astype(np.float32), tokens, token_ids=ids)
    stats.run(paths, stats.StatsSettings())
    return paths


@pytest.fixture
def four_token_versions(tmp_path):
    """Three versions of a 4-token, 2-dim model: token "b" turns 90° at step 1, "c" 45° at step 2."""
    tokens = ["a", "b", "c", "d"]
    v0 = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], float)
    v1 = np.array([[1, 0], [1, 0], [1, 1], [-1, 0]], float)
    v2 = np.array([[1, 0], [1, 0], [1, 0], [-1, 0]], float)
    for name, matrix in (("v0", v0), ("v1", v1), ("v2", v2)):
        write_version(tmp_path, name, matrix, tokens)
    return tmp_path


def test_trajectories_by_hand(four_token_versions):
    sides = [read_side(ModelPaths.in_project(v, four_token_versions).embeddings) for v in ("v0", "v1", "v2")]
    aligned = align_versions(sides)
    moves = trajectories(aligned.matrices, k=1, block_rows=2)
    # step 1: b turned 90 degrees; step 2: c turned 45 degrees (and is 45 from where it began).
    np.testing.assert_allclose(moves.cosine_to_previous, [[1, 0, 1, 1], [1, 1, SQRT_HALF, 1]], atol=1e-6)
    np.testing.assert_allclose(moves.cosine_to_first, [[1, 0, 1, 1], [1, 0, SQRT_HALF, 1]], atol=1e-6)
    # The nearest neighbour (k=1; a tie goes to the lower id) of a, b, c, d:
    # v0: c, c, a (a and b tie), b (0 beats -1/√2 and -1); v1: b, a, a, c (-1/√2 beats -1);
    # v2: b (b and c tie), a, a, a (all -1).
    kept = moves.neighbours_kept
    np.testing.assert_allclose(kept[0], [0, 0, 1, 0])
    np.testing.assert_allclose(kept[1], [1, 1, 1, 0])


def test_the_stage_writes_its_tables_and_the_page_reads_them(four_token_versions):
    root = four_token_versions
    paths = SeriesPaths.in_project("toy", ["v0", "v1", "v2"], root)
    metrics = run(paths, SeriesSettings(k=1, top_moved=2))
    long = pq.read_table(paths.trajectories).to_pylist()
    assert len(long) == 4 * 2  # tokens x steps
    assert [(r["token"], r["step"], r["version"]) for r in long[:2]] == [("a", 1, "v1"), ("a", 2, "v2")]
    tokens = {r["token"]: r for r in pq.read_table(paths.tokens).to_pylist()}
    assert tokens["b"]["moved_rank"] == 1 and tokens["b"]["moved_most_at_step"] == 1
    assert tokens["c"]["moved_rank"] == 2 and tokens["c"]["moved_most_at_step"] == 2
    assert [m["token"] for m in metrics["top_moved"]] == ["b", "c"]
    assert [row["sharp_moves"] for row in metrics["versions"]] == [None, 1, 1]
    # Each version's statistics are its own stats.json's, not recomputed.
    for row, name in zip(metrics["versions"], ("v0", "v1", "v2")):
        assert row["norm_median"] == read_json(ModelPaths.in_project(name, root).stats)["row_norm"]["p50"]
    assert read_json(paths.plots["norm_median"]) == [{"step": r["step"], "version": r["version"], "norm_median": r["norm_median"]}
                                                      for r in metrics["versions"]]
    page = series_page(read_json(paths.metrics))  # what compare renders into reports/series/toy/
    assert '**v1** (step 1): 1 token moved sharply (cosine to `v0` below 0.9): `"b"`\u00a0(0).' in page.markdown
    for figure in page.figures:
        figure.run(root / "figures")
    assert (root / "figures" / "series.png").is_file()


def test_versions_align_on_keys_not_ids(tmp_path):
    """A later version with its ids in another order and one token fewer: rows follow the key."""
    write_version(tmp_path, "v0", np.eye(3), ["x", "y", "z"])
    write_version(tmp_path, "v1", np.array([[0, 0, 1], [1, 0, 0]], float), ["z", "x"])
    sides = [read_side(ModelPaths.in_project(v, tmp_path).embeddings) for v in ("v0", "v1")]
    aligned = align_versions(sides)
    assert aligned.tokens == ["x", "z"] and aligned.ids.tolist() == [0, 2]
    np.testing.assert_array_equal(aligned.matrices[1], [[1, 0, 0], [0, 0, 1]])
    assert aligned.unaligned == [1, 0]


def test_planted_movers_are_found_at_their_steps(tmp_path):
    vocab, dim, steps = 3000, 16, 6
    tokens = [f"w{i}" for i in range(vocab)]
    for step in range(steps):
        write_version(tmp_path, f"s{step}", series_embedding(vocab, dim, seed=7, step=step).float().numpy(), tokens)
    paths = SeriesPaths.in_project("planted", [f"s{s}" for s in range(steps)], tmp_path)
    metrics = run(paths, SeriesSettings(top_moved=PLANTED_MOVERS + 5))
    planted = planted_movers(vocab, seed=7)
    found = {m["token_id"]: m["moved_most_at_step"] for m in metrics["top_moved"][:PLANTED_MOVERS]}
    assert found == planted
    # Everything else only drifted: no sharp move outside the planted tokens.
    assert [row["sharp_moves"] for row in metrics["versions"][1:]] == [2] * MOVER_STEPS


def test_series_steps_repeat_exactly_and_move_only_the_planted_tokens_sharply():
    assert torch.equal(series_embedding(500, 8, seed=3, step=2), series_embedding(500, 8, seed=3, step=2))
    assert set(planted_movers(500, seed=3).values()) == set(range(1, MOVER_STEPS + 1))
    before, after = (series_embedding(500, 8, seed=3, step=s).double() for s in (0, 1))
    cosine = (before * after).sum(1) / before.norm(dim=1) / after.norm(dim=1)
    jumped = {t for t, at in planted_movers(500, seed=3).items() if at == 1}
    assert set(torch.nonzero(cosine < 0.9).flatten().tolist()) == jumped


@pytest.mark.parametrize("series, message", [
    ({"s": ["a"]}, "series.s must list at least two model names in order"),
    ({"s": ["a", "a"]}, "series.s lists 'a' twice"),
    ({"s": ["a", "nope"]}, "model 'nope' is not in params.yaml"),
    ({"other": ["a", "b"]}, "series 's' is not in params.yaml"),
])
def test_series_entries_are_checked(series, message):
    model = {"format": "safetensors", "source": {"path": "x"}, "tokenizer": None, "tensor": None}
    params = {"models": {"a": model, "b": model}, "series": series}
    with pytest.raises(DissectError, match=message):
        series_paths(params, "s")


def test_settings_come_from_the_trajectory_section():
    assert read_settings({"trajectory": {"k": 3}}, "s").k == 3
    with pytest.raises(DissectError, match="trajectory.sharp_move_below"):
        read_settings({"trajectory": {"sharp_move_below": "low"}}, "s")


def test_readme_series_queries_run_on_the_outputs(tmp_path, monkeypatch):
    """README's DuckDB queries over a series, on a series named as in the README."""
    import duckdb

    from project_repo import readme_sql_queries

    tokens = ["powder", "river", "stone", "cloud"]
    v0 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], float)
    v1 = v0.copy()
    v1[0] = [0, 0.3, 1]  # powder jumps at step 1
    for name, matrix in (("run-step-0", v0), ("run-step-1", v1), ("run-step-2", v1)):
        write_version(tmp_path, name, matrix, tokens)
    run(SeriesPaths.in_project("run-demo", ["run-step-0", "run-step-1", "run-step-2"], tmp_path), SeriesSettings(k=1))
    queries = readme_sql_queries("series/run-demo")
    monkeypatch.chdir(tmp_path)
    duck = duckdb.connect()
    steps = duck.execute(queries[0]).fetchall()
    assert [(row[0], row[1]) for row in steps] == [(1, "run-step-1"), (2, "run-step-2")]
    assert steps[0][2] < 0.3 and steps[1][2] == pytest.approx(1.0)  # cosine to previous: the jump, then still
    top = duck.execute(queries[1]).fetchall()
    assert top[0][:2] == ("powder", "run-step-1") and len(top) == 4
