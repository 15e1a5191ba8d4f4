"""stats stage: what the embedding matrix of one model looks like, as numbers.

Reads ``artifacts/<name>/embeddings.parquet`` and writes beside it:

* ``stats.json`` (DVC metrics): the whole matrix (``values``: count, mean, std, min, max,
  max_abs, nan_count, inf_count), the L2 norms of its rows (``row_norm``: mean, std, min,
  max, p01, p50, p99), anisotropy (``anisotropy``: the norm of the mean row and the mean
  cosine of the rows to it) and row counts (``rows``: total, nonfinite, zero, duplicate,
  duplicate_groups);
* ``dims.parquet``: one row per dimension: ``dim int32``, ``mean``, ``std`` (float64),
  ``min``, ``max`` (float32, values of the matrix);
* ``tokens.parquet``: one row per token: ``token_id int32``, ``token string``,
  ``l2_norm float64``, ``max_abs float32``, ``cos_to_mean float64`` and ``duplicate_of
  int32``: for a row identical to a row of lower id, the lowest id of its group of
  identical rows (every copy points to the same first row, as pandas' ``duplicated`` keeps
  the first); null for that first row and for a unique row;
* ``norm_hist.json`` (DVC plot data): the histogram of row norms as a list of
  ``{"norm": bin centre, "bin_start", "bin_end", "count"}``.

Conventions, so every number means one thing:

* Means and standard deviations are accumulated in float64, chunk by chunk, in two passes
  (sums, then squared deviations from the exact mean), so they match numpy's float64
  result on the whole matrix; stds are population stds (ddof = 0), as numpy's.
* NaN and ±Inf are counted (``values.nan_count``, ``values.inf_count``). The value
  statistics (global and per dimension) cover the finite values only. The row statistics
  (norms, the mean row, cosines, histogram) cover the rows whose values are all finite;
  a row holding NaN or Inf gets null ``l2_norm``, ``max_abs`` and ``cos_to_mean`` in
  tokens.parquet and is counted in ``rows.nonfinite``.
* A cosine needs two non-zero vectors: rows of norm 0 (often the padding rows) get a null
  ``cos_to_mean`` and are left out of ``anisotropy.mean_cos_to_mean``; if the mean row
  itself is 0, that mean is null.
* JSON has no NaN: a statistic over no values at all (a matrix with no finite value, a
  dimension with none) is written as null, for exactly that reason and no other.
* ``rows.duplicate`` counts the rows that have a bit-identical row elsewhere (all members
  of every group, so three equal rows count 3; -0.0 and 0.0 count as equal), and
  ``rows.duplicate_groups`` the groups they form: three equal rows are one group, whose
  first row has a null ``duplicate_of`` and the two others point to it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import run_stage
from pipeline.core.io import output_set, write_json_atomic
from pipeline.core.params import model_paths
from pipeline.core.parquet import derived_provenance, read_vectors, write_table
from pipeline.core.paths import ModelPaths
from pipeline.core.progress import progress_bar
from pipeline.core.row_hash import row_hashes
from pipeline.core.settings import as_params, from_section, setting, whole_number

ROWS_PER_CHUNK = 8192  # 8192 x 2048 float64 = 128 MiB per temporary, whatever the vocabulary size
CHUNK_ELEMENTS = 8192 * 2048  # wider matrices get fewer rows per chunk, so temporaries stay that size
PERCENTILES = (1, 50, 99)


@dataclass(frozen=True)
class ValueMoments:
    """Per-dimension sums over the finite values, from the first pass."""

    count: np.ndarray  # [dim] int64: finite values per dimension
    total: np.ndarray  # [dim] float64
    minimum: np.ndarray  # [dim] float32; +inf where a dimension has no finite value
    maximum: np.ndarray  # [dim] float32; -inf likewise
    nan_count: int
    inf_count: int

    @property
    def dim_mean(self) -> np.ndarray:  # [dim] float64; 0 where undefined, so deviations stay finite
        return np.divide(self.total, self.count, out=np.zeros_like(self.total), where=self.count > 0)


@dataclass(frozen=True)
class RowMeasures:
    """Per-row measures from the first pass."""

    finite: np.ndarray  # [vocab] bool: every value of the row is finite
    l2_norm: np.ndarray  # [vocab] float64
    max_abs: np.ndarray  # [vocab] float32
    finite_row_sum: np.ndarray  # [dim] float64: sum of the finite rows


@dataclass(frozen=True)
class MatrixStats:
    """Everything the stage writes, computed from the matrix alone."""

    summary: dict[str, Any]  # stats.json
    dims: pa.Table  # dims.parquet
    l2_norm: np.ndarray  # [vocab] float64, NaN for non-finite rows
    max_abs: np.ndarray  # [vocab] float32, NaN for non-finite rows
    cos_to_mean: np.ndarray  # [vocab] float64, NaN where undefined
    duplicate_of: np.ndarray  # [vocab] int64: lowest id of the row's group of equal rows; -1 for it and for unique rows
    histogram: list[dict[str, float | int]]  # norm_hist.json


def row_chunks(rows: int, rows_per_chunk: int) -> Iterator[slice]:
    for start in range(0, rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, rows))


def _finite_part(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite mask [rows, dim], float64 copy [rows, dim] with the non-finite values set to 0)."""
    finite = np.isfinite(block)
    wide = block.astype(np.float64)
    if not finite.all():
        wide[~finite] = 0.0
    return finite, wide


def _chunks_in_parallel(function, matrix: np.ndarray, rows_per_chunk: int) -> Iterator[tuple[slice, Any]]:
    """``(chunk, function(matrix[chunk]))`` for every row chunk, in order, computed a thread per core.

    numpy releases the GIL in these kernels, so the cores share the chunks; the caller folds
    the per-chunk results in chunk order, so every sum is grouped exactly as in one thread.
    At most one chunk per core is in flight, which bounds the temporaries (about 200 MiB a
    chunk at the default size).
    """
    from pipeline.core.memory import worker_count

    chunks = list(row_chunks(matrix.shape[0], rows_per_chunk))
    workers = worker_count()
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            yield chunk, function(matrix[chunk])
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(function, matrix[chunk])))
            if len(pending) >= workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _chunk_rows(rows_per_chunk: int, dim: int) -> int:
    """Rows per chunk, fewer for wide matrices so a float64 temporary stays near 128 MiB."""
    return max(1, min(rows_per_chunk, CHUNK_ELEMENTS // max(dim, 1)))


def _first_pass_chunk(block: np.ndarray) -> dict[str, Any]:
    finite, wide = _finite_part(block)
    out: dict[str, Any] = {"sum": wide.sum(axis=0)}  # [dim]
    # Norms of rows with a non-finite value are discarded later, so zeros there do no harm.
    out["l2"] = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    out["max_abs"] = np.abs(block).max(axis=1)
    row_ok = finite.all(axis=1)
    out["row_ok"] = row_ok
    if row_ok.all():
        out["count"] = block.shape[0]
        out["min"], out["max"] = block.min(axis=0), block.max(axis=0)
        out["finite_row_sum"] = None  # the chunk sum itself
        out["nan"] = out["inf"] = 0
    else:
        out["count"] = finite.sum(axis=0, dtype=np.int64)
        out["min"] = np.where(finite, block, np.float32(np.inf)).min(axis=0)
        out["max"] = np.where(finite, block, np.float32(-np.inf)).max(axis=0)
        out["finite_row_sum"] = wide[row_ok].sum(axis=0)
        out["nan"] = int(np.isnan(block).sum())
        out["inf"] = int(np.isinf(block).sum())
    return out


def first_pass(matrix: np.ndarray, rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[ValueMoments, RowMeasures]:
    """Sums, extremes and non-finite counts per dimension; norms and max |x| per row."""
    rows, dim = matrix.shape
    count = np.zeros(dim, np.int64)
    total = np.zeros(dim, np.float64)
    minimum = np.full(dim, np.inf, np.float32)
    maximum = np.full(dim, -np.inf, np.float32)
    finite_rows = np.zeros(rows, bool)
    l2_norm = np.zeros(rows, np.float64)
    max_abs = np.zeros(rows, np.float32)
    finite_row_sum = np.zeros(dim, np.float64)
    nan_count = inf_count = 0
    with progress_bar(total=rows, desc="stats: sums and norms", unit="rows") as bar:
        for chunk, part in _chunks_in_parallel(_first_pass_chunk, matrix, _chunk_rows(rows_per_chunk, dim)):
            total += part["sum"]
            l2_norm[chunk] = part["l2"]
            max_abs[chunk] = part["max_abs"]
            finite_rows[chunk] = part["row_ok"]
            count += part["count"]
            np.minimum(minimum, part["min"], out=minimum)
            np.maximum(maximum, part["max"], out=maximum)
            finite_row_sum += part["sum"] if part["finite_row_sum"] is None else part["finite_row_sum"]
            nan_count += part["nan"]
            inf_count += part["inf"]
            bar.update(chunk.stop - chunk.start)
    values = ValueMoments(count, total, minimum, maximum, nan_count, inf_count)
    return values, RowMeasures(finite_rows, l2_norm, max_abs, finite_row_sum)


def second_pass(
    matrix: np.ndarray, dim_mean: np.ndarray, mean_row: np.ndarray, rows_per_chunk: int = ROWS_PER_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(per-dim sum of squared deviations from ``dim_mean`` over finite values [dim],
    dot product of each row with ``mean_row`` [vocab]), both float64."""
    rows, dim = matrix.shape
    squares = np.zeros(dim, np.float64)
    dots = np.zeros(rows, np.float64)

    def measure(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite, wide = _finite_part(block)  # [rows_per_chunk, dim] float64
        chunk_dots = np.einsum("ij,j->i", wide, mean_row)  # no BLAS: the same bits on any kernel; non-finite rows are discarded later
        wide -= dim_mean
        if not finite.all():
            wide[~finite] = 0.0
        return chunk_dots, np.einsum("ij,ij->j", wide, wide)

    with progress_bar(total=rows, desc="stats: deviations and cosines", unit="rows") as bar:
        for chunk, (chunk_dots, chunk_squares) in _chunks_in_parallel(measure, matrix, _chunk_rows(rows_per_chunk, dim)):
            dots[chunk] = chunk_dots
            squares += chunk_squares
            bar.update(chunk.stop - chunk.start)
    return squares, dots


def duplicate_of(matrix: np.ndarray, rows_per_chunk: int = ROWS_PER_CHUNK) -> np.ndarray:
    """For each row, the lowest row index holding the identical row when that is another row,
    else -1 (the group's first row, a unique row) [vocab] int64.

    Rows are compared by their bits after folding -0.0 into 0.0 (so NaN rows with the same
    bits match too). Each row gets a 64-bit hash of those bits, computed chunk by chunk on
    every core, and only rows that share a hash are compared: each with the lowest row of
    its hash, all at once. A row that differs from it (two contents with one hash) is looked
    up by a cryptographic digest of its bits and confirmed on them, so the answer is exact,
    and a file built to make the first hash collide costs no more than digesting every row.
    """
    rows = matrix.shape[0]
    rows_per_chunk = _chunk_rows(rows_per_chunk, matrix.shape[1])
    weights = _hash_weights(matrix.shape[1])
    hashes = np.empty(rows, np.uint64)  # [vocab]
    with progress_bar(total=rows, desc="stats: duplicate rows", unit="rows") as bar:
        for chunk, chunk_hashes in _chunks_in_parallel(lambda block: row_hashes(block, weights), matrix, rows_per_chunk):
            hashes[chunk] = chunk_hashes  # the product wraps modulo 2**64, the same on every machine
            bar.update(chunk.stop - chunk.start)
    shared, lowest = _rows_sharing_a_hash(hashes)  # [m] each
    same = _equal_rows(matrix, shared, lowest, rows_per_chunk)  # [m]
    first = np.arange(rows, dtype=np.int64)  # [vocab]: lowest row with the same content
    first[shared[same]] = lowest[same]
    _match_by_digest(matrix, np.sort(shared[~same]), first)
    return np.where(first == np.arange(rows), -1, first)


def _row_bits(rows: np.ndarray) -> np.ndarray:
    """[n, dim] uint32: the float32 bits of ``rows`` [n, dim] (or of one row), -0.0 as 0.0."""
    with np.errstate(invalid="ignore"):  # a signaling NaN comes out quiet, as in the row hash, not as a warning
        folded = np.ascontiguousarray(rows, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    return folded.view(np.uint32)


def _hash_weights(dim: int) -> np.ndarray:
    """[dim] odd uint64 weights of the row hash sum_j bits_j * w_j (mod 2**64, :mod:`pipeline.core.row_hash`), fixed by a seed."""
    return np.random.default_rng(0x5EED).integers(0, 2**63, size=dim, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _rows_sharing_a_hash(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([m] the rows whose hash another row has, [m] the lowest row with each one's hash)."""
    order = np.argsort(hashes, kind="stable")  # [vocab]: by hash, then row
    ordered = hashes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # [hashes]
    sizes = np.diff(np.r_[starts, len(ordered)])
    lowest = np.repeat(order[starts], sizes)  # [vocab]
    shared = np.repeat(sizes > 1, sizes)
    return order[shared], lowest[shared]


def _equal_rows(matrix: np.ndarray, rows: np.ndarray, others: np.ndarray, rows_per_chunk: int) -> np.ndarray:
    """[m] bool: whether row ``rows[i]`` has the bits of row ``others[i]``."""
    equal = np.empty(len(rows), dtype=bool)
    for start in range(0, len(rows), rows_per_chunk):
        stop = start + rows_per_chunk
        equal[start:stop] = (_row_bits(matrix[rows[start:stop]]) == _row_bits(matrix[others[start:stop]])).all(axis=1)
    return equal


def _match_by_digest(matrix: np.ndarray, rows: np.ndarray, first: np.ndarray) -> None:
    """Set ``first`` for ``rows`` (ascending), which differ from the lowest row of their hash:
    the lowest of them with the same bits (none of the other rows can have them). Rows with
    the same bits have the same digest, so the digest alone keys them; a digest shared by
    different bits is told apart by comparing the bits."""
    seen: dict[bytes, list[int]] = {}
    for index in rows.tolist():
        bits = _row_bits(matrix[index])
        candidates = seen.setdefault(hashlib.blake2b(bits, digest_size=16).digest(), [])
        match = next((c for c in candidates if np.array_equal(_row_bits(matrix[c]), bits)), None)
        if match is None:
            candidates.append(index)
        else:
            first[index] = match


def norm_histogram(norms: np.ndarray, bins: int) -> list[dict[str, float | int]]:
    """Histogram records of ``norms`` (finite values) that DVC plots render with x=norm, y=count."""
    if norms.size == 0:
        return []
    counts, edges = np.histogram(norms, bins=bins)
    return [
        {"norm": float((low + high) / 2), "bin_start": float(low), "bin_end": float(high), "count": int(n)}
        for low, high, n in zip(edges[:-1], edges[1:], counts)
    ]


def _number(value: float) -> float | None:
    """A JSON-safe float: None (null) for a statistic over no values."""
    value = float(value)
    return value if np.isfinite(value) else None


def _value_summary(values: ValueMoments, squares: np.ndarray) -> dict[str, Any]:
    n = int(values.count.sum())
    mean = float(values.total.sum() / n) if n else float("nan")
    # Between-dimension term: exact regrouping of the squared deviations from the global mean.
    spread = float((values.count * (values.dim_mean - mean) ** 2).sum()) if n else float("nan")
    std = float(np.sqrt((squares.sum() + spread) / n)) if n else float("nan")
    low = float(values.minimum.min()) if values.minimum.size else float("nan")
    high = float(values.maximum.max()) if values.maximum.size else float("nan")
    return {
        "count": n,
        "mean": _number(mean),
        "std": _number(std),
        "min": _number(low),
        "max": _number(high),
        "max_abs": _number(max(abs(low), abs(high))),
        "nan_count": values.nan_count,
        "inf_count": values.inf_count,
    }


def _norm_summary(norms: np.ndarray) -> dict[str, float | None]:
    if norms.size == 0:
        return {key: None for key in ("mean", "std", "min", "max", *(f"p{p:02d}" for p in PERCENTILES))}
    percentiles = np.percentile(norms, PERCENTILES)
    summary = {"mean": float(norms.mean()), "std": float(norms.std()), "min": float(norms.min()), "max": float(norms.max())}
    summary.update({f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, percentiles)})
    return summary


def dims_table(values: ValueMoments, squares: np.ndarray) -> pa.Table:
    defined = values.count > 0  # [dim]
    std = np.sqrt(np.divide(squares, values.count, out=np.zeros_like(squares), where=defined))
    return pa.table(
        {
            "dim": pa.array(np.arange(values.count.size, dtype=np.int32)),
            "mean": pa.array(values.dim_mean, mask=~defined),
            "std": pa.array(std, mask=~defined),
            "min": pa.array(values.minimum, mask=~defined),
            "max": pa.array(values.maximum, mask=~defined),
        }
    )


def matrix_stats(matrix: np.ndarray, histogram_bins: int = 50, rows_per_chunk: int = ROWS_PER_CHUNK) -> MatrixStats:
    """All statistics of ``matrix`` [vocab, dim] float32, in two passes plus one for duplicates."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a [vocab, dim] matrix, got shape {matrix.shape}")
    values, rows = first_pass(matrix, rows_per_chunk)
    n_finite_rows = int(rows.finite.sum())
    mean_row = rows.finite_row_sum / max(n_finite_rows, 1)  # [dim] float64
    squares, dots = second_pass(matrix, values.dim_mean, mean_row, rows_per_chunk)

    l2_norm = np.where(rows.finite, rows.l2_norm, np.nan)  # [vocab]
    max_abs = np.where(rows.finite, rows.max_abs, np.float32(np.nan))  # [vocab]
    mean_vector_norm = float(np.sqrt(np.einsum("i,i->", mean_row, mean_row))) if n_finite_rows else float("nan")
    cos = cosines(dots, l2_norm, mean_vector_norm)
    finite_norms = l2_norm[rows.finite]
    defined_cos = cos[np.isfinite(cos)]
    duplicates = duplicate_of(matrix, rows_per_chunk)
    groups = int(np.unique(duplicates[duplicates >= 0]).size)  # each group's first row, which the copies name

    summary = {
        "vocab_size": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "values": _value_summary(values, squares),
        "row_norm": _norm_summary(finite_norms),
        "anisotropy": {
            "mean_vector_norm": _number(mean_vector_norm),
            "mean_cos_to_mean": _number(defined_cos.mean()) if defined_cos.size else None,
        },
        "rows": {
            "total": int(matrix.shape[0]),
            "nonfinite": int(matrix.shape[0] - n_finite_rows),
            "zero": int((rows.finite & (rows.l2_norm == 0)).sum()),
            "duplicate": int((duplicates >= 0).sum()) + groups,
            "duplicate_groups": groups,
        },
    }
    return MatrixStats(
        summary=summary,
        dims=dims_table(values, squares),
        l2_norm=l2_norm,
        max_abs=max_abs,
        cos_to_mean=cos,
        duplicate_of=duplicates,
        histogram=norm_histogram(finite_norms, histogram_bins),
    )


def cosines(dots: np.ndarray, norms: np.ndarray, mean_vector_norm: float) -> np.ndarray:
    """Cosine of each row to the mean row [vocab] float64; NaN where a norm is 0 or undefined."""
    cos = np.full(dots.shape, np.nan)
    if not mean_vector_norm > 0:
        return cos
    usable = np.isfinite(norms) & (norms > 0)
    cos[usable] = dots[usable] / (norms[usable] * mean_vector_norm)
    return cos


def tokens_table(token_ids: np.ndarray, tokens: pa.Array | pa.ChunkedArray, stats: MatrixStats) -> pa.Table:
    """One row per token; NaN measures (undefined, see the module notes) become nulls."""
    return pa.table(
        {
            "token_id": pa.array(token_ids.astype(np.int32, copy=False)),
            "token": tokens,
            "l2_norm": pa.array(stats.l2_norm, from_pandas=True),
            "max_abs": pa.array(stats.max_abs, from_pandas=True),
            "cos_to_mean": pa.array(stats.cos_to_mean, from_pandas=True),
            "duplicate_of": pa.array(stats.duplicate_of.astype(np.int32), mask=stats.duplicate_of < 0),
        }
    )


@dataclass(frozen=True)
class StatsSettings:
    # Bins of the row-norm histogram (DVC plot data).
    norm_histogram_bins: int = setting(50, whole_number(1, 100_000))


def run(paths: ModelPaths, settings: StatsSettings, rows_per_chunk: int = ROWS_PER_CHUNK) -> dict[str, Any]:
    """The stage on one model; returns the stats.json content."""
    token_ids, matrix = read_vectors(paths.embeddings)
    tokens = pq.read_table(paths.embeddings, columns=["token"]).column("token")
    stats = matrix_stats(matrix, settings.norm_histogram_bins, rows_per_chunk)
    provenance = derived_provenance("stats", paths.name, paths.embeddings, {"stats": as_params(settings)})
    with output_set():
        write_table(paths.dims, stats.dims, provenance)
        write_table(paths.tokens, tokens_table(token_ids, tokens, stats), provenance)
        write_json_atomic(paths.norm_hist, stats.histogram)
        write_json_atomic(paths.stats, stats.summary)
    return stats.summary


main = Stage("stats", "MODEL", model_paths, from_section(StatsSettings, "stats"), run).main


if __name__ == "__main__":
    run_stage(main)
