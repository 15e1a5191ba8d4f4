"""Markdown building blocks for the reports: tables, tokens shown exactly, readable numbers."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

SPLIT_MARK = "†"


def token(text: str | None) -> str:
    """A token as inline code, quoted so leading spaces show and control characters escape."""
    if text is None:
        return "*(padding)*"
    shown = json.dumps(text, ensure_ascii=False).replace("|", "\\|")
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def number(value: Any, digits: int = 4) -> str:
    """A number rounded for reading (the Parquet and JSON keep full precision)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits or abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def percent(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one letter per column (l, r, c)."""
    align = align or "l" * len(headers)
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(path: str, alt: str) -> str:
    return f"![{alt}]({path})"
