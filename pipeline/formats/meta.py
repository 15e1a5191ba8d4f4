"""Meta reference checkpoints: ``consolidated.NN.pth`` shards plus ``params.json``.

Each shard is opened with ``torch.load(weights_only=True, mmap=True)``: the pickle may only
rebuild tensors (anything else is refused before it runs), and the tensor data stays on
disk until the embedding rows are copied out. Model-parallel shards hold slices of the
embedding: Llama 2's ``ParallelEmbedding`` splits the model dimension, Llama 3's
``VocabParallelEmbedding`` splits the vocabulary. The shard shapes and ``params.json``'s
``dim`` tell which; both are joined into one [vocab, dim] matrix.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.base import Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.formats.checks import JSONProblem, file_inside, is_whole, quoted, read_json_file
from pipeline.core.memory import empty_float32, reuse_freed_memory
from pipeline.formats.convert import MappedFile, fill_float32
from pipeline.core.progress import progress_bar

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")


def weight_files(path: Path) -> list[Path]:
    """The files a read of ``path`` (a .pth file or a checkpoint folder) may touch."""
    if path.is_file():
        return [path]
    shards = _shards(path)
    params = _params_file(path)
    return [*shards, params] if params is not None else shards


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    reuse_freed_memory()
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a Meta checkpoint folder or .pth file")
    shards = [path] if path.is_file() else _shards(path)
    params_dim = _params_dim(path if path.is_dir() else path.parent)
    for shard in shards:
        _check_archive(shard)  # every member, before anything is inflated, on both paths below
    slices = _read_without_torch(shards, tensor)
    if slices is None:
        slices, key = [], tensor
        for shard in shards:
            state = _load_state(shard)
            key = choose_tensor_key(sorted(state), tensor if tensor is not None else key, shard)
            slices.append(_tensor_bits(state[key], key, shard))
    else:
        key = slices[0][2]
        slices = [(array, dtype_name) for array, dtype_name, _ in slices]
    matrix, axis = _join(slices, params_dim, path)
    for array, _ in slices:
        _MAPS.pop(id(array), None)  # a float32 map returned as the matrix stays alive through the array itself
    dtype_name = slices[0][1]
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    record = SourceRecord(files=tuple(weight_files(path)), tensor_key=key, source_dtype=dtype_name, shape=shape)
    return Embedding(matrix=matrix, source=record)


# ---- the fast path: the embedding's bytes straight from the zip archive, without torch ------
#
# A ``torch.save`` file is a zip archive (stored, not compressed) holding ``data.pkl``, a
# pickle of the state dict whose tensors refer to storages ``data/<key>``. The pickle is
# read here by an unpickler that knows only the handful of names a plain state dict uses
# (anything else, or any surprise at all, sends the shard down the torch path, which gives
# the precise error); the tensor is then memory-mapped at its offset inside the archive.
# This skips torch's import (seconds) and reads only the embedding's bytes.

# A state dict's pickle takes ~113 bytes a tensor (a Llama 3.1 405B shard's 1,134 tensors:
# 128 KB), and unpickling can cost ~430 bytes of memory per byte of pickle (torch's
# unpickler on a pickle of empty sets): 512 KiB holds 4,600 tensors and keeps that under 256 MB.
MAX_STATE_PICKLE_BYTES = 512 * 1024
_STORAGE_DTYPES = {
    "BFloat16Storage": ("<u2", "bfloat16"),
    "HalfStorage": ("<f2", "float16"),
    "FloatStorage": ("<f4", "float32"),
    "DoubleStorage": ("<f8", "float64"),
}


class _Unsupported(Exception):
    """The shard uses something the fast path does not read; torch.load takes over."""


@dataclass(frozen=True)
class _StorageRef:
    kind: str
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise _Unsupported("tensor without a storage")
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _StateUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise _Unsupported("persistent id")
        return _StorageRef(kind=pid[1], key=str(pid[2]), numel=int(pid[4]))


def _read_without_torch(shards: list[Path], tensor: str | None) -> list[tuple[np.ndarray, str, str]] | None:
    """(array view, dtype name, key) of the embedding in each shard, or None to use torch."""
    slices, key = [], tensor
    try:
        for shard in shards:
            state, archive_span = _fast_state(shard)
            key = choose_tensor_key(sorted(state), tensor if tensor is not None else key, shard)
            start, shape, stored, dtype_name = archive_span(state[key], key, shard)
            mapped = MappedFile(shard, start, shape[0] * shape[1] * np.dtype(stored).itemsize)
            array = mapped.array(stored, shape)
            _MAPS[id(array)] = mapped
            slices.append((array, dtype_name, key))
    except Exception:  # noqa: BLE001 - any surprise in an untrusted file: the torch path reads it or names the problem
        for array, *_ in slices:
            _MAPS.pop(id(array), None)
        return None
    return slices


def embedding_span(shard: Path | BinaryIO, tensor: str | None, where: Path) -> tuple[str, int, int]:
    """(key, start, length) of the embedding's bytes in one ``.pth`` shard.

    Reads only the archive's directory, its pickle and the member's local header, which is
    what a ranged download of ``shard`` (a file object that fetches what it is asked for)
    needs before it fetches the tensor's bytes and nothing else.
    """
    try:
        state, archive_span = _fast_state(shard)
        key = choose_tensor_key(sorted(state), tensor, where)
        start, (rows, cols), stored, _ = archive_span(state[key], key, where)
    except (_Unsupported, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError) as why:
        raise DissectError(
            f"{where} cannot be read by byte range ({type(why).__name__}: {str(why)[:80]}); "
            "download the checkpoint and set source.path to it"
        ) from None
    return key, start, rows * cols * np.dtype(stored).itemsize


def _fast_state(shard: Path | BinaryIO):
    with zipfile.ZipFile(shard) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise _Unsupported("no single data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        if order is not None and _read_member(archive, order, 16).strip() != b"little":
            raise _Unsupported("big-endian checkpoint")
        state = _StateUnpickler(io.BytesIO(_read_member(archive, infos[pickles[0]], MAX_STATE_PICKLE_BYTES))).load()
    if not isinstance(state, dict):
        raise _Unsupported("not a state dict")

    def archive_span(value, key: str, where: Path) -> tuple[int, tuple[int, int], str, str]:
        """(start, shape, stored numpy dtype, dtype name) of a tensor's bytes in the archive."""
        if not isinstance(value, _TensorRef):
            raise _Unsupported("not a tensor")
        rows, cols = require_2d(value.size, key, where)
        if value.stride != (cols, 1):
            raise _Unsupported("not a row-major tensor")
        stored, dtype_name = _STORAGE_DTYPES[value.storage.kind]
        itemsize = np.dtype(stored).itemsize
        if value.offset < 0 or value.offset + rows * cols > value.storage.numel:
            raise _Unsupported("tensor beyond its storage")
        info = infos[f"{prefix}data/{value.storage.key}"]
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != value.storage.numel * itemsize:
            raise _Unsupported("compressed or mis-sized storage")
        start = _member_data_offset(shard, info) + value.offset * itemsize
        return start, (rows, cols), stored, dtype_name

    return state, archive_span


_MAPS: dict[int, MappedFile] = {}  # array id -> its map, so _join can drop converted pages


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A small member's bytes, never inflating more than ``limit`` + 1 of them whatever it declares."""
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise _Unsupported("member larger than its limit")
    return data


# ---- the archive, checked before either path inflates a byte of it ------------------------

MAX_ARCHIVE_MEMBERS = 100_000  # a shard holds a member per storage: thousands
MAX_INFLATED_BYTES = 16 * 1024 * 1024  # all compressed members together (torch.save compresses none)
CHECKPOINT_FIX = "check the file is complete and `format` is right"


def _check_archive(shard: Path) -> None:
    """Refuse a .pth whose zip members could cost more than their bounds, before anything inflates them.

    Checked from the central directory alone: the member count; every member's bytes lie
    inside the file; a stored member declares the size it stores; storages (``data/``) are
    stored, never compressed (torch maps them); a compressed member declares at most
    :data:`MAX_INFLATED_BYTES` (all together) and ``data.pkl`` at most
    :data:`MAX_STATE_PICKLE_BYTES`. A member whose declared size is a lie inflates only up
    to it: Python's zipfile and torch's reader both stop there.
    """
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as handle:
            end = zipfile._EndRecData(handle)
            if end is None:
                raise DissectError(f"{shard} is not a readable PyTorch checkpoint (not a zip archive); {CHECKPOINT_FIX}")
            if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ARCHIVE_MEMBERS:
                raise _bad_archive(shard, f"it lists more than {MAX_ARCHIVE_MEMBERS:,} members")
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error):
        raise DissectError(f"{shard} is not a readable PyTorch checkpoint (a damaged zip archive); {CHECKPOINT_FIX}") from None
    if len({info.filename for info in infos}) != len(infos):
        raise _bad_archive(shard, "two members share a name")
    inflated = 0
    for info in infos:
        name = info.filename
        if info.header_offset + 30 + info.compress_size > size:
            raise _bad_archive(shard, f"member {quoted(name)} lies beyond the end of the file")
        if name == "data.pkl" or name.endswith("/data.pkl"):
            if info.file_size > MAX_STATE_PICKLE_BYTES:
                raise _bad_archive(shard, f"its data.pkl is larger than the {MAX_STATE_PICKLE_BYTES // 1024} KiB a state dict's pickle takes")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise _bad_archive(shard, f"member {quoted(name)} declares a size other than the bytes it stores")
            continue
        if "/data/" in f"/{name}":
            raise _bad_archive(shard, f"storage {quoted(name)} is compressed; torch.save stores storages as they are")
        inflated += info.file_size
        if inflated > MAX_INFLATED_BYTES:
            raise _bad_archive(shard, f"its compressed members would inflate past {MAX_INFLATED_BYTES // 2**20} MiB")


def _bad_archive(shard: Path, why: str) -> DissectError:
    return DissectError(f"{shard} is refused as a PyTorch checkpoint ({why}); re-save it with torch.save(state_dict)")


def _member_data_offset(file: Path | BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header (whose extra field may
    differ from the central directory's)."""
    if hasattr(file, "read"):
        file.seek(info.header_offset)
        header = file.read(30)
    else:
        with open(file, "rb") as handle:
            handle.seek(info.header_offset)
            header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise _Unsupported("bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _shards(folder: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_PATTERN.match(p.name)))
    if not found:
        raise DissectError(f"no consolidated.NN.pth in {folder}; point `source.path` at the folder of a Meta checkpoint")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(numbers))):
        raise DissectError(f"the shards in {folder} are numbered {numbers}, not 00..{len(numbers) - 1:02d}; a shard is missing")
    return [file_inside(folder, p.name, "the shard", RESTORE) for _, p in found]


RESTORE = "restore the checkpoint's files as one folder"


def _params_file(folder: Path) -> Path | None:
    params = folder / "params.json"
    if not (params.exists() or params.is_symlink()):
        return None
    return file_inside(folder, params.name, "the checkpoint's", RESTORE)


def _params_dim(folder: Path) -> int | None:
    """``dim`` of the folder's params.json: None without one, a :class:`DissectError` if it is not a positive whole number."""
    params = _params_file(folder)
    if params is None:
        return None
    fix = "restore the checkpoint's params.json"
    try:
        values = read_json_file(params)
    except JSONProblem as problem:
        raise DissectError(f"{params} is not usable ({problem}); {fix}") from None
    if not isinstance(values, dict):
        raise DissectError(f"{params} is not a JSON object; {fix}")
    dim = values.get("dim")
    if dim is None:
        return None
    if not (is_whole(dim) and dim > 0):
        raise DissectError(f"{params} has dim {quoted(dim)}, not a positive whole number; {fix}")
    return dim


def _load_state(shard: Path) -> dict[str, Any]:
    import torch  # imported here: stages that never read .pth files stay free of torch's start-up cost

    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise DissectError(
            f"{shard} was refused: it holds more than tensors ({_refusal_reason(error)}); only plain state dicts are "
            "loaded, never code: re-save it with torch.save(model.state_dict()) from a source you trust"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        # torch surfaces a damaged archive or pickle as any of RuntimeError, EOFError,
        # TypeError, AssertionError, struct.error, ...: all mean the same to the user.
        raise DissectError(
            f"{shard} is not a readable PyTorch checkpoint ({type(error).__name__}); check the file is complete and `format` is right"
        ) from None
    if not isinstance(state, dict):
        raise DissectError(f"{shard} holds a {type(state).__name__}, not a state dict of tensors; re-save it with torch.save(state_dict)")
    return state


def _refusal_reason(error: Exception) -> str:
    """What the pickle wanted beside tensors, in our words.

    torch's message advises retrying with ``weights_only=False`` or allowing the refused
    global (``add_safe_globals([eval])``): exactly what must not be done with an untrusted
    file, so none of its sentences are repeated, only the name of what was refused.
    """
    text = str(error)
    wanted = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", text)
    if wanted:
        return f"it asks for {wanted.group(1)}, which is code, not a tensor"
    opcode = re.search(r"[Uu]nsupported operand\s+(\S+)", text)
    if opcode:
        return f"it uses the pickle operation {opcode.group(1).strip('.,')}, which a state dict does not need"
    return "it is not a plain state dict"


def _tensor_bits(tensor: Any, key: str, shard: Path) -> tuple[np.ndarray, str]:
    """The tensor's values as a numpy view of the mapped file (bfloat16 as uint16 bits)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise DissectError(f"{key!r} in {shard} is a {type(tensor).__name__}, not a tensor; set `tensor:` to the embedding")
    require_2d(tuple(tensor.shape), key, shard)
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), dtype_name
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return tensor.numpy(), dtype_name
    raise DissectError(f"{key!r} in {shard} is {dtype_name}, not a float tensor; set `tensor:` to the embedding")


def _join(slices: list[tuple[np.ndarray, str]], params_dim: int | None, where: Path) -> tuple[np.ndarray, int]:
    """Join shard slices along the vocabulary (Llama 3) or the model dimension (Llama 2)."""
    arrays = [array for array, _ in slices]
    if len({dtype for _, dtype in slices}) > 1:
        raise DissectError(f"the shards in {where} disagree on the embedding's dtype; the checkpoint is inconsistent")
    axis = _split_axis([a.shape for a in arrays], params_dim, where)
    if len(arrays) == 1 and arrays[0].dtype == np.float32:
        return arrays[0], axis
    rows = sum(a.shape[0] for a in arrays) if axis == 0 else arrays[0].shape[0]
    cols = arrays[0].shape[1] if axis == 0 else sum(a.shape[1] for a in arrays)
    out = empty_float32((rows, cols))  # [vocab, dim]
    offset = 0
    with progress_bar(total=sum(a.shape[0] for a in arrays), desc="read tok_embeddings", unit="rows") as bar:
        for array in arrays:
            release = _releaser(array)
            if axis == 0:
                fill_float32(out[offset : offset + array.shape[0]], array, slices[0][1], bar, release)
                offset += array.shape[0]
            else:
                fill_float32(out[:, offset : offset + array.shape[1]], array, slices[0][1], bar, release)
                offset += array.shape[1]
    return out, axis


def _releaser(array: np.ndarray):
    """Drops a fast-path array's converted rows from memory (they stay in the page cache)."""
    mapped = _MAPS.pop(id(array), None)
    if mapped is None:
        return None
    row_bytes = array.shape[1] * array.itemsize
    return lambda start, stop: mapped.release(start * row_bytes, stop * row_bytes)


def _split_axis(shapes: list[tuple[int, ...]], params_dim: int | None, where: Path) -> int:
    """0 for shards that split the vocabulary, 1 for ones that split the model dimension.

    Meta's parallel embeddings split an axis into equal parts, so unequal slices (or a single
    shard whose width is not params.json's ``dim``) mean a shard from another model.
    """
    if len(shapes) == 1:
        if params_dim is not None and shapes[0][1] != params_dim:
            raise DissectError(
                f"the embedding in {where} is {list(shapes[0])} but params.json says dim {quoted(params_dim)}; "
                "the params.json or the shard belongs to another model (a lone model-parallel shard? point at the whole folder)"
            )
        return 0
    if len(set(shapes)) > 1:
        raise DissectError(
            f"the embedding slices in {where} have unequal shapes {quoted([list(s) for s in shapes], 120)}, but Meta's "
            "model-parallel shards split it into equal parts; a shard is from another model, re-download the checkpoint"
        )
    if params_dim is None:
        raise DissectError(
            f"cannot tell how the shards in {where} split the embedding without params.json; add the checkpoint's params.json"
        )
    cols = shapes[0][1]
    if cols * len(shapes) == params_dim:
        return 1
    if cols == params_dim:
        return 0
    raise DissectError(
        f"the embedding slices in {where} (each {list(shapes[0])}) join to neither [vocab, {quoted(params_dim)}] "
        "along the vocabulary nor along the model dimension; a shard is missing or from another model"
    )
