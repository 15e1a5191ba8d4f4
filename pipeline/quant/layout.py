"""The quant file layout: how ``quant/<scheme>.parquet`` is written and read back, in one place.

A quant file has one row per matrix row:

* ``token_id int32``;
* ``codes``: ``fixed_size_binary``, the row's codes as raw little-endian bytes of the dtype
  the recipe's ``codes_dtype`` names: int8 codes, 4-bit codes packed two a byte as uint8,
  or for the fp16/bf16 references the rounded values in their 16 bits (fp16 as IEEE
  float16; bf16 as its uint16 bit pattern, the high half of the float32 value), so a file
  holds the bits per weight it is reported at. Parquet has no 8- or 16-bit integer column:
  as a list of integers each code would be stored as a 4-byte INT32, which pyarrow writes
  ten times slower than these bytes, into a file no smaller under zstd;
* ``scales`` (per-row and per-block schemes only): ``fixed_size_list<float32>`` of the
  row's block scales (fp16 scales are stored exactly as float32).

The file's provenance carries the scheme's ``dequantize`` recipe
(:meth:`pipeline.quant.base.Scheme.recipe`), enough to rebuild the float matrix with
pyarrow and numpy alone::

      import json, numpy as np, pyarrow.parquet as pq
      path = "artifacts/smollm2-135m/quant/q4_0.parquet"
      recipe = json.loads(pq.read_schema(path).metadata[b"embedding_dissect"])["dequantize"]
      table = pq.read_table(path)
      n = table.num_rows
      column = lambda name: table.column(name).combine_chunks()
      codes = np.frombuffer(column("codes").buffers()[1], recipe["codes_dtype"]).reshape(n, -1)  # the bytes as codes
      if recipe["code_bits"] == 4:  # two codes a byte: a run of `nibble_span` codes per nibble
          nibbles = (codes & 15, codes >> 4)[:: 1 if recipe["low_nibble_first"] else -1]
          codes = np.stack([half.reshape(n, -1, recipe["nibble_span"]) for half in nibbles], axis=2)
      if recipe.get("float_format") == "bfloat16":  # uint16 bit patterns: the high half of a float32
          codes = (codes.astype(np.uint32) << 16).view(np.float32)
      values = np.asarray(recipe["lookup"], np.float32)[codes] if recipe["lookup"] else codes.astype(np.float32) - recipe["offset"]
      scales = column("scales").flatten().to_numpy().reshape(n, -1) if recipe["scale"] is None else np.full((n, 1), recipe["scale"], np.float32)
      matrix = (values.reshape(n, scales.shape[1], -1) * scales[:, :, None]).reshape(n, -1)  # [vocab, dim] float32

Polars reads the codes as an array column with
``pl.col("codes").bin.reinterpret(dtype=pl.Array(pl.Int8, width), endianness="little")``.

:func:`dequantize_file` is the same rebuild by the scheme's own decoder, used by the
drift stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import DissectError
from pipeline.core.parquet import leaf_column_paths
from pipeline.quant.base import Encoded, Scheme

ROWS_PER_CHUNK = 4096  # rows encoded, measured and written at a time: one row group of a quant file


def quant_schema(scheme: Scheme, dim: int) -> pa.Schema:
    fields = [
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("codes", pa.binary(scheme.code_width(dim) * scheme.codes_dtype.itemsize), nullable=False),
    ]
    block = scheme.block_for(dim)
    if scheme.tensor_scale is None and block:
        fields.append(pa.field("scales", pa.list_(pa.field("element", pa.float32(), nullable=False), dim // block), nullable=False))
    return pa.schema(fields)


def record_batch(token_ids: np.ndarray, encoded: Encoded, schema: pa.Schema) -> pa.RecordBatch:
    """One row group's columns, the codes' bytes as they are (:attr:`Scheme.codes_dtype`)."""
    columns = [pa.array(token_ids, type=pa.int32()), _binary_rows(encoded.codes)]
    if "scales" in schema.names:
        columns.append(_list_array(encoded.scales))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# zstd level 1: the codes are near random bytes, which level 3 compresses no further.
QUANT_COMPRESSION_LEVEL = 1


def quant_write_options(schema: pa.Schema) -> dict[str, Any]:
    """How the quant files are encoded (:func:`pipeline.core.parquet.write_batches` options):
    the codes' bytes plain under zstd, and min/max statistics only on the other columns,
    since those of the codes tell a reader nothing."""
    paths = dict(zip(schema.names, leaf_column_paths(schema)))
    return {
        "compression_level": QUANT_COMPRESSION_LEVEL,
        "statistics_columns": [path for name, path in paths.items() if name != "codes"],
    }


def _list_array(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _binary_rows(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Each row of ``values`` [n, width] as one value of its bytes (little-endian), without a copy."""
    values = np.ascontiguousarray(values)
    width = values.shape[1] * values.itemsize
    return pa.Array.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values.view(np.uint8))])


def dequantize_file(path: Path, recipe: dict[str, Any]) -> np.ndarray:
    """The float32 matrix [vocab, dim] a quant/<scheme>.parquet stands for, row group by row group.

    Per-row and per-block schemes decode with the scheme's own :meth:`Scheme.decode`; the
    per-tensor ones carry their one scale in the recipe (``(code - offset) * scale``, in
    float32, exactly as their decode computes it).
    """
    from pipeline.quant import SCHEMES

    name = recipe.get("scheme")
    if name not in SCHEMES:
        raise DissectError(f"{path} was written by an unknown quantization scheme {name!r}; rebuild it with the quantize stage")
    scheme = SCHEMES[name]()
    file = pq.ParquetFile(path)
    if not pa.types.is_fixed_size_binary(file.schema_arrow.field("codes").type) or "codes_dtype" not in recipe:
        raise DissectError(f"{path} holds its codes in an older layout; rebuild it with the quantize stage")
    out = np.empty((file.metadata.num_rows, recipe["dim"]), np.float32)  # [vocab, dim]
    start = 0
    for group in range(file.num_row_groups):
        table = file.read_row_group(group)
        n = table.num_rows
        codes = code_rows(table, recipe["codes_dtype"])
        if recipe.get("scale") is None or scheme.code_bits == 16:  # per row or block, or a float cast
            scales = _list_rows(table, "scales", n) if "scales" in table.column_names else None
            rows = scheme.decode(Encoded(codes=codes, scales=scales, clipped=0))
        else:
            rows = (codes.astype(np.float32) - np.float32(recipe["offset"])) * np.float32(recipe["scale"])
        out[start : start + n] = rows
        start += n
    return out


def code_rows(table: pa.Table, codes_dtype: str) -> np.ndarray:
    """The ``codes`` column as an array [rows, code_width] of ``codes_dtype``, without a copy
    when the column is one chunk."""
    column = table.column("codes").combine_chunks()
    width = column.type.byte_width
    # A slice shares its parent's buffer: read only its own rows' bytes.
    count = len(column) * width // np.dtype(codes_dtype).itemsize
    return np.frombuffer(column.buffers()[1], codes_dtype, count=count, offset=column.offset * width).reshape(len(column), -1)


def _list_rows(table: pa.Table, column: str, n: int) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
