"""dvc.yaml's plots: every model on the overlaid charts, and figures that show offline.

DVC cannot loop over ``models`` in the top-level ``plots:`` that overlay the models, so
their lists are written out; this test fails when they differ from params.yaml's models,
and ``python tests/test_dvc_plots.py`` (from the project root) rewrites them.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Overlaid plot id -> (the per-model file, the field plotted).
OVERLAID = {
    "explained-variance-all-models": ("pca_variance.json", "cumulative"),
    "row-norms-all-models": ("norm_hist.json", "count"),
}


def models() -> list[str]:
    return list(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["models"])


def expected_sources(plot: str) -> dict[str, str]:
    file, field = OVERLAID[plot]
    return {f"artifacts/{model}/{file}": field for model in models()}


def top_level_plots(text: str) -> dict[str, dict]:
    return {plot_id: spec for entry in yaml.safe_load(text)["plots"] for plot_id, spec in entry.items()}


def test_overlaid_plots_name_every_model_in_params():
    plots = top_level_plots((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for plot in OVERLAID:
        assert plots[plot]["y"] == expected_sources(plot), f"{plot}: run `python tests/test_dvc_plots.py` to rewrite it"


def test_figures_are_image_plots_and_the_variance_plot_is_readable():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    report = stages["report"]["do"]
    assert {"reports/${key}/figures": {"cache": False}} in report["plots"]  # PNGs copied beside DVC's HTML
    variance = next(entry for entry in stages["pca"]["do"]["plots"] if "artifacts/${key}/pca_variance.json" in entry)
    assert variance["artifacts/${key}/pca_variance.json"]["y"] == "cumulative"
    # Each PNG is shown once: as the report's copy, not also as the pca stage's original.
    pca_plots = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stages["pca"]["do"]["plots"]]
    assert not [path for path in pca_plots if path.endswith(".png")]


def rewrite(text: str) -> str:
    """``text`` (dvc.yaml) with each overlaid plot's ``y:`` block listing params.yaml's models."""
    for plot in OVERLAID:
        pattern = re.compile(rf"(  - {re.escape(plot)}:\n(?:      (?!y:).*\n)*      y:\n)((?:        .*\n)*)")
        lines = "".join(f"        {path}: {field}\n" for path, field in expected_sources(plot).items())
        text, count = pattern.subn(lambda match: match.group(1) + lines, text)
        assert count == 1, f"dvc.yaml has no top-level plot {plot} with a y: block"
    return text


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
