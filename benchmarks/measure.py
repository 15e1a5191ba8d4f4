"""What a case's own process measures about itself: its RSS, the bytes it read, the time.

The parent takes the peak RSS from ``os.wait4``; these helpers give the child the rest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Self


def rss_now() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def io_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (page faults on maps included)."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache, so the next read goes to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Timer:
    """Times the ``with`` block; ``result`` also holds the RSS just before it ("extra" memory
    is the peak minus that)."""

    def __init__(self) -> None:
        self.result: dict = {}

    def __enter__(self) -> Self:
        self.result["rss_before"] = rss_now()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.result["seconds"] = time.perf_counter() - self.start
