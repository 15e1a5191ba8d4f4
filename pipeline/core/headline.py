"""The headline numbers DVC compares: a few numbers per model and per drift pair.

``dvc exp show`` and ``dvc metrics diff`` put every metric of every file in one table, so
the files declared as DVC metrics hold only what a person compares between versions, as
numbers (no strings), rounded to ``SIGNIFICANT`` digits so the columns stay narrow. The
detailed JSON files (stats.json, quant.json, undertrained.json, drift.json) keep full
precision and every field; they are ordinary outputs.

Every number sits under the model's (or the pair's) own name: DVC names a column by its
key alone when no other file has that key, so ``smollm2-135m.q4_0.rmse`` is a column's
whole header, where keys shared by every model's file would be prefixed with the file's
path (``reports/smollm2-135m/headline.json:q4_0.rmse``).
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4


def significant(value: float | int | None, digits: int = SIGNIFICANT) -> float | int | None:
    """``value`` rounded to ``digits`` significant digits; whole numbers and None unchanged."""
    if value is None or isinstance(value, (bool, int)):
        return value
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value if math.isfinite(value) else None
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def model_headline(
    name: str,
    stats: dict[str, Any],
    quant: dict[str, dict[str, Any]] | None,
    undertrained: dict[str, Any] | None,
) -> dict[str, Any]:
    """``{name: {...}}``: the model's shape, statistics, flagged tokens and each scheme's RMSE and recall."""
    numbers: dict[str, Any] = {
        "vocab": stats["vocab_size"],
        "dim": stats["dim"],
        "mean": significant(stats["values"]["mean"]),
        "std": significant(stats["values"]["std"]),
        "norm_median": significant(stats["row_norm"]["p50"]),
        "anisotropy": significant(stats["anisotropy"]["mean_cos_to_mean"]),
        "duplicate_rows": stats["rows"]["duplicate"],
    }
    if undertrained is not None:
        numbers["undertrained"] = undertrained["flagged"]
    for scheme, metrics in (quant or {}).items():
        k = metrics.get("recall_k")
        numbers[scheme] = {
            "rmse": significant(metrics["rmse"]),
            f"recall@{k}" if k else "recall": significant(metrics["tokens_recall_at_k"]),
        }
    return {name: numbers}


def drift_headline(pair: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{pair: {...}}``: how many tokens lined up and how far they moved."""
    numbers: dict[str, Any] = {"aligned": metrics["aligned"], "unaligned": metrics["only_in_base"] + metrics["only_in_other"]}
    if "ambiguous" in metrics:
        numbers["unaligned"] += metrics["ambiguous"]
    if metrics.get("cosine"):
        numbers["cosine_mean"] = significant(metrics["cosine"]["mean"])
        numbers["cosine_min"] = significant(metrics["cosine"]["min"])
    if metrics.get("l2_change_relative"):
        numbers["l2_change_rel"] = significant(metrics["l2_change_relative"]["mean"])
    if "procrustes" in metrics:
        numbers["procrustes_rel"] = significant(metrics["procrustes"]["relative_residual"])
    k = metrics["knn_jaccard"]["k"]
    numbers[f"jaccard@{k}"] = significant(metrics["knn_jaccard"]["mean"])
    return {pair: numbers}
