"""similarity stage: how close the configured words are to each other and to every token.

Reads ``artifacts/<name>/embeddings.parquet`` and ``words.parquet`` and writes beside them:

* ``similarity.parquet``: every ordered pair of word variants (the diagonal included), in
  words.parquet's row order: ``word_a``, ``variant_a``, ``word_b``, ``variant_b``,
  ``cosine float32``. Computed in float64; symmetric, 1 on the diagonal.
* ``neighbors.parquet``: for each word variant its ``similarity.k`` nearest tokens over the
  whole vocabulary: ``word``, ``variant``, ``rank int32`` (1 = nearest), ``token_id int32``,
  ``token string``, ``cosine float32``. The variant's own token(s) are left out (a
  single-token word would otherwise find itself first). One pass over the matrix for all
  words: a block of rows at a time times the stacked word vectors.
* ``knn.parquet``: with ``similarity.scope: all``, the exact k-nearest-neighbour graph of
  the whole vocabulary: ``token_id int32``, ``rank int32``, ``neighbor_id int32``,
  ``cosine float32``, the token itself left out. With ``scope: words`` the file is written
  with no rows (DVC needs every declared output to exist); its provenance says which.

Cosine conventions (:mod:`pipeline.knn`): rows are compared by direction, so a row of norm
0 (padding) has cosine 0 with everything, itself included; equal cosines rank by token id,
lowest first; a matrix or word vector holding NaN or Inf stops the stage with an error
rather than writing NaN. Neighbour search is exact, not an approximate index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import model_stage_main, run_stage
from pipeline.errors import DissectError
from pipeline.hashing import file_sha256
from pipeline.knn import Neighbors, check_search_params, knn_graph, nearest_keys, unit_rows
from pipeline.parquet import derived_provenance, read_matrix, vectors_to_numpy, write_table
from pipeline.progress import progress_bar

STAGE = "similarity"
SCOPES = ("words", "all")
KNN_ROW_GROUP = 65536  # a knn.parquet row is 16 bytes; 4096-row groups would be tiny


@dataclass(frozen=True)
class SimilaritySettings:
    k: int
    scope: str
    block_rows: int


def similarity_settings(settings: dict[str, Any]) -> SimilaritySettings:
    """The ``similarity`` params, checked; each mistake is a DissectError naming the fix."""
    k, block_rows = check_search_params(settings.get("k", 10), settings.get("block_rows", 4096))
    scope = settings.get("scope", "words")
    if scope not in SCOPES:
        raise DissectError(f"similarity.scope is {scope!r}; set it to one of {', '.join(SCOPES)}")
    return SimilaritySettings(k=k, scope=scope, block_rows=block_rows)


@dataclass(frozen=True)
class WordVectors:
    """The rows of words.parquet this stage uses."""

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


def word_cosines(vectors: np.ndarray) -> np.ndarray:
    """Cosines of every pair of rows of ``vectors`` [w, dim], float64 [w, w].

    Exactly symmetric, summed in a fixed order (no BLAS, so the same bits on every kernel);
    the diagonal is 1, or 0 for a zero vector, which has no direction.
    """
    from pipeline.determinism import cosine_table

    wide = np.asarray(vectors, dtype=np.float64)
    if not np.isfinite(wide).all():
        raise DissectError("a word vector holds NaN or Inf; rebuild words.parquet from intact embeddings")
    return cosine_table(wide)


def similarity_table(words: WordVectors) -> pa.Table:
    """Every ordered pair (a, b) of word variants, a-major, with its cosine."""
    n = len(words)
    a, b = np.divmod(np.arange(n * n), n)  # [n * n] each
    return pa.table(
        {
            "word_a": words.word.take(a),
            "variant_a": words.variant.take(a),
            "word_b": words.word.take(b),
            "variant_b": words.variant.take(b),
            "cosine": pa.array(word_cosines(words.vectors).reshape(-1).astype(np.float32)),
        }
    )


def word_neighbors(words: WordVectors, unit: np.ndarray, k: int, block_rows: int) -> Neighbors:
    """The k nearest tokens of each word variant, its own tokens excluded; ``unit`` [vocab, dim] unit rows."""
    queries = unit_rows(words.vectors)  # [w, dim]
    with progress_bar(total=unit.shape[0], desc="word neighbours", unit="rows") as bar:
        return nearest_keys(queries, unit, k, block_rows, exclude=words.token_ids, progress=bar.update)


def neighbors_table(words: WordVectors, neighbors: Neighbors, tokens: pa.Array) -> pa.Table:
    """One row per (word variant, rank); ``tokens`` [vocab] is the readable piece of each id."""
    query, slot = np.nonzero(neighbors.valid())  # row-major: word order, then rank
    token_ids = neighbors.ids[query, slot]
    return pa.table(
        {
            "word": words.word.take(query),
            "variant": words.variant.take(query),
            "rank": pa.array((slot + 1).astype(np.int32)),
            "token_id": pa.array(token_ids.astype(np.int32)),
            "token": tokens.take(token_ids),
            "cosine": pa.array(neighbors.cosines[query, slot]),
        }
    )


def knn_table(neighbors: Neighbors | None) -> pa.Table:
    """The kNN graph as (token_id, rank, neighbor_id, cosine) rows; no rows when not computed."""
    if neighbors is None:
        query = slot = np.empty(0, dtype=np.int64)
        ids, cosines = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    else:
        query, slot = np.nonzero(neighbors.valid())
        ids, cosines = neighbors.ids[query, slot], neighbors.cosines[query, slot]
    return pa.table(
        {
            "token_id": pa.array(query.astype(np.int32)),
            "rank": pa.array((slot + 1).astype(np.int32)),
            "neighbor_id": pa.array(ids.astype(np.int32)),
            "cosine": pa.array(cosines.astype(np.float32)),
        }
    )


def vocabulary_graph(unit: np.ndarray, k: int, block_rows: int) -> Neighbors:
    tiles = -(-unit.shape[0] // block_rows)
    with progress_bar(total=tiles * (tiles + 1) // 2, desc="kNN graph", unit="tiles") as bar:
        return knn_graph(unit, k, block_rows, progress=bar.update)



def read_words(path: Path, dim: int, rows: int, model: str) -> WordVectors:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DissectError(f"{path} does not exist; run the words stage first (`dvc repro words@{model}`)") from None
    return word_vectors_from_table(table, dim, rows, str(path))


def run(model_dir: Path, settings: dict[str, Any]) -> None:
    """The stage on ``model_dir`` (``artifacts/<name>``)."""
    model_dir = Path(model_dir)
    checked = similarity_settings(settings)
    embeddings = model_dir / "embeddings.parquet"
    words_path = model_dir / "words.parquet"
    matrix = read_matrix(embeddings)  # [vocab, dim]
    words = read_words(words_path, matrix.shape[1], matrix.shape[0], model_dir.name)
    tokens = pq.read_table(embeddings, columns=["token"]).column("token").combine_chunks()
    # In place: the raw matrix is not needed again, and this saves a second copy of it.
    unit = unit_rows(matrix, inplace=True, what=str(embeddings))  # [vocab, dim]
    del matrix

    similarity = similarity_table(words)
    neighbors = neighbors_table(words, word_neighbors(words, unit, checked.k, checked.block_rows), tokens)
    graph = vocabulary_graph(unit, checked.k, checked.block_rows) if checked.scope == "all" else None

    provenance = derived_provenance(STAGE, model_dir.name, embeddings, {"similarity": asdict(checked)})
    provenance["words"] = {"path": str(words_path), "sha256": file_sha256(words_path)}
    write_table(model_dir / "similarity.parquet", similarity, provenance)
    write_table(model_dir / "neighbors.parquet", neighbors, provenance)
    write_table(model_dir / "knn.parquet", knn_table(graph), provenance, row_group_size=KNN_ROW_GROUP)


main = model_stage_main("similarity", run)


if __name__ == "__main__":
    run_stage(main)
