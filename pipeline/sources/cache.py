"""The cache of remote bytes: each remote file as a sparse local file holding the ranges read.

A remote file version (where it lives, its name, its ETag or commit) gets one folder under
``<cache>/remote/``: a sparse file named like the remote file of the remote file's full size in which every
byte range read so far sits at its own offset (the rest is a hole that takes no disk),
and ``ranges.json``, the list of those ranges with the sha256 of each. So:

* an unchanged remote file is never read twice: a range already listed is served from
  disk, and only the missing parts of a wider range are fetched;
* a changed remote file (another ETag or commit) is another key, another folder: it is
  fetched afresh, never mixed with the old bytes;
* every listed range is re-hashed by :meth:`CachedFile.verify` before it is used again; a
  range whose bytes no longer match is dropped and fetched anew.

The readers in :mod:`pipeline.formats` open ``data`` like any local file: its size, header
and embedding bytes are the remote file's, so their checks run unchanged. A range is
listed only after its bytes are written and flushed, so an interrupted fetch resumes.

The cache folder is ``$EMBEDDING_DISSECT_CACHE``, else ``$XDG_CACHE_HOME/embedding-dissect``,
else ``~/.cache/embedding-dissect``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.core.hashing import spans_sha256
from pipeline.core.io import write_json_atomic
from pipeline.core.progress import progress_bar
from pipeline.sources.ranged import RangedReader

CACHE_ENV = "EMBEDDING_DISSECT_CACHE"
CHUNK_BYTES = 32 * 1024 * 1024  # one request at most; each chunk is listed once written
CACHE_LAYOUT_VERSION = 1


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embedding-dissect"


def cache_key(location: str, file: str, version: str) -> dict[str, Any]:
    """What names a remote file version: where (a redacted URL or ``hf://repo@commit``), which file, which ETag."""
    return {"layout": CACHE_LAYOUT_VERSION, "location": location, "file": file, "version": version}


class CachedFile:
    """One remote file version in the cache, read through ``reader`` where bytes are missing."""

    def __init__(self, reader: RangedReader, key: dict[str, Any], root: Path | None = None):
        self.reader = reader
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:40]
        self.folder = (root or cache_dir()) / "remote" / digest
        # Named like the remote file, so a reader's message about it says which file it is.
        self.data = self.folder / (PurePosixPath(str(key["file"])).name or "data")
        self.index = self.folder / "ranges.json"
        self.size = reader.size
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = _load_index(self.index) if self.data.is_file() else None
        if isinstance(stored, dict) and stored.get("key") == key and self.data.stat().st_size == self.size:
            self.ranges: list[list[Any]] = stored["ranges"]
            self.verify()
        else:
            self.data.unlink(missing_ok=True)  # never truncate in place: a view may link to it
            with open(self.data, "wb") as handle:
                handle.truncate(self.size)  # a hole: no disk used until bytes are written
            self.ranges = []
            self._save()
        self.fetched: list[tuple[int, int]] = []  # what this process downloaded
        self.used: list[tuple[int, int]] = []  # what this process asked for

    # ---- what is present --------------------------------------------------------------

    def _save(self) -> None:
        write_json_atomic(self.index, {"key": self.key, "ranges": self.ranges})

    def missing(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of ``[start, stop)`` no listed range covers."""
        gaps, position = [], start
        for begin, end, _ in sorted(self.ranges):
            if end <= position or begin >= stop:
                continue
            if begin > position:
                gaps.append((position, begin))
            position = max(position, end)
            if position >= stop:
                break
        if position < stop:
            gaps.append((position, stop))
        return gaps

    def ensure(self, start: int, stop: int, desc: str | None = None) -> None:
        """Make bytes ``[start, stop)`` present, fetching only the missing parts, in chunks."""
        self.used.append((start, stop))
        gaps = self.missing(start, stop)
        total = sum(end - begin for begin, end in gaps)
        if not total:
            return
        with progress_bar(total=total, desc=desc or f"fetch {self.reader.transport.name}", unit="B",
                          enabled=total >= CHUNK_BYTES) as bar, open(self.data, "r+b") as handle:
            for begin, end in gaps:
                for chunk_start in range(begin, end, CHUNK_BYTES):
                    chunk_stop = min(chunk_start + CHUNK_BYTES, end)
                    data = self.reader.read(chunk_start, chunk_stop - chunk_start)
                    handle.seek(chunk_start)
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                    self.ranges.append([chunk_start, chunk_stop, hashlib.sha256(data).hexdigest()])
                    self.fetched.append((chunk_start, chunk_stop))
                    self._save()
                    bar.update(chunk_stop - chunk_start)

    def read(self, start: int, length: int) -> bytes:
        self.ensure(start, start + length)
        with open(self.data, "rb") as handle:
            handle.seek(start)
            return handle.read(length)

    def verify(self) -> list[list[int]]:
        """Re-hash every listed range; drop those whose bytes changed. Returns the dropped ones."""
        dropped, kept = [], []
        for begin, end, sha in self.ranges:
            if spans_sha256(self.data, [(begin, end)]) == sha:
                kept.append([begin, end, sha])
            else:
                dropped.append([begin, end])
        if dropped:
            self.ranges = kept
            self._save()
        return dropped

    def present(self) -> list[tuple[int, int]]:
        """The listed ranges, merged: what the local copy holds."""
        return merge_spans([(begin, end) for begin, end, _ in self.ranges])

    def content_sha256(self, spans: list[tuple[int, int]]) -> str:
        """sha256 of the bytes of ``spans`` (in order), read from the local copy."""
        return spans_sha256(self.data, spans)

    def handle(self) -> "CachedHandle":
        return CachedHandle(self)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[begin, end)`` spans sorted, with overlapping and touching ones joined."""
    merged: list[list[int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(begin, end) for begin, end in merged]


def _load_index(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or damaged: the file's ranges are fetched afresh


class CachedHandle(io.RawIOBase):
    """A seekable read-only file object over a :class:`CachedFile`: each read fetches what is
    missing, so a parser run on it (zipfile, a header parser) downloads exactly what it reads."""

    def __init__(self, cached: CachedFile):
        super().__init__()
        self.cached = cached
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.cached.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        stop = self.cached.size if size is None or size < 0 else min(self.cached.size, self.position + size)
        if stop <= self.position:
            return b""
        data = self.cached.read(self.position, stop - self.position)
        self.position = stop
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
