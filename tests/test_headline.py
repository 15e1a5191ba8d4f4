"""The headline metrics: the few numbers DVC compares, numbers only, under the model's name."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.core.headline import drift_headline, model_headline, significant

ROOT = Path(__file__).resolve().parent.parent

STATS = {
    "vocab_size": 8, "dim": 4,
    "values": {"mean": -0.000542289044, "std": 0.13557820779},
    "row_norm": {"p50": 3.15387988176},
    "anisotropy": {"mean_cos_to_mean": 0.664927631616},
    "rows": {"duplicate": 2},
}
QUANT = {
    "q4_0": {"rmse": 0.0150436044708, "tokens_recall_at_k": 0.8368, "recall_k": 10, "bits_per_weight": 4.5},
    "fp16": {"rmse": 0.0, "tokens_recall_at_k": 1.0, "recall_k": 10},
}


def leaves(tree: dict) -> list:
    return [value for v in tree.values() for value in (leaves(v) if isinstance(v, dict) else [v])]


def test_significant_keeps_four_digits_whatever_the_scale():
    assert significant(0.0150436044708) == 0.01504
    assert significant(-0.000542289044) == -0.0005423
    assert significant(3.15387988176) == 3.154
    assert significant(12345.678) == 12350.0
    assert significant(0.0) == 0.0 and significant(7) == 7 and significant(None) is None
    assert significant(float("nan")) is None


def test_model_headline_is_numbers_only_under_the_model_name():
    headline = model_headline("tiny", STATS, QUANT, {"flagged": 3, "rule": "a long sentence"})
    assert list(headline) == ["tiny"]
    numbers = headline["tiny"]
    assert numbers["vocab"] == 8 and numbers["dim"] == 4 and numbers["duplicate_rows"] == 2 and numbers["undertrained"] == 3
    assert numbers["mean"] == -0.0005423 and numbers["std"] == 0.1356
    assert numbers["norm_median"] == 3.154 and numbers["anisotropy"] == 0.6649
    assert numbers["q4_0"] == {"rmse": 0.01504, "recall@10": 0.8368}
    assert numbers["fp16"] == {"rmse": 0.0, "recall@10": 1.0}
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in leaves(headline))


def test_model_headline_without_quant_or_undertrained():
    numbers = model_headline("tiny", STATS, None, None)["tiny"]
    assert "undertrained" not in numbers and "q4_0" not in numbers and numbers["vocab"] == 8


def test_drift_headline_counts_what_did_not_align():
    metrics = {
        "pair": "a-b", "base": "x", "other": "y", "aligned": 90, "only_in_base": 4, "only_in_other": 1, "ambiguous": 2,
        "cosine": {"mean": 0.99912345, "min": 0.5}, "l2_change_relative": {"mean": 0.0412345},
        "procrustes": {"relative_residual": 0.0312345}, "knn_jaccard": {"k": 10, "mean": 0.712345},
    }
    headline = drift_headline("a-b", metrics)
    assert headline == {"a-b": {"aligned": 90, "unaligned": 7, "cosine_mean": 0.9991, "cosine_min": 0.5,
                                "l2_change_rel": 0.04123, "procrustes_rel": 0.03123, "jaccard@10": 0.7123}}


def test_dvc_metrics_are_the_headline_files_only():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {stage: [next(iter(m)) if isinstance(m, dict) else m for m in body.get("do", body).get("metrics", [])]
                for stage, body in stages.items()}
    assert declared["report"] == ["reports/${key}/headline.json"]
    assert declared["drift"] == ["artifacts/drift/${key}/headline.json"]
    assert all(not files for stage, files in declared.items() if stage not in ("report", "drift"))
    outs = str(stages)
    for detail in ("stats.json", "quant.json", "undertrained.json", "drift.json"):
        assert detail in outs  # still an output, only no longer a metric
