"""The per-model report in order: its sections, their numbers, and the figures they show.

``render`` is pure: it returns the markdown and the figures to make, and the report stage
draws (or copies) them. A section's number is its place in ``SECTIONS``, so removing or
moving one renumbers the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.report import figures
from pipeline.report import markdown as md
from pipeline.report import sections as s
from pipeline.report.sections import Artifacts


@dataclass(frozen=True)
class FigureJob:
    """One PNG of the report: ``draw(data, <figures folder>/name)``."""

    name: str
    draw: Callable[[Any, Path], None]
    data: Any

    def run(self, folder: Path) -> None:
        self.draw(self.data, folder / self.name)


def _no_figures(a: Artifacts) -> list[FigureJob]:
    return []


@dataclass(frozen=True)
class Section:
    """A numbered section: its heading (fixed, or from the artifacts), its body, its figures."""

    title: str | Callable[[Artifacts], str]
    body: Callable[[Artifacts], str]
    figures: Callable[[Artifacts], list[FigureJob]] = _no_figures

    def heading(self, a: Artifacts) -> str:
        return self.title if isinstance(self.title, str) else self.title(a)


@dataclass(frozen=True)
class Rendered:
    markdown: str
    figures: tuple[FigureJob, ...]


def _norm_histogram(a: Artifacts) -> list[FigureJob]:
    return [FigureJob(s.NORM_HISTOGRAM, figures.norm_histogram_figure, a.norm_hist)]


def _first_dims(a: Artifacts) -> list[FigureJob]:
    return [FigureJob(s.FIRST_DIMS, figures.first_dims_figure, figures.FirstDims(s.first_word_rows(a), s.FIRST_DIMS_PLOTTED))]


def _similarity(a: Artifacts) -> list[FigureJob]:
    order, matrix = s.similarity_matrix(a)
    split = s.split_variants(a.words)
    labels = [figures.label_text(v) + (md.SPLIT_MARK if v in split else "") for v in order]
    return [FigureJob(s.SIMILARITY, figures.similarity_heatmap, figures.Heatmap(labels, matrix))]


def _pca(a: Artifacts) -> list[FigureJob]:
    # The two scatter plots are the pca stage's, copied as they are.
    copies = [FigureJob(name, figures.copy_figure, a.figures_dir / name) for name in (s.PCA_WORDS, s.PCA_VOCAB)]
    return [*copies, FigureJob(s.EXPLAINED_VARIANCE, figures.variance_figure, a.pca_variance)]


SECTIONS: tuple[Section, ...] = (
    Section("The model", s.model_section),
    Section("The matrix", s.matrix_section, _norm_histogram),
    Section(s.word_title, s.word_section, _first_dims),
    Section("Similarity", s.similarity_section, _similarity),
    Section("PCA", s.pca_section, _pca),
    Section("Quantization", s.quant_section),
    Section("Under-trained tokens", s.undertrained_section),
    Section("Using the artifacts", s.usage_section),
)


def render(a: Artifacts, sections: Sequence[Section] = SECTIONS) -> Rendered:
    """The report's markdown, sections numbered in order, and every figure it shows."""
    parts = [
        f"# {a.name}: the token-embedding layer, dissected",
        f"Word variants marked {md.SPLIT_MARK} split into several tokens; their vector is pooled from the pieces. "
        "Numbers are rounded for reading: the Parquet and JSON artifacts keep full precision.",
    ]
    jobs: list[FigureJob] = []
    for number, section in enumerate(sections, start=1):
        parts.append(f"## {number}. {section.heading(a)}\n\n{section.body(a)}")
        jobs += section.figures(a)
    return Rendered("\n\n".join(part.rstrip() for part in parts) + "\n", tuple(jobs))
