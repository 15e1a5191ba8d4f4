"""GGUF files (llama.cpp): the ``token_embd.weight`` tensor, dequantized to float32.

The header is parsed by :mod:`pipeline.formats.gguf_file` (bounded and validated); the
tensor's blocks are memory-mapped and dequantized with the ``gguf`` package in row chunks,
so memory stays near one float32 copy of the matrix.

The common types (F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are dequantized here, bit-identical to the
``gguf`` package's formulas but without its temporaries: each slab of rows is written
straight into the output, over a thread per core, and the converted source pages are
dropped from memory as the work moves on. BF16 and Q8_0 (one pass each) are converted by
numpy; the others by the fused kernels of :mod:`pipeline.formats.fused` (numba), which
write each value once. Every other type goes through the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.base import KNOWN_EMBEDDING_KEYS, Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.formats.checks import file_inside, is_whole
from pipeline.core.memory import empty_float32, reuse_freed_memory
from pipeline.formats.convert import MappedFile, parallel_rows, widen_bfloat16
from pipeline.formats.gguf_file import read_gguf
from pipeline.core.progress import progress_bar



def weight_files(path: Path) -> list[Path]:
    return [path if path.is_file() else _single_file(path)]


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    reuse_freed_memory()
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a .gguf file")
    file = path if path.is_file() else _single_file(path)
    contents = read_gguf(file)
    _refuse_missing_split(contents, tensor)
    key = choose_tensor_key(sorted(contents.tensors), tensor, file)
    info = contents.tensors[key]
    shape = require_2d(info.shape, key, file)
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    mapped = MappedFile(contents.path, info.offset, info.nbytes)
    blocks = mapped.array("u1", (rows, info.nbytes // rows))  # [vocab, bytes per row]
    matrix = dequantize_rows(blocks, info.type_id, shape, key, release=mapped.release)
    record = SourceRecord(files=(file,), tensor_key=key, source_dtype=_type_name(info.type_id), shape=shape)
    return Embedding(matrix=matrix, source=record)


def _refuse_missing_split(contents, tensor: str | None) -> None:
    """A split GGUF names no files, and its other parts are never looked for: say so when the tensor is elsewhere."""
    parts = contents.metadata.get("split.count")
    wanted = [tensor] if tensor is not None else KNOWN_EMBEDDING_KEYS
    if is_whole(parts) and parts > 1 and not any(key in contents.tensors for key in wanted):
        raise DissectError(
            f"{contents.path} is one part of a split GGUF (split.count above 1) and does not hold the embedding; "
            "merge the parts with `llama-gguf-split --merge` and point `source.path` at the merged file"
        )


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(type_id).name


def dequantize_rows(blocks: np.ndarray, type_id: int, shape: tuple[int, int], key: str, release=None) -> np.ndarray:
    """Float32 [vocab, dim] from the raw blocks [vocab, bytes per row], chunk by chunk.

    ``release(start_byte, stop_byte)``, if given, is told which source bytes are done with.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return blocks.view(np.float32).reshape(shape)  # the memory map already is the matrix
    kernel = _kernel(qtype.name)
    out = empty_float32(shape)  # [vocab, dim]
    row_bytes = blocks.shape[1]
    with progress_bar(total=shape[0], desc=f"dequantize {key} ({qtype.name})", unit="rows") as bar:
        if kernel is None:
            work = lambda start, stop: out.__setitem__(  # noqa: E731
                slice(start, stop), _dequantize(gguf, np.asarray(blocks[start:stop]), qtype, key).reshape(stop - start, shape[1])
            )
        else:
            work = lambda start, stop: kernel(out[start:stop], blocks[start:stop])  # noqa: E731

        def done(start: int, stop: int) -> None:
            if release is not None:
                release(start * row_bytes, stop * row_bytes)
            bar.update(stop - start)

        parallel_rows(shape[0], shape[1] * 4, work, done)
    return out


def _scales(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of each block [n, block bytes], as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _q8_0(out: np.ndarray, raw: np.ndarray) -> None:
    """Q8_0 rows: one multiply pass, already near the copy rate with numpy, so not worth importing numba for."""
    blocks = raw.reshape(-1, 34)  # [n, 2 + 32]: fp16 d, int8 codes
    np.multiply(blocks[:, 2:].view(np.int8), _scales(blocks, 0), out=out.reshape(-1, 32), dtype=np.float32)


def _bf16(out: np.ndarray, raw: np.ndarray) -> None:
    """bfloat16 rows: numpy widens them at the copy rate, so no compiled kernel is needed."""
    widen_bfloat16(out, raw.view(np.uint16).reshape(out.shape))


_NUMPY_KERNELS = {"Q8_0": _q8_0, "BF16": _bf16}
FUSED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "F16")  # compiled in pipeline.formats.fused


def _kernel(name: str):
    """``kernel(out [rows, dim] float32, raw [rows, bytes per row])`` for GGML type ``name``, or None
    where the gguf package dequantizes it; numba is imported only for a type it compiles."""
    if name in _NUMPY_KERNELS:
        return _NUMPY_KERNELS[name]
    if name in FUSED_TYPES:
        from pipeline.formats.fused import GGML_KERNELS

        return GGML_KERNELS[name]
    return None


def _dequantize(gguf, chunk: np.ndarray, qtype, key: str) -> np.ndarray:
    try:
        return gguf.quants.dequantize(chunk, qtype)
    except NotImplementedError:
        raise DissectError(
            f"tensor {key!r} is stored as {qtype.name}, which the gguf package cannot dequantize; convert the file to Q8_0 or F16"
        ) from None


def _single_file(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) == 1:
        return file_inside(folder, candidates[0].name, "the GGUF file", "point `source.path` at the .gguf file itself")
    if not candidates:
        raise DissectError(f"no .gguf file in {folder}; point `source.path` at the .gguf file")
    raise DissectError(f"{folder} holds several .gguf files; point `source.path` at one of them")
