"""sha256 of files and of embedding matrices, streamed so memory stays flat."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

_CHUNK_BYTES = 16 * 1024 * 1024


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def matrix_sha256(matrix: np.ndarray, rows_per_chunk: int = 8192) -> str:
    """sha256 of the matrix as C-ordered little-endian float32 bytes.

    Two matrices with the same values in the same order have the same hash, whatever
    format they were read from; this is how tests prove that formats agree bit for bit.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a [vocab, dim] matrix, got shape {matrix.shape}")
    digest = hashlib.sha256()
    for start in range(0, matrix.shape[0], rows_per_chunk):
        block = np.ascontiguousarray(matrix[start : start + rows_per_chunk], dtype="<f4")
        digest.update(memoryview(block).cast("B"))
    return digest.hexdigest()
