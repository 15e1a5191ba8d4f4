"""Parquet layout, provenance and atomic writes."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core import parquet
from pipeline.core.hashing import matrix_sha256
from pipeline.core.io import atomic_path, write_json_atomic
from pipeline.core.parquet import read_provenance, read_vectors, vector_array, vectors_to_numpy, write_table


def vectors_table(matrix: np.ndarray) -> pa.Table:
    return pa.table({"token_id": pa.array(np.arange(len(matrix), dtype=np.int32)), "vector": vector_array(matrix)})


@settings(max_examples=40, deadline=None)
@given(
    matrix=arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 9)),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    row_group_size=st.integers(1, 16),
    read_batch_bytes=st.one_of(st.integers(1, 80), st.just(parquet.READ_BATCH_BYTES)),
)
def test_round_trip_is_bit_exact(tmp_path_factory, matrix, row_group_size, read_batch_bytes):
    path = tmp_path_factory.mktemp("rt") / "m.parquet"
    write_table(path, vectors_table(matrix), {"stage": "test"}, row_group_size=row_group_size)
    # Small batches split the row groups (1 to 20 rows of up to 9 values, or one row per batch).
    with mock.patch.object(parquet, "READ_BATCH_BYTES", read_batch_bytes):
        token_ids, back = read_vectors(path)
    assert np.array_equal(token_ids, np.arange(len(matrix)))
    # Compare bits, so NaN payloads and -0.0 count too.
    assert np.array_equal(back.view(np.uint32), matrix.view(np.uint32))


def test_layout_zstd_byte_stream_split_row_groups_and_provenance(tmp_path):
    matrix = np.arange(30, dtype=np.float32).reshape(10, 3)
    path = tmp_path / "m.parquet"
    write_table(path, vectors_table(matrix), {"stage": "test", "shape": [10, 3]}, row_group_size=4)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 3  # 4 + 4 + 2 rows
    vector_chunk = metadata.row_group(0).column(1)
    assert vector_chunk.path_in_schema == "vector.list.element"
    assert vector_chunk.compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in vector_chunk.encodings
    assert read_provenance(path) == {"stage": "test", "shape": [10, 3]}
    assert pq.read_schema(path).field("vector").type == pa.list_(pa.float32(), 3)


def test_vectors_to_numpy_over_several_chunks():
    first, second = np.ones((2, 3), np.float32), np.full((1, 3), 7, np.float32)
    column = pa.chunked_array([vector_array(first), vector_array(second)])
    assert np.array_equal(vectors_to_numpy(column), np.concatenate([first, second]))


def test_matrix_hash_depends_on_values_not_on_chunking():
    matrix = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    assert matrix_sha256(matrix, rows_per_chunk=7) == matrix_sha256(matrix, rows_per_chunk=1000)
    changed = matrix.copy()
    changed[50, 2] = np.nextafter(changed[50, 2], np.float32(np.inf))
    assert matrix_sha256(changed) != matrix_sha256(matrix)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert list(tmp_path.iterdir()) == [target]
