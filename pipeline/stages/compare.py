"""compare stage: ``reports/index.md``, one table over every model in params.yaml, and the
page of each series (``reports/series/<name>/series.md``, from its ``series.json``).

A row per model (vocabulary, dimension, statistics, anisotropy, the first word's nearest
tokens, each quantization scheme's error), links to each model's report, and a short
paragraph on the largest differences. Read from the artifacts only; correct for any
number of models, one included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.report import markdown as md
from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.io import output_set, read_json, write_bytes_atomic
from pipeline.core.parquet import read_provenance
from pipeline.core.params import project_paths
from pipeline.core.paths import ModelPaths, ProjectPaths, SeriesPaths
from pipeline.core.settings import NoSettings, no_settings
from pipeline.report.render import Rendered
from pipeline.report.sections import Exports, drift_section, export_section
from pipeline.report.series import series_page

NEIGHBOURS_SHOWN = 3


@dataclass(frozen=True)
class ModelSummary:
    name: str
    source_dtype: str
    vocab: int
    dim: int
    stats: dict[str, Any]
    first_word: str
    first_word_neighbours: list[tuple[str, float]]
    quant: dict[str, dict[str, Any]]



def load_summary(paths: ModelPaths) -> ModelSummary:
    model_dir, name = paths.artifacts, paths.name
    provenance = read_provenance(model_dir / "embeddings.parquet")
    words = pq.read_table(model_dir / "words.parquet", columns=["word", "variant"]).to_pylist()
    first = words[0]
    neighbours = [
        row for row in pq.read_table(model_dir / "neighbors.parquet", columns=["variant", "rank", "token", "cosine"]).to_pylist()
        if row["variant"] == first["variant"]
    ]
    neighbours.sort(key=lambda row: row["rank"])
    quant_path = model_dir / "quant.json"
    return ModelSummary(
        name=name,
        source_dtype=provenance["source_dtype"],
        vocab=provenance["shape"][0],
        dim=provenance["shape"][1],
        stats=read_json(model_dir / "stats.json"),
        first_word=first["variant"],
        first_word_neighbours=[(row["token"], row["cosine"]) for row in neighbours[:NEIGHBOURS_SHOWN]],
        quant=read_json(quant_path) if quant_path.exists() else {},
    )


def models_table(summaries: list[ModelSummary]) -> str:
    headers = ["model", "source dtype", "vocab", "dim", "mean", "std", "max \\|x\\|", "row norm median",
               "mean cos to mean", "duplicate rows", "nearest to the first word"]
    numeric = [
        [s.vocab for s in summaries], [s.dim for s in summaries],
        [s.stats["values"]["mean"] for s in summaries], [s.stats["values"]["std"] for s in summaries],
        [s.stats["values"]["max_abs"] for s in summaries], [s.stats["row_norm"]["p50"] for s in summaries],
        [s.stats["anisotropy"]["mean_cos_to_mean"] for s in summaries], [s.stats["rows"]["duplicate"] for s in summaries],
    ]
    cells = [md.column(values) for values in numeric]  # one format per column
    rows = [[
        f"[{s.name}]({s.name}/report.md)", s.source_dtype, *(column[i] for column in cells),
        f"{md.token(s.first_word)}: " + ", ".join(f"{md.token(t)} ({c:.2f})" for t, c in s.first_word_neighbours),
    ] for i, s in enumerate(summaries)]
    return md.table(headers, rows, "llrrrrrrrrl")


def quant_table(summaries: list[ModelSummary], key: str, digits: int = 3) -> str:
    """One row per model, one column per scheme: ``key`` (rmse or tokens_recall_at_k) of each."""
    schemes = sorted({scheme for s in summaries for scheme in s.quant})
    columns = [md.column([s.quant[scheme][key] if scheme in s.quant else None for s in summaries], digits) for scheme in schemes]
    rows = [[s.name, *(column[i] for column in columns)] for i, s in enumerate(summaries)]
    return md.table(["model", *(f"`{scheme}`" for scheme in schemes)], rows, "l" + "r" * len(schemes))


def quant_tables(summaries: list[ModelSummary]) -> list[str]:
    """RMSE and recall as two tables, models down and schemes across, so each fits a page's width."""
    if not any(s.quant for s in summaries):
        return ["No model has quantization results."]
    ks = sorted({str(m.get("recall_k", "k")) for s in summaries for m in s.quant.values()})
    return ["RMSE of the dequantized matrix:", quant_table(summaries, "rmse"),
            f"Recall@{'/'.join(ks)} (k = quantize.recall_k):", quant_table(summaries, "tokens_recall_at_k")]


def series_links(paths: ProjectPaths) -> list[str]:
    """A line per series of params.yaml, linking its page."""
    if not paths.series:
        return []
    lines = [f"- [{s.name}](series/{s.name}/series.md): {len(s.versions)} versions, "
             f"`{s.versions[0].name}` to `{s.versions[-1].name}`" for s in paths.series]
    return ["## Series", "How tokens moved over each ordered run of versions:", "\n".join(lines)]


def differences(summaries: list[ModelSummary]) -> str:
    """The largest differences between the models, as sentences citing the values."""
    if len(summaries) == 1:
        return f"Only one model is configured ({summaries[0].name}); add another with `dvc exp run -S '+model@models.NAME=NAME'` to compare."
    by_vocab = sorted(summaries, key=lambda s: s.vocab)
    by_dim = sorted(summaries, key=lambda s: s.dim)
    by_aniso = sorted(summaries, key=lambda s: s.stats["anisotropy"]["mean_cos_to_mean"] or 0.0)
    by_norm = sorted(summaries, key=lambda s: s.stats["row_norm"]["p50"] or 0.0)
    sentences = [
        f"Vocabularies range from {md.number(by_vocab[0].vocab)} tokens ({by_vocab[0].name}) to "
        f"{md.number(by_vocab[-1].vocab)} ({by_vocab[-1].name}), dimensions from {by_dim[0].dim} ({by_dim[0].name}) "
        f"to {by_dim[-1].dim} ({by_dim[-1].name}).",
        f"{by_aniso[-1].name} is the most anisotropic (mean cosine to the mean vector "
        f"{md.number(by_aniso[-1].stats['anisotropy']['mean_cos_to_mean'], 3)}), {by_aniso[0].name} the least "
        f"({md.number(by_aniso[0].stats['anisotropy']['mean_cos_to_mean'], 3)}).",
        f"Median row norms go from {md.number(by_norm[0].stats['row_norm']['p50'], 3)} ({by_norm[0].name}) to "
        f"{md.number(by_norm[-1].stats['row_norm']['p50'], 3)} ({by_norm[-1].name}), so absolute quantization errors "
        "are comparable only relative to that scale (SNR and recall are scale-free).",
    ]
    return " ".join(sentences)


def load_exports(model_dir: Path) -> Exports | None:
    """What the export stage wrote for one model, or None when it has not run."""
    config = model_dir / "projector" / "projector_config.json"
    atlas = model_dir / "atlas.parquet"
    if not config.is_file() or not atlas.is_file():
        return None
    return Exports(rows=pq.ParquetFile(atlas).metadata.num_rows, projector_tensors=len(read_json(config)["embeddings"]))


def version_sections(paths: ProjectPaths) -> list[str]:
    """Drift between versions (every pair in artifacts/drift/) and the exports that exist."""
    drift_dir = paths.drift_dir
    pairs = sorted(p for p in drift_dir.iterdir() if p.is_dir()) if drift_dir.is_dir() else []
    sections = []
    for pair in pairs:
        metrics = pair / "drift.json"
        sections.append(drift_section(pair.name, read_json(metrics) if metrics.is_file() else None))
    exported = [model for model in paths.models if model.atlas.is_file()]
    sections += [export_section(model.name, load_exports(model.artifacts)) for model in exported]
    return sections


def render(summaries: list[ModelSummary], extra_sections: list[str] | None = None) -> str:
    parts = [
        "# Token-embedding layers compared",
        f"{len(summaries)} model{'s' if len(summaries) != 1 else ''} from params.yaml. Each name links to its report.",
        models_table(summaries),
        "## Quantization: RMSE, and recall@k of nearest neighbours",
        "Recall@k: the share of a sampled token's k nearest tokens (k = quantize.recall_k) that stay among its k nearest "
        "after quantization; the sample is quantize.sample_tokens tokens.",
        *quant_tables(summaries),
        "## The largest differences",
        differences(summaries),
        *(extra_sections or []),
    ]
    return "\n\n".join(parts) + "\n"


def series_pages(paths: ProjectPaths) -> list[tuple[SeriesPaths, Rendered]]:
    """Each series' page, from the series stage's series.json."""
    pages = []
    for series in paths.series:
        if not series.metrics.is_file():
            raise DissectError(f"{series.metrics} is missing; run the series stage (`dvc repro series@{series.name}`)")
        pages.append((series, series_page(read_json(series.metrics))))
    return pages


def run(paths: ProjectPaths, settings: NoSettings) -> Path:
    summaries = [load_summary(model) for model in paths.models]
    pages = series_pages(paths)
    with output_set():
        paths.series_reports.mkdir(parents=True, exist_ok=True)  # a DVC output even with no series
        for series, page in pages:
            for figure in page.figures:
                figure.run(series.figures)
            write_bytes_atomic(series.page, page.markdown.encode("utf-8"))
        write_bytes_atomic(paths.index, render(summaries, [*series_links(paths), *version_sections(paths)]).encode("utf-8"))
    return paths.index


main = Stage("compare", None, project_paths, no_settings, run).main


if __name__ == "__main__":
    run_stage(main)
