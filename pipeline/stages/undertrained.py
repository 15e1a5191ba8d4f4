"""undertrained stage: tokens the model barely saw in training, found from the weights alone.

After "Fishing for Magikarp" (Land & Bartolo, 2024), adapted to the input embedding. A
token that (almost) never occurs in the training data gets (almost) no gradient, so its
row stays near where initialisation (and weight decay) left it, and so near the rows of
other such tokens. Prompts containing these tokens make models misbehave. Nothing here
runs the model.

**Reference set** of tokens known to be unused (``undertrained.reference``):

* ``auto``: every known-unused token the vocabulary has: the byte tokens (byte-level BPE
  or byte fallback) for the bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF), and
  the placeholders embeddings.parquet marks ``kind = unused`` (named unused, reserved or
  extra with a number: Gemma's ``<unusedN>``, BERT's ``[unusedN]``, Llama 3's
  ``<|reserved_special_token_N|>``, T5's ``<extra_id_N>``; see
  :data:`pipeline.tokenizers.load.UNUSED_NAME`); if there are none, the tokens of
  ``reference_tokens`` this vocabulary has; if it has none, the ``fallback_rows`` rows of
  smallest L2 norm (a weaker reference). The output says in a sentence which it used and why;
* ``tokens``: exactly ``reference_tokens`` (each must be in the vocabulary);
* ``smallest_norm``: the ``fallback_rows`` rows of smallest norm.

**Indicators**, one per token (float32):

* ``l2_norm``: the row's L2 norm;
* ``cos_dist_ref``: 1 - cosine(row, mean of the reference rows);
* ``cos_dist_ref_centered``: the same after removing from every row the mean row of the
  vocabulary and then its component along the first principal axis. Those two shared
  directions dominate most embedding matrices (anisotropy) and would make every token look
  close to everything; without them, what is left of a row is what training wrote there.

**Rule**: a token is ``flagged`` when its ``cos_dist_ref_centered`` is at most the
``undertrained.percentile``-th percentile (numpy's default linear interpolation) of that
indicator over every row that has a token text (padding rows, which no token uses, are
never flagged). Close to the unused reference means under-trained; so by construction about
``percentile`` % of the vocabulary is flagged, strongest first by ``rank``. The rule and the
threshold are in the output's provenance.

**Tokenizer check**: ``encodes_to_self`` says whether encoding the token's own text (no
special tokens added) gives exactly that one token. False means the token cannot come
from typing its text (often a sign it was never produced in training either); null where
the question does not apply: padding rows, pieces that are not valid UTF-8 on their own
(their text spells bytes as ``<0xNN>``), and WordPiece continuation pieces (``##ing``, which
only occur inside a word).

Settings come from the ``undertrained`` section, and a model may set its own in its
config (``conf/model/<name>.yaml``, under ``undertrained:``, e.g. ``reference_tokens``,
which name tokens of that model's vocabulary); the model's values win and are checked by
the same rules.

Outputs in ``artifacts/<name>/``:

* ``undertrained.parquet``: ``token_id int32``, ``token string``, ``l2_norm``,
  ``cos_dist_ref``, ``cos_dist_ref_centered`` (float32), ``is_reference``, ``is_special``,
  ``encodes_to_self`` (bool, nullable), ``flagged`` (bool), ``rank int32`` (1 = closest
  to the reference by ``cos_dist_ref_centered``; null for padding rows);
* ``undertrained.json``: the counts, the reference used (``method``, ``count`` and
  ``reason``, a sentence), the threshold, and the strongest candidates with their text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.io import output_set, write_json_atomic
from pipeline.core.knn import iter_blocks
from pipeline.core.params import model_config, model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, list_of, one_of, read_section, real_number, setting, string, whole_number
from pipeline.core.parquet import derived_provenance, read_matrix, write_table
from pipeline.core.progress import progress_bar

STAGE = "undertrained"
BLOCK_ROWS = 8192
REFERENCE_MODES = ("auto", "tokens", "smallest_norm")
# Lead bytes 0xC0/0xC1 would only start overlong encodings; 0xF5-0xFF exceed U+10FFFF. No
# valid UTF-8 text contains them, so a byte-level BPE never sees these byte tokens.
UNUSED_UTF8_BYTES = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])
SHOWN_EXAMPLES = 3  # tokens named in the reference's sentence
RULE = (
    "flagged = cos_dist_ref_centered <= the percentile-th percentile (numpy linear) of "
    "cos_dist_ref_centered over rows with a token text; cos_dist_ref_centered = 1 - cosine to the "
    "reference mean after subtracting the vocabulary mean row and the first principal component"
)
ENCODE_BATCH = 8192


@dataclass(frozen=True)
class UndertrainedSettings:
    # Flag tokens at or below this percentile of the centred cosine distance to the reference.
    percentile: float = setting(2.0, real_number(0.0, 100.0, open_interval=True))
    reference: str = setting("auto", one_of(*REFERENCE_MODES))
    reference_tokens: list[str] = setting([], list_of(string()))
    fallback_rows: int = setting(16, whole_number(1, 1_000_000))
    top: int = setting(25, whole_number(1, 100_000))

    def __post_init__(self) -> None:
        if self.reference == "tokens" and not self.reference_tokens:
            raise DissectError("undertrained.reference is 'tokens' but undertrained.reference_tokens is empty; list the unused tokens")


# --------------------------------------------------------------------------------------
# Reference set


def read_settings(params: dict[str, Any], name: str | None) -> UndertrainedSettings:
    """The ``undertrained`` section, with what the model's own config sets under ``undertrained:`` on top."""
    model = model_config(params, str(name))
    own = model.entry.get(STAGE)
    where = f"models.{model.name}.{STAGE}"
    read_section(UndertrainedSettings, own, where)  # a mistake in the model's part is named there
    section = params.get(STAGE)
    if section is not None and not isinstance(section, dict):
        return read_section(UndertrainedSettings, section, STAGE)  # the section's own error
    return read_section(UndertrainedSettings, {**(section or {}), **(own or {})}, STAGE)


@dataclass(frozen=True)
class Reference:
    rows: np.ndarray  # [r] int64 row indices
    method: str  # how they were chosen: auto, tokens or smallest_norm, and what auto found
    reason: str = ""  # the same as a sentence a person reads


# What each family of known-unused tokens is, for the reference's sentence.
KNOWN_UNUSED = {
    "placeholders": "placeholder tokens named unused, reserved or extra",
    "unused_utf8_bytes": "byte tokens for bytes that never occur in UTF-8",
}


def known_unused_rows(tokens: list[str | None], token_bytes: list[bytes | None], kinds: list[str] | None = None) -> dict[str, np.ndarray]:
    """Rows of tokens known to be unused, by family (only the families this vocabulary has).

    ``kinds`` is embeddings.parquet's ``kind`` column; without it (an older file) the
    placeholder names are matched here.
    """
    if kinds is None:
        from pipeline.tokenizers.load import UNUSED_NAME

        kinds = ["unused" if text is not None and UNUSED_NAME.fullmatch(text) else "normal" for text in tokens]
    found: dict[str, list[int]] = {"placeholders": [], "unused_utf8_bytes": []}
    for row, (raw, kind) in enumerate(zip(token_bytes, kinds)):
        if kind == "unused":
            found["placeholders"].append(row)
        elif raw is not None and len(raw) == 1 and raw[0] in UNUSED_UTF8_BYTES:
            found["unused_utf8_bytes"].append(row)
    return {family: np.asarray(rows, np.int64) for family, rows in found.items() if rows}


def _examples(tokens: list[str | None], rows: np.ndarray) -> str:
    """A few of the tokens, quoted: ``<unused0>``, ``<unused1>``, … ``<unused6241>``."""
    shown = [f"`{tokens[row]}`" for row in rows[:SHOWN_EXAMPLES]]
    if len(rows) > SHOWN_EXAMPLES:
        shown.append(f"… `{tokens[rows[-1]]}`")
    return ", ".join(shown)


def listed_rows(tokens: list[str | None], wanted: list[str], strict: bool = True) -> np.ndarray:
    """Rows of the token texts in ``wanted``; with ``strict``, a text not in the vocabulary is an error.

    Not strict (``auto``), texts this vocabulary lacks are skipped: one list in params.yaml
    serves every model of a run.
    """
    index = {text: row for row, text in enumerate(tokens) if text is not None}
    missing = [text for text in wanted if text not in index]
    if missing and strict:
        raise DissectError(
            f"undertrained.reference_tokens lists {missing[0]!r}, which is not a token of this vocabulary; "
            "use the token text as embeddings.parquet spells it"
        )
    return np.asarray(sorted({index[text] for text in wanted if text in index}), np.int64)


def smallest_norm_rows(norms: np.ndarray, count: int, eligible: np.ndarray) -> np.ndarray:
    """The ``count`` eligible rows of smallest norm (ties by row), sorted by row."""
    candidates = np.flatnonzero(eligible)
    order = np.lexsort((candidates, norms[candidates]))
    return np.sort(candidates[order[:count]]).astype(np.int64)


def choose_reference(
    settings: UndertrainedSettings,
    tokens: list[str | None],
    token_bytes: list[bytes | None],
    norms: np.ndarray,
    kinds: list[str] | None = None,
) -> Reference:
    """The reference rows, how they were chosen, and why, in a sentence."""
    eligible = np.array([text is not None for text in tokens])
    smallest = f"the {settings.fallback_rows} rows of smallest L2 norm, a weak reference (any small row, used or not, counts)"
    if settings.reference == "tokens":
        rows = listed_rows(tokens, settings.reference_tokens)
        return Reference(rows, "tokens (reference_tokens)",
                         f"the {len(rows)} tokens listed in reference_tokens ({_examples(tokens, rows)}), as configured.")
    if settings.reference == "smallest_norm":
        rows = smallest_norm_rows(norms, settings.fallback_rows, eligible)
        return Reference(rows, f"smallest_norm ({settings.fallback_rows} rows)", f"{smallest}, as configured.")
    known = known_unused_rows(tokens, token_bytes, kinds)
    if known:
        rows = np.unique(np.concatenate(list(known.values())))
        families = " and ".join(f"{len(found):,} {KNOWN_UNUSED[family]} ({_examples(tokens, found)})" for family, found in known.items())
        counts = ", ".join(f"{family}: {len(found)}" for family, found in known.items())
        return Reference(rows, f"auto ({counts})", f"{families}, found by auto: tokens no training text produces.")
    none_known = f"this vocabulary has no {' and no '.join(KNOWN_UNUSED.values())}, so auto"
    listed = listed_rows(tokens, settings.reference_tokens, strict=False)
    if len(listed):
        return Reference(listed, f"auto: reference_tokens ({len(listed)} of {len(settings.reference_tokens)} found)",
                         f"{none_known} took the {len(listed)} of the {len(settings.reference_tokens)} reference_tokens this "
                         f"vocabulary has ({_examples(tokens, listed)}), named in the model's config.")
    rows = smallest_norm_rows(norms, settings.fallback_rows, eligible)
    return Reference(rows, f"auto: smallest_norm ({settings.fallback_rows} rows)",
                     f"{none_known} took {smallest}; name known-unused tokens in the model's undertrained.reference_tokens.")


# --------------------------------------------------------------------------------------
# Indicators


@dataclass(frozen=True)
class Indicators:
    l2_norm: np.ndarray  # [vocab] float32
    cos_dist_ref: np.ndarray  # [vocab] float32
    cos_dist_ref_centered: np.ndarray  # [vocab] float32


def row_norms(matrix: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """L2 norm of each row [vocab], accumulated in float64."""
    out = np.empty(matrix.shape[0], np.float64)
    for start, block in iter_blocks(matrix, block_rows):
        wide = block.astype(np.float64)
        out[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    return out


def first_axis(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean row [dim], first principal axis [dim], unit) of ``matrix``, both float64."""
    from pipeline.core.pca import fit_pca

    pca = fit_pca(matrix, n_components=1)
    return pca.mean, pca.components[0]


def cosine_distances(matrix: np.ndarray, target: np.ndarray, mean: np.ndarray | None, axis: np.ndarray | None,
                     block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """1 - cosine of each row to ``target`` [dim], after removing ``mean`` and the ``axis`` component.

    ``target`` is given in the same (centred) space. A zero row or target has cosine 0,
    hence distance 1 (it has no direction to be close in).
    """
    from pipeline.core.determinism import PUBLISHED_BITS, dot_rows, quantize

    target = target.astype(np.float64)
    target_norm = np.sqrt(np.einsum("i,i->", target, target))
    out = np.empty(matrix.shape[0], np.float32)  # [vocab]
    for start, block in iter_blocks(matrix, block_rows):
        rows = block.astype(np.float64)  # [block, dim]
        if mean is not None:
            rows -= mean
        if axis is not None:
            rows -= np.outer(dot_rows(rows, axis), axis)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows)) * target_norm  # [block]
        dots = dot_rows(rows, target)
        cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
        distance = 1.0 - np.clip(cos, -1.0, 1.0)
        # The principal axis comes from an eigensolver (last bits vary with the BLAS kernel):
        # the distances measured after removing it are published on a 2^-20 grid.
        out[start : start + len(block)] = distance if axis is None else quantize(distance, 2.0**-PUBLISHED_BITS)
    return out


def remove_directions(vector: np.ndarray, mean: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``vector`` [dim] minus ``mean``, then minus its component along unit ``axis``."""
    centred = vector - mean
    return centred - float(np.einsum("i,i->", centred, axis)) * axis


def indicators(matrix: np.ndarray, reference_rows: np.ndarray, norms: np.ndarray | None = None) -> Indicators:
    """The three indicators of every row of ``matrix`` [vocab, dim] against ``reference_rows``."""
    if len(reference_rows) == 0:
        raise DissectError("the reference set of unused tokens is empty; list some in undertrained.reference_tokens")
    norms = row_norms(matrix) if norms is None else norms
    reference_mean = matrix[reference_rows].astype(np.float64).mean(axis=0)  # [dim]
    raw = cosine_distances(matrix, reference_mean, None, None)
    mean, axis = first_axis(matrix)
    # Removing the mean and one direction is linear, so the reference mean in the centred
    # space is the centred reference mean: no second pass over the reference rows.
    centred = cosine_distances(matrix, remove_directions(reference_mean, mean, axis), mean, axis)
    return Indicators(norms.astype(np.float32), raw, centred)


def flag(indicator: np.ndarray, eligible: np.ndarray, percentile: float) -> tuple[np.ndarray, float]:
    """(flags [vocab] bool, threshold): eligible rows whose indicator is at most the percentile."""
    values = indicator[eligible].astype(np.float64)
    threshold = float(np.percentile(values, percentile)) if values.size else float("nan")
    return eligible & (indicator <= threshold), threshold


def ranks(indicator: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """1-based rank of each eligible row by indicator, lowest first (ties by row); 0 elsewhere."""
    rows = np.flatnonzero(eligible)
    order = rows[np.lexsort((rows, indicator[rows]))]
    out = np.zeros(indicator.shape[0], np.int32)
    out[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return out


# --------------------------------------------------------------------------------------
# Tokenizer check


def is_continuation_model(tok: Any) -> str | None:
    """The WordPiece continuation prefix (``##``) when the tokenizer is WordPiece, else None."""
    model = tok.model
    return getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None


def encodes_to_self(tok: Any, tokens: list[str | None], token_bytes: list[bytes | None]) -> list[bool | None]:
    """Per row: does encoding the token's own text give exactly that token? (None: not applicable)."""
    prefix = is_continuation_model(tok)
    out: list[bool | None] = [None] * len(tokens)
    rows = [
        row for row, (text, raw) in enumerate(zip(tokens, token_bytes))
        if text is not None and raw is None and text != "" and not (prefix and text.startswith(prefix))
    ]
    for start in range(0, len(rows), ENCODE_BATCH):
        chunk = rows[start : start + ENCODE_BATCH]
        encodings = tok.encode_batch([tokens[row] for row in chunk], add_special_tokens=False)
        for row, encoding in zip(chunk, encodings):
            out[row] = list(encoding.ids) == [row]
    return out


# --------------------------------------------------------------------------------------
# Outputs


def undertrained_table(
    tokens: pa.Array, ind: Indicators, reference: np.ndarray, special: np.ndarray,
    self_encodes: list[bool | None], flags: np.ndarray, rank: np.ndarray,
) -> pa.Table:
    is_reference = np.zeros(len(flags), bool)
    is_reference[reference] = True
    return pa.table({
        "token_id": pa.array(np.arange(len(flags), dtype=np.int32)),
        "token": tokens,
        "l2_norm": pa.array(ind.l2_norm),
        "cos_dist_ref": pa.array(ind.cos_dist_ref),
        "cos_dist_ref_centered": pa.array(ind.cos_dist_ref_centered),
        "is_reference": pa.array(is_reference),
        "is_special": pa.array(special),
        "encodes_to_self": pa.array(self_encodes, type=pa.bool_()),
        "flagged": pa.array(flags),
        "rank": pa.array(rank, mask=rank == 0),
    })


def summary(table: pa.Table, settings: UndertrainedSettings, reference: Reference, threshold: float) -> dict[str, Any]:
    """The metrics: counts, reference, threshold and the strongest candidates."""
    flagged = table.filter(table.column("flagged"))
    not_reference = flagged.filter(pc.invert(flagged.column("is_reference")))
    unreachable = flagged.filter(pc.equal(flagged.column("encodes_to_self"), False))
    top = flagged.sort_by("rank").slice(0, settings.top)
    return {
        "vocab_size": table.num_rows,
        "flagged": flagged.num_rows,
        "flagged_outside_reference": not_reference.num_rows,
        "flagged_not_encodable_to_self": unreachable.num_rows,
        "reference": {"method": reference.method, "count": int(len(reference.rows)), "reason": reference.reason},
        "percentile": settings.percentile,
        "threshold_cos_dist_ref_centered": threshold,
        "rule": RULE,
        "strongest": [
            {key: _json_value(row[key]) for key in ("rank", "token_id", "token", "cos_dist_ref_centered", "cos_dist_ref",
                                                   "l2_norm", "is_reference", "encodes_to_self")}
            for row in top.to_pylist()
        ],
    }


def _json_value(value: Any) -> Any:
    return round(float(value), 6) if isinstance(value, float) else value


# --------------------------------------------------------------------------------------
# Stage


def run(paths: ModelPaths, settings: UndertrainedSettings) -> dict[str, Any]:
    """The stage on one model; returns the metrics it wrote."""
    from pipeline.tokenizers.load import special_token_ids, tokenizer_from_json

    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    columns = pq.read_table(paths.embeddings, columns=["token", "kind", "token_bytes"])
    token_array = columns.column("token").combine_chunks()
    tokens: list[str | None] = token_array.to_pylist()
    token_bytes: list[bytes | None] = columns.column("token_bytes").to_pylist()
    kinds: list[str] = columns.column("kind").to_pylist()
    tok = tokenizer_from_json(paths.tokenizer)

    with progress_bar(total=4, desc="under-trained tokens", unit="step") as bar:
        norms = row_norms(matrix)
        reference = choose_reference(settings, tokens, token_bytes, norms, kinds)
        bar.update(1)
        ind = indicators(matrix, reference.rows, norms)
        bar.update(1)
        eligible = np.array([text is not None for text in tokens])
        flags, threshold = flag(ind.cos_dist_ref_centered, eligible, settings.percentile)
        rank = ranks(ind.cos_dist_ref_centered, eligible)
        special = np.zeros(len(tokens), bool)
        special[[i for i in special_token_ids(tok) if i < len(tokens)]] = True
        bar.update(1)
        self_encodes = encodes_to_self(tok, tokens, token_bytes)
        bar.update(1)

    table = undertrained_table(token_array, ind, reference.rows, special, self_encodes, flags, rank)
    metrics = summary(table, settings, reference, threshold)
    provenance = derived_provenance(STAGE, paths.name, paths.embeddings, {"undertrained": as_params(settings)})
    provenance.update({"rule": RULE, "reference": metrics["reference"], "threshold": threshold})
    with output_set():
        write_table(paths.undertrained, table, provenance)
        write_json_atomic(paths.undertrained_metrics, metrics)
    return metrics


main = Stage(STAGE, "MODEL", model_paths, read_settings, run).main


if __name__ == "__main__":
    run_stage(main)
