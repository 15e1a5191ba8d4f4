"""The artifact layout: the one place that names every file a stage reads or writes.

A stage never spells a file name; it is handed one of these objects and asks it::

    models/<model>/                 fetch: the weight files, tokenizer, manifest.json
    models/<model>.hashed.json      fetch: size and times of the files it hashed (local)
    artifacts/<model>/              every per-model stage (see README, "What you get")
    artifacts/drift/<pair>/         drift between two files of one vocabulary
    reports/<model>/                report.md, its figures, headline.json (committed)
    reports/index.md                the comparison of all models (committed)
    series/<series>/                the series stage: trajectories.parquet, tokens.parquet, series.json, plots/
    reports/series/<series>/        series.md and its figure (compare; committed)

Paths are relative to the project root (DVC runs every stage there), so the provenance
written into outputs names the same paths on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = "models"
ARTIFACTS_DIR = "artifacts"
REPORTS_DIR = "reports"
DRIFT_DIR = "drift"
SERIES_DIR = "series"
# Folders beside the models' own under artifacts/ and reports/: no model may take these names.
RESERVED_NAMES = (DRIFT_DIR, SERIES_DIR)


@dataclass(frozen=True)
class ModelPaths:
    """Every file of one model version; ``name`` is its key under ``models`` in params.yaml."""

    name: str
    models: Path  # models/<name>: what fetch materialised
    artifacts: Path  # artifacts/<name>: the stages' outputs
    reports: Path  # reports/<name>: report.md and figures

    @classmethod
    def in_project(cls, name: str, root: Path | str = ".") -> ModelPaths:
        root = Path(root)
        return cls(name=name, models=root / MODELS_DIR / name, artifacts=root / ARTIFACTS_DIR / name, reports=root / REPORTS_DIR / name)

    @classmethod
    def for_artifacts(cls, artifacts: Path | str) -> ModelPaths:
        """The layout around an ``artifacts/<name>`` folder (its project root two levels up)."""
        artifacts = Path(artifacts)
        return cls.in_project(artifacts.name, artifacts.parent.parent)

    # fetch
    @property
    def manifest(self) -> Path:
        return self.models / "manifest.json"

    @property
    def hashed(self) -> Path:
        """fetch's record of each file's size and times when it hashed it, so extract trusts the
        manifest's sha256 without hashing again. Beside models/<name>, not in it: it is
        machine-local, and DVC hashes models/<name> as extract's input."""
        return self.models.parent / f"{self.name}.hashed.json"

    # extract
    @property
    def embeddings(self) -> Path:
        return self.artifacts / "embeddings.parquet"

    @property
    def tokenizer(self) -> Path:
        return self.artifacts / "tokenizer.json"

    # stats
    @property
    def stats(self) -> Path:
        return self.artifacts / "stats.json"

    @property
    def norm_hist(self) -> Path:
        return self.artifacts / "norm_hist.json"

    @property
    def dims(self) -> Path:
        return self.artifacts / "dims.parquet"

    @property
    def tokens(self) -> Path:
        return self.artifacts / "tokens.parquet"

    # words
    @property
    def words(self) -> Path:
        return self.artifacts / "words.parquet"

    # similarity
    @property
    def similarity(self) -> Path:
        return self.artifacts / "similarity.parquet"

    @property
    def neighbors(self) -> Path:
        return self.artifacts / "neighbors.parquet"

    @property
    def knn(self) -> Path:
        return self.artifacts / "knn.parquet"

    # pca
    @property
    def pca(self) -> Path:
        return self.artifacts / "pca.parquet"

    @property
    def pca_words(self) -> Path:
        return self.artifacts / "pca_words.parquet"

    @property
    def pca_variance(self) -> Path:
        return self.artifacts / "pca_variance.json"

    @property
    def figures(self) -> Path:
        """Figures a stage draws from its own results (the pca scatter plots)."""
        return self.artifacts / "figures"

    # quantize
    @property
    def quant_dir(self) -> Path:
        return self.artifacts / "quant"

    def quant_file(self, scheme: str) -> Path:
        return self.quant_dir / f"{scheme}.parquet"

    @property
    def quant_metrics(self) -> Path:
        return self.artifacts / "quant.json"

    # undertrained
    @property
    def undertrained(self) -> Path:
        return self.artifacts / "undertrained.parquet"

    @property
    def undertrained_metrics(self) -> Path:
        return self.artifacts / "undertrained.json"

    # export
    @property
    def projector(self) -> Path:
        return self.artifacts / "projector"

    @property
    def atlas(self) -> Path:
        return self.artifacts / "atlas.parquet"

    # report
    @property
    def report(self) -> Path:
        return self.reports / "report.md"

    @property
    def report_figures(self) -> Path:
        return self.reports / "figures"

    @property
    def headline(self) -> Path:
        """The few numbers DVC compares between versions (the report stage's DVC metrics)."""
        return self.reports / "headline.json"


@dataclass(frozen=True)
class DriftPaths:
    """The two files a drift pair compares and where its outputs go."""

    name: str
    base: Path
    other: Path
    out: Path  # artifacts/drift/<name>

    @classmethod
    def in_project(cls, name: str, base: Path | str, other: Path | str, root: Path | str = ".") -> DriftPaths:
        root = Path(root)
        return cls(name=name, base=root / base, other=root / other, out=root / ARTIFACTS_DIR / DRIFT_DIR / name)

    @property
    def table(self) -> Path:
        return self.out / "drift.parquet"

    @property
    def metrics(self) -> Path:
        return self.out / "drift.json"

    @property
    def headline(self) -> Path:
        """The few numbers DVC compares between versions (the drift stage's DVC metrics)."""
        return self.out / "headline.json"


@dataclass(frozen=True)
class ProjectPaths:
    """The whole project's outputs: every model's, every drift pair's and the index."""

    models: tuple[ModelPaths, ...]
    drift_dir: Path  # artifacts/drift: one folder per pair
    index: Path  # reports/index.md
    series_reports: Path  # reports/series: every series' page
    series: tuple[SeriesPaths, ...] = ()

    @classmethod
    def in_project(cls, names: list[str], root: Path | str = ".", series: dict[str, list[str]] | None = None) -> ProjectPaths:
        root = Path(root)
        return cls(
            models=tuple(ModelPaths.in_project(name, root) for name in names),
            drift_dir=root / ARTIFACTS_DIR / DRIFT_DIR,
            index=root / REPORTS_DIR / "index.md",
            series_reports=root / REPORTS_DIR / SERIES_DIR,
            series=tuple(SeriesPaths.in_project(name, versions, root) for name, versions in (series or {}).items()),
        )


@dataclass(frozen=True)
class SeriesPaths:
    """The versions of a series, in order, and where the series stage writes."""

    name: str
    versions: tuple[ModelPaths, ...]
    out: Path  # series/<name>: the series stage's outputs, cached
    reports: Path  # reports/series/<name>: its page, rendered by compare, committed

    @classmethod
    def in_project(cls, name: str, versions: list[str], root: Path | str = ".") -> SeriesPaths:
        root = Path(root)
        return cls(name=name, versions=tuple(ModelPaths.in_project(v, root) for v in versions),
                   out=root / SERIES_DIR / name, reports=root / REPORTS_DIR / SERIES_DIR / name)

    @property
    def trajectories(self) -> Path:
        return self.out / "trajectories.parquet"

    @property
    def tokens(self) -> Path:
        return self.out / "tokens.parquet"

    @property
    def metrics(self) -> Path:
        return self.out / "series.json"

    @property
    def page(self) -> Path:
        return self.reports / "series.md"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def plots(self) -> dict[str, Path]:
        """DVC plot files, one per statistic over the versions (x: step): field -> file."""
        return {field: self.out / "plots" / f"{field}.json" for field in ("cosine_to_first_mean", "norm_median", "undertrained")}
