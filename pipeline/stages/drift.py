"""drift stage: how far each token moved between two versions of an embedding matrix.

A pair (``drift.pairs.<name>: {base: PATH, other: PATH}``) names two vector files: a
model's ``artifacts/<m>/embeddings.parquet``, or one of its quantized variants
``artifacts/<m>/quant/<scheme>.parquet`` (dequantized here with the scheme's own decode in
:mod:`pipeline.quant`). The two must share a tokenizer's vocabulary; tokens are aligned
by their text (the ``token`` column), so the same vocabulary with ids in another order
still lines up. Tokens are matched by ``token_key`` (unique in every file extract writes:
the text, but ``<0x0A>`` for a byte-fallback piece whose text ``"\\n"`` another piece also
has; files without the column are matched by ``token``). Tokens only one side has, keys
that occur more than once on either side (``ambiguous``: only possible in files without
``token_key``), and padding rows are left out and counted.

Per aligned token (float32):

* ``cosine``: cosine of the two rows (same dim only); ``relative_frobenius`` in drift.json is
  ``|| A - B ||_F / || A ||_F`` over the aligned rows, and ``identical_rows`` counts rows equal in both;
* ``l2_change`` and ``l2_change_relative`` (divided by the base row's norm);
* ``procrustes_residual`` and ``procrustes_residual_relative``: ``|| a R - b ||`` after the
  orthogonal Procrustes rotation R = argmin over orthogonal R of ``|| A R - B ||_F`` (the
  SVD of A^T B, accumulated in float64 chunk by chunk). Two separately trained models have
  arbitrary bases; the rotation removes that, so what is left is real change;
* ``knn_jaccard``: |N_a ∩ N_b| / |N_a ∪ N_b| of the token's ``drift.k`` nearest
  neighbours by cosine (exact, :func:`pipeline.core.knn.knn_graph`), each side searched among
  the aligned tokens only. Works when the dims differ;
* ``moved_rank``: 1 = moved most. By ``procrustes_residual_relative`` when the dims match
  (largest first), else by ``knn_jaccard`` (smallest first); ties by base token id.

Outputs in ``artifacts/drift/<pair>/``: ``drift.parquet`` (``base_id``, ``other_id``
int32, ``token``, the columns above), ``drift.json`` (alignment counts, summaries of each
column, Procrustes fit, the ``drift.top_moved`` tokens that moved most) and
``headline.json`` (DVC metrics: a few of those numbers under the pair's name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.cli import Stage
from pipeline.core.drift import BLOCK_ROWS, Side, align_by_key, jaccard, read_side, row_changes, take_rows
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.headline import drift_headline
from pipeline.core.io import output_set, write_json_atomic
from pipeline.core.knn import MAX_BLOCK_ROWS, MAX_K, iter_blocks, knn_graph, unit_rows
from pipeline.core.params import check_name
from pipeline.core.paths import DriftPaths
from pipeline.core.settings import as_params, from_section, setting, shown, whole_number
from pipeline.core.parquet import derived_provenance, write_table

STAGE = "drift"


def pair_files(value: Any, where: str) -> dict[str, dict[str, str]]:
    """``drift.pairs``: pair name -> {base, other}, each a vector file path."""
    if not isinstance(value, dict):
        raise DissectError(f"{where} must map each pair name to `base:` and `other:` files, got {shown(value)}")
    for name, entry in value.items():
        check_name(name, "drift pair")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(side), str) and entry[side] for side in ("base", "other")):
            raise DissectError(f"{where}.{name} must set `base:` and `other:` to vector files (embeddings.parquet or quant/<scheme>.parquet)")
    return value


@dataclass(frozen=True)
class DriftSettings:
    k: int = setting(10, whole_number(1, MAX_K))
    top_moved: int = setting(50, whole_number(1, 1_000_000))
    block_rows: int = setting(4096, whole_number(1, MAX_BLOCK_ROWS))
    # The pairs compared: DVC runs the stage once per entry; each run's files are its paths.
    pairs: dict[str, dict[str, str]] = setting({}, pair_files, recorded=False)


def pair_paths(params: dict[str, Any], name: str | None) -> DriftPaths:
    """The files of pair ``name`` in ``drift.pairs`` and where its outputs go."""
    pairs = read_settings(params).pairs
    if name not in pairs:
        raise DissectError(f"drift pair {name!r} is not in drift.pairs (pairs: {', '.join(sorted(pairs)) or 'none'}); add it to conf/config.yaml")
    return DriftPaths.in_project(name, pairs[name]["base"], pairs[name]["other"])


read_settings = from_section(DriftSettings, STAGE)


def procrustes(a: np.ndarray, b: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """The orthogonal R [dim, dim] (float64) minimising ``|| a R - b ||_F``: U V^T of svd(a^T b)."""
    cross = np.zeros((a.shape[1], b.shape[1]), np.float64)  # [dim, dim]
    for start, block in iter_blocks(a, block_rows):
        cross += block.astype(np.float64).T @ b[start : start + len(block)].astype(np.float64)
    u, _, vt = np.linalg.svd(cross)
    return u @ vt


def procrustes_residuals(a: np.ndarray, b: np.ndarray, rotation: np.ndarray,
                         block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(``|| a_i R - b_i ||``, the same / ``|| b_i ||``), each [n] float32.

    R comes from an SVD whose last bits vary with the BLAS kernel, so both are published on
    a grid: the residual 2^-20 below its row's ``|| b_i ||`` (or ``|| a_i ||`` when b_i is 0),
    the relative residual 2^-20 absolute; the relative one is the published residual divided
    by ``|| b_i ||``, so the two columns agree.
    """
    from pipeline.core.determinism import PUBLISHED_BITS, quantize, scale_quantum

    residual = np.empty(len(a), np.float32)
    relative = np.empty(len(a), np.float32)
    for start, block in iter_blocks(a, block_rows):
        x = block.astype(np.float64)
        y = b[start : start + len(block)].astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        diff = quantize(np.linalg.norm(x @ rotation - y, axis=1), scale_quantum(np.where(ny > 0, ny, nx)))
        residual[start : start + len(block)] = diff
        ratio = np.divide(diff, ny, out=np.full_like(diff, np.inf), where=ny > 0)
        relative[start : start + len(block)] = quantize(ratio, 2.0**-PUBLISHED_BITS)
    return residual, relative


def moved_order(relative_residual: np.ndarray | None, knn_overlap: np.ndarray, base_ids: np.ndarray) -> np.ndarray:
    """Row indices, moved most first (see the module docstring for the order)."""
    if relative_residual is not None:
        return np.lexsort((base_ids, -relative_residual.astype(np.float64)))
    return np.lexsort((base_ids, knn_overlap))


# --------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Drift:
    table: pa.Table
    metrics: dict[str, Any]


def compare(base: Side, other: Side, settings: DriftSettings) -> Drift:
    """Everything the stage writes, for two sides."""
    alignment = align_by_key(base.keys, other.keys)
    a = take_rows(base.matrix, alignment.base_rows)  # [n, dim_a]
    b = take_rows(other.matrix, alignment.other_rows)  # [n, dim_b]
    same_dim = a.shape[1] == b.shape[1]
    n = len(a)
    nulls = pa.nulls(n, pa.float32())
    columns: dict[str, Any] = {
        "base_id": pa.array(alignment.base_rows.astype(np.int32)),
        "other_id": pa.array(alignment.other_rows.astype(np.int32)),
        "token": pa.array([base.tokens[row] for row in alignment.base_rows], pa.string()),
    }
    metrics: dict[str, Any] = {
        "aligned": n, "only_in_base": alignment.only_base, "only_in_other": alignment.only_other,
        "ambiguous": alignment.ambiguous, "ids_differ": alignment.ids_differ, "dim_base": int(a.shape[1]), "dim_other": int(b.shape[1]),
    }
    relative_residual = None
    if same_dim:
        cosine, l2, l2_relative = row_changes(a, b)
        rotation = procrustes(a, b)
        residual, relative_residual = procrustes_residuals(a, b, rotation)
        columns.update(cosine=cosine, l2_change=l2, l2_change_relative=l2_relative,
                       procrustes_residual=residual, procrustes_residual_relative=relative_residual)
        metrics.update(relative_frobenius=relative_frobenius(l2, a), identical_rows=int((l2 == 0).sum()),
                       cosine=describe(cosine), l2_change=describe(l2),
                       l2_change_relative=describe(l2_relative), procrustes=procrustes_fit(a, b, residual, rotation))
    else:
        columns.update({name: nulls for name in ("cosine", "l2_change", "l2_change_relative",
                                                 "procrustes_residual", "procrustes_residual_relative")})
    overlap = jaccard(knn_graph(unit_rows(a), settings.k, settings.block_rows, "drift: base neighbours").ids,
                      knn_graph(unit_rows(b), settings.k, settings.block_rows, "drift: other neighbours").ids)
    columns["knn_jaccard"] = overlap
    order = moved_order(relative_residual, overlap, alignment.base_rows)
    moved_rank = np.empty(n, np.int32)
    moved_rank[order] = np.arange(1, n + 1, dtype=np.int32)
    columns["moved_rank"] = moved_rank
    table = pa.table({key: value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value)
                      for key, value in columns.items()})
    metrics["knn_jaccard"] = {**describe(overlap), "k": settings.k, "identical_fraction": float((overlap == 1).mean()) if n else None}
    metrics["moved_by"] = "procrustes_residual_relative" if same_dim else "knn_jaccard"
    metrics["top_moved"] = [_jsonable(row) for row in table.take(order[: settings.top_moved]).to_pylist()]
    return Drift(table, metrics)


def describe(values: np.ndarray) -> dict[str, float | None]:
    """mean, min, p01, median, p99, max of ``values`` (finite entries only)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if not finite.size:
        return {key: None for key in ("mean", "min", "p01", "median", "p99", "max")}
    p01, median, p99 = np.percentile(finite, [1, 50, 99])
    return {"mean": float(finite.mean()), "min": float(finite.min()), "p01": float(p01), "median": float(median),
            "p99": float(p99), "max": float(finite.max())}


def relative_frobenius(l2: np.ndarray, a: np.ndarray) -> float:
    """``|| A - B ||_F / || A ||_F`` from the per-row changes ``l2`` [n]: how much of the matrix changed."""
    total_a = sum(float(np.einsum("ij,ij->", blk.astype(np.float64), blk.astype(np.float64))) for _, blk in iter_blocks(a, BLOCK_ROWS))
    change = float(np.square(l2.astype(np.float64)).sum())
    return float(np.sqrt(change / total_a)) if total_a > 0 else 0.0


def procrustes_fit(a: np.ndarray, b: np.ndarray, residual: np.ndarray, rotation: np.ndarray) -> dict[str, float]:
    """How well one rotation explains the change: ``||AR - B||_F / ||B||_F`` and R's distance from identity."""
    total_b = sum(float(np.einsum("ij,ij->", blk.astype(np.float64), blk.astype(np.float64))) for _, blk in iter_blocks(b, BLOCK_ROWS))
    relative = float(np.sqrt(np.square(residual.astype(np.float64)).sum() / total_b)) if total_b > 0 else 0.0
    from pipeline.core.determinism import round_decimal

    # R's distance from I carries the SVD's last bits: published to 9 significant digits.
    distance = round_decimal(float(np.sqrt(np.einsum("ij,ij->", rotation - np.eye(len(rotation)), rotation - np.eye(len(rotation))))), 9)
    return {"relative_residual": relative, "rotation_distance_from_identity": distance}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {key: (round(value, 6) if isinstance(value, float) and np.isfinite(value) else value) for key, value in row.items()}


# --------------------------------------------------------------------------------------
# Stage


def run(paths: DriftPaths, settings: DriftSettings) -> dict[str, Any]:
    """One pair of ``drift.pairs``: write its drift.parquet and drift.json."""
    base, other = read_side(paths.base), read_side(paths.other)
    result = compare(base, other, settings)
    metrics = {"pair": paths.name, "base": str(paths.base), "other": str(paths.other), **result.metrics}
    provenance = derived_provenance(STAGE, paths.name, paths.base, {"drift": {**as_params(settings), "pair": paths.name}})
    provenance["inputs"] = [{"path": str(side.path), "matrix_sha256": side.matrix_sha256} for side in (base, other)]
    with output_set():
        write_table(paths.table, result.table, provenance)
        write_json_atomic(paths.metrics, metrics)
        write_json_atomic(paths.headline, drift_headline(paths.name, metrics))
    return metrics


main = Stage(STAGE, "PAIR", pair_paths, read_settings, run).main


if __name__ == "__main__":
    run_stage(main)
