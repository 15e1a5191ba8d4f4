"""sha256 of files and of embedding matrices, streamed so memory stays flat; and the
record that lets a later stage trust a file's sha256 without hashing it again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK_BYTES = 16 * 1024 * 1024


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def spans_sha256(path: Path | str, spans) -> str:
    """sha256 of the bytes of ``spans`` (``[begin, end)`` pairs, in order) of a file: what a
    ranged read of a remote file hashes, the rest of the file being holes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for begin, end in spans:
            handle.seek(begin)
            remaining = end - begin
            while remaining > 0 and (chunk := handle.read(min(remaining, _CHUNK_BYTES))):
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


def file_stat(path: Path | str) -> dict[str, int]:
    """What changes when a file's bytes change (size, modification and change times, inode).

    The change time cannot be set back by a program (``touch -d`` sets only the modification
    time), so a file edited and given its old mtime still differs. Machine-local: kept out of
    anything DVC hashes (see :attr:`pipeline.core.paths.ModelPaths.hashed`).
    """
    status = os.stat(path)
    return {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns, "inode": status.st_ino}


def hashed_file(path: Path | str) -> dict[str, Any]:
    """``file_stat`` taken before hashing, and the sha256: if the file changes while it is
    hashed, its stat no longer matches and the next check hashes it again."""
    before = file_stat(path)
    return {**before, "sha256": file_sha256(path)}


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
