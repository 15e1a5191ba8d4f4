"""The page of a series (``reports/series/<name>/series.md``): its statistics over the
versions as lines, and the tokens that moved most, and when, in plain words.

Pure: :func:`series_page` takes the series stage's metrics (``series.json``) and returns
the markdown and the figure to draw; every number comes from that file.
"""

from __future__ import annotations

from typing import Any

from pipeline.report import figures
from pipeline.report import markdown as md
from pipeline.report.render import FigureJob, Rendered

LINES_FIGURE = "series.png"
MOVERS_LISTED = 10


def _per_version_table(versions: list[dict[str, Any]]) -> str:
    headers = ["step", "version", "median norm", "anisotropy", "under-trained", "cos to first", "cos to previous", "neighbours kept"]
    fields = ["norm_median", "anisotropy", "undertrained", "cosine_to_first_mean", "cosine_to_previous_mean", "neighbours_kept_mean"]
    shown = {field: md.column([row[field] for row in versions]) for field in fields}
    rows = [[str(row["step"]), row["version"], *(shown[field][i] for field in fields)]
            for i, row in enumerate(versions)]
    return md.table(headers, rows, "rl" + "r" * len(fields))


def _moves_in_words(metrics: dict[str, Any]) -> str:
    versions = metrics["versions"]
    settings = metrics["settings"]
    threshold = md.number(settings["sharp_move_below"])
    lines = []
    for row in versions[1:]:
        sharp = row["sharp_moves"]
        movers = [m for m in metrics["top_moved"] if m["moved_most_at_step"] == row["step"] and m["cosine_to_previous_there"] < settings["sharp_move_below"]]
        named = ", ".join(f"{md.token(m['token'])} ({md.number(m['cosine_to_previous_there'], 2)})" for m in movers[:MOVERS_LISTED])
        what = f"{sharp:,} token{'s' if sharp != 1 else ''} moved sharply (cosine to `{versions[row['step'] - 1]['version']}` below {threshold})"
        lines.append(f"- **{row['version']}** (step {row['step']}): {what}" + (f": {named}." if named else "."))
    return "\n".join(lines)


def _top_table(metrics: dict[str, Any]) -> str:
    headers = ["rank", "token", "moved most at", "cos to previous there", "cos to first at end", "neighbours held"]
    top = metrics["top_moved"]
    there = md.column([m["cosine_to_previous_there"] for m in top])
    end = md.column([m["cosine_to_first_at_end"] for m in top])
    rows = [[str(i + 1), md.token(m["token"]), f"step {m['moved_most_at_step']}", there[i], end[i], md.number(m["neighbours_held"])]
            for i, m in enumerate(top)]
    return md.table(headers, rows, "rllrrl")


def series_page(metrics: dict[str, Any]) -> Rendered:
    name, versions = metrics["series"], metrics["versions"]
    unaligned = {v: n for v, n in metrics["unaligned"].items() if n}
    alignment = (f"{metrics['aligned']:,} tokens are in every version and compared"
                 + (": " + ", ".join(f"{v} has {n:,} more" for v, n in unaligned.items()) if unaligned else "") + ".")
    k = metrics["settings"]["k"]
    order = " → ".join(f"`{row['version']}`" for row in versions)
    parts = [
        f"# Series `{name}`: {len(versions)} versions",
        f"{order}. {alignment}",
        "## Over the versions",
        md.figure(f"figures/{LINES_FIGURE}", f"statistics of {name} over its versions"),
        _per_version_table(versions),
        f"*cos to first / previous*: mean cosine of a token's row with its row in the first / the previous version; "
        f"*neighbours kept*: mean share of a token's {k} nearest neighbours that it kept from the previous version.",
        "## When tokens moved",
        _moves_in_words(metrics),
        f"## The {len(metrics['top_moved'])} tokens that moved most in one step",
        _top_table(metrics),
        "Every token's row at every step is in `trajectories.parquet`, one row per token per step, "
        "and its summary in `tokens.parquet` (DVC outputs of the series stage).",
    ]
    return Rendered("\n\n".join(parts) + "\n", (FigureJob(LINES_FIGURE, figures.series_figure, versions),))
