"""report stage: ``reports/<name>/report.md``, its figures and ``headline.json``, from the artifacts alone.

Every number and every figure comes from a file an earlier stage wrote; nothing is
computed again from the matrix. The story follows the walkthrough the project automates:
the model, the matrix, one word ("Hello", the first configured word) from text to
vector, similarity, PCA, quantization, under-trained tokens, and how to use the artifacts.

This module loads the artifacts and writes the outputs; the sections are written in
``pipeline/report/sections.py``, ordered and numbered in ``pipeline/report/render.py``,
and the figures drawn in ``pipeline/report/figures.py``.

``headline.json`` (:mod:`pipeline.core.headline`) is the model's DVC metrics: the few
numbers ``dvc exp show`` and ``dvc metrics diff`` compare between versions.

Deterministic: the same artifacts give byte-identical markdown, PNGs and JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.headline import model_headline
from pipeline.core.io import output_set, read_json, write_bytes_atomic, write_json_atomic
from pipeline.core.params import model_paths
from pipeline.core.parquet import read_provenance
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import NoSettings, no_settings
from pipeline.report.render import render
from pipeline.report.sections import PCA_VOCAB, PCA_WORDS, Artifacts



def _read_rows(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except FileNotFoundError:
        raise DissectError(f"{path} is missing; run the stage that writes it (`dvc repro`)") from None


def load_artifacts(model_dir: Path) -> Artifacts:
    dims = pq.read_table(model_dir / "dims.parquet")
    quant_path = model_dir / "quant.json"
    undertrained_path = model_dir / "undertrained.json"
    for figure in (model_dir / "figures" / PCA_WORDS, model_dir / "figures" / PCA_VOCAB):  # copied into the report
        if not figure.is_file():
            raise DissectError(f"{figure} is missing; run the pca stage (`dvc repro pca@{model_dir.name}`)")
    return Artifacts(
        name=model_dir.name,
        provenance=read_provenance(model_dir / "embeddings.parquet"),
        stats=read_json(model_dir / "stats.json"),
        norm_hist=read_json(model_dir / "norm_hist.json"),
        dims={name: dims.column(name).to_numpy() for name in dims.column_names},
        words=_read_rows(model_dir / "words.parquet"),
        similarity=_read_rows(model_dir / "similarity.parquet"),
        neighbors=_read_rows(model_dir / "neighbors.parquet"),
        pca_variance=read_json(model_dir / "pca_variance.json"),
        quant=read_json(quant_path) if quant_path.exists() else None,
        undertrained=read_json(undertrained_path) if undertrained_path.is_file() else None,
        figures_dir=model_dir / "figures",
    )


def run(paths: ModelPaths, settings: NoSettings) -> Path:
    artifacts = load_artifacts(paths.artifacts)
    report = render(artifacts)
    with output_set():
        for figure in report.figures:
            figure.run(paths.report_figures)
        write_bytes_atomic(paths.report, report.markdown.encode("utf-8"))
        write_json_atomic(paths.headline, model_headline(paths.name, artifacts.stats, artifacts.quant, artifacts.undertrained))
    return paths.report


main = Stage("report", "MODEL", model_paths, no_settings, run).main


if __name__ == "__main__":
    run_stage(main)
