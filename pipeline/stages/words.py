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
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

from pipeline.core.cli import model_stage_main, run_stage
from pipeline.core.errors import DissectError
from pipeline.lookup import POOLINGS, word_vectors
from pipeline.core.parquet import derived_provenance, read_matrix, vector_array, write_table

FIRST_DIMS = 10


@dataclass(frozen=True)
class WordSettings:
    words: list[str]
    leading_space: bool
    pooling: str
    top_k: int


def word_settings(settings: dict[str, Any]) -> WordSettings:
    """The ``words`` params, checked; each mistake is a DissectError naming the fix."""
    words = settings.get("list")
    if not isinstance(words, list) or not words:
        raise DissectError("words.list is empty or missing; list at least one word, e.g. list: [Hello]")
    check_words(words)
    leading_space = settings.get("leading_space", True)
    if not isinstance(leading_space, bool):
        raise DissectError(f"words.leading_space is {leading_space!r}; set it to true or false")
    pooling = settings.get("pooling", "mean")
    if pooling not in POOLINGS:
        raise DissectError(f"words.pooling is {pooling!r}; set it to one of {', '.join(POOLINGS)}")
    top_k = settings.get("top_k", 10)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise DissectError(f"words.top_k is {top_k!r}; set it to a whole number of dimensions, at least 1")
    return WordSettings(list(words), leading_space, pooling, top_k)


def check_words(words: Sequence[Any]) -> None:
    seen: set[str] = set()
    for word in words:
        if not isinstance(word, str):
            # YAML reads unquoted yes/no/on/off as booleans and digits as numbers.
            raise DissectError(f"words.list entry {word!r} is not text; quote it in the config, e.g. '{word}'")
        if not word:
            raise DissectError("words.list has an empty word; remove it")
        if not word.strip():
            raise DissectError(f"words.list entry {word!r} is only whitespace; remove it or give a word")
        if word in seen:
            raise DissectError(f"words.list has {word!r} twice; list each word once")
        seen.add(word)


def word_variants(words: Sequence[str], leading_space: bool) -> list[tuple[str, str]]:
    """(word, text looked up) pairs: the word as written, then with a leading space if asked."""
    if not words:
        raise DissectError("words.list is empty; list at least one word, e.g. list: [Hello]")
    check_words(words)
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


def run(model_dir: Path, settings: dict[str, Any]) -> pa.Table:
    """The stage on ``model_dir`` (``artifacts/<name>``); returns the table written."""
    from pipeline.tokenizers.load import tokenizer_from_json

    model_dir = Path(model_dir)
    checked = word_settings(settings)
    embeddings = model_dir / "embeddings.parquet"
    matrix = read_matrix(embeddings)  # [vocab, dim]
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DissectError(f"{tokenizer_file} is missing; run the extract stage first (`dvc repro extract@{model_dir.name}`)")
    tokenizer = tokenizer_from_json(tokenizer_file)
    token_texts = pq.read_table(embeddings, columns=["token"]).column("token")
    table = words_table(matrix, tokenizer, token_texts, checked)
    write_table(model_dir / "words.parquet", table, derived_provenance("words", model_dir.name, embeddings, {"words": settings}))
    return table


main = model_stage_main("words", run)


if __name__ == "__main__":
    run_stage(main)
