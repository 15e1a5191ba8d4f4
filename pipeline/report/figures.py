"""Every figure the pipeline draws, each a function ``(data, path) -> None``.

The report's figures (row-norm histogram, first dimensions, similarity heatmap, explained
variance) and the pca stage's two scatter plots are drawn here and nowhere else; the
report's copies of the pca figures are made here too.

Same input, same bytes: a fixed font that ships with matplotlib (DejaVu Sans), a fixed
dpi, no Software/date metadata in the PNG, and labels that escape any character the font
cannot draw (CJK, emoji) instead of leaving an empty box.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.io import atomic_path

FONT = "DejaVu Sans"  # ships with matplotlib, so every machine renders the same glyphs
DPI = 100


@lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties(family=FONT), fallback_to_default=False)
    return frozenset(ft2font.FT2Font(path).get_charmap())


def drawable(text: str) -> str:
    """``text`` with the characters the font cannot draw written as \\uXXXX."""
    glyphs = _font_codepoints()
    out = []
    for char in text:
        code = ord(char)
        if char.isprintable() and code in glyphs:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


def label_text(text: str) -> str:
    """``text`` in quotes (so a leading space shows), characters the font cannot draw as \\uXXXX."""
    return '"' + drawable(text) + '"'


@contextlib.contextmanager
def style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context({"font.family": FONT, "font.size": 9, "figure.dpi": DPI, "savefig.dpi": DPI}):
        yield


def new_figure(width: float, height: float) -> Any:
    # A bare Figure with its own Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: Path) -> None:
    # No Software/date metadata, so the same picture is the same bytes on every run.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


# Where a label may sit around its point, in points: right, below, left, above, then further out.
LABEL_OFFSETS = ((5, 2), (5, -10), (-5, 2), (-5, -10), (5, 12), (5, -20), (-5, 12), (-5, -20), (5, 22), (5, -30))


def label_points(figure: Any, ax: Any, xy: np.ndarray, labels: list[str], boxed: bool = False) -> None:
    """Label each point, moving a label to the first nearby spot where it overlaps no other.

    Greedy and deterministic; labels stay out of the layout so placing them cannot move the axes.
    """
    from matplotlib.transforms import Bbox

    figure.draw_without_rendering()  # fix the layout first: label positions depend on it
    renderer = figure.canvas.get_renderer()
    # Labels avoid the markers as well as each other.
    taken: list[Any] = [Bbox.from_extents(px - 3, py - 3, px + 3, py + 3) for px, py in ax.transData.transform(xy)]
    bbox = {"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "linewidth": 0} if boxed else None
    for (x, y), label in zip(xy, labels):
        text = ax.annotate(
            label, (x, y), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=8, parse_math=False, bbox=bbox
        )
        text.set_in_layout(False)
        for dx, dy in LABEL_OFFSETS:
            text.set_position((dx, dy))
            text.set_horizontalalignment("left" if dx > 0 else "right")
            extent = text.get_window_extent(renderer)
            if not any(extent.overlaps(other) for other in taken):
                break
        else:
            text.set_position(LABEL_OFFSETS[0])
            text.set_horizontalalignment("left")
            extent = text.get_window_extent(renderer)
        taken.append(extent)


def copy_figure(source: Path, path: Path) -> None:
    """A figure another stage drew, copied as it is."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


# ---- the report's figures -------------------------------------------------------------------


def norm_histogram_figure(norm_hist: list[dict[str, Any]], path: Path) -> None:
    """Bars of ``norm_hist.json`` (``bin_start``, ``bin_end``, ``count`` per bin)."""
    with style():
        figure = new_figure(6, 3)
        ax = figure.add_subplot()
        starts = [b["bin_start"] for b in norm_hist]
        widths = [b["bin_end"] - b["bin_start"] for b in norm_hist]
        ax.bar(starts, [b["count"] for b in norm_hist], width=widths, align="edge", color="#4C72B0")
        ax.set_xlabel("L2 norm of the row")
        ax.set_ylabel("tokens")
        ax.set_title("Row norms")
        save_png(figure, path)


@dataclass(frozen=True)
class FirstDims:
    rows: list[dict[str, Any]]  # words.parquet rows: variant, split, vector
    count: int  # how many leading dimensions to plot


def first_dims_figure(data: FirstDims, path: Path) -> None:
    """One line per word variant over its first ``count`` dimensions."""
    with style():
        figure = new_figure(7, 3)
        ax = figure.add_subplot()
        for row in data.rows:
            values = row["vector"][: data.count]
            label = label_text(row["variant"]) + (" (split)" if row["split"] else "")
            ax.plot(range(len(values)), values, linewidth=1, label=label)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("dimension")
        ax.set_ylabel("value")
        ax.set_title(f"First {data.count} dimensions")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the lines, never over a peak
        save_png(figure, path)


@dataclass(frozen=True)
class Heatmap:
    labels: list[str]  # one per row and column, already drawable
    matrix: np.ndarray  # [n, n] cosine similarities


def similarity_heatmap(data: Heatmap, path: Path) -> None:
    """The word variants' cosine similarities, each cell printed."""
    labels, matrix = data.labels, data.matrix
    with style():
        size = 2.5 + 0.6 * len(labels)
        figure = new_figure(size + 1, size)
        ax = figure.add_subplot()
        image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] < 0.6 else "black")
        figure.colorbar(image, ax=ax, label="cosine similarity")
        ax.set_title("Cosine similarity of the words")
        save_png(figure, path)


def variance_figure(variance: list[dict[str, Any]], path: Path) -> None:
    """Bars of ``pca_variance.json`` per component, and their running sum."""
    with style():
        figure = new_figure(6, 3)
        ax = figure.add_subplot()
        components = [v["component"] for v in variance]
        bars = ax.bar(components, [v["explained_variance_ratio"] for v in variance], color="#4C72B0", label="per component")
        ax.set_xlabel("principal component")
        ax.set_ylabel("explained variance ratio (bars)")
        # The running sum on its own 0-1 axis, so the bars keep the height of theirs.
        total = ax.twinx()
        (line,) = total.plot(components, [v["cumulative"] for v in variance], color="#C44E52", label="cumulative")
        total.set_ylim(0, 1)
        total.set_ylabel("cumulative (line)")
        ax.legend(handles=[bars, line], loc="center right")
        ax.set_title("Explained variance (whole vocabulary)")
        save_png(figure, path)


# ---- the pca stage's figures ----------------------------------------------------------------


def _axis_label(ratios: np.ndarray, axis: int) -> str:
    ratio = ratios[axis] if axis < len(ratios) else 0.0
    return f"PC{axis + 1} ({100 * ratio:.1f}% of variance)"


@dataclass(frozen=True)
class PcaWords:
    model: str
    variants: list[str | None]  # the word variants, in the order of the rows below
    vocab_xy: np.ndarray  # [w, 2] in the whole-vocabulary basis
    vocab_ratios: np.ndarray  # that basis's explained variance ratios
    words_xy: np.ndarray  # [w, 2] in the basis fitted on the words alone
    words_ratios: np.ndarray


def pca_words_figure(data: PcaWords, path: Path) -> None:
    """The word variants in the whole-vocabulary basis (left) and the words-only basis (right)."""
    labels = [label_text(variant or "") for variant in data.variants]
    with style():
        figure = new_figure(12, 5.5)
        panels = figure.subplots(1, 2)
        for ax, xy, ratios, title in (
            (panels[0], data.vocab_xy, data.vocab_ratios, "PCA of the whole vocabulary"),
            (panels[1], data.words_xy, data.words_ratios, "PCA of these word vectors only"),
        ):
            ax.scatter(xy[:, 0], xy[:, 1], s=18, color="tab:red")
            ax.set_title(title)
            ax.set_xlabel(_axis_label(ratios, 0))
            ax.set_ylabel(_axis_label(ratios, 1))
            ax.margins(0.15)
        figure.suptitle(f"{data.model}: word variants in two PCA bases")
        for ax, xy in zip(panels, (data.vocab_xy, data.words_xy)):
            label_points(figure, ax, xy, labels)
        save_png(figure, path)


VIEW_PERCENTILES = (0.1, 99.9)  # a handful of outlier tokens must not shrink the bulk to a dot


def view_box(coordinates: np.ndarray, words_xy: np.ndarray) -> np.ndarray:
    """[[x_lo, y_lo], [x_hi, y_hi]]: the central 99.8% of tokens per axis, widened to every word."""
    lo, hi = np.percentile(coordinates, VIEW_PERCENTILES, axis=0)  # [2] each
    lo, hi = np.minimum(lo, words_xy.min(axis=0)), np.maximum(hi, words_xy.max(axis=0))
    pad = (hi - lo) * 0.03
    return np.stack([lo - pad, hi + pad])


@dataclass(frozen=True)
class PcaVocab:
    model: str
    coordinates: np.ndarray  # [vocab, 2] every token in the whole-vocabulary basis
    ratios: np.ndarray  # that basis's explained variance ratios
    variants: list[str | None]  # the word variants, marked on top
    words_xy: np.ndarray  # [w, 2] the words in the same basis


def pca_vocab_figure(data: PcaVocab, path: Path) -> None:
    """Every token as a density (log-scaled hexbin), the words marked on top.

    The view covers the central 99.8% of tokens on each axis (and every word); the title
    says how many outlying tokens fall outside it.
    """
    coordinates, words_xy = data.coordinates, data.words_xy
    labels = [label_text(variant or "") for variant in data.variants]
    box = view_box(coordinates, words_xy)
    inside = ((coordinates >= box[0]) & (coordinates <= box[1])).all(axis=1)  # [vocab]
    outside = int((~inside).sum())
    with style():
        figure = new_figure(8, 6.5)
        ax = figure.subplots()
        shown = coordinates[inside]
        extent = (box[0, 0], box[1, 0], box[0, 1], box[1, 1])
        cells = ax.hexbin(shown[:, 0], shown[:, 1], gridsize=90, bins="log", mincnt=1, cmap="viridis", extent=extent)
        figure.colorbar(cells, ax=ax, label="tokens per cell")
        ax.scatter(words_xy[:, 0], words_xy[:, 1], s=22, color="tab:red", edgecolors="white", linewidths=0.6)
        ax.set_xlim(box[0, 0], box[1, 0])
        ax.set_ylim(box[0, 1], box[1, 1])
        note = f" ({outside} outliers outside the view)" if outside else ""
        ax.set_title(f"{data.model}: all {len(coordinates)} tokens{note}, words in red")
        ax.set_xlabel(_axis_label(data.ratios, 0))
        ax.set_ylabel(_axis_label(data.ratios, 1))
        densest = int(np.argmax(cells.get_array()))
        count = int(round(float(cells.get_array()[densest])))
        cx, cy = cells.get_offsets()[densest]
        ax.annotate(f"densest cell: {count} tokens", (cx, cy), xytext=(0.02, 0.03), textcoords="axes fraction", fontsize=8,
                    arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8},
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.85, "linewidth": 0})
        label_points(figure, ax, words_xy, labels, boxed=True)
        save_png(figure, path)


# ---- the series stage's figure --------------------------------------------------------------


def series_figure(versions: list[dict[str, Any]], path: Path) -> None:
    """Three panels over the versions: how far they moved, their norms and anisotropy, flagged tokens."""
    steps = [row["step"] for row in versions]
    names = [drawable(row["version"]) for row in versions]
    with style():
        figure = new_figure(9, 3)
        moved, shape, flagged = figure.subplots(1, 3)
        for field, label in (("cosine_to_first_mean", "cos to first"), ("cosine_to_previous_mean", "cos to previous"),
                             ("neighbours_kept_mean", "neighbours kept")):
            points = [(row["step"], row[field]) for row in versions if row[field] is not None]
            moved.plot(*zip(*points), marker="o", label=label)
        moved.set_title("How far each version moved")
        moved.legend(loc="lower left", fontsize=8)
        shape.plot(steps, [row["norm_median"] for row in versions], marker="o", color="#4C72B0", label="median norm")
        shape.set_ylabel("median row norm")
        twin = shape.twinx()
        twin.plot(steps, [row["anisotropy"] for row in versions], marker="s", color="#C44E52", label="anisotropy")
        twin.set_ylabel("anisotropy (mean cos to mean)")
        shape.set_title("Norms and anisotropy")
        for ax in (shape, twin):  # the values themselves on the axis, not an offset like "+1"
            ax.ticklabel_format(axis="y", useOffset=False)
        flagged.plot(steps, [row["undertrained"] or 0 for row in versions], marker="o", color="#55A868")
        flagged.set_title("Under-trained tokens flagged")
        for ax in (moved, shape, flagged):
            ax.set_xticks(steps, names, rotation=30, ha="right", fontsize=7)
        save_png(figure, path)
