"""Turn a memory-mapped source tensor into float32 in row chunks (bounded extra memory)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.progress import progress_bar

ROWS_PER_CHUNK = 8192


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen by shifting the 16 bits up (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fill_float32(out: np.ndarray, source: np.ndarray, dtype_name: str, bar: tqdm | None = None) -> None:
    """Write ``source`` (raw values of ``dtype_name``; bfloat16 as uint16 bits) into ``out`` as float32.

    Row chunk by row chunk, so that only one chunk of the source is paged in at a time.
    """
    for start in range(0, source.shape[0], ROWS_PER_CHUNK):
        stop = min(start + ROWS_PER_CHUNK, source.shape[0])
        block = np.asarray(source[start:stop])
        out[start:stop] = bf16_bits_to_float32(block) if dtype_name == "bfloat16" else block
        if bar is not None:
            bar.update(stop - start)


def rows_to_float32(source: np.ndarray, dtype_name: str, desc: str) -> np.ndarray:
    """A float32 matrix [vocab, dim] from ``source``; a float32 memory map is returned as it is."""
    if dtype_name == "float32" and source.dtype == np.float32:
        return source
    out = np.empty(source.shape, dtype=np.float32)  # [vocab, dim]
    with progress_bar(total=source.shape[0], desc=desc, unit="rows") as bar:
        fill_float32(out, source, dtype_name, bar)
    return out
