"""Report sections: pure functions from loaded artifacts to markdown.

Nothing here reads or writes a file or draws a figure. The per-model report's sections
take an ``Artifacts`` and return their body without a heading: ``render.py`` orders them,
numbers their headings from that order and names the figures each one shows. The drift
and export sections of ``reports/index.md`` take the loaded metrics of one pair or one
model and return a whole section, heading included; missing results give a short note
saying which stage to run, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report import markdown as md

TOP_SHOWN = 20
SIMILARITY_COLUMNS = 6  # word variants per similarity table: wider ones overflow the page
FIRST_DIMS_PLOTTED = 100

# The quantization scheme named the best trade-off: the fewest bits per weight among the
# schemes that keep every row's direction (min row cosine) and the nearest neighbours.
TRADE_OFF_MIN_ROW_COSINE = 0.99
TRADE_OFF_MIN_RECALL = 0.9

# The report's figures, as files under reports/<name>/figures/. The pca stage draws the
# two PCA scatter plots under artifacts/<name>/figures/ with the same names.
FIGURES_DIR = "figures"
NORM_HISTOGRAM = "norm_histogram.png"
FIRST_DIMS = "first_dims.png"
SIMILARITY = "similarity.png"
PCA_WORDS = "pca_words.png"
PCA_VOCAB = "pca_vocab.png"
EXPLAINED_VARIANCE = "explained_variance.png"


@dataclass(frozen=True)
class Artifacts:
    """What one model's stages wrote, loaded once."""

    name: str
    provenance: dict[str, Any]
    stats: dict[str, Any]
    norm_hist: list[dict[str, Any]]
    dims: dict[str, np.ndarray]
    words: list[dict[str, Any]]
    similarity: list[dict[str, Any]]
    neighbors: list[dict[str, Any]]
    pca_variance: list[dict[str, Any]]
    quant: dict[str, dict[str, Any]] | None
    undertrained: dict[str, Any] | None
    figures_dir: Path  # artifacts/<name>/figures: the figures the pca stage drew


@dataclass(frozen=True)
class Exports:
    """What the export stage wrote for one model."""

    rows: int  # tokens in atlas.parquet
    projector_tensors: int  # tensors in projector_config.json


def _figure(name: str, alt: str) -> str:
    return md.figure(f"{FIGURES_DIR}/{name}", alt)


# ---- small helpers ----------------------------------------------------------------------


def variant_label(row: dict[str, Any]) -> str:
    """A word variant as shown everywhere: quoted, with the split mark when it splits."""
    return md.token(row["variant"]) + (md.SPLIT_MARK if row["split"] else "")


def split_variants(words: list[dict[str, Any]]) -> set[str]:
    return {row["variant"] for row in words if row["split"]}


def _is_synthetic(provenance: dict[str, Any]) -> bool:
    source = provenance.get("params", {}).get("model", {}).get("source", {}) or {}
    return source.get("synthetic") is not None


def first_word_rows(a: Artifacts) -> list[dict[str, Any]]:
    """The variants of the first configured word (words.parquet rows), the first one first."""
    first_word = a.words[0]["word"]
    return [row for row in a.words if row["word"] == first_word]


def similarity_matrix(a: Artifacts) -> tuple[list[str], np.ndarray]:
    """The word variants in words.parquet order and their [n, n] cosine similarities."""
    order = [row["variant"] for row in a.words]
    index = {variant: i for i, variant in enumerate(order)}
    matrix = np.zeros((len(order), len(order)))
    for pair in a.similarity:
        matrix[index[pair["variant_a"]], index[pair["variant_b"]]] = pair["cosine"]
    return order, matrix


# ---- the per-model report: one body per section ------------------------------------------


def model_section(a: Artifacts) -> str:
    p = a.provenance
    tokenizer = p["tokenizer"]
    # Four spaces: every markdown renderer nests that, not only GitHub's.
    files = "\n".join(f"    - `{f['path']}` ({md.number(f['bytes'])} bytes), sha256 `{f['sha256']}`" for f in p["source_files"])
    padded = tokenizer.get("padded_rows", 0)
    padding_note = f"; {md.number(padded)} rows beyond it are padding (no token)" if padded else ""
    lines = [
        f"- **Name:** `{a.name}`",
        f"- **Format:** {p['format']}",
        f"- **Source files:**\n{files}",
        f"- **Tensor:** `{p['tensor_key']}`, stored as **{p['source_dtype']}**, shape **[{p['shape'][0]:,}, {p['shape'][1]:,}]** (vocabulary × dimension)",
        f"- **Matrix sha256 (float32):** `{p['matrix_sha256']}`",
        f"- **Tokenizer:** {tokenizer['kind']} (`{tokenizer['path']}`), {md.number(tokenizer['vocab_size'])} tokens{padding_note}",
    ]
    if _is_synthetic(p):
        lines += ["", "> **Synthetic values.** This checkpoint was generated with the exact layout of the model but "
                  "seeded random values: the shapes and the tokenizer are real, the numbers say nothing about the model."]
    return "\n".join(lines)


def what_the_numbers_say(a: Artifacts) -> list[str]:
    """Plain-language readings of the statistics, each citing the artifact value it rests on."""
    s = a.stats
    notes = []
    cos = s["anisotropy"]["mean_cos_to_mean"]
    if cos is not None:
        degree = "strongly anisotropic" if cos > 0.5 else "moderately anisotropic" if cos > 0.1 else "close to isotropic"
        notes.append(f"The space is **{degree}**: the mean cosine of a row to the mean vector is {md.number(cos, 3)} "
                     f"(0 would mean no shared direction), and the mean vector's norm is "
                     f"{md.number(s['anisotropy']['mean_vector_norm'], 3)} against a median row norm of {md.number(s['row_norm']['p50'], 3)}.")
    std = a.dims["std"]
    top = int(np.argmax(std))
    ratio = float(std[top] / np.median(std)) if np.median(std) > 0 else float("inf")
    if ratio > 3:
        order = np.argsort(-std, kind="stable")[:5]
        notes.append(f"**A few dimensions dominate:** dimension {top} has a standard deviation {ratio:.1f}× the median "
                     f"dimension's; the five largest are dimensions {', '.join(str(int(d)) for d in order)}.")
    else:
        notes.append(f"No dimension dominates: the largest per-dimension standard deviation (dimension {top}) is {ratio:.1f}× the median.")
    norms = s["row_norm"]
    low, high, p01, p99 = md.distinct_numbers([norms["min"], norms["max"], norms["p01"], norms["p99"]], 3)
    notes.append(f"Row norms range from {low} to {high}; the middle 98% lie between {p01} and {p99}.")
    if s["rows"]["duplicate"]:
        groups = s["rows"].get("duplicate_groups")
        grouped = f", in {md.number(groups)} {'group' if groups == 1 else 'groups'} of identical rows" if groups else ""
        notes.append(f"**{md.number(s['rows']['duplicate'])} rows are exact copies of another row**{grouped}, typically "
                     "tokens that training never updated (`duplicate_of` in `tokens.parquet` gives each copy the lowest "
                     "token id of its group).")
    nonfinite = s["values"]["nan_count"] + s["values"]["inf_count"]
    if nonfinite:
        notes.append(f"**The matrix holds {md.number(nonfinite)} NaN or Inf values** in {md.number(s['rows']['nonfinite'])} rows; "
                     "they are left out of every statistic above.")
    return notes


def matrix_section(a: Artifacts) -> str:
    s = a.stats
    v, n = s["values"], s["row_norm"]
    rows = [
        ["values", md.number(v["count"]), md.number(v["mean"]), md.number(v["std"]), md.number(v["min"]), md.number(v["max"])],
        ["row L2 norms", md.number(s["rows"]["total"]), md.number(n["mean"]), md.number(n["std"]), md.number(n["min"]), md.number(n["max"])],
    ]
    extra = [
        ["max \\|x\\|", md.number(v["max_abs"])],
        ["NaN / Inf values", f"{md.number(v['nan_count'])} / {md.number(v['inf_count'])}"],
        ["row norm percentiles 1 / 50 / 99", " / ".join(md.number(n[k]) for k in ("p01", "p50", "p99"))],
        ["norm of the mean vector", md.number(s["anisotropy"]["mean_vector_norm"])],
        ["mean cosine of rows to the mean vector", md.number(s["anisotropy"]["mean_cos_to_mean"])],
        ["rows that duplicate another row", md.number(s["rows"]["duplicate"])],
        ["all-zero rows", md.number(s["rows"]["zero"])],
    ]
    return "\n".join([
        md.table(["", "count", "mean", "std", "min", "max"], rows, "lrrrrr"),
        "",
        md.table(["statistic", "value"], extra, "lr"),
        "",
        _figure(NORM_HISTOGRAM, "Histogram of row norms"),
        "",
        *[f"- {note}" for note in what_the_numbers_say(a)],
    ])


def word_title(a: Artifacts) -> str:
    return f"{md.token(a.words[0]['word'])} from text to vector"


def word_section(a: Artifacts) -> str:
    rows = first_word_rows(a)
    main = rows[0]
    splits = md.table(
        ["variant", "token ids", "pieces", "tokens", "split"],
        [[md.token(r["variant"]), ", ".join(str(i) for i in r["token_ids"]), " ".join(md.token(t) for t in r["tokens"]),
          str(r["n_tokens"]), "**yes**, pooled by " + r["pooling"] if r["split"] else "no"] for r in rows],
        "llllr",
    )
    first_ten = ", ".join(md.number(x) for x in main["first_10"])
    top = md.table(["rank", "dimension", "value"],
                   [[str(i + 1), str(d), md.number(val)] for i, (d, val) in enumerate(zip(main["top_dims"], main["top_values"]))], "rrr")
    return "\n".join([
        "How the tokenizer splits it (special tokens such as BOS never count as the word's tokens):",
        "",
        splits,
        "",
        f"The vector of {variant_label(main)} ({'the mean of its pieces' if main['split'] else 'one row of the matrix'}):",
        "",
        f"- **First 10 values:** {first_ten}",
        f"- **L2 norm:** {md.number(main['l2_norm'])}",
        f"- **The {len(main['top_dims'])} dimensions of largest |value|:**",
        "",
        top,
        "",
        _figure(FIRST_DIMS, f"First {FIRST_DIMS_PLOTTED} dimensions of {main['word']}"),
    ])


def similarity_section(a: Artifacts) -> str:
    order, matrix = similarity_matrix(a)
    index = {variant: i for i, variant in enumerate(order)}
    split = split_variants(a.words)
    labels = [md.token(v) + (md.SPLIT_MARK if v in split else "") for v in order]
    # At most SIMILARITY_COLUMNS columns a table, as even as they come, so each fits a page (GitHub: ~920 px).
    tables = -(-len(order) // SIMILARITY_COLUMNS)
    bounds = [round(len(order) * t / tables) for t in range(tables + 1)]
    cosines = "\n\n".join(
        md.table(["", *labels[start:stop]],
                 [[labels[i], *(f"{matrix[i, j]:.2f}" for j in range(start, stop))] for i in range(len(order))],
                 "l" + "r" * (stop - start))
        for start, stop in zip(bounds, bounds[1:])
    )
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(a.neighbors, key=lambda r: (index[r["variant"]], r["rank"])):
        by_variant.setdefault(row["variant"], []).append(row)
    neighbours = md.table(
        ["word", "nearest tokens in the vocabulary (cosine)"],
        # A no-break space ties each cosine to its token: a line may wrap between neighbours, never inside one.
        [[labels[index[v]], ", ".join(f"{md.token(r['token'])}{md.NO_BREAK_SPACE}({r['cosine']:.2f})" for r in rows)]
         for v, rows in by_variant.items()],
    )
    return "\n".join([
        "Cosine similarity of every pair of word variants:",
        "",
        cosines,
        "",
        _figure(SIMILARITY, "Cosine similarity heatmap"),
        "",
        "Each word's nearest tokens over the whole vocabulary (its own token excluded):",
        "",
        neighbours,
    ])


def pca_section(a: Artifacts) -> str:
    shown = a.pca_variance[:10]
    # A row per component: a column per component would be 11 wide, past the page.
    table = md.table(["component", "explained variance", "cumulative"],
                     [[str(v["component"]), md.percent(v["explained_variance_ratio"], 1), md.percent(v["cumulative"], 1)]
                      for v in shown], "rrr")
    last = a.pca_variance[-1]
    return "\n".join([
        "The words projected to two dimensions, in the basis fitted on the whole vocabulary and in a PCA "
        "fitted on the word vectors alone (what the walkthrough does):",
        "",
        _figure(PCA_WORDS, "Words in two PCA bases"),
        "",
        "The whole vocabulary as a density, with the words marked:",
        "",
        _figure(PCA_VOCAB, "Vocabulary density in the first two principal components"),
        "",
        table,
        "",
        f"The first {last['component']} components explain {md.percent(last['cumulative'], 1)} of the variance.",
        "",
        _figure(EXPLAINED_VARIANCE, "Explained variance ratio"),
    ])


def qualified(quant: dict[str, dict[str, Any]]) -> list[str]:
    """The schemes that keep every row's direction and the nearest neighbours, best first.

    Fewest bits per weight first; ties on size go to the scheme that keeps more nearest
    neighbours, then to the smaller error.
    """
    eligible = [
        (metrics["bits_per_weight"], -(metrics.get("tokens_recall_at_k") or 0.0), metrics.get("rmse") or 0.0, scheme)
        for scheme, metrics in quant.items()
        if (metrics.get("row_cosine_min") or 0.0) >= TRADE_OFF_MIN_ROW_COSINE
        and (metrics.get("tokens_recall_at_k") or 0.0) >= TRADE_OFF_MIN_RECALL
    ]
    return [entry[-1] for entry in sorted(eligible)]


def best_trade_off(quant: dict[str, dict[str, Any]]) -> str | None:
    found = qualified(quant)
    return found[0] if found else None


def _names(schemes: list[str]) -> str:
    quoted = [f"`{scheme}`" for scheme in schemes]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _snr(metrics: dict[str, Any]) -> str:
    # An exact round trip has no noise: quant.json stores its SNR as null.
    if metrics["snr_db"] is None and metrics["rmse"] == 0:
        return "∞ (exact)"
    return md.number(metrics["snr_db"], 3)


def quant_section(a: Artifacts) -> str:
    if a.quant is None:
        return "No quantization was run for this model (`quantize` stage)."
    k = next(iter(a.quant.values())).get("recall_k")
    at_k = f"@{k}" if k else "@k"
    schemes = list(a.quant)

    def cells(key: str, digits: int = 3, scale: float = 1.0) -> list[str]:  # one number format down a column
        return md.column([None if a.quant[x][key] is None else a.quant[x][key] * scale for x in schemes], digits)

    size = md.table(
        ["scheme", "bits/weight", "MB on disk", "× vs float32", "RMSE", "max \\|error\\|", "SNR dB"],
        [[f"`{x}`", *row, _snr(a.quant[x])] for x, *row in zip(schemes, cells("bits_per_weight"), cells("bytes_on_disk", 3, 1e-6),
                                                                cells("compression_vs_float32"), cells("rmse"), cells("max_abs_error"))],
        "lrrrrrr")
    kept = md.table(
        ["scheme", "row cos mean", "row cos min", "clipped", f"recall{at_k} words", f"recall{at_k} tokens", "max Δ similarity"],
        [[f"`{x}`", *row] for x, *row in zip(schemes, cells("row_cosine_mean", 6), cells("row_cosine_min", 6),
                                              [md.percent(a.quant[x]["clipped_fraction"], 3) for x in schemes],
                                              cells("words_recall_at_k"), cells("tokens_recall_at_k"), cells("words_similarity_max_change"))],
        "lrrrrrr")
    best = best_trade_off(a.quant)
    others = [scheme for scheme in qualified(a.quant) if scheme != best]
    also = (f" Also qualif{'y' if len(others) > 1 else 'ies'}, from fewest bits per weight: {_names(others)}." if others
            else " No other scheme qualifies.")
    verdict = (f"**Best trade-off: `{best}`**, the fewest bits per weight ({md.number(a.quant[best]['bits_per_weight'], 3)}) "
               f"among the schemes whose worst row keeps a cosine of at least {TRADE_OFF_MIN_ROW_COSINE} to the original "
               f"and whose nearest neighbours keep a recall{at_k} of at least {TRADE_OFF_MIN_RECALL} (sampled tokens).{also}"
               if best else f"No scheme keeps every row above cosine {TRADE_OFF_MIN_ROW_COSINE} with recall above {TRADE_OFF_MIN_RECALL}.")
    fixed = a.quant.get("int8_tensor_fixed")
    clip_note = []
    if fixed and fixed["clipped_values"]:
        clip_note = ["", f"The walkthrough's fixed scale (0.01) clips every value beyond ±1.27: here "
                     f"{md.number(fixed['clipped_values'])} values ({md.percent(fixed['clipped_fraction'], 3)})."]
    return "\n".join(["What each scheme costs and how far its values move:", "", size, "",
                      f"What it keeps: the direction of every row and the nearest neighbours (recall{at_k}: the share of "
                      f"each token's {k or 'k'} nearest tokens that stay among its {k or 'k'} nearest):", "", kept, "",
                      verdict, *clip_note])


def _reference(reference: dict[str, Any]) -> str:
    """How the reference set was chosen, as the undertrained stage said it (older files: its method)."""
    if reference.get("reason"):
        return reference["reason"]
    return f"{reference['method']}, {md.number(reference['count'])} tokens."


def undertrained_section(a: Artifacts, top: int = TOP_SHOWN) -> str:
    """Under-trained token candidates of one model (``undertrained.json``)."""
    metrics = a.undertrained
    if metrics is None:
        return "Not computed for this model (`undertrained` stage)."
    headers = ["rank", "id", "token", "cos. distance (centred)", "L2 norm", "reference", "encodes to itself"]
    rows = [[md.number(r["rank"]), str(r["token_id"]), md.token(r["token"]), md.number(r["cos_dist_ref_centered"]),
             md.number(r["l2_norm"]), md.number(r["is_reference"]), md.number(r["encodes_to_self"])]
            for r in metrics["strongest"][:top]]
    return "\n".join([
        f"Tokens whose embedding stayed close to that of tokens known to be unused (after Land & Bartolo, 2024, "
        f"\"Fishing for Magikarp\"), from the weights alone. The reference: {_reference(metrics['reference'])} A token is flagged when its cosine distance to the "
        f"reference mean, once the vocabulary's mean row and first principal component are removed, is at most "
        f"percentile {md.number(metrics['percentile'])} of its distribution ({md.number(metrics['threshold_cos_dist_ref_centered'])}).",
        "",
        f"**{md.number(metrics['flagged'])} of {md.number(metrics['vocab_size'])} tokens flagged**, "
        f"{md.number(metrics['flagged_outside_reference'])} of them outside the reference set; "
        f"{md.number(metrics['flagged_not_encodable_to_self'])} cannot be produced by encoding their own text.",
        "", f"The {len(rows)} strongest candidates:", "", md.table(headers, rows, "rrlrrcc"), "",
        f"All of them, with every indicator: `artifacts/{a.name}/undertrained.parquet`.",
    ])


def usage_section(a: Artifacts) -> str:
    path = f"artifacts/{a.name}/embeddings.parquet"
    batch = len(a.words)
    seq = max(row["n_tokens"] for row in a.words)
    dim = a.provenance["shape"][1]
    return "\n".join([
        f"A batch lookup of the {batch} word variants above gives an array of shape **[{batch}, {seq}, {dim}]** "
        "(batch, longest tokenization, dimension) and a mask that marks the padding:",
        "",
        "```python",
        "import pyarrow.parquet as pq",
        "from pipeline.lookup import batch_lookup, load_embedding_layer",
        "from pipeline.core.parquet import read_vectors",
        "from pipeline.tokenizers.load import tokenizer_from_json",
        "",
        f'_, matrix = read_vectors("{path}")',
        f'tokenizer = tokenizer_from_json("artifacts/{a.name}/tokenizer.json")',
        f'words = pq.read_table("artifacts/{a.name}/words.parquet").column("variant").to_pylist()',
        "vectors, mask, ids = batch_lookup(matrix, tokenizer, words)",
        f"vectors.shape  # ({batch}, {seq}, {dim})",
        "",
        f'layer = load_embedding_layer("{path}")  # a frozen torch.nn.Embedding',
        "```",
        "",
        "The same rows from DuckDB:",
        "",
        "```sql",
        "SELECT token_id, token, vector[1:10] AS first_10",
        f"FROM '{path}'",
        "WHERE token IN ('Hello', ' Hello');",
        "```",
    ])


# ---- reports/index.md: whole sections, heading included ----------------------------------


def drift_section(pair: str, metrics: dict[str, Any] | None, top: int = TOP_SHOWN) -> str:
    """Drift between the two sides of one pair (``artifacts/drift/<pair>/drift.json``, loaded)."""
    title = f"## Drift: `{pair}`"
    if metrics is None:
        return f"{title}\n\nNot computed (`drift` stage)."
    lines = [title, "", f"`{metrics['base']}` against `{metrics['other']}`: {md.number(metrics['aligned'])} tokens aligned by text "
             f"({md.number(metrics['ids_differ'])} with different ids; {md.number(metrics['only_in_base'])} only in the first, "
             f"{md.number(metrics['only_in_other'])} only in the second).", "", drift_story(metrics), ""]
    summary_rows = []
    for key, label in (("cosine", "cosine of the two rows"), ("l2_change_relative", "L2 change / norm"),
                       ("knn_jaccard", f"Jaccard of the {metrics['knn_jaccard']['k']} nearest neighbours")):
        stats = metrics.get(key)
        if stats:
            summary_rows.append([label] + [md.number(stats[s]) for s in ("mean", "min", "p01", "median", "max")])
    lines += [md.table(["per token", "mean", "min", "p01", "median", "max"], summary_rows, "lrrrrr"), ""]
    headers = ["#", "token", "cosine", "residual / norm", "Jaccard"]
    rows = [[md.number(r["moved_rank"]), md.token(r["token"]), md.number(r["cosine"]),
             md.number(r["procrustes_residual_relative"]), md.number(r["knn_jaccard"])] for r in metrics["top_moved"][:top]]
    lines += [f"The tokens that moved most (by `{metrics['moved_by']}`):", "", md.table(headers, rows, "rlrrr")]
    return "\n".join(lines)


# Thresholds of the plain-words drift summary.
PRACTICALLY_SAME = 1e-3  # relative Frobenius difference
KEPT_DIRECTION = 0.999  # lowest row cosine
CLOSE_DIRECTION = 0.99  # mean row cosine
MOSTLY_ROTATION = 0.5  # Procrustes residual below this fraction of the raw difference
NEIGHBOURHOODS_HELD, NEIGHBOURHOODS_PARTLY = 0.9, 0.5  # mean Jaccard of the nearest neighbours
MOVED_NAMED = 5


def drift_story(metrics: dict[str, Any]) -> str:
    """What changed between the two sides, in plain words, from the drift metrics."""
    sentences = []
    difference, cosine, fit = metrics.get("relative_frobenius"), metrics.get("cosine"), metrics.get("procrustes")
    if difference is not None and cosine:
        if difference < PRACTICALLY_SAME:
            identical, largest = metrics.get("identical_rows"), (metrics.get("l2_change_relative") or {}).get("max")
            rows = "" if identical is None else (f": {md.number(identical)} of {md.number(metrics['aligned'])} rows are identical "
                                                 f"and the others differ by at most {md.percent(largest, 3)} of their norm")
            sentences.append(f"The two matrices hold practically the same values{rows} (relative Frobenius difference "
                             f"{md.number(difference, 3)}).")
        else:
            kept = ("every token kept its direction" if cosine["min"] >= KEPT_DIRECTION
                    else "tokens kept their direction closely" if cosine["mean"] >= CLOSE_DIRECTION
                    else "tokens changed direction")
            sentences.append(f"The second matrix differs from the first by {md.percent(difference)} of its norm "
                             f"(relative Frobenius difference) and {kept}: row cosine mean {md.number(cosine['mean'])}, "
                             f"lowest {md.number(cosine['min'])}.")
            if fit:
                residual = fit["relative_residual"]
                if residual < MOSTLY_ROTATION * difference:
                    sentences.append(f"Most of that change is a rotation of the whole space: after the best orthogonal rotation "
                                     f"(Procrustes) only {md.percent(residual)} is left.")
                else:
                    sentences.append(f"It is not a rotation: the best orthogonal rotation (Procrustes) still leaves "
                                     f"{md.percent(residual)} of the norm, so the tokens moved independently of one another.")
    elif metrics.get("dim_base") != metrics.get("dim_other"):
        sentences.append(f"The dimensions differ ({metrics.get('dim_base')} against {metrics.get('dim_other')}), so only "
                         "neighbourhoods can be compared.")
    jaccard = metrics["knn_jaccard"]
    if jaccard.get("mean") is not None:
        held = ("Neighbourhoods held" if jaccard["mean"] >= NEIGHBOURHOODS_HELD
                else "Neighbourhoods partly held" if jaccard["mean"] >= NEIGHBOURHOODS_PARTLY else "Neighbourhoods did not hold")
        sentences.append(f"{held}: a token shares on average {md.percent(jaccard['mean'])} of its {jaccard['k']} nearest "
                         f"neighbours across the two (Jaccard), and {md.percent(jaccard['identical_fraction'])} keep exactly the same ones.")
    moved = [md.token(row["token"]) for row in metrics.get("top_moved", [])[:MOVED_NAMED]]
    if moved:
        sentences.append(f"The tokens that moved most: {', '.join(moved)}.")
    return " ".join(sentences)


def export_section(name: str, exports: Exports | None) -> str:
    """Where one model's exports are and how to open them."""
    title = f"## Exports: {name}"
    if exports is None:
        return f"{title}\n\nNot exported for this model (`export` stage)."
    shards = exports.projector_tensors
    shard_note = (f" TensorBoard serves at most 100,000 points per tensor, so the config splits the vocabulary into "
                  f"{shards} tensors of at most that size." if shards > 1 else "")
    return "\n".join([
        title, "",
        f"- **TensorBoard Embedding Projector**: `artifacts/{name}/projector/` holds `vectors.tsv` and `metadata.tsv` for all "
        f"{md.number(exports.rows)} tokens and `projector_config.pbtxt`; run `tensorboard --logdir artifacts/{name}/projector`, "
        f"or load the two TSV files in the standalone projector.{shard_note}",
        f"- **embedding-atlas**: `artifacts/{name}/atlas.parquet` (text, PCA x and y, each token's nearest neighbours "
        f"with cosine distances): `embedding-atlas artifacts/{name}/atlas.parquet --text text --x x --y y --neighbors neighbors`.",
    ])
