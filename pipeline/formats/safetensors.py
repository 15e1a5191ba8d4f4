"""Hugging Face safetensors: one file, or shards named by ``model.safetensors.index.json``.

The header is parsed and checked here rather than trusted: its length, every offset and
every byte size are checked against the file before a byte of tensor data is touched.
Only the embedding tensor is memory-mapped; the rest of the model is never read.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.base import Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.formats.checks import JSONProblem, file_inside, is_whole, parse_json, quoted, read_json_file
from pipeline.core.memory import reuse_freed_memory
from pipeline.formats.convert import MappedFile, rows_to_float32

INDEX_NAME = "model.safetensors.index.json"
# Largest JSON header we accept: the format's own limit is 100 MB.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype -> (numpy dtype of the stored bits, our name for it)
DTYPES: dict[str, tuple[str, str]] = {
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),
    "F64": ("<f8", "float64"),
}


def weight_files(path: Path) -> list[Path]:
    """The files a read of ``path`` (a file or a model folder) may touch."""
    if path.is_file():
        return [path]
    if _has_index(path):
        index = _index(path)
        _, shards = _read_index(index)
        return [index, *(shards[name] for name in sorted(shards))]
    return [_single_file(path)]


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    reuse_freed_memory()
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a .safetensors file or a model folder")
    if path.is_dir() and _has_index(path):
        return _read_sharded(_index(path), tensor)
    file = path if path.is_file() else _single_file(path)
    header = read_header(file)
    key = choose_tensor_key(sorted(header.tensors), tensor, file)
    return _embedding_from(file, header, key, files=(file,))


REDOWNLOAD = "re-download the model's files into one folder"


def _has_index(folder: Path) -> bool:
    return (folder / INDEX_NAME).exists() or (folder / INDEX_NAME).is_symlink()


def _index(folder: Path) -> Path:
    return file_inside(folder, INDEX_NAME, "the index", REDOWNLOAD)


def _single_file(folder: Path) -> Path:
    preferred = folder / "model.safetensors"
    if preferred.exists() or preferred.is_symlink():
        return file_inside(folder, preferred.name, "the weights file", REDOWNLOAD)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return file_inside(folder, candidates[0].name, "the weights file", REDOWNLOAD)
    if not candidates:
        raise DissectError(f"no .safetensors file in {folder}; point `source.path` at the model's folder or file")
    raise DissectError(f"{folder} holds several .safetensors files but no {INDEX_NAME}; point `source.path` at one file")


def _read_index(index: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """The weight map (tensor -> shard name) and shard name -> path for every shard it names.

    Every shard must be a file in the index's folder, whether or not it holds the embedding.
    """
    weight_map = read_weight_map(index)
    described = f"the shard named in {index.name}"
    return weight_map, {name: file_inside(index.parent, name, described, REDOWNLOAD) for name in set(weight_map.values())}


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight map (tensor -> shard name), checked for shape only."""
    try:
        weight_map = read_json_file(index)["weight_map"]
    except (JSONProblem, KeyError, TypeError) as error:
        why = error if isinstance(error, JSONProblem) else "no weight_map"
        raise DissectError(f"{index} is not a valid safetensors index ({why}); re-download the model's index file") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DissectError(f"{index} has a malformed weight_map; re-download the model's index file")
    return weight_map


def _read_sharded(index: Path, tensor: str | None) -> Embedding:
    weight_map, shards = _read_index(index)
    key = choose_tensor_key(sorted(weight_map), tensor, index)
    shard = shards[weight_map[key]]
    header = read_header(shard)
    if key not in header.tensors:
        raise DissectError(f"{shard} does not hold {quoted(key)} although {index.name} says so; re-download the shard")
    return _embedding_from(shard, header, key, files=(index, shard))


class Header:
    """A checked safetensors header: tensor entries and where the data region starts."""

    def __init__(self, tensors: dict[str, dict], data_start: int, file_size: int):
        self.tensors = tensors
        self.data_start = data_start
        self.file_size = file_size


def read_header(file: Path) -> Header:
    """Parse and check the header of ``file``; every inconsistency is a :class:`DissectError`.

    Nothing read from the file is quoted unless it passed its check: a length that is not
    plausible is not printed (it would show the file's first bytes).
    """
    file_size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(file, "shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > file_size:
            raise _not_safetensors(file, f"its header length is not plausible: it exceeds the file size of {file_size:,} bytes")
        if header_len > MAX_HEADER_BYTES:
            raise _not_safetensors(file, f"its header length is over the format's limit of {MAX_HEADER_BYTES:,} bytes")
        raw = handle.read(header_len)
    try:
        entries = parse_json(raw)
    except JSONProblem as problem:
        raise _not_safetensors(file, f"header: {problem}") from None
    if not isinstance(entries, dict):
        raise _not_safetensors(file, "header is not a JSON object")
    entries.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = {name: _check_entry(file, name, entry, file_size - data_start) for name, entry in entries.items()}
    _check_no_overlap(file, tensors)
    return Header(tensors, data_start, file_size)


def _not_safetensors(file: Path, why: str) -> DissectError:
    return DissectError(f"{file} is not a valid safetensors file ({why}); check the file is complete and `format` is right")


def _check_entry(file: Path, name: str, entry: object, data_size: int) -> dict:
    """One tensor's entry: whole numbers (not booleans or floats) that fit the file exactly."""
    if not isinstance(entry, dict):
        raise _not_safetensors(file, f"entry {quoted(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(is_whole(d) and d >= 0 for d in shape):
        raise _not_safetensors(file, f"tensor {quoted(name)} has an invalid shape {quoted(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_whole(o) for o in offsets)):
        raise _not_safetensors(file, f"tensor {quoted(name)} has invalid data_offsets {quoted(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _not_safetensors(file, f"tensor {quoted(name)} lies outside the file's {data_size:,} data bytes")
    itemsize = _itemsize(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:  # exact: no int64 to overflow
        raise _not_safetensors(file, f"tensor {quoted(name)} shape {quoted(shape)} {dtype} does not match its {end - begin:,} bytes")
    return entry


def _itemsize(dtype: object) -> int | None:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    return sizes.get(dtype) if isinstance(dtype, str) else None


def _check_no_overlap(file: Path, tensors: dict[str, dict]) -> None:
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in tensors.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _not_safetensors(file, f"tensors {quoted(first)} and {quoted(second)} overlap")


def _embedding_from(file: Path, header: Header, key: str, files: tuple[Path, ...]) -> Embedding:
    entry = header.tensors[key]
    shape = require_2d(tuple(entry["shape"]), key, file)
    if entry["dtype"] not in DTYPES:
        raise DissectError(
            f"tensor {quoted(key)} in {file} is {quoted(entry['dtype'])}, not a float type this reader supports ({', '.join(DTYPES)})"
        )
    stored_dtype, dtype_name = DTYPES[entry["dtype"]]
    offset = header.data_start + entry["data_offsets"][0]
    itemsize = np.dtype(stored_dtype).itemsize
    if dtype_name == "float32":
        raw = np.memmap(file, dtype=stored_dtype, mode="r", offset=offset, shape=shape)  # [vocab, dim], returned as is
        matrix = rows_to_float32(raw, dtype_name, desc=f"read {key}")
    else:
        # Mapped so that converted rows can be dropped from memory (they stay in the page cache).
        mapped = MappedFile(file, offset, shape[0] * shape[1] * itemsize)
        raw = mapped.array(stored_dtype, shape)  # [vocab, dim]
        row_bytes = shape[1] * itemsize
        matrix = rows_to_float32(
            raw, dtype_name, desc=f"read {key}", release=lambda start, stop: mapped.release(start * row_bytes, stop * row_bytes)
        )
    return Embedding(matrix=matrix, source=SourceRecord(files=files, tensor_key=key, source_dtype=dtype_name, shape=shape))
