"""Where the matmul-bound work runs: numpy's BLAS on the CPU, or a CUDA device through torch.

``compute.device`` in params.yaml chooses it for every stage:

* ``auto`` (the default): CUDA when the machine has an NVIDIA device and torch can use it,
  else the CPU;
* ``cpu``: numpy's BLAS, never torch's device code;
* ``cuda``: the first CUDA device; a machine without one stops the stage with one line.

Three products move to the device: the float32 tiles of the exact neighbour search
(:func:`pipeline.core.knn.knn_graph`, whose tiles above the diagonal stay there and send back
only the entries that reach a query's threshold (:meth:`Resident.hits_between`);
:class:`pipeline.core.knn.TopK`), the bfloat16 screen of the
quantize stage's recall (:mod:`pipeline.core.screen`) and the block products of PCA's
covariance (:mod:`pipeline.core.pca`). None of them is published as it comes out: each engine
bounds the rounding error of its products for any summation order and decides what it
publishes from values it recomputes on the CPU in a fixed order (neighbour cosines in
float64, PCA's refined axes and rounded coordinates). So the choice changes where the time
goes, never a byte of an output, and it is not part of any output's provenance. For those
bounds to hold, the device must sum float32 products in float32: TF32 and reduced-precision
reductions are switched off before the first product (:func:`strict_float32`).

The torch path runs on any torch device; the tests run it on the CPU (``computing_on("cpu")``)
and check its outputs are the bytes of the numpy path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.core.settings import one_of, read_section, setting

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_ENV = "EMBEDDING_DISSECT_DEVICE"  # overrides compute.device for one process (a GPU worker)
# Also allowed there: the device code path run by torch on the CPU, to check it on a machine without a GPU.
TORCH_ON_CPU = "torch-cpu"
# Device nodes the NVIDIA driver creates: without one, `auto` needs no torch import to know.
NVIDIA_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia/version")


@dataclass(frozen=True)
class ComputeSettings:
    # Where products run: auto (CUDA when present), cpu or cuda; outputs are the same bytes.
    device: str = setting("auto", one_of(*DEVICE_CHOICES), recorded=False)


def read_compute(params: Mapping[str, Any]) -> ComputeSettings:
    return read_section(ComputeSettings, params.get("compute"), "compute")


def nvidia_driver_present(nodes: tuple[str, ...] = NVIDIA_NODES) -> bool:
    return any(Path(node).exists() for node in nodes)


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(
    choice: str,
    driver_present: Callable[[], bool] = nvidia_driver_present,
    cuda_available: Callable[[], bool] = torch_cuda_available,
) -> str | None:
    """The torch device name the products run on for a ``compute.device`` choice, or None for
    numpy on the CPU. ``auto`` imports torch only where an NVIDIA driver is installed."""
    if choice == "cpu":
        return None
    if choice == TORCH_ON_CPU:
        return "cpu"
    if choice == "auto":
        return "cuda" if driver_present() and cuda_available() else None
    if choice == "cuda":
        if not cuda_available():
            raise DissectError(
                "compute.device is cuda but torch sees no CUDA device here (a CPU build of torch, or no GPU); "
                "set compute.device to auto or cpu"
            )
        return "cuda"
    raise DissectError(f"compute.device must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}")


_DEVICE: str | None = None  # the torch device of this process's products; None: numpy on the CPU


def compute_device() -> str | None:
    """The torch device products run on in this process, or None for numpy on the CPU."""
    return _DEVICE


def use_device(name: str | None) -> None:
    """Run this process's products on torch device ``name`` (None: numpy on the CPU)."""
    global _DEVICE
    if name is not None:
        strict_float32()
    _DEVICE = name


def use_compute_settings(params: Mapping[str, Any]) -> None:
    """Set this process's device from params.yaml's ``compute`` section (what a stage does first);
    the environment variable EMBEDDING_DISSECT_DEVICE, when set, overrides it (one worker of a
    cluster with a GPU, say)."""
    settings = read_compute(params)
    choice = os.environ.get(DEVICE_ENV) or settings.device
    if choice not in (*DEVICE_CHOICES, TORCH_ON_CPU):
        raise DissectError(f"{DEVICE_ENV} must be one of {', '.join((*DEVICE_CHOICES, TORCH_ON_CPU))}, got {choice!r}; unset it to use compute.device")
    use_device(resolve_device(choice))


@contextmanager
def computing_on(name: str | None) -> Iterator[None]:
    """Products inside the block run on torch device ``name`` (None: numpy), as before after it."""
    before = compute_device()
    use_device(name)
    try:
        yield
    finally:
        use_device(before)


def strict_float32() -> None:
    """Make CUDA matmuls accumulate float32 in float32 (no TF32, no reduced-precision
    reductions for bfloat16 and float16 inputs): the error bounds of the screens assume it."""
    import torch

    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = False
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False


class Resident:
    """A float32 matrix [n, dim] kept where the products run, copied there once.

    On the CPU it is the array itself and products are numpy's BLAS (:func:`cpu_product`); on
    a torch device it is a copy on that device, and each product comes back as a float32
    numpy array.
    """

    def __init__(self, matrix: np.ndarray):
        self.device = compute_device()
        self.matrix = matrix
        self.on_device = None
        if self.device is not None:
            import torch

            self.on_device = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(self.device)  # [n, dim]

    def times_rows(self, a: slice, b: slice, scratch: np.ndarray | None = None) -> np.ndarray:
        """float32 [a rows, b rows]: rows ``a`` times rows ``b`` of the matrix, transposed; on the
        CPU written into the front of ``scratch`` (flat float32, reused) when it is given."""
        if self.on_device is None:
            return cpu_product(self.matrix[a], self.matrix[b], scratch)
        return (self.on_device[a] @ self.on_device[b].T).cpu().numpy()

    def hits_between(
        self, a: slice, b: slice, row_floor: np.ndarray, column_floor: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """On a torch device: rows ``a`` times rows ``b`` transposed, kept there, and only the
        entries that reach a floor brought back: ((r, c, value) where ``product >= row_floor[:, None]``,
        (r, c, value) where ``product >= column_floor[None, :]``), each in row-major order as
        ``np.nonzero`` lists them (int64, int64, float32), for float32 floors [a] and [b].

        The whole product would cross to the host as a 64 MiB tile of 4096 x 4096; once every
        query holds a top-k, a few thousand of its 16.8 M entries reach a floor."""
        import torch

        product = self.on_device[a] @ self.on_device[b].T  # [a rows, b rows] float32, on the device
        floors = (
            torch.from_numpy(np.ascontiguousarray(row_floor, np.float32)).to(self.device)[:, None],  # [a, 1]
            torch.from_numpy(np.ascontiguousarray(column_floor, np.float32)).to(self.device)[None, :],  # [1, b]
        )
        found = []
        for floor in floors:
            r, c = torch.nonzero(product >= floor, as_tuple=True)  # row-major
            found.append((r.cpu().numpy(), c.cpu().numpy(), product[r, c].cpu().numpy()))
        return found[0], found[1]

    def times(self, keys: np.ndarray) -> np.ndarray:
        """float32 [n, m]: the matrix times ``keys`` [m, dim] (host rows), transposed."""
        if self.on_device is None:
            return cpu_product(self.matrix, keys)
        import torch

        moved = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)).to(self.device)  # [m, dim]
        return (self.on_device @ moved.T).cpu().numpy()


def cpu_product(left: np.ndarray, right: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """float32 [l, r]: ``left`` [l, dim] times ``right`` [r, dim] transposed, by numpy's BLAS
    on one thread per core, each core multiplying its own span of the longer side's rows;
    written into the front of ``scratch`` (a flat buffer of at least l * r) when given: a
    fresh array of a tile's size is mapped afresh by the allocator, and every one of its
    pages is then faulted in again.

    OpenBLAS's own threads keep spinning for a while after a product returns, and the
    compiled passes that read the product next then share the cores with them: on two cores
    a 4096 x 4096 tile's pass took 60 ms after a threaded product against 34 ms after this
    one, and the product itself was no slower (0.17-0.19 s against 0.20 s). Every element
    is one dot product whichever span holds it; the engines bound any summation order anyway.
    """
    from pipeline.core.parallel import span_map

    shape = (left.shape[0], right.shape[0])
    dtype = np.result_type(left, right)
    fits = scratch is not None and scratch.dtype == dtype and scratch.size >= shape[0] * shape[1]
    out = scratch[: shape[0] * shape[1]].reshape(shape) if fits else np.empty(shape, dtype=dtype)  # [l, r]
    by_rows = left.shape[0] >= right.shape[0]

    def span_product(span: tuple[int, int]) -> None:
        part = slice(*span)
        if by_rows:
            np.matmul(left[part], right.T, out=out[part])
        else:
            np.matmul(left, right[part].T, out=out[:, part])

    with one_blas_thread():
        span_map(span_product, max(left.shape[0], right.shape[0]))
    return out


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on the calling thread alone inside the block (as before after it).

    OpenBLAS's thread count is process-wide, and threadpoolctl lets one thread change it: the
    first to set a limit (a stage's main thread) while it lives. A block opened in another
    thread then changes nothing, and its products run on the BLAS's own threads as well: the
    same numbers, only more threads than cores.
    """
    if not _BLAS_CONTROL:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROL.append(ThreadpoolController())  # finding the loaded libraries once: 0.3 ms a call otherwise
    with _BLAS_CONTROL[0].limit(limits=1, user_api="blas"):
        yield


_BLAS_CONTROL: list = []
