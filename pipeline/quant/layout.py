"""The quant file layout: how ``quant/<scheme>.parquet`` is written and read back, in one place.

A quant file has one row per matrix row:

* ``token_id int32``;
* ``codes``: ``fixed_size_list`` of the scheme's codes per row: int8, 4-bit codes packed two
  a byte as uint8, or for the fp16/bf16 references the rounded values in their 16 bits
  (fp16 as Parquet float16; bf16, which Parquet has no type for, as its uint16 bit pattern,
  the high half of the float32 value), so a file holds the bits per weight it is reported at;
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
      rows = lambda name: table.column(name).combine_chunks().flatten().to_numpy().reshape(n, -1)
      codes = rows("codes")
      if recipe["code_bits"] == 4:  # two codes a byte: a run of `nibble_span` codes per nibble
          nibbles = (codes & 15, codes >> 4)[:: 1 if recipe["low_nibble_first"] else -1]
          codes = np.stack([half.reshape(n, -1, recipe["nibble_span"]) for half in nibbles], axis=2)
      if recipe.get("float_format") == "bfloat16":  # uint16 bit patterns: the high half of a float32
          codes = (codes.astype(np.uint32) << 16).view(np.float32)
      values = np.asarray(recipe["lookup"], np.float32)[codes] if recipe["lookup"] else codes.astype(np.float32) - recipe["offset"]
      scales = rows("scales") if recipe["scale"] is None else np.full((n, 1), recipe["scale"], np.float32)
      matrix = (values.reshape(n, scales.shape[1], -1) * scales[:, :, None]).reshape(n, -1)  # [vocab, dim] float32

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
    codes_type = pa.from_numpy_dtype(scheme.codes_dtype)
    fields = [
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("codes", pa.list_(pa.field("element", codes_type, nullable=False), scheme.code_width(dim)), nullable=False),
    ]
    block = scheme.block_for(dim)
    if scheme.tensor_scale is None and block:
        fields.append(pa.field("scales", pa.list_(pa.field("element", pa.float32(), nullable=False), dim // block), nullable=False))
    return pa.schema(fields)


def record_batch(token_ids: np.ndarray, encoded: Encoded, schema: pa.Schema) -> pa.RecordBatch:
    stored = schema.field("codes").type.value_type
    columns = [pa.array(token_ids, type=pa.int32()), _list_array(narrowed(encoded.codes, stored))]
    if "scales" in schema.names:
        columns.append(_list_array(encoded.scales))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# zstd level 1 writes the codes 1.1-1.5x faster than level 3 and, with the encodings below,
# to files as small or smaller (measured on the Llama 3.2 1B matrix).
QUANT_COMPRESSION_LEVEL = 1


def quant_write_options(schema: pa.Schema) -> dict[str, Any]:
    """How the quant files are encoded (:func:`pipeline.core.parquet.write_batches` options).

    Integer codes are dictionary encoded: Parquet stores int8 and uint8 as 4-byte INT32, and
    their at most 256 distinct values become 8-bit indices, which writes twice as fast and
    a quarter smaller than plain INT32 under zstd. fp16's float16 codes are too (DuckDB
    reads float16 only without BYTE_STREAM_SPLIT). bf16's uint16 bit patterns are
    BYTE_STREAM_SPLIT instead: Parquet stores them as INT32, whose two zero high bytes
    then compress to nothing (MiniLM's bf16 file: 16.1 MB, against 17.2 dictionary encoded
    and 16.2 as float32 values). Min/max statistics of the codes tell a reader nothing, so
    only the other columns carry them.
    """
    paths = dict(zip(schema.names, leaf_column_paths(schema)))
    codes = schema.field("codes") if "codes" in paths else None
    code_type = codes.type.value_type if codes is not None else None
    split = code_type == pa.uint16()
    dictionary = code_type is not None and not split and (pa.types.is_integer(code_type) or pa.types.is_float16(code_type))
    return {
        "compression_level": QUANT_COMPRESSION_LEVEL,
        "dictionary_columns": [paths["codes"]] if dictionary else [],
        "split_columns": [paths["codes"]] if split else [],
        "statistics_columns": [path for name, path in paths.items() if name != "codes"],
    }


def narrowed(codes: np.ndarray, stored: pa.DataType) -> np.ndarray:
    """``codes`` as the ``codes`` column stores them: the fp16/bf16 schemes' float32 values
    (already rounded, so nothing is lost) in their 16 bits; other codes unchanged."""
    if pa.types.is_float16(stored):
        return codes.astype(np.float16)
    if stored == pa.uint16():
        return (np.ascontiguousarray(codes, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return codes


def widened(codes: np.ndarray) -> np.ndarray:
    """The float32 values of 16-bit float codes (float16, or bfloat16 bit patterns in uint16),
    exactly; other codes unchanged. The inverse of :func:`narrowed`."""
    if codes.dtype == np.float16:
        return codes.astype(np.float32)
    if codes.dtype == np.uint16:
        return (codes.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return codes


def _list_array(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


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
    out = np.empty((file.metadata.num_rows, recipe["dim"]), np.float32)  # [vocab, dim]
    start = 0
    for group in range(file.num_row_groups):
        table = file.read_row_group(group)
        n = table.num_rows
        codes = widened(_list_rows(table, "codes", n))
        if recipe.get("scale") is None:
            scales = _list_rows(table, "scales", n) if "scales" in table.column_names else None
            rows = scheme.decode(Encoded(codes=codes, scales=scales, clipped=0))
        else:
            rows = (codes.astype(np.float32) - np.float32(recipe["offset"])) * np.float32(recipe["scale"])
        out[start : start + n] = rows
        start += n
    return out


def _list_rows(table: pa.Table, column: str, n: int) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
