"""Parquet I/O shared by every stage: one layout, one provenance record, atomic writes.

Layout (see DESIGN.md, "Parquet conventions"):

* vectors are a ``fixed_size_list<float32>[dim]`` column named ``vector`` next to
  ``token_id int32`` and ``token string``; ``embeddings.parquet`` (the extract stage) has, in
  order:

  ===============  ======================================================================
  column           value
  ===============  ======================================================================
  ``token_id``     ``int32``, the row of the matrix
  ``token``        the piece as text, exactly (``" Hello"``); null for padding rows. Not
                   unique: a byte-fallback vocabulary's byte ``<0x0A>`` reads ``"\n"`` too
  ``token_key``    unique: ``token``, but a byte-fallback piece keeps its name (``<0x0A>``),
                   and a text that would still repeat gets ``<id:N>`` appended; null for
                   padding. Drift aligns two files on it
  ``kind``         ``normal`` | ``byte`` | ``special`` | ``unused`` | ``padding``
                   (:data:`pipeline.tokenizers.load.TOKEN_KINDS`)
  ``token_bytes``  the raw bytes of a piece that is not valid UTF-8 alone, else null
  ``vector``       ``fixed_size_list<float32>[dim]`` (DuckDB reads it as ``FLOAT[]``: cast
                   to ``FLOAT[dim]`` for the ``array_*`` functions)
  ===============  ======================================================================

* zstd compression, BYTE_STREAM_SPLIT on every float column (it puts the four bytes of
  each float in separate streams, so the zero low bytes of a bf16-sourced matrix compress
  to almost nothing), no dictionary encoding unless a writer names the columns (the
  quantize stage's integer codes, whose few distinct values it suits), row groups of a few
  thousand rows;
* provenance lives in the file's key-value metadata under the single key
  ``embedding_dissect`` as a JSON object:

  =================  ==========================================================
  key                value
  =================  ==========================================================
  ``stage``          the stage that wrote the file (``extract``, ...)
  ``model``          the model's name in params.yaml (``smollm2-135m``)
  ``format``         ``meta`` | ``safetensors`` | ``gguf``
  ``source_files``   ``[{"path", "sha256", "bytes"}]`` of the weight files read
  ``tensor_key``     the embedding tensor's name in the source
  ``source_dtype``   its dtype there (``bfloat16``, ``Q8_0``, ...)
  ``shape``          ``[vocab, dim]``
  ``matrix_sha256``  sha256 of the float32 matrix (:func:`pipeline.core.hashing.matrix_sha256`)
  ``tokenizer``      ``{"kind", "path", "sha256", "vocab_size"}``
  ``params``         the stage's params as read from params.yaml
  ``package``        ``{"name": "embedding-dissect", "version", "libraries": {name: version}}``:
                     the exact versions of numpy, scipy, pyarrow, torch, ... (:mod:`pipeline.core.environment`)
  =================  ==========================================================

Files derived from ``embeddings.parquet`` by later stages carry ``stage``, ``model``,
``params`` and ``package`` as above, plus ``input``: ``{"path", "matrix_sha256"}`` of the
embeddings they were computed from (:func:`derived_provenance`), so any table can be traced
back to the exact matrix and, through its provenance, to the weight files.

Writes go through :func:`pipeline.core.io.atomic_path`: a killed stage leaves the old file or
none, never half of one.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.core.environment import library_versions
from pipeline.core.errors import DissectError
from pipeline.core.io import atomic_path

PROVENANCE_KEY = b"embedding_dissect"
DEFAULT_ROW_GROUP_SIZE = 4096


def package_record() -> dict[str, Any]:
    """This package's version and the exact versions of the libraries that decide output bytes."""
    return {"name": "embedding-dissect", "version": __version__, "libraries": library_versions()}


def derived_provenance(stage: str, model: str, embeddings_path: Path | str, params: dict[str, Any]) -> dict[str, Any]:
    """Provenance of a table computed from ``embeddings_path`` by ``stage``."""
    source = read_provenance(embeddings_path)
    return {
        "stage": stage,
        "model": model,
        "input": {"path": str(embeddings_path), "matrix_sha256": source.get("matrix_sha256")},
        "params": params,
        "package": package_record(),
    }


def vector_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<float32>[dim]`` array viewing ``matrix`` [rows, dim] without a copy."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])


def vectors_to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """The float32 matrix [rows, dim] held by a ``fixed_size_list<float32>`` column."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dim = column.type.list_size
    if not chunks:
        return np.empty((0, dim), dtype=np.float32)
    parts = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for chunk in chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def with_provenance(schema: pa.Schema, provenance: dict[str, Any]) -> pa.Schema:
    """``schema`` with ``provenance`` attached as JSON under :data:`PROVENANCE_KEY`."""
    metadata = dict(schema.metadata or {})
    metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode("utf-8")
    return schema.with_metadata(metadata)


def read_provenance(path: Path | str) -> dict[str, Any]:
    metadata = pq.read_schema(path).metadata or {}
    if PROVENANCE_KEY not in metadata:
        raise DissectError(f"{path} has no embedding-dissect provenance; rebuild it with `dvc repro`")
    return json.loads(metadata[PROVENANCE_KEY])


def _float_column_paths(schema: pa.Schema) -> list[str]:
    """Parquet column paths of every float32/float64 leaf (BYTE_STREAM_SPLIT applies to leaves).

    Not float16: Parquet stores it as 2-byte FIXED_LEN_BYTE_ARRAY, and DuckDB cannot read
    BYTE_STREAM_SPLIT on those.
    """
    def split(value_type: pa.DataType) -> bool:
        return pa.types.is_floating(value_type) and not pa.types.is_float16(value_type)

    paths = []
    for field in schema:
        if split(field.type):
            paths.append(field.name)
        elif pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type):
            if split(field.type.value_type):
                paths.append(f"{field.name}.list.element")
    return paths


def _writer_options(
    schema: pa.Schema,
    compression_level: int,
    statistics_columns: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        "use_dictionary": False,
        "use_byte_stream_split": _float_column_paths(schema),
        "write_statistics": True if statistics_columns is None else statistics_columns,
    }


def leaf_column_paths(schema: pa.Schema) -> list[str]:
    """Parquet column paths of every leaf, as the writer's per-column options name them."""
    return [f"{field.name}.list.element" if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type)
            else field.name for field in schema]


def write_batches(
    path: Path | str,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch | pa.Table],
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression_level: int = 3,
    *,
    statistics_columns: list[str] | None = None,
) -> None:
    """Stream ``batches`` into ``path`` atomically; ``schema`` carries the provenance.

    No column is dictionary encoded; ``statistics_columns`` (Parquet column paths, see
    :func:`leaf_column_paths`), when given, are the only columns with min/max statistics
    (None: every column has them).
    """
    options = _writer_options(schema, compression_level, statistics_columns)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, **options) as writer:
            for batch in batches:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch], schema)
                writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=row_group_size)


def write_table(
    path: Path | str,
    table: pa.Table,
    provenance: dict[str, Any],
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression_level: int = 3,
) -> None:
    """Write a whole table atomically with ``provenance`` in its metadata."""
    schema = with_provenance(table.schema, provenance)
    write_batches(path, schema, [table], row_group_size, compression_level)


# Rows decoded at a time by a reader thread, as bytes of float32: buffers this small are reused
# by Arrow's allocator from batch to batch, where a whole row group's (268 MB at width 16384)
# were mapped afresh each time and every page faulted in again. On the 2-core Intel machine
# of RESULTS-intel.md, by whole row groups against 1 MiB batches: the 405B-shaped matrix
# 11.9 s and a 10.5 GB peak against 7.8-8.6 s and 8.6 GB; the 1B 1.2-1.8 s and 1.5 GB
# against 1.07-1.13 s and 1.2 GB.
READ_BATCH_BYTES = 1 << 20


def read_vectors(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """``(token_ids [rows] int32, matrix [rows, dim] float32)`` from a vector Parquet file.

    Filled batch by batch (READ_BATCH_BYTES) into one array, so the peak is the matrix plus
    a batch or so per thread (reading the whole table first would hold the Arrow copy and the
    numpy copy at once). The row groups are decoded by a thread per core, each writing its own rows:
    decompression and the copy release the GIL. What the reader freed is then handed back
    (:func:`pipeline.core.memory.return_freed_memory`): kept by Arrow's allocator and glibc's
    arenas, it stayed under the stage's own chunk buffers (the stats stage on the 1B peaked at
    1.94-1.97 GB with it and 1.62-1.65 GB without).
    """
    from pipeline.core.memory import empty_float32, return_freed_memory, reuse_freed_memory, worker_count

    reuse_freed_memory()
    try:
        file = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DissectError(f"{path} does not exist; run `dvc repro` to build it") from None
    metadata = file.metadata
    rows = metadata.num_rows
    token_ids = np.empty(rows, np.int32)  # [rows]
    matrix = empty_float32((rows, file.schema_arrow.field("vector").type.list_size))  # [rows, dim]
    starts = np.concatenate([[0], np.cumsum([metadata.row_group(g).num_rows for g in range(file.num_row_groups)])])
    workers = min(worker_count(), file.num_row_groups)
    batch_rows = max(1, READ_BATCH_BYTES // max(matrix.itemsize * matrix.shape[1], 1))

    def read_groups(groups: range | list[int], handle: pq.ParquetFile) -> None:
        for group in groups:
            start = int(starts[group])
            batches = handle.iter_batches(batch_rows, row_groups=[group], columns=["token_id", "vector"],
                                          use_threads=workers <= 1)
            for batch in batches:
                stop = start + batch.num_rows
                token_ids[start:stop] = batch.column("token_id").to_numpy()
                matrix[start:stop] = vectors_to_numpy(batch.column("vector"))
                start = stop

    if workers <= 1:
        read_groups(range(file.num_row_groups), file)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Interleaved groups, so the threads move through the file together.
            futures = [pool.submit(read_groups, list(range(w, file.num_row_groups, workers)), pq.ParquetFile(path))
                       for w in range(workers)]
            for future in futures:
                future.result()
    return_freed_memory()
    return token_ids, matrix


def read_matrix(path: Path | str) -> np.ndarray:
    """The embedding matrix [vocab, dim] of ``path``, whose rows must be in token-id order.

    Every stage that indexes rows by token id reads through here, so a file whose rows are
    not 0..n-1 is refused in one place with one message.
    """
    token_ids, matrix = read_vectors(path)
    if not np.array_equal(token_ids, np.arange(len(token_ids))):
        raise DissectError(f"the rows of {path} are not in token-id order 0..n-1; rebuild it with the extract stage")
    return matrix


class _Abandoned(Exception):
    """Raised inside the writer when the producer failed, so the file is not completed."""


def write_in_background(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], **options: Any) -> None:
    """:func:`write_batches` (with ``options``) in a second thread while this one computes the next batches.

    Encoding and compressing a row group takes a good share of the time the work that produces
    it does; pyarrow releases the GIL while it writes, so the two overlap.
    If producing fails, the writer abandons its temporary file and the error is raised here.
    """
    start_writing(path, schema, batches, **options)()


def start_writing(
    path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], queued: int = 1, **options: Any
) -> Callable[[], None]:
    """:func:`write_in_background`, returning once every batch is produced, with the writer still
    on up to ``queued`` + 1 of them: the returned call waits for it (and raises its error),
    so the caller can start on other work meanwhile. The batches waiting are held in memory."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=queued)  # bounded: what waits while one is written
    finished, failed = object(), object()
    ended = threading.Event()
    errors: list[BaseException] = []

    def is_end(item: Any) -> bool:
        return item is finished or item is failed

    def received() -> Iterator[pa.RecordBatch]:
        while not is_end(item := handoff.get()):
            yield item
        ended.set()
        if item is failed:
            raise _Abandoned()

    def write() -> None:
        try:
            write_batches(path, schema, received(), **options)
        except BaseException as error:  # raised in the producer's thread below
            errors.append(error)
            while not ended.is_set():  # keep taking batches so a waiting producer can finish
                if is_end(handoff.get()):
                    ended.set()

    def wait() -> None:
        writer.join()
        if errors:
            raise errors[0]

    writer = threading.Thread(target=write, name=f"write {path.name}", daemon=True)
    writer.start()
    try:
        for batch in batches:
            if errors:
                break
            handoff.put(batch)
    except BaseException:
        handoff.put(failed)
        writer.join()
        raise
    handoff.put(finished)
    if errors:
        wait()
    return wait
