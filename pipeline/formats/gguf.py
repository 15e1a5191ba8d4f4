"""GGUF files (llama.cpp): the ``token_embd.weight`` tensor, dequantized to float32.

The file is memory-mapped by the ``gguf`` package's reader; only the embedding's blocks are
dequantized, in row chunks, so memory stays near one float32 copy of the matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DissectError
from pipeline.formats.base import Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.progress import progress_bar

ROWS_PER_CHUNK = 4096
GGUF_MAGIC = b"GGUF"


def weight_files(path: Path) -> list[Path]:
    return [path if path.is_file() else _single_file(path)]


def open_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path``; a malformed file is a :class:`DissectError`."""
    import gguf

    file = path if path.is_file() else _single_file(path)
    with open(file, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise DissectError(f"{file} is not a GGUF file (no GGUF magic); check the file and the model's `format`")
    try:
        return gguf.GGUFReader(file, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError, UnicodeDecodeError, EOFError) as error:
        raise DissectError(f"{file} is a damaged GGUF file ({type(error).__name__}: {str(error)[:120]}); re-download it") from None


def read_embedding(path: Path, tensor: str | None = None, reader: Any | None = None) -> Embedding:
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a .gguf file")
    reader = reader if reader is not None else open_reader(path)
    file = Path(reader.data.filename) if hasattr(reader.data, "filename") else path
    tensors = {t.name: t for t in reader.tensors}
    key = choose_tensor_key(sorted(tensors), tensor, file)
    info = tensors[key]
    # GGUF lists dimensions innermost first: [dim, vocab].
    shape = require_2d(tuple(int(n) for n in reversed(info.shape.tolist())), key, file)
    matrix = dequantize_rows(info.data, info.tensor_type, shape, key)
    record = SourceRecord(files=(file,), tensor_key=key, source_dtype=info.tensor_type.name, shape=shape)
    return Embedding(matrix=matrix, source=record)


def dequantize_rows(data: np.ndarray, qtype: Any, shape: tuple[int, int], key: str) -> np.ndarray:
    """Float32 [vocab, dim] from the raw blocks ``data`` [vocab, bytes per row], chunk by chunk."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if qtype not in gguf.quants._type_traits and qtype not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        raise DissectError(f"tensor {key!r} is stored as {qtype.name}, which the gguf package cannot dequantize; convert the file to Q8_0 or F16")
    rows = data.reshape(shape[0], -1)
    out = np.empty(shape, dtype=np.float32)  # [vocab, dim]
    with progress_bar(total=shape[0], desc=f"dequantize {key} ({qtype.name})", unit="rows") as bar:
        for start in range(0, shape[0], ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, shape[0])
            out[start:stop] = gguf.quants.dequantize(np.asarray(rows[start:stop]), qtype).reshape(stop - start, shape[1])
            bar.update(stop - start)
    return out


def _single_file(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DissectError(f"no .gguf file in {folder}; point `source.path` at the .gguf file")
    raise DissectError(f"{folder} holds several .gguf files; point `source.path` at one of them")
