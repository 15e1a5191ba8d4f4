"""The reports as GitHub renders them: parsed by cmarkgfm (GitHub's own fork of cmark), then
checked for what a reader at GitHub's ~920-px column trips on.

* no table wider than MAX_COLUMNS columns (wider ones overflow the column);
* no number a browser can break across lines (``1.91e-`` / ``04``): scientific notation
  is written ``1.910×10⁻⁴``, and a neighbour's cosine is tied to its token;
* every image the markdown shows exists beside it;
* no code span that starts with a plain space (a browser wraps there, and the token's
  leading space, the thing it shows, is lost at a line start).

Checked on the committed reports (``reports/``) and on a report the stage renders from
tiny made-up artifacts, so a change in the renderer is caught before the reports are
regenerated.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

cmarkgfm = pytest.importorskip("cmarkgfm")

from pipeline.core.paths import ModelPaths  # noqa: E402
from pipeline.core.settings import NoSettings  # noqa: E402
from pipeline.stages.report import run as run_report  # noqa: E402

from test_report import toy_artifacts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_COLUMNS = 8
BREAKABLE_NUMBER = re.compile(r"\d[eE][-+]\d")  # 1.91e-04: a browser may wrap after the sign


class Page(HTMLParser):
    """Tables (rows of cell texts), image sources and code span texts of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.code: list[str] = []
        self.cells_after_code: list[str] = []  # the text right after each code span
        self._cell: list[str] | None = None
        self._code: list[str] | None = None
        self._after_code = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "code":
            self._code = []
        self._after_code = False

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "code" and self._code is not None:
            self.code.append("".join(self._code))
            self._code = None
            self._after_code = True

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._code is not None:
            self._code.append(data)
        elif self._after_code:
            self.cells_after_code.append(data)
            self._after_code = False


def parse(markdown: str) -> Page:
    page = Page()
    page.feed(cmarkgfm.github_flavored_markdown_to_html(markdown))
    return page


def problems(path: Path) -> list[str]:
    """What a reader of ``path`` on GitHub would trip on, one line each."""
    page = parse(path.read_text(encoding="utf-8"))
    found = []
    for number, table in enumerate(page.tables, 1):
        width = max(len(row) for row in table)
        if width > MAX_COLUMNS:
            found.append(f"{path}: table {number} has {width} columns (at most {MAX_COLUMNS} fit)")
        found += [f"{path}: table {number} breaks a number: {cell!r}" for row in table for cell in row
                  if BREAKABLE_NUMBER.search(cell)]
    found += [f"{path}: image {source} is missing" for source in page.images
              if not re.match(r"[a-z]+://", source) and not (path.parent / source).is_file()]
    found += [f"{path}: code span {text!r} starts with a plain space" for text in page.code if text.startswith(" ")]
    found += [f"{path}: a plain space after a code span before {text[:8]!r} lets the line break there"
              for text in page.cells_after_code if re.match(r" \(-?\d\.\d+\)", text)]
    return found


def test_the_checks_catch_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("\n".join([
        "| " + " | ".join(f"c{i}" for i in range(9)) + " |", "|" + "---|" * 9, "| " + " | ".join(["1"] * 9) + " |", "",
        "| a | b |", "|---|---|", "| 1.91e-04 | x |", "",
        "![x](figures/none.png)", "", "` Hello`", "", "`\"Hi\"` (0.81), `models/a` (96 bytes)",
    ]), encoding="utf-8")
    found = problems(bad)
    assert len(found) == 5, found
    assert "9 columns" in found[0] and "breaks a number" in found[1] and "none.png is missing" in found[2]
    assert "starts with a plain space" in found[3] and "lets the line break" in found[4]


def test_a_report_rendered_from_tiny_artifacts_reads_well_on_github(tmp_path):
    toy_artifacts(tmp_path)
    report = run_report(ModelPaths.in_project("toy", tmp_path), NoSettings())
    assert problems(report) == []
    page = parse(report.read_text(encoding="utf-8"))
    assert page.tables and page.images and any(text.startswith('"\u00a0Hello') for text in page.code)


@pytest.mark.parametrize("report", sorted((ROOT / "reports").glob("**/*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_reports_read_well_on_github(report):
    assert problems(report) == []
