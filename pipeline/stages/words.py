"""words stage: the vectors of the configured words, as ``artifacts/<name>/words.parquet``.

Each word of ``words.list`` is looked up as written and, with ``words.leading_space``, with
a space before it too (``" Hello"`` is its own token in byte-level BPE vocabularies, and the
form a word takes inside a sentence). A word that splits into several tokens is marked
(``split``) and pooled into one vector by ``words.pooling`` (mean, first or last); it is
never silently reduced to its first piece. Special tokens (BOS/EOS) are never part of it.

One row per (word, variant): ``word``, ``variant`` (the text looked up), ``token_ids
list<int32>``, ``tokens list<string>`` (the pieces as readable text, from
embeddings.parquet), ``n_tokens int32``, ``split bool``, ``pooling``, ``vector
fixed_size_list<float32>[dim]``, ``l2_norm float64``, ``first_10 list<float32>``,
``top_dims list<int32>`` / ``top_values list<float32>`` (the ``words.top_k`` dimensions of
largest |value|, largest first, ties to the lower dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.lookup import POOLINGS, word_vectors
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, boolean, from_section, list_of, one_of, setting, shown, whole_number
from pipeline.core.parquet import derived_provenance, read_matrix, vector_array, write_table

FIRST_DIMS = 10


def word_text(value: Any, where: str) -> str:
    """A word to look up: text with something besides whitespace."""
    if not isinstance(value, str):
        # YAML reads unquoted yes/no/on/off as booleans and digits as numbers.
        raise DissectError(f"{where} must be text, got {shown(value)}; quote it in the config, e.g. '{value}'")
    if not value.strip():
        raise DissectError(f"{where} must be a word, got {shown(value)}; remove it or give a word")
    return value


@dataclass(frozen=True)
class WordSettings:
    # The words looked up, each as written and (leading_space) with a leading space.
    words: list[str] = setting(["Hello"], list_of(word_text, min_items=1, max_items=1000, unique=True), key="list")
    leading_space: bool = setting(True, boolean())
    # How a word that splits into several tokens becomes one vector.
    pooling: str = setting("mean", one_of(*POOLINGS))
    top_k: int = setting(10, whole_number(1, 100_000))


def word_variants(words: Sequence[str], leading_space: bool) -> list[tuple[str, str]]:
    """(word, text looked up) pairs: the word as written, then with a leading space if asked."""
    return [(word, text) for word in words for text in ([word, " " + word] if leading_space else [word])]


def top_dims(vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(dims [k] int32, values [k] float32): the k dims of largest |value|, ties to the lower dim."""
    order = np.argsort(-np.abs(vector), kind="stable")[:k]  # stable: equal |value| keeps dim order
    return order.astype(np.int32), vector[order].astype(np.float32)


def words_table(
    matrix: np.ndarray,
    tokenizer: tokenizers.Tokenizer,
    token_texts: pa.Array | pa.ChunkedArray,
    settings: WordSettings,
) -> pa.Table:
    """One row per (word, variant) of ``settings``; ``token_texts`` [vocab] is the readable piece per id."""
    pairs = word_variants(settings.words, settings.leading_space)
    found = word_vectors(matrix, tokenizer, [text for _, text in pairs], settings.pooling)
    vectors = np.stack([item.vector for item in found]).astype(np.float32)  # [variants, dim]
    tops = [top_dims(vector, settings.top_k) for vector in vectors]
    n_tokens = [len(item.token_ids) for item in found]
    return pa.table(
        {
            "word": pa.array([word for word, _ in pairs], pa.string()),
            "variant": pa.array([text for _, text in pairs], pa.string()),
            "token_ids": pa.array([item.token_ids for item in found], pa.list_(pa.int32())),
            "tokens": pa.array([token_texts.take(item.token_ids).to_pylist() for item in found], pa.list_(pa.string())),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "split": pa.array([n > 1 for n in n_tokens], pa.bool_()),
            "pooling": pa.array([settings.pooling] * len(found), pa.string()),
            "vector": vector_array(vectors),
            "l2_norm": pa.array(np.linalg.norm(vectors.astype(np.float64), axis=1)),
            "first_10": pa.array(list(vectors[:, :FIRST_DIMS]), pa.list_(pa.float32())),
            "top_dims": pa.array([dims for dims, _ in tops], pa.list_(pa.int32())),
            "top_values": pa.array([values for _, values in tops], pa.list_(pa.float32())),
        }
    )


def run(paths: ModelPaths, settings: WordSettings) -> pa.Table:
    """The stage on one model; returns the table written."""
    from pipeline.tokenizers.load import tokenizer_from_json

    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    if not paths.tokenizer.is_file():
        raise DissectError(f"{paths.tokenizer} is missing; run the extract stage first (`dvc repro extract@{paths.name}`)")
    tokenizer = tokenizer_from_json(paths.tokenizer)
    token_texts = pq.read_table(paths.embeddings, columns=["token"]).column("token")
    table = words_table(matrix, tokenizer, token_texts, settings)
    write_table(paths.words, table, derived_provenance("words", paths.name, paths.embeddings, {"words": as_params(settings)}))
    return table


main = Stage("words", "MODEL", model_paths, from_section(WordSettings, "words"), run).main


if __name__ == "__main__":
    run_stage(main)
