"""words.parquet as the later stages read it: each word variant's token ids and pooled vector."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import DissectError
from pipeline.core.parquet import vectors_to_numpy


@dataclass(frozen=True)
class WordVectors:
    """The rows of words.parquet that the similarity, pca and quantize stages use."""

    word: pa.Array  # [w] string
    variant: pa.Array  # [w] string
    token_ids: list[np.ndarray]  # [w] of int64 [n_tokens]
    vectors: np.ndarray  # [w, dim] float32

    def __len__(self) -> int:
        return len(self.vectors)


def word_vectors_from_table(table: pa.Table, dim: int, rows: int, where: str = "words.parquet") -> WordVectors:
    """Check ``table`` (words.parquet) against a [rows, dim] matrix and take what is needed."""
    fix = "rebuild it with the words stage (`dvc repro words@MODEL`)"
    missing = [name for name in ("word", "variant", "token_ids", "vector") if name not in table.column_names]
    if missing:
        raise DissectError(f"{where} has no column {', '.join(missing)}; {fix}")
    if table.num_rows == 0:
        raise DissectError(f"{where} has no words; list some under words.list and {fix}")
    column = table.column("vector")
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != dim:
        raise DissectError(f"{where} holds vectors of type {column.type}, not {dim}-dim like the matrix; {fix}")
    if column.null_count:
        raise DissectError(f"{where} has {column.null_count} words without a vector; {fix}")
    vectors = vectors_to_numpy(column)  # [w, dim]
    token_ids = [np.asarray(ids if ids is not None else [], dtype=np.int64) for ids in table.column("token_ids").to_pylist()]
    for ids in token_ids:
        outside = ids[(ids < 0) | (ids >= rows)]
        if outside.size:
            raise DissectError(f"{where} names token id {outside[0]}, outside the matrix's {rows} rows; {fix}")
    return WordVectors(
        word=table.column("word").combine_chunks(),
        variant=table.column("variant").combine_chunks(),
        token_ids=token_ids,
        vectors=vectors,
    )


def read_words(path: Path, dim: int, rows: int, model: str) -> WordVectors:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DissectError(f"{path} does not exist; run the words stage first (`dvc repro words@{model}`)") from None
    return word_vectors_from_table(table, dim, rows, str(path))
