"""Memory and worker helpers shared by the readers and the stages.

Large matrices are filled by a thread per core; these decide how many threads, keep glibc
from unmapping chunk temporaries on every loop, hand freed pages back between steps, and
map big outputs in bulk (first-touch page faults are costly on virtual machines).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def worker_count() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


_TUNED = False


def reuse_freed_memory() -> None:
    """Let glibc keep and reuse freed blocks up to 256 MiB instead of unmapping them.

    The stages work in row chunks whose temporaries (tens of MiB each) glibc would otherwise
    map fresh and unmap on every chunk; on a virtual machine a fresh page costs microseconds
    to fault in, which doubled the time of chunk loops here. Process-wide and idempotent;
    arrays above the threshold (whole matrices) are still mapped and returned on free.
    """
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def return_freed_memory() -> None:
    """Give the pages freed by the previous step back to the system.

    Reading a Parquet file leaves freed pages in Arrow's allocator (~0.4 GB for the 1B
    matrix), and chunk buffers freed by worker threads stay in glibc's per-thread arenas,
    which keep what is freed (more so after :func:`reuse_freed_memory`); carried from step
    to step they would add up on the peak. Call it between steps, not inside a chunk loop,
    so the chunks of one step still reuse their buffers.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing kept


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in, writable, in one call


def empty_float32(shape: tuple[int, ...]) -> np.ndarray:
    """``np.empty(shape, float32)`` whose pages are already mapped, for large outputs.

    First-touch page faults are costly on virtual machines (1 GiB took 1.0-3 s touched page
    by page here, against 0.4-0.7 s mapped in bulk): the pages are populated by one kernel
    call per core (huge pages were faster on average but swung from 0.07 to 1.8 s). Anything
    unsupported falls back to np.empty.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    if nbytes < (64 << 20):
        return np.empty(shape, np.float32)
    try:
        import ctypes
        import mmap

        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        array = np.frombuffer(region, dtype=np.float32).reshape(shape)
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        base, workers = array.ctypes.data, worker_count()
        step = -(-nbytes // workers // mmap.PAGESIZE) * mmap.PAGESIZE
        spans = [(base + i * step, min(step, nbytes - i * step)) for i in range(workers) if i * step < nbytes]
        with ThreadPoolExecutor(max_workers=len(spans)) as pool:  # ctypes releases the GIL
            list(pool.map(lambda span: madvise(span[0], span[1], _MADV_POPULATE_WRITE), spans))
        return array
    except (OSError, AttributeError, ValueError):
        return np.empty(shape, np.float32)
