"""Turn a memory-mapped source tensor into float32 in row chunks (bounded extra memory).

The conversion runs on small row slabs (a few MiB, so each slab's two passes stay in the
CPU cache) spread over a thread per core: numpy releases the GIL in these kernels, so the
cores share the work. bfloat16 widens with no temporary at all: the 16 bits are copied
into the float32 destination as integers and shifted up in place; float16 is widened by a
fused kernel (:mod:`pipeline.formats.fused`), bit-identical to numpy's cast but faster.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from tqdm import tqdm

from pipeline.core.memory import empty_float32, worker_count
from pipeline.core.progress import progress_bar

ROWS_PER_CHUNK = 8192
SLAB_BYTES = 1 << 21  # float32 bytes written per slab: 2 MiB


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen by shifting the 16 bits up (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def widen_bfloat16(out: np.ndarray, bits: np.ndarray) -> None:
    """``out`` [rows, cols] C-contiguous float32 from bfloat16 bit patterns ``bits`` (uint16, same
    shape), in place: numpy copies the 16 bits up at the copy rate, with no temporary."""
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="unsafe")  # uint16 -> uint32
    np.left_shift(wide, np.uint32(16), out=wide)


def _convert_slab(out: np.ndarray, block: np.ndarray, dtype_name: str) -> None:
    """``out`` [rows, cols] float32 (any row stride, contiguous rows) from ``block`` of the source."""
    if dtype_name == "bfloat16" and out.flags.c_contiguous:
        widen_bfloat16(out, block)
    elif dtype_name == "bfloat16":
        out[...] = bf16_bits_to_float32(np.asarray(block))
    elif block.dtype == np.float16 and block.dtype.isnative:
        # numba is imported here, only for float16 sources
        from pipeline.formats.fused import widen_float16

        widen_float16(out.view(np.uint32), block.view(np.uint16))
    else:
        np.copyto(out, block, casting="unsafe")


def parallel_rows(
    rows: int, row_bytes: int, work: Callable[[int, int], None], done: Callable[[int, int], None] | None = None
) -> None:
    """Call ``work(start, stop)`` on slabs of rows over a thread per core, in order of chunks.

    ``done(start, stop)`` is called (in this thread) once every slab of a chunk of
    :data:`ROWS_PER_CHUNK` rows has finished: a chunk's source pages can then be released.
    """
    slab = max(1, SLAB_BYTES // max(row_bytes, 1))
    workers = worker_count()
    if workers == 1 or rows <= slab:
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, rows)
            for s in range(start, stop, slab):
                work(s, min(s + slab, stop))
            if done is not None:
                done(start, stop)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, rows)
            futures = [pool.submit(work, s, min(s + slab, stop)) for s in range(start, stop, slab)]
            for future in futures:
                future.result()
            if done is not None:
                done(start, stop)


def fill_float32(
    out: np.ndarray,
    source: np.ndarray,
    dtype_name: str,
    bar: tqdm | None = None,
    release: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``source`` (raw values of ``dtype_name``; bfloat16 as uint16 bits) into ``out`` as float32.

    Row chunk by row chunk, so that only one chunk of the source is paged in at a time;
    ``release(start, stop)`` is told when rows ``start:stop`` of the source are no longer needed.
    """

    def work(start: int, stop: int) -> None:
        _convert_slab(out[start:stop], source[start:stop], dtype_name)

    def done(start: int, stop: int) -> None:
        if release is not None:
            release(start, stop)
        if bar is not None:
            bar.update(stop - start)

    parallel_rows(source.shape[0], out.shape[1] * 4, work, done)


def rows_to_float32(
    source: np.ndarray, dtype_name: str, desc: str, release: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """A float32 matrix [vocab, dim] from ``source``; a float32 memory map is returned as it is."""
    if dtype_name == "float32" and source.dtype == np.float32:
        return source
    out = empty_float32(source.shape)  # [vocab, dim]
    with progress_bar(total=source.shape[0], desc=desc, unit="rows") as bar:
        fill_float32(out, source, dtype_name, bar, release)
    return out


class MappedFile:
    """A read-only memory map of a file whose consumed ranges can be dropped from this process.

    Dropping (``MADV_DONTNEED``) keeps the pages in the page cache but takes them out of the
    process's resident set, so a converted source does not count twice against memory.
    """

    def __init__(self, path, offset: int, length: int):
        import mmap

        self._mmap_module = mmap
        page = mmap.ALLOCATIONGRANULARITY
        self.base = offset - offset % page
        self.skip = offset - self.base
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), length + self.skip, access=mmap.ACCESS_READ, offset=self.base)
        self.length = length

    def array(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(self.map, dtype=dtype, count=int(np.prod(shape)), offset=self.skip).reshape(shape)

    def release(self, start_byte: int, stop_byte: int) -> None:
        """Drop the whole pages inside bytes ``start_byte:stop_byte`` of the mapped tensor."""
        madvise = getattr(self.map, "madvise", None)
        if madvise is None or not hasattr(self._mmap_module, "MADV_DONTNEED"):
            return
        page = self._mmap_module.PAGESIZE
        begin = -(-(start_byte + self.skip) // page) * page
        end = (stop_byte + self.skip) // page * page
        if end > begin:
            madvise(self._mmap_module.MADV_DONTNEED, begin, end - begin)
