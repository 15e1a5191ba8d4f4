"""Report sections for the under-trained tokens, drift and export stages.

Each is a pure function of files an earlier stage wrote and returns markdown; a missing
input gives a short note saying which stage to run, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.report import markdown as md

TOP_SHOWN = 20


def _json(path: Path) -> Any | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def undertrained_section(model_dir: Path, top: int = TOP_SHOWN) -> str:
    """Under-trained token candidates of one model (``undertrained.json``)."""
    metrics = _json(Path(model_dir) / "undertrained.json")
    title = "## Under-trained tokens"
    if metrics is None:
        return f"{title}\n\nNot computed for this model (`undertrained` stage)."
    headers = ["rank", "id", "token", "cos. distance (centred)", "L2 norm", "reference", "encodes to itself"]
    rows = [[md.number(r["rank"]), str(r["token_id"]), md.token(r["token"]), md.number(r["cos_dist_ref_centered"]),
             md.number(r["l2_norm"]), md.number(r["is_reference"]), md.number(r["encodes_to_self"])]
            for r in metrics["strongest"][:top]]
    return "\n".join([
        title, "",
        f"Tokens whose embedding stayed close to that of tokens known to be unused (after Land & Bartolo, 2024, "
        f"\"Fishing for Magikarp\"), from the weights alone. Reference: {metrics['reference']['method']}, "
        f"{md.number(metrics['reference']['count'])} tokens. A token is flagged when its cosine distance to the "
        f"reference mean, once the vocabulary's mean row and first principal component are removed, is at most "
        f"percentile {md.number(metrics['percentile'])} of its distribution ({md.number(metrics['threshold_cos_dist_ref_centered'])}).",
        "",
        f"**{md.number(metrics['flagged'])} of {md.number(metrics['vocab_size'])} tokens flagged**, "
        f"{md.number(metrics['flagged_outside_reference'])} of them outside the reference set; "
        f"{md.number(metrics['flagged_not_encodable_to_self'])} cannot be produced by encoding their own text.",
        "", f"The {len(rows)} strongest candidates:", "", md.table(headers, rows, "rrlrrcc"), "",
        f"All of them, with every indicator: `artifacts/{Path(model_dir).name}/undertrained.parquet`.",
    ])


def drift_section(pair_dir: Path, top: int = TOP_SHOWN) -> str:
    """Drift between the two sides of one pair (``artifacts/drift/<pair>/drift.json``)."""
    pair_dir = Path(pair_dir)
    metrics = _json(pair_dir / "drift.json")
    title = f"## Drift: `{pair_dir.name}`"
    if metrics is None:
        return f"{title}\n\nNot computed (`drift` stage)."
    lines = [title, "", f"`{metrics['base']}` against `{metrics['other']}`: {md.number(metrics['aligned'])} tokens aligned by text "
             f"({md.number(metrics['ids_differ'])} with different ids; {md.number(metrics['only_in_base'])} only in the first, "
             f"{md.number(metrics['only_in_other'])} only in the second).", ""]
    summary_rows = []
    for key, label in (("cosine", "cosine of the two rows"), ("l2_change_relative", "L2 change / norm"),
                       ("knn_jaccard", f"Jaccard of the {metrics['knn_jaccard']['k']} nearest neighbours")):
        stats = metrics.get(key)
        if stats:
            summary_rows.append([label] + [md.number(stats[s]) for s in ("mean", "min", "p01", "median", "max")])
    lines += [md.table(["per token", "mean", "min", "p01", "median", "max"], summary_rows, "lrrrrr"), ""]
    if "procrustes" in metrics:
        fit = metrics["procrustes"]
        lines += [f"After the best orthogonal rotation (Procrustes) the change left is "
                  f"{md.percent(fit['relative_residual'])} of the second matrix's norm; "
                  f"{md.percent(metrics['knn_jaccard']['identical_fraction'])} of tokens keep exactly the same neighbours.", ""]
    headers = ["#", "token", "cosine", "residual / norm", "Jaccard"]
    rows = [[md.number(r["moved_rank"]), md.token(r["token"]), md.number(r["cosine"]),
             md.number(r["procrustes_residual_relative"]), md.number(r["knn_jaccard"])] for r in metrics["top_moved"][:top]]
    lines += [f"The tokens that moved most (by `{metrics['moved_by']}`):", "", md.table(headers, rows, "rlrrr")]
    return "\n".join(lines)


def export_section(model_dir: Path) -> str:
    """Where the exports are and how to open them."""
    model_dir = Path(model_dir)
    name = model_dir.name
    title = "## Exports"
    config = _json(model_dir / "projector" / "projector_config.json")
    atlas = model_dir / "atlas.parquet"
    if config is None or not atlas.is_file():
        return f"{title}\n\nNot exported for this model (`export` stage)."
    rows = pq.ParquetFile(atlas).metadata.num_rows
    shards = len(config["embeddings"])
    shard_note = (f" TensorBoard serves at most 100,000 points per tensor, so the config splits the vocabulary into "
                  f"{shards} tensors of at most that size." if shards > 1 else "")
    return "\n".join([
        title, "",
        f"- **TensorBoard Embedding Projector**: `artifacts/{name}/projector/` holds `vectors.tsv` and `metadata.tsv` for all "
        f"{md.number(rows)} tokens and `projector_config.pbtxt`; run `tensorboard --logdir artifacts/{name}/projector`, "
        f"or load the two TSV files in the standalone projector.{shard_note}",
        f"- **embedding-atlas**: `artifacts/{name}/atlas.parquet` (text, PCA x and y, each token's nearest neighbours "
        f"with cosine distances): `embedding-atlas artifacts/{name}/atlas.parquet --text text --x x --y y --neighbors neighbors`.",
    ])
