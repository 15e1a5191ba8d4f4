"""Markdown building blocks for the reports: tables, tokens shown exactly, readable numbers."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

SPLIT_MARK = "†"
NO_BREAK_SPACE = "\u00a0"
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def token(text: str | None) -> str:
    """A token as inline code, quoted so leading spaces show and control characters escape."""
    if text is None:
        return "*(padding)*"
    # No-break spaces: a browser would otherwise wrap `" Hello"` at its leading space.
    shown = json.dumps(text, ensure_ascii=False).replace("|", "\\|").replace(" ", NO_BREAK_SPACE)
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
            return scientific(value, digits)
        return f"{value:.{digits}g}"
    return str(value)


def scientific(value: float, digits: int = 4) -> str:
    """``1.910×10⁻⁴``: ``digits`` significant digits, an exponent no browser breaks a line in
    (``1.91e-04`` wraps after its hyphen in a narrow table column)."""
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa}×10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def column(values: Sequence[float | int | None], digits: int = 4) -> list[str]:
    """One number format for a whole table column: all scientific when any value needs it,
    else all with the same decimals (``digits`` significant for the smallest); None as "–"."""
    present = [abs(float(v)) for v in values if v is not None and not isinstance(v, bool) and math.isfinite(v) and v != 0]
    if not present or all(isinstance(v, int) for v in values if v is not None):
        return [number(v, digits) for v in values]
    if min(present) < 10 ** -(digits - 1) or max(present) >= 10 ** digits:
        return ["–" if v is None else "0" if v == 0 else scientific(float(v), digits) for v in values]
    decimals = max(0, digits - 1 - math.floor(math.log10(min(present))))
    return ["–" if v is None else f"{float(v):,.{decimals}f}" for v in values]


def distinct_numbers(values: Sequence[float], digits: int = 3) -> list[str]:
    """``values`` rounded to ``digits`` significant digits, or more where that would make two
    different values read the same: a range never collapses ("from 1.03 to 1.04; the middle
    98% lie between 1.03 and 1.03" becomes "... between 1.031 and 1.034")."""
    for more in range(digits, 18):
        shown = [number(float(value), more) for value in values]
        if all(shown[i] != shown[j] for i in range(len(values)) for j in range(i) if values[i] != values[j]):
            return shown
    return [repr(float(value)) for value in values]


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
