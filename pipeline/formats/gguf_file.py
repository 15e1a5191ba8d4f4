"""A bounded, validating parser of GGUF headers (metadata and tensor table).

GGUF files come from anywhere, so every count, length and offset is checked against the
bytes that remain before it is used: a damaged or hostile header ends in a
:class:`DissectError`, never in a huge allocation, an endless loop or a foreign exception.
It is also fast: string arrays (a vocabulary, its merges) are read in one pass, and a file
is parsed once per process however many times the embedding reader and the tokenizer ask.

Layout (little-endian): ``"GGUF"``, version u32 (2 or 3), tensor_count u64, kv_count u64,
then kv_count ``(key: string, type: u32, value)``, then tensor_count ``(name: string,
n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)``; tensor data starts at the next
multiple of ``general.alignment`` (default 32). A string is ``(length: u64, utf-8 bytes)``.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.checks import is_whole, quoted

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, size) for scalars
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY: dict[int, str] = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost first, e.g. [vocab, dim] (GGUF stores innermost first)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


class _NeedMore(Exception):
    """The header goes on past the prefix read so far (but not past the file)."""


class _Cursor:
    """Reads a prefix of a file, refusing to step past the file's end."""

    def __init__(self, buffer: bytes, file_size: int, path: Path):
        self.buffer, self.file_size, self.pos, self.path = memoryview(buffer), file_size, 0, path

    def remaining(self) -> int:
        return self.file_size - self.pos

    def fail(self, why: str) -> DissectError:
        return DissectError(f"{self.path} is a damaged GGUF file ({why} at byte {self.pos}); re-download it or check `format`")

    def take(self, size: int) -> memoryview:
        if size < 0 or size > self.remaining():
            raise self.fail(f"needs {size} bytes, {self.remaining()} remain")
        if self.pos + size > len(self.buffer):
            raise _NeedMore
        view = self.buffer[self.pos : self.pos + size]
        self.pos += size
        return view

    def scalar(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self.take(size))[0]

    def count(self, min_item_size: int, what: str) -> int:
        """A u64 count that cannot describe more items than the bytes that remain could hold."""
        value = self.scalar("<Q", 8)
        if value * max(min_item_size, 1) > self.remaining():
            raise self.fail(f"{what} count is larger than the file")  # the count itself is not shown: it is not plausible
        return value

    def string(self) -> str:
        raw = self.take(self.count(1, "string length"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None


def _number(value: int) -> str:
    """A small number read from the file, as text; a large one is not shown (it would be raw bytes)."""
    return str(value) if 0 <= value < 1 << 16 else "beyond any valid value"


def _value(cursor: _Cursor, type_id: int, depth: int = 0) -> Any:
    if type_id in _SCALARS:
        return cursor.scalar(*_SCALARS[type_id])
    if type_id == _STRING:
        return cursor.string()
    if type_id == _ARRAY and depth == 0:
        item_type = cursor.scalar("<I", 4)
        if item_type in _NUMPY:
            n = cursor.count(_SCALARS[item_type][1], "array")
            return np.frombuffer(cursor.take(n * _SCALARS[item_type][1]), dtype=_NUMPY[item_type]).copy()
        if item_type == _STRING:
            n = cursor.count(8, "string array")
            return [cursor.string() for _ in range(n)]
        raise cursor.fail(f"array of unsupported type {_number(item_type)}")
    raise cursor.fail(f"unknown value type {_number(type_id)}")


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string()
    n_dims = cursor.scalar("<I", 4)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {quoted(name)} has {_number(n_dims)} dimensions, not 1 to {MAX_DIMS}")
    dims = struct.unpack(f"<{n_dims}Q", cursor.take(8 * n_dims))
    type_id = cursor.scalar("<I", 4)
    offset = cursor.scalar("<Q", 8)
    return name, tuple(reversed(dims)), type_id, offset


def _nbytes(shape: tuple[int, ...], type_id: int, name: str, cursor: _Cursor) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise cursor.fail(f"tensor {quoted(name)} has unknown type id {_number(type_id)}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    elements = 1
    for d in shape:
        elements *= d
    if shape[-1] % block_size:
        raise cursor.fail(f"tensor {quoted(name)} row of {_number(shape[-1])} is not a whole number of {qtype.name} blocks")
    return elements // block_size * type_size


def parse(buffer: bytes, file_size: int, path: Path) -> GGUFContents:
    """Parse the header held in ``buffer``, a prefix of the ``file_size``-byte file at ``path``."""
    if buffer[:4] != MAGIC:
        raise DissectError(f"{path} is not a GGUF file (no GGUF magic); check the file and the model's `format`")
    cursor = _Cursor(buffer, file_size, path)
    cursor.take(4)
    version = cursor.scalar("<I", 4)
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"unsupported GGUF version {_number(version)} (big-endian or too new)")
    tensor_count = cursor.scalar("<Q", 8)
    kv_count = cursor.scalar("<Q", 8)
    if kv_count * 13 > cursor.remaining() or tensor_count * 25 > cursor.remaining():
        raise cursor.fail("the tensor or metadata count is larger than the file")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        if key in metadata:
            raise cursor.fail(f"metadata key {quoted(key)} appears twice")
        metadata[key] = _value(cursor, cursor.scalar("<I", 4))
    infos = [_tensor_info(cursor) for _ in range(tensor_count)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not is_whole(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {quoted(alignment)} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, offset in infos:
        if name in tensors:
            raise cursor.fail(f"tensor {quoted(name)} appears twice")
        nbytes = _nbytes(shape, type_id, name, cursor)
        start = data_start + offset
        if start + nbytes > file_size:
            raise cursor.fail(f"tensor {quoted(name)} lies beyond the end of the file")
        if offset % alignment:
            raise cursor.fail(f"tensor {quoted(name)} starts at an offset that is not a multiple of general.alignment {alignment}")
        tensors[name] = TensorInfo(name=name, shape=shape, type_id=type_id, offset=start, nbytes=nbytes)
    return GGUFContents(path=path, version=version, metadata=metadata, tensors=tensors)


INITIAL_PREFIX_BYTES = 4 * 1024 * 1024


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFContents:
    prefix = INITIAL_PREFIX_BYTES
    with open(path, "rb") as handle:
        while True:
            handle.seek(0)
            try:
                return parse(handle.read(prefix), size, Path(path))
            except _NeedMore:
                # The metadata (a large vocabulary) is longer than the prefix: read more.
                prefix *= 4


def read_gguf(path: Path) -> GGUFContents:
    """The header of the GGUF file at ``path``, parsed once per process while the file is unchanged."""
    path = Path(path)
    if not path.is_file():
        raise DissectError(f"{path} is not a file; point the model's `source.path` at a .gguf file")
    stat = path.stat()
    return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def tensor_blocks(contents: GGUFContents, info: TensorInfo) -> np.ndarray:
    """The raw bytes of ``info`` as a read-only memory map [rows, bytes per row]."""
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    return np.memmap(contents.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(rows, info.nbytes // rows))
