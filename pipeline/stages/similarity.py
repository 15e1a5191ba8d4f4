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

Cosine conventions (:mod:`pipeline.core.knn`): rows are compared by direction, so a row of norm
0 (padding) has cosine 0 with everything, itself included; equal cosines rank by token id,
lowest first; a matrix or word vector holding NaN or Inf stops the stage with an error
rather than writing NaN. Neighbour search is exact, not an approximate index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.hashing import file_sha256
from pipeline.core.knn import MAX_BLOCK_ROWS, MAX_K, Neighbors, knn_graph, nearest_keys, unit_rows
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, from_section, one_of, setting, whole_number
from pipeline.core.io import output_set
from pipeline.core.parquet import derived_provenance, read_matrix, write_table
from pipeline.core.progress import progress_bar
from pipeline.core.words import WordVectors, read_words

STAGE = "similarity"
SCOPES = ("words", "all")
KNN_ROW_GROUP = 65536  # a knn.parquet row is 16 bytes; 4096-row groups would be tiny


@dataclass(frozen=True)
class SimilaritySettings:
    # Nearest tokens listed per word variant.
    k: int = setting(10, whole_number(1, MAX_K))
    # words: neighbours of the configured words only; all: the exact kNN graph of every token.
    scope: str = setting("words", one_of(*SCOPES))
    # Rows per block of the blocked similarity computation (bounds memory for scope: all).
    block_rows: int = setting(4096, whole_number(1, MAX_BLOCK_ROWS))


def word_cosines(vectors: np.ndarray) -> np.ndarray:
    """Cosines of every pair of rows of ``vectors`` [w, dim], float64 [w, w].

    Exactly symmetric, summed in a fixed order (no BLAS, so the same bits on every kernel);
    the diagonal is 1, or 0 for a zero vector, which has no direction.
    """
    from pipeline.core.determinism import cosine_table

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



def run(paths: ModelPaths, settings: SimilaritySettings) -> None:
    """The stage on one model."""
    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    words = read_words(paths.words, matrix.shape[1], matrix.shape[0], paths.name)
    tokens = pq.read_table(paths.embeddings, columns=["token"]).column("token").combine_chunks()
    # In place: the raw matrix is not needed again, and this saves a second copy of it.
    unit = unit_rows(matrix, inplace=True, what=str(paths.embeddings))  # [vocab, dim]
    del matrix

    similarity = similarity_table(words)
    neighbors = neighbors_table(words, word_neighbors(words, unit, settings.k, settings.block_rows), tokens)
    graph = vocabulary_graph(unit, settings.k, settings.block_rows) if settings.scope == "all" else None

    provenance = derived_provenance(STAGE, paths.name, paths.embeddings, {"similarity": as_params(settings)})
    provenance["words"] = {"path": str(paths.words), "sha256": file_sha256(paths.words)}
    with output_set():
        write_table(paths.similarity, similarity, provenance)
        write_table(paths.neighbors, neighbors, provenance)
        write_table(paths.knn, knn_table(graph), provenance, row_group_size=KNN_ROW_GROUP)


main = Stage(STAGE, "MODEL", model_paths, from_section(SimilaritySettings, STAGE), run).main


if __name__ == "__main__":
    run_stage(main)
