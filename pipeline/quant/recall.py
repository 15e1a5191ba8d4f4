"""What quantization does to nearest neighbours: the queries, and the original matrix's answer.

The queries are a seeded sample of tokens plus the words of words.parquet (pooled as the
words stage pooled them). :func:`reference` finds their exact neighbours in the original
matrix once; every scheme's neighbours are then compared with it (recall@k), and on large
matrices the reference keeps each query's best candidate rows so fine schemes only need
to re-score those (the pruned recall of the quantize stage's ``SchemeRun``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.core.knn import TopK, excluding_own, unit_rows
from pipeline.core.parallel import row_chunks
from pipeline.lookup import pool
from pipeline.quant.layout import ROWS_PER_CHUNK
from pipeline.quant.measure import OriginalSums, similarity_table

FLOAT_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "F64": 64, "F32": 32, "F16": 16, "BF16": 16}


@dataclass(frozen=True)
class WordQuery:
    text: str  # as looked up: "Hello" or " Hello"
    token_ids: tuple[int, ...]


def pool_rows(rows: np.ndarray, pooling: str) -> np.ndarray:
    """One vector [dim] from a word's token rows [n, dim], pooled exactly as the words stage pools."""
    return pool(rows[None], np.ones((1, len(rows)), dtype=bool), pooling)[0]


@dataclass(frozen=True)
class Queries:
    """The rows whose neighbours are compared: sampled tokens, then the words."""

    token_rows: np.ndarray  # [t] int64, sorted
    words: list[WordQuery]
    pooling: str = "mean"  # as the words stage pools a word that splits: mean | first | last

    def vectors(self, rows_of: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(token vectors [t, dim], word vectors [w, dim]) from ``rows_of(row indices) -> rows``."""
        tokens = rows_of(self.token_rows)
        words = [pool_rows(rows_of(np.array(word.token_ids, dtype=np.int64)), self.pooling) for word in self.words]
        dim = tokens.shape[1]
        return tokens, np.array(words, dtype=np.float32).reshape(len(words), dim)

    @property
    def self_rows(self) -> np.ndarray:
        """[t + w]: the row each query is, never its own neighbour; -1 for words."""
        return np.concatenate([self.token_rows, np.full(len(self.words), -1, dtype=np.int64)])


@dataclass(frozen=True)
class Reference:
    """What the original matrix gives, computed once and compared with every scheme."""

    neighbours: np.ndarray  # [t + w, k] row ids
    word_similarity: np.ndarray  # [w, w]
    source_bits: float | None
    # For the pruned recall (see SchemeRun): each query's unit vector and k-th best cosine,
    # and its CANDIDATES best rows by a score within candidate_slack + candidate_out |score|
    # of the original cosine (-inf for unfilled slots, +inf for a query without a list):
    # every row left out has a cosine of at most the lowest score plus that bound.
    query_units: np.ndarray | None = None  # [t + w, dim] float32
    kth_cosine: np.ndarray | None = None  # [t + w] float64
    candidate_ids: np.ndarray | None = None  # [t + w, CANDIDATES] int64
    candidate_scores: np.ndarray | None = None  # [t + w, CANDIDATES] float32
    candidate_slack: np.ndarray | None = None  # [t + w] float64
    candidate_out: float = 0.0

    def reach(self, scores: np.ndarray, slack: np.ndarray) -> np.ndarray:
        """The highest original cosine a candidate score can stand for (``slack`` broadcast to it)."""
        with np.errstate(invalid="ignore"):
            bound = scores + self.candidate_out * np.abs(scores) + slack
        return np.where(np.isneginf(scores), -np.inf, bound)


def sample_token_rows(norms_inverse: np.ndarray, size: int, seed: int) -> np.ndarray:
    """[min(size, nonzero rows)] sorted row indices, drawn without replacement.

    Zero rows (padding, unused tokens) are left out: every row is equally near them, so they
    have no neighbours to recall.
    """
    candidates = np.flatnonzero(norms_inverse > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(size, len(candidates)), replace=False)).astype(np.int64)


# The pruned recall keeps each query's best CANDIDATES rows of the original matrix; a
# scheme whose error could move a row farther than that list reaches is measured in full.
CANDIDATES = 512
PRUNE_MIN_ROWS = 8 * ROWS_PER_CHUNK  # below this the full pass is cheap anyway
SCORE_SLACK = 1e-3  # float32 rounding of the cosines, with a wide margin


def reference(
    matrix: np.ndarray, queries: Queries, k: int, source_dtype: str | None, sums: list[OriginalSums] | None = None
) -> Reference:
    """The neighbours of the original matrix (exact, through the engine's bfloat16 screen), and
    the candidate lists that prune fine schemes when the matrix is large; ``sums`` as
    :attr:`SchemeRun.sums`."""
    tokens, words = queries.vectors(lambda rows: matrix[rows])
    units = unit_rows(np.concatenate([tokens, words]))  # [t + w, dim]
    similarity, bits = similarity_table(words), source_bits(source_dtype)
    keep = min(CANDIDATES, matrix.shape[0])
    prune = matrix.shape[0] >= PRUNE_MIN_ROWS and keep > k
    top = TopK(
        units, k, excluding_own(queries.self_rows), "neighbours (original)", matrix.shape[0],
        screen="bfloat16", keep=keep if prune else 0,
    )
    top.add_chunks(
        (start, matrix[start:stop], sums[index].norms if sums is not None else None)
        for index, (start, stop) in enumerate(row_chunks(matrix.shape[0], ROWS_PER_CHUNK))
    )
    found = top.finish()
    if not top.bound_held:
        return reference_float32(matrix, units, queries.self_rows, k, keep if prune else k, similarity, bits)
    if not prune:
        return Reference(neighbours=found.ids, word_similarity=similarity, source_bits=bits)
    return Reference(
        neighbours=found.ids,
        word_similarity=similarity,
        source_bits=bits,
        query_units=units,
        kth_cosine=top.scores[:, -1],
        candidate_ids=top.candidate_ids,
        candidate_scores=top.candidate_scores,
        candidate_slack=top.candidate_slack,
        candidate_out=top.precision.out,
    )


def reference_float32(
    matrix: np.ndarray, units: np.ndarray, self_rows: np.ndarray, k: int, keep: int, similarity: np.ndarray, bits: float | None
) -> Reference:
    """:func:`reference` by the engine's float32 screen, for when the bfloat16 screen broke its bound."""
    top = TopK(units, keep, excluding_own(self_rows), "neighbours (original, float32)", matrix.shape[0])
    for start, stop in row_chunks(matrix.shape[0], ROWS_PER_CHUNK):
        top.add(start, matrix[start:stop])
    found = top.finish()  # [q, keep], best first: the k best are its first k
    neighbours = found.ids[:, :k]
    if keep == k:
        return Reference(neighbours=neighbours, word_similarity=similarity, source_bits=bits)
    return Reference(
        neighbours=neighbours,
        word_similarity=similarity,
        source_bits=bits,
        query_units=units,
        kth_cosine=found.cosines[:, k - 1].astype(np.float64),
        candidate_ids=found.ids,
        candidate_scores=found.cosines,
        candidate_slack=np.zeros(len(units)),  # float32 cosines: SCORE_SLACK in the windows covers them
    )


def source_bits(dtype: str | None) -> float | None:
    """Bits per weight of the source dtype (torch or GGML names); None when unknown."""
    if dtype in FLOAT_BITS:
        return float(FLOAT_BITS[dtype])
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype]]
    except KeyError:
        return None
    return type_size * 8 / block
