"""Deterministic matplotlib figures shared by the stages that draw.

Same input, same bytes: a fixed font that ships with matplotlib (DejaVu Sans), a fixed
dpi, no Software/date metadata in the PNG, and labels that escape any character the font
cannot draw (CJK, emoji) instead of leaving an empty box.
"""

from __future__ import annotations

import contextlib
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
