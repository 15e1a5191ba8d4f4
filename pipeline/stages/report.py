"""report stage: ``reports/<name>/report.md`` and its figures, rendered from the artifacts alone.

Every number and every figure comes from a file an earlier stage wrote; nothing is
computed again from the matrix. The story follows the walkthrough the project automates:
the model, the matrix, one word ("Hello", the first configured word) from text to
vector, similarity, PCA, quantization, under-trained tokens, and how to use the artifacts.

Deterministic: the same artifacts give byte-identical markdown and PNGs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.report import markdown as md
from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.report.figures import drawable, new_figure, save_png, style
from pipeline.core.io import atomic_path, read_json, write_bytes_atomic
from pipeline.core.params import model_paths
from pipeline.core.parquet import read_provenance
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import NoSettings, no_settings
from pipeline.report.sections import undertrained_section

FIRST_DIMS_PLOTTED = 100

# The quantization scheme named the best trade-off: the fewest bits per weight among the
# schemes that keep every row's direction (min row cosine) and the nearest neighbours.
TRADE_OFF_MIN_ROW_COSINE = 0.99
TRADE_OFF_MIN_RECALL = 0.9


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
    figures_dir: Path



def _read_rows(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except FileNotFoundError:
        raise DissectError(f"{path} is missing; run the stage that writes it (`dvc repro`)") from None


def load_artifacts(model_dir: Path) -> Artifacts:
    dims = pq.read_table(model_dir / "dims.parquet")
    quant_path = model_dir / "quant.json"
    return Artifacts(
        name=model_dir.name,
        provenance=read_provenance(model_dir / "embeddings.parquet"),
        stats=read_json(model_dir / "stats.json"),
        norm_hist=read_json(model_dir / "norm_hist.json"),
        dims={name: dims.column(name).to_numpy() for name in dims.column_names},
        words=_read_rows(model_dir / "words.parquet"),
        similarity=_read_rows(model_dir / "similarity.parquet"),
        neighbors=_read_rows(model_dir / "neighbors.parquet"),
        pca_variance=read_json(model_dir / "pca_variance.json"),
        quant=read_json(quant_path) if quant_path.exists() else None,
        figures_dir=model_dir / "figures",
    )


# ---- small helpers ----------------------------------------------------------------------


def variant_label(row: dict[str, Any]) -> str:
    """A word variant as shown everywhere: quoted, with the split mark when it splits."""
    return md.token(row["variant"]) + (md.SPLIT_MARK if row["split"] else "")


def _split_variants(words: list[dict[str, Any]]) -> set[str]:
    return {row["variant"] for row in words if row["split"]}


def _is_synthetic(provenance: dict[str, Any]) -> bool:
    source = provenance.get("params", {}).get("model", {}).get("source", {}) or {}
    return source.get("synthetic") is not None


# ---- figures ------------------------------------------------------------------------------


def norm_histogram_figure(norm_hist: list[dict[str, Any]], path: Path) -> None:
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


def first_dims_figure(rows: list[dict[str, Any]], path: Path) -> None:
    with style():
        figure = new_figure(7, 3)
        ax = figure.add_subplot()
        for row in rows:
            values = row["vector"][:FIRST_DIMS_PLOTTED]
            label = '"' + drawable(row["variant"]) + '"' + (" (split)" if row["split"] else "")
            ax.plot(range(len(values)), values, linewidth=1, label=label)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("dimension")
        ax.set_ylabel("value")
        ax.set_title(f"First {FIRST_DIMS_PLOTTED} dimensions")
        ax.legend(loc="upper right")
        save_png(figure, path)


def similarity_heatmap(labels: list[str], matrix: np.ndarray, path: Path) -> None:
    with style():
        size = 2.5 + 0.45 * len(labels)
        figure = new_figure(size + 1, size)
        ax = figure.add_subplot()
        image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] < 0.6 else "black")
        figure.colorbar(image, ax=ax, label="cosine similarity")
        ax.set_title("Cosine similarity of the words")
        save_png(figure, path)


def variance_figure(variance: list[dict[str, Any]], path: Path) -> None:
    with style():
        figure = new_figure(6, 3)
        ax = figure.add_subplot()
        components = [v["component"] for v in variance]
        ax.bar(components, [v["explained_variance_ratio"] for v in variance], color="#4C72B0", label="per component")
        ax.plot(components, [v["cumulative"] for v in variance], color="#C44E52", label="cumulative")
        ax.set_xlabel("principal component")
        ax.set_ylabel("explained variance ratio")
        ax.set_ylim(0, 1)
        ax.legend(loc="center right")
        ax.set_title("Explained variance (whole vocabulary)")
        save_png(figure, path)


# ---- sections -----------------------------------------------------------------------------


def model_section(a: Artifacts) -> str:
    p = a.provenance
    tokenizer = p["tokenizer"]
    # Four spaces: every markdown renderer nests that, not only GitHub's.
    files = "\n".join(f"    - `{f['path']}` ({md.number(f['bytes'])} bytes), sha256 `{f['sha256']}`" for f in p["source_files"])
    padded = tokenizer.get("padded_rows", 0)
    padding_note = f"; {md.number(padded)} rows beyond it are padding (no token)" if padded else ""
    lines = [
        "## 1. The model",
        "",
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
    notes.append(f"Row norms range from {md.number(norms['min'], 3)} to {md.number(norms['max'], 3)}; "
                 f"the middle 98% lie between {md.number(norms['p01'], 3)} and {md.number(norms['p99'], 3)}.")
    if s["rows"]["duplicate"]:
        notes.append(f"**{md.number(s['rows']['duplicate'])} rows are exact copies of another row**, typically tokens "
                     "that training never updated (see `duplicate_of` in `tokens.parquet`).")
    nonfinite = s["values"]["nan_count"] + s["values"]["inf_count"]
    if nonfinite:
        notes.append(f"**The matrix holds {md.number(nonfinite)} NaN or Inf values** in {md.number(s['rows']['nonfinite'])} rows; "
                     "they are left out of every statistic above.")
    return notes


def matrix_section(a: Artifacts, figures: Path) -> str:
    s = a.stats
    v, n = s["values"], s["row_norm"]
    norm_histogram_figure(a.norm_hist, figures / "norm_histogram.png")
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
        "## 2. The matrix",
        "",
        md.table(["", "count", "mean", "std", "min", "max"], rows, "lrrrrr"),
        "",
        md.table(["statistic", "value"], extra, "lr"),
        "",
        md.figure("figures/norm_histogram.png", "Histogram of row norms"),
        "",
        *[f"- {note}" for note in what_the_numbers_say(a)],
    ])


def word_section(a: Artifacts, figures: Path) -> str:
    first_word = a.words[0]["word"]
    rows = [row for row in a.words if row["word"] == first_word]
    main = rows[0]
    first_dims_figure(rows, figures / "first_dims.png")
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
        f"## 3. {md.token(first_word)} from text to vector",
        "",
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
        md.figure("figures/first_dims.png", f"First {FIRST_DIMS_PLOTTED} dimensions of {first_word}"),
    ])


def similarity_section(a: Artifacts, figures: Path) -> str:
    order = [row["variant"] for row in a.words]
    index = {variant: i for i, variant in enumerate(order)}
    matrix = np.zeros((len(order), len(order)))
    for pair in a.similarity:
        matrix[index[pair["variant_a"]], index[pair["variant_b"]]] = pair["cosine"]
    split = _split_variants(a.words)
    plot_labels = ['"' + drawable(v) + '"' + (md.SPLIT_MARK if v in split else "") for v in order]
    similarity_heatmap(plot_labels, matrix, figures / "similarity.png")
    labels = [md.token(v) + (md.SPLIT_MARK if v in split else "") for v in order]
    cosines = md.table(["", *labels], [[labels[i], *(f"{matrix[i, j]:.2f}" for j in range(len(order)))] for i in range(len(order))],
                       "l" + "r" * len(order))
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(a.neighbors, key=lambda r: (index[r["variant"]], r["rank"])):
        by_variant.setdefault(row["variant"], []).append(row)
    neighbours = md.table(
        ["word", "nearest tokens in the vocabulary (cosine)"],
        [[labels[index[v]], ", ".join(f"{md.token(r['token'])} ({r['cosine']:.2f})" for r in rows)] for v, rows in by_variant.items()],
    )
    return "\n".join([
        "## 4. Similarity",
        "",
        "Cosine similarity of every pair of word variants:",
        "",
        cosines,
        "",
        md.figure("figures/similarity.png", "Cosine similarity heatmap"),
        "",
        "Each word's nearest tokens over the whole vocabulary (its own token excluded):",
        "",
        neighbours,
    ])


def pca_section(a: Artifacts, figures: Path) -> str:
    for name in ("pca_words.png", "pca_vocab.png"):
        source = a.figures_dir / name
        if not source.is_file():
            raise DissectError(f"{source} is missing; run the pca stage (`dvc repro pca@{a.name}`)")
        with atomic_path(figures / name) as tmp:
            shutil.copyfile(source, tmp)
    variance_figure(a.pca_variance, figures / "explained_variance.png")
    shown = a.pca_variance[:10]
    table = md.table(["component", *(str(v["component"]) for v in shown)],
                     [["explained variance", *(md.percent(v["explained_variance_ratio"], 1) for v in shown)],
                      ["cumulative", *(md.percent(v["cumulative"], 1) for v in shown)]], "l" + "r" * len(shown))
    last = a.pca_variance[-1]
    return "\n".join([
        "## 5. PCA",
        "",
        "The words projected to two dimensions, in the basis fitted on the whole vocabulary and in a PCA "
        "fitted on the word vectors alone (what the walkthrough does):",
        "",
        md.figure("figures/pca_words.png", "Words in two PCA bases"),
        "",
        "The whole vocabulary as a density, with the words marked:",
        "",
        md.figure("figures/pca_vocab.png", "Vocabulary density in the first two principal components"),
        "",
        table,
        "",
        f"The first {last['component']} components explain {md.percent(last['cumulative'], 1)} of the variance.",
        "",
        md.figure("figures/explained_variance.png", "Explained variance ratio"),
    ])


def best_trade_off(quant: dict[str, dict[str, Any]]) -> str | None:
    # Ties on size go to the scheme that keeps more nearest neighbours, then to the smaller error.
    eligible = [
        (metrics["bits_per_weight"], -(metrics.get("tokens_recall_at_k") or 0.0), metrics.get("rmse") or 0.0, scheme)
        for scheme, metrics in quant.items()
        if (metrics.get("row_cosine_min") or 0.0) >= TRADE_OFF_MIN_ROW_COSINE
        and (metrics.get("tokens_recall_at_k") or 0.0) >= TRADE_OFF_MIN_RECALL
    ]
    return min(eligible)[-1] if eligible else None


def _snr(metrics: dict[str, Any]) -> str:
    # An exact round trip has no noise: quant.json stores its SNR as null.
    if metrics["snr_db"] is None and metrics["rmse"] == 0:
        return "∞ (exact)"
    return md.number(metrics["snr_db"], 3)


def quant_section(a: Artifacts) -> str:
    if a.quant is None:
        return "## 6. Quantization\n\nNo quantization was run for this model (`quantize` stage)."
    headers = ["scheme", "bits/weight", "MB on disk", "× vs float32", "RMSE", "max \\|error\\|", "SNR dB",
               "row cos mean", "row cos min", "clipped", "recall@k words", "recall@k tokens", "max Δ similarity"]
    rows = [[f"`{scheme}`", md.number(m["bits_per_weight"], 3), md.number(m["bytes_on_disk"] / 1e6, 3),
             md.number(m["compression_vs_float32"], 3), md.number(m["rmse"], 3), md.number(m["max_abs_error"], 3),
             _snr(m), md.number(m["row_cosine_mean"], 6), md.number(m["row_cosine_min"], 6),
             md.percent(m["clipped_fraction"], 3), md.number(m["words_recall_at_k"], 3), md.number(m["tokens_recall_at_k"], 3),
             md.number(m["words_similarity_max_change"], 3)] for scheme, m in a.quant.items()]
    best = best_trade_off(a.quant)
    verdict = (f"**Best trade-off: `{best}`**, the fewest bits per weight ({md.number(a.quant[best]['bits_per_weight'], 3)}) "
               f"among the schemes whose worst row keeps a cosine of at least {TRADE_OFF_MIN_ROW_COSINE} to the original "
               f"and whose nearest neighbours keep a recall of at least {TRADE_OFF_MIN_RECALL}."
               if best else f"No scheme keeps every row above cosine {TRADE_OFF_MIN_ROW_COSINE} with recall above {TRADE_OFF_MIN_RECALL}.")
    fixed = a.quant.get("int8_tensor_fixed")
    clip_note = []
    if fixed and fixed["clipped_values"]:
        clip_note = ["", f"The walkthrough's fixed scale (0.01) clips every value beyond ±1.27: here "
                     f"{md.number(fixed['clipped_values'])} values ({md.percent(fixed['clipped_fraction'], 3)})."]
    return "\n".join(["## 6. Quantization", "", md.table(headers, rows, "l" + "r" * (len(headers) - 1)), "", verdict, *clip_note])


def usage_section(a: Artifacts) -> str:
    path = f"artifacts/{a.name}/embeddings.parquet"
    batch = len(a.words)
    seq = max(row["n_tokens"] for row in a.words)
    dim = a.provenance["shape"][1]
    return "\n".join([
        "## 8. Using the artifacts",
        "",
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
        f"SELECT token_id, token, vector[1:10] AS first_10 FROM '{path}' WHERE token IN ('Hello', ' Hello');",
        "```",
    ])


def render(a: Artifacts, figures: Path) -> str:
    figures.mkdir(parents=True, exist_ok=True)
    sections = [
        f"# {a.name}: the token-embedding layer, dissected",
        f"Word variants marked {md.SPLIT_MARK} split into several tokens; their vector is pooled from the pieces. "
        "Numbers are rounded for reading: the Parquet and JSON artifacts keep full precision.",
        model_section(a),
        matrix_section(a, figures),
        word_section(a, figures),
        similarity_section(a, figures),
        pca_section(a, figures),
        quant_section(a),
        undertrained_section(a.figures_dir.parent).replace("## Under-trained tokens", "## 7. Under-trained tokens", 1),
        usage_section(a),
    ]
    return "\n\n".join(section.rstrip() for section in sections) + "\n"


def run(paths: ModelPaths, settings: NoSettings) -> Path:
    artifacts = load_artifacts(paths.artifacts)
    text = render(artifacts, paths.report_figures)
    write_bytes_atomic(paths.report, text.encode("utf-8"))
    return paths.report


main = Stage("report", "MODEL", model_paths, no_settings, run).main


if __name__ == "__main__":
    run_stage(main)
