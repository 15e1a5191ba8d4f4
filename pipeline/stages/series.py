"""series stage: how every token moved over an ordered run of versions of one model.

``series.<name>: [v0, v1, ...]`` in params.yaml names models of the run in order (the
checkpoints of a training run, monthly releases). Each version went through the per-model
stages on its own; this stage reads their artifacts and lines the versions up on the token
key the drift stage uses (:mod:`pipeline.core.drift`), keeping the tokens every version has.

Per aligned token and step s = 1..n-1 (``trajectories.parquet``, one row each):

* ``cosine_to_first`` and ``cosine_to_previous``: cosine of the token's row at step s with
  its row in the first version and in version s-1;
* ``neighbours_kept``: Jaccard overlap of the token's ``series.k`` nearest neighbours (exact
  cosine kNN among the aligned tokens, :func:`pipeline.core.knn.knn_graph`) at s and s-1.

Per token (``tokens.parquet``): the step where it moved most (lowest cosine to the previous
version; the earliest on a tie), that cosine, its cosine to the first version at the end,
whether its neighbours held (``neighbours_kept`` >= ``series.neighbours_held`` at every
step) and ``moved_rank`` (1 = moved most in a single step; ties by token id).

Per version (``series.json`` and the DVC plot files in ``series/<name>/plots/``): the
version's headline statistics read from its own ``stats.json`` and ``undertrained.json``,
and the means of the three columns above. Every output is cached, so DVC's run-cache can
carry the stage between machines; the page that draws them
(``reports/series/<name>/series.md``, committed) is rendered by the compare stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.cli import Stage
from pipeline.core.drift import Side, align_by_key, jaccard, read_side, row_changes, take_rows
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.io import output_set, read_json, write_json_atomic
from pipeline.core.knn import MAX_BLOCK_ROWS, MAX_K, knn_graph, unit_rows
from pipeline.core.params import check_name, model_config
from pipeline.core.paths import SeriesPaths
from pipeline.core.parquet import derived_provenance, write_table
from pipeline.core.settings import as_params, from_section, real_number, setting, shown, whole_number

STAGE = "series"


def series_versions(value: Any, where: str) -> dict[str, list[str]]:
    """``series``: series name -> its versions in order, each a model of the run, at least two."""
    if not isinstance(value, dict):
        raise DissectError(f"{where} must map each series name to its list of model versions, in order, got {shown(value)}")
    for name, versions in value.items():
        check_name(name, "series", where)
        if not isinstance(versions, list) or len(versions) < 2 or not all(isinstance(v, str) for v in versions):
            raise DissectError(f"{where}.{name} must list at least two model names in order, got {shown(versions)}")
        repeated = sorted({v for v in versions if versions.count(v) > 1})
        if repeated:
            raise DissectError(f"{where}.{name} lists {repeated[0]!r} twice; each version appears once")
    return value


@dataclass(frozen=True)
class SeriesSettings:
    k: int = setting(10, whole_number(1, MAX_K))
    # A token's neighbours held when at least this share of them stayed at every step.
    neighbours_held: float = setting(0.5, real_number(0.0, 1.0))
    # A step moved a token sharply when its cosine to the previous version fell below this.
    sharp_move_below: float = setting(0.9, real_number(-1.0, 1.0))
    top_moved: int = setting(25, whole_number(1, 1_000_000))
    block_rows: int = setting(4096, whole_number(1, MAX_BLOCK_ROWS))


# `series:` names the series; how the stage measures them is the `trajectory:` section.
read_settings = from_section(SeriesSettings, "trajectory")


def series_paths(params: dict[str, Any], name: str | None) -> SeriesPaths:
    """The versions of series ``name`` (each checked to be a model of the run) and its outputs."""
    series = series_versions(params.get("series") or {}, "series")
    if name not in series:
        raise DissectError(f"series {name!r} is not in params.yaml (series: {', '.join(sorted(series)) or 'none'}); add it to conf/config.yaml")
    for version in series[name]:
        model_config(params, version)
    return SeriesPaths.in_project(name, series[name])


# --------------------------------------------------------------------------------------
# Lining the versions up


@dataclass(frozen=True)
class Aligned:
    ids: np.ndarray  # [n] int64: each aligned token's id in the first version
    tokens: list[str | None]  # [n]
    matrices: list[np.ndarray]  # per version [n, dim] float32, row i = the same token
    unaligned: list[int]  # per version: its tokens left out (not in every version, or ambiguous)


def align_versions(sides: list[Side]) -> Aligned:
    """The tokens every version has, in the first version's id order."""
    first = sides[0]
    rows_in_first = np.arange(len(first.keys))
    # Each later version is aligned with the first; a token stays if every version has it.
    alignments = [align_by_key(first.keys, side.keys) for side in sides[1:]]
    kept = rows_in_first
    for alignment in alignments:
        kept = np.intersect1d(kept, alignment.base_rows)
    rows = [kept]
    for alignment in alignments:
        position = np.searchsorted(alignment.base_rows, kept)
        rows.append(alignment.other_rows[position])
    dims = {side.matrix.shape[1] for side in sides}
    if len(dims) > 1:
        raise DissectError(f"the versions of a series have dims {sorted(dims)}; a series compares versions of one model, with one dim")
    return Aligned(
        ids=kept,
        tokens=[first.tokens[row] for row in kept],
        matrices=[take_rows(side.matrix, r) for side, r in zip(sides, rows)],
        unaligned=[len(side.keys) - len(kept) for side in sides],
    )


# --------------------------------------------------------------------------------------
# Trajectories


@dataclass(frozen=True)
class Trajectories:
    cosine_to_first: np.ndarray  # [steps, n] float32
    cosine_to_previous: np.ndarray  # [steps, n] float32
    neighbours_kept: np.ndarray  # [steps, n] float32


def trajectories(matrices: list[np.ndarray], k: int, block_rows: int) -> Trajectories:
    """The three per-token measures at every step s = 1..len(matrices)-1."""
    steps = len(matrices) - 1
    to_first, to_previous, kept = (np.empty((steps, len(matrices[0])), np.float32) for _ in range(3))
    previous_neighbours = knn_graph(unit_rows(matrices[0]), k, block_rows, "series: neighbours at step 0").ids
    for step in range(1, steps + 1):
        to_first[step - 1] = row_changes(matrices[0], matrices[step])[0]
        to_previous[step - 1] = row_changes(matrices[step - 1], matrices[step])[0]
        neighbours = knn_graph(unit_rows(matrices[step]), k, block_rows, f"series: neighbours at step {step}").ids
        kept[step - 1] = jaccard(previous_neighbours, neighbours)
        previous_neighbours = neighbours
    return Trajectories(to_first, to_previous, kept)


def trajectory_table(aligned: Aligned, versions: list[str], moves: Trajectories) -> pa.Table:
    """One row per (token, step), token by token in id order, steps in order."""
    steps, n = moves.cosine_to_first.shape
    return pa.table({
        "token_id": pa.array(np.repeat(aligned.ids, steps).astype(np.int32)),
        "token": pa.array([t for t in aligned.tokens for _ in range(steps)], pa.string()),
        "step": pa.array(np.tile(np.arange(1, steps + 1, dtype=np.int16), n)),
        "version": pa.DictionaryArray.from_arrays(
            pa.array(np.tile(np.arange(1, steps + 1, dtype=np.int32), n)), pa.array(versions, pa.string())),
        "cosine_to_first": pa.array(moves.cosine_to_first.T.reshape(-1)),
        "cosine_to_previous": pa.array(moves.cosine_to_previous.T.reshape(-1)),
        "neighbours_kept": pa.array(moves.neighbours_kept.T.reshape(-1)),
    })


def token_table(aligned: Aligned, versions: list[str], moves: Trajectories, settings: SeriesSettings) -> pa.Table:
    """One row per token: where it moved most and whether its neighbours held."""
    # argmin returns the first minimum: a tie goes to the earliest step.
    worst = np.argmin(moves.cosine_to_previous, axis=0)  # [n]
    columns = np.arange(len(aligned.ids))
    largest = moves.cosine_to_previous[worst, columns]  # [n]
    order = np.lexsort((aligned.ids, largest.astype(np.float64)))
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return pa.table({
        "token_id": pa.array(aligned.ids.astype(np.int32)),
        "token": pa.array(aligned.tokens, pa.string()),
        "moved_most_at_step": pa.array((worst + 1).astype(np.int16)),
        "moved_most_at_version": pa.array([versions[s + 1] for s in worst], pa.string()),
        "cosine_to_previous_there": pa.array(largest),
        "cosine_to_first_at_end": pa.array(moves.cosine_to_first[-1]),
        "neighbours_kept_min": pa.array(moves.neighbours_kept.min(axis=0)),
        "neighbours_held": pa.array(moves.neighbours_kept.min(axis=0) >= settings.neighbours_held),
        "moved_rank": pa.array(rank),
    })


# --------------------------------------------------------------------------------------
# Per version


def version_rows(paths: SeriesPaths, moves: Trajectories, settings: SeriesSettings) -> list[dict[str, Any]]:
    """Per version: its headline statistics (from its own artifacts) and how far it moved."""
    rows = []
    for step, version in enumerate(paths.versions):
        stats = read_json(version.stats)
        undertrained = read_json(version.undertrained_metrics) if version.undertrained_metrics.is_file() else None
        row: dict[str, Any] = {
            "step": step,
            "version": version.name,
            "norm_median": stats["row_norm"]["p50"],
            "anisotropy": stats["anisotropy"]["mean_cos_to_mean"],
            "undertrained": undertrained["flagged"] if undertrained else None,
            "cosine_to_first_mean": 1.0,
            "cosine_to_previous_mean": None,
            "neighbours_kept_mean": None,
            "sharp_moves": None,
        }
        if step:
            previous = moves.cosine_to_previous[step - 1].astype(np.float64)
            row.update(
                cosine_to_first_mean=float(moves.cosine_to_first[step - 1].astype(np.float64).mean()),
                cosine_to_previous_mean=float(previous.mean()),
                neighbours_kept_mean=float(moves.neighbours_kept[step - 1].astype(np.float64).mean()),
                sharp_moves=int((previous < settings.sharp_move_below).sum()),
            )
        rows.append(row)
    return rows


def plot_rows(rows: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """A DVC plot file's rows: step, version and one field (x: step)."""
    return [{"step": row["step"], "version": row["version"], field: row[field]} for row in rows if row[field] is not None]


def top_movers(tokens: pa.Table, limit: int) -> list[dict[str, Any]]:
    order = np.argsort(tokens.column("moved_rank").to_numpy(), kind="stable")[:limit]
    keep = ("token_id", "token", "moved_most_at_step", "moved_most_at_version", "cosine_to_previous_there",
            "cosine_to_first_at_end", "neighbours_held")
    return [{key: (round(v, 6) if isinstance(v, float) else v) for key, v in row.items() if key in keep}
            for row in tokens.take(order).to_pylist()]


# --------------------------------------------------------------------------------------
# Stage


def run(paths: SeriesPaths, settings: SeriesSettings) -> dict[str, Any]:
    versions = [version.name for version in paths.versions]
    sides = [read_side(version.embeddings) for version in paths.versions]
    aligned = align_versions(sides)
    moves = trajectories(aligned.matrices, settings.k, settings.block_rows)
    tokens = token_table(aligned, versions, moves, settings)
    rows = version_rows(paths, moves, settings)
    metrics = {
        "series": paths.name,
        "versions": rows,
        "aligned": len(aligned.ids),
        "unaligned": dict(zip(versions, aligned.unaligned)),
        "settings": as_params(settings),
        "top_moved": top_movers(tokens, settings.top_moved),
    }
    provenance = derived_provenance(STAGE, paths.name, paths.versions[0].embeddings, {"series": {**as_params(settings), "versions": versions}})
    provenance["inputs"] = [{"path": str(side.path), "matrix_sha256": side.matrix_sha256} for side in sides]
    with output_set():
        write_table(paths.trajectories, trajectory_table(aligned, versions, moves), provenance)
        write_table(paths.tokens, tokens, provenance)
        write_json_atomic(paths.metrics, metrics)
        for field, path in paths.plots.items():
            write_json_atomic(path, plot_rows(rows, field))
    return metrics


main = Stage(STAGE, "SERIES", series_paths, read_settings, run).main


if __name__ == "__main__":
    run_stage(main)
