"""Where a tensor's bytes sit inside a ``torch.save`` archive (for the plain-read limit)."""

from __future__ import annotations

from pathlib import Path

from pipeline.formats import meta


def pth_tensor_span(file: Path, key: str) -> tuple[int, int]:
    """(byte offset, byte length) of tensor ``key``'s data in ``file``."""
    state, entry = meta._fast_state(Path(file))
    array, _ = entry(state[key], key, Path(file))
    mapped = meta._MAPS.pop(id(array))
    return mapped.base + mapped.skip, mapped.length
