"""Where a tensor's bytes sit inside a ``torch.save`` archive (for the plain-read limit)."""

from __future__ import annotations

from pathlib import Path

from pipeline.formats import meta


def pth_tensor_span(file: Path, key: str) -> tuple[int, int]:
    """(byte offset, byte length) of tensor ``key``'s data in ``file``."""
    found, start, length = meta.embedding_span(Path(file), key, Path(file))
    return start, length
