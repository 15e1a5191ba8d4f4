"""One reader per weight format, all returning an :class:`Embedding`.

Every reader reads only the embedding tensor, never the whole model, and returns a float32
matrix [vocab, dim] plus a :class:`SourceRecord` of where it came from.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import DissectError
from pipeline.formats import gguf, meta, onnx, safetensors
from pipeline.formats.base import KNOWN_EMBEDDING_KEYS, Embedding, SourceRecord

READERS = {"meta": meta, "safetensors": safetensors, "gguf": gguf, "onnx": onnx}

__all__ = ["KNOWN_EMBEDDING_KEYS", "Embedding", "SourceRecord", "READERS", "read_embedding", "weight_files"]


def _module(fmt: str):
    if fmt not in READERS:
        raise DissectError(f"unknown format {fmt!r}; set the model's `format` to one of {', '.join(READERS)}")
    return READERS[fmt]


def read_embedding(fmt: str, path: Path, tensor: str | None = None) -> Embedding:
    """The embedding matrix of the model at ``path`` (a file or a model folder)."""
    return _module(fmt).read_embedding(Path(path), tensor)


def weight_files(fmt: str, path: Path) -> list[Path]:
    """Files that reading ``path`` may touch: what ``fetch`` hashes so DVC sees a change."""
    path = Path(path)
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to the model's file or folder")
    return _module(fmt).weight_files(path)
