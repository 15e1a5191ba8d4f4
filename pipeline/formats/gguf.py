"""GGUF files (llama.cpp): the ``token_embd.weight`` tensor, dequantized to float32.

The header is parsed by :mod:`pipeline.formats.gguf_file` (bounded and validated); the
tensor's blocks are memory-mapped and dequantized with the ``gguf`` package in row chunks,
so memory stays near one float32 copy of the matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DissectError
from pipeline.formats.base import Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.formats.gguf_file import read_gguf, tensor_blocks
from pipeline.progress import progress_bar

ROWS_PER_CHUNK = 4096


def weight_files(path: Path) -> list[Path]:
    return [path if path.is_file() else _single_file(path)]


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a .gguf file")
    file = path if path.is_file() else _single_file(path)
    contents = read_gguf(file)
    key = choose_tensor_key(sorted(contents.tensors), tensor, file)
    info = contents.tensors[key]
    shape = require_2d(info.shape, key, file)
    matrix = dequantize_rows(tensor_blocks(contents, info), info.type_id, shape, key)
    record = SourceRecord(files=(file,), tensor_key=key, source_dtype=_type_name(info.type_id), shape=shape)
    return Embedding(matrix=matrix, source=record)


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(type_id).name


def dequantize_rows(blocks: np.ndarray, type_id: int, shape: tuple[int, int], key: str) -> np.ndarray:
    """Float32 [vocab, dim] from the raw blocks [vocab, bytes per row], chunk by chunk."""
    import gguf

    qtype = gguf.GGMLQuantizationType(type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return blocks.view(np.float32).reshape(shape)  # the memory map already is the matrix
    out = np.empty(shape, dtype=np.float32)  # [vocab, dim]
    with progress_bar(total=shape[0], desc=f"dequantize {key} ({qtype.name})", unit="rows") as bar:
        for start in range(0, shape[0], ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, shape[0])
            chunk = np.asarray(blocks[start:stop])
            if qtype == gguf.GGMLQuantizationType.F16:
                out[start:stop] = chunk.view(np.float16)
            else:
                out[start:stop] = _dequantize(gguf, chunk, qtype, key).reshape(stop - start, shape[1])
            bar.update(stop - start)
    return out


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
        return candidates[0]
    if not candidates:
        raise DissectError(f"no .gguf file in {folder}; point `source.path` at the .gguf file")
    raise DissectError(f"{folder} holds several .gguf files; point `source.path` at one of them")
