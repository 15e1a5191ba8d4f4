"""Work spread over the cores with threads: numpy and torch kernels release the GIL.

One pool of a thread per core (plus one, so a chunk's measurement runs beside the next
chunk's encoding) and one single measuring thread whose tasks run in the order they were
started. Splitting rows among threads changes no value: every row is computed alone.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from pipeline.core.memory import worker_count


_POOL: list = []
MIN_ROWS_PER_THREAD = 256


def split_map(function: Callable[[np.ndarray], Any], rows: np.ndarray) -> list[Any]:
    """``function`` on consecutive row slices of ``rows``, one per core, results in row order.

    The schemes' kernels are numpy (and torch) calls that release the GIL, so the cores
    share a chunk; rows are independent once a scheme is fitted, so the split changes no value.
    """
    return span_map(lambda span: function(rows[span[0] : span[1]]), len(rows))


def span_map(function: Callable[[tuple[int, int]], Any], rows: int) -> list[Any]:
    """``function((start, stop))`` for consecutive spans of ``rows`` rows, one per core, in order."""
    workers = worker_count()
    if workers == 1 or rows < 2 * MIN_ROWS_PER_THREAD:
        return [function((0, rows))]
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    return list(_pool(workers).map(function, list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))))


def _pool(workers: int) -> Any:
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        # One more thread than cores: the measuring thread's own spans (rescoring a
        # chunk's candidates, restoring seed rows) start while the next chunk is encoded.
        _POOL.append(ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="quantize"))
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure"))
    return _POOL[0]


def in_order(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``function(*args)`` on the single measuring thread; the returned call waits for it.

    Calls started this way run one after another in the order they were started. Runs it
    right away when there is one core.
    """
    return _submit(1, function, *args)


def _submit(pool_index: int, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``function(*args)`` on ``_POOL[pool_index]`` (0: the cores, 1: the measuring thread), or now on one core."""
    workers = worker_count()
    if workers == 1:
        result = function(*args)
        return lambda: result
    _pool(workers)
    return _POOL[pool_index].submit(function, *args).result


def row_chunks(rows: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, rows)


def chunk_map(function: Callable[[int, int], Any], rows: int, rows_per_chunk: int) -> list[Any]:
    """``[function(start, stop) for each chunk of rows]``, the chunks shared among the cores."""
    chunks = list(row_chunks(rows, rows_per_chunk))
    workers = worker_count()
    if workers == 1:
        return [function(start, stop) for start, stop in chunks]
    return list(_pool(workers).map(lambda chunk: function(*chunk), chunks))


def start_in_background(function: Callable[[], Any], name: str) -> None:
    """Run ``function()`` on a daemon thread of its own, its errors dropped: for work whose only
    effect is that later work runs sooner (importing torch, numba's first compiled call), done
    while a read leaves the GIL free. Whatever it failed at fails again where it is needed."""
    import threading

    def run() -> None:
        try:
            function()
        except BaseException:
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
