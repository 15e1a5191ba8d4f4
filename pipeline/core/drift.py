"""Reading two versions of an embedding matrix and lining their tokens up: the shared
engine of the drift stage (one pair) and the series stage (a run of versions).

A side is a vector file: a model's ``embeddings.parquet`` or one of its
``quant/<scheme>.parquet`` (dequantized with the scheme's own decode). Tokens are matched
by ``token_key`` (unique in every file extract writes), or by ``token`` in files without
that column; keys that occur more than once on a side are left out and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.errors import DissectError
from pipeline.core.knn import iter_blocks
from pipeline.core.parquet import read_matrix, read_provenance
from pipeline.quant.layout import dequantize_file

BLOCK_ROWS = 8192
MIN_SHARED_FRACTION = 0.5  # below this the two files do not share a vocabulary


# --------------------------------------------------------------------------------------
# Reading a side: embeddings or a dequantized variant


@dataclass(frozen=True)
class Side:
    path: Path
    tokens: list[str | None]  # [rows] text per row (row = token id)
    keys: list[str | None]  # [rows] token_key per row: what the two sides are aligned on
    matrix: np.ndarray  # [rows, dim] float32
    matrix_sha256: str | None  # of the embeddings it comes from


def read_side(path: Path) -> Side:
    """A vector file as (token texts, float32 matrix); quantized files are dequantized."""
    try:
        provenance = read_provenance(path)
    except FileNotFoundError:
        raise DissectError(f"{path} does not exist; build it with `dvc repro` or fix the path in drift.pairs") from None
    if "dequantize" in provenance:
        embeddings = embeddings_of_variant(path, provenance)
        matrix = dequantize_file(path, provenance["dequantize"])
    else:
        embeddings = path
        matrix = read_matrix(path)
    columns = [name for name in ("token", "token_key") if name in pq.read_schema(embeddings).names]
    table = pq.read_table(embeddings, columns=columns)
    tokens = table.column("token").to_pylist()
    keys = table.column(columns[-1]).to_pylist()
    if len(tokens) != len(matrix):
        raise DissectError(f"{path} has {len(matrix)} rows but its embeddings {embeddings} {len(tokens)}; rebuild both with `dvc repro`")
    sha = provenance.get("matrix_sha256") or (provenance.get("input") or {}).get("matrix_sha256")
    return Side(path=path, tokens=tokens, keys=keys, matrix=matrix, matrix_sha256=sha)


def embeddings_of_variant(path: Path, provenance: dict[str, Any]) -> Path:
    """The embeddings.parquet a quantized file was made from (its token texts are there).

    The provenance holds the path as the quantize stage saw it (relative to the project);
    ``<model>/quant/<scheme>.parquet`` beside ``<model>/embeddings.parquet`` covers a
    folder that was moved.
    """
    recorded = Path((provenance.get("input") or {}).get("path", ""))
    beside = path.parent.parent / "embeddings.parquet"
    for candidate in (recorded, beside):
        if candidate.is_file():
            return candidate
    raise DissectError(f"the embeddings {path} was quantized from ({recorded}) are missing; rebuild them with `dvc repro`")


# --------------------------------------------------------------------------------------
# Alignment


@dataclass(frozen=True)
class Alignment:
    base_rows: np.ndarray  # [n] int64
    other_rows: np.ndarray  # [n] int64
    only_base: int  # base tokens whose key the other side lacks
    only_other: int
    ambiguous: int  # base tokens left out because their key occurs more than once on a side
    ids_differ: int  # aligned tokens whose ids differ


def align_by_key(base: list[str | None], other: list[str | None]) -> Alignment:
    """Rows of the tokens both vocabularies have, matched by key, in base id order.

    A key that occurs more than once on either side cannot say which row is which: its
    rows are left out on both sides and counted as ``ambiguous``.
    """
    counts_base, counts_other = Counter(k for k in base if k is not None), Counter(k for k in other if k is not None)
    both = set(counts_base) & set(counts_other)
    repeated = {key for key in both if counts_base[key] > 1 or counts_other[key] > 1}
    shared = both - repeated
    other_index = {key: row for row, key in enumerate(other) if key in shared}
    pairs = [(row, other_index[key]) for row, key in enumerate(base) if key in shared]
    base_rows = np.asarray([a for a, _ in pairs], np.int64)
    other_rows = np.asarray([b for _, b in pairs], np.int64)
    ambiguous = sum(counts_base[key] for key in repeated)
    base_keys, other_keys = sum(counts_base.values()), sum(counts_other.values())
    if len(pairs) < MIN_SHARED_FRACTION * max(base_keys, other_keys, 1):
        raise DissectError(
            f"the two vocabularies share only {len(pairs)} of {base_keys} / {other_keys} tokens; "
            "drift compares versions with one tokenizer: pick a pair that shares it"
        )
    only_base = sum(count for key, count in counts_base.items() if key not in counts_other)
    only_other = sum(count for key, count in counts_other.items() if key not in counts_base)
    return Alignment(base_rows, other_rows, only_base, only_other, ambiguous, int((base_rows != other_rows).sum()))


def take_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` as a contiguous float32 array, without a copy when ``rows`` is 0..n-1."""
    if len(rows) == len(matrix) and np.array_equal(rows, np.arange(len(matrix))):
        return matrix
    return np.ascontiguousarray(matrix[rows])


# --------------------------------------------------------------------------------------
# Measures (a and b are aligned: row i of each is the same token)


def row_changes(a: np.ndarray, b: np.ndarray, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine, l2 change, l2 change / |a|), each [n] float32; a zero row has cosine 0."""
    n = len(a)
    cosine, l2, relative = (np.empty(n, np.float32) for _ in range(3))
    for start, block in iter_blocks(a, block_rows):
        x = block.astype(np.float64)  # [block, dim]
        y = b[start : start + len(block)].astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dots = np.einsum("ij,ij->i", x, y)
        cos = np.divide(dots, nx * ny, out=np.zeros_like(dots), where=nx * ny > 0)
        diff = np.linalg.norm(x - y, axis=1)
        stop = start + len(block)
        cosine[start:stop] = np.clip(cos, -1.0, 1.0)
        l2[start:stop] = diff
        relative[start:stop] = np.divide(diff, nx, out=np.full_like(diff, np.inf), where=nx > 0)
    return cosine, l2, relative


def jaccard(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """Per row, |A ∩ B| / |A ∪ B| of two neighbour id sets [n, k] (-1 entries ignored)."""
    out = np.empty(len(ids_a), np.float32)
    for start in range(0, len(ids_a), BLOCK_ROWS):
        x, y = ids_a[start : start + BLOCK_ROWS], ids_b[start : start + BLOCK_ROWS]
        # Each row's ids are distinct, so comparing all k x k pairs counts the intersection.
        common = ((x[:, :, None] == y[:, None, :]) & (x[:, :, None] >= 0)).sum(axis=(1, 2))
        union = (x >= 0).sum(axis=1) + (y >= 0).sum(axis=1) - common
        out[start : start + len(x)] = np.divide(common, union, out=np.ones(len(x)), where=union > 0)
    return out
