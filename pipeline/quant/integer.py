"""int8 with one scale per tensor (fixed, as in the tutorial, or from the data) or per row."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.quant.base import Encoded, Scheme, as_float32, count_outside, scale_blocks

INT8_SYMMETRIC_MAX = 127


@dataclass(frozen=True)
class Int8TensorFixed(Scheme):
    """``torch.quantize_per_tensor(x, scale=0.01, zero_point=0, dtype=torch.qint8)``, as in the tutorial.

    The scale ignores the data, so every value outside [-1.28, 1.27] saturates at code
    -128 or 127: the clipped count says how much of the matrix that is.
    """

    name = "int8_tensor_fixed"
    description = "per-tensor int8, fixed scale 0.01 and zero point 0 (torch.quantize_per_tensor, qint8)"
    code_bits = 8
    scale: float = 0.01
    zero_point: int = 0
    qmin, qmax = -128, 127

    @property
    def tensor_scale(self) -> float:
        return self.scale

    @property
    def code_range(self) -> tuple[np.float32, np.float32]:
        """The lowest and highest values the codes decode to."""
        scale = np.float32(self.scale)
        return np.float32(self.qmin - self.zero_point) * scale, np.float32(self.qmax - self.zero_point) * scale

    def encode(self, rows: np.ndarray) -> Encoded:
        import torch  # only this scheme needs torch; importing it costs a second

        # torch warns on read-only arrays (a memory-mapped matrix); a chunk copy is cheap.
        source = torch.from_numpy(rows if rows.flags.writeable else rows.copy())
        # torch 2.13 marks quantized tensors deprecated; this scheme reproduces the tutorial's
        # call. Filtered for the process, not inside warnings.catch_warnings(), which is not
        # thread-safe: another encoding thread leaving it restores the filters without this
        # one, and torch warns once, on whichever thread calls first.
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        quantized = torch.quantize_per_tensor(source, self.scale, self.zero_point, torch.qint8)
        codes = quantized.int_repr().numpy()  # [n, dim] int8
        return Encoded(codes=codes, scales=None, clipped=self.beyond_range(rows))

    def beyond_range(self, rows: np.ndarray) -> int:
        """How many of ``rows`` lie beyond the values the codes reach (they saturate)."""
        low, high = self.code_range
        return count_outside(rows, low, high)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        # As torch's dequantize: float(scale) * (code - zero_point), in float32.
        values = as_float32(encoded.codes, out)  # [n, dim]
        if self.zero_point:
            values -= np.float32(self.zero_point)
        values *= np.float32(self.scale)
        return values

    def recipe(self, dim: int) -> dict:
        return {**super().recipe(dim), "offset": self.zero_point}


@dataclass(frozen=True)
class Int8Tensor(Scheme):
    """Symmetric int8 with one scale for the tensor, max |x| / 127: nothing clips."""

    name = "int8_tensor"
    description = "per-tensor symmetric int8, scale = max|x| / 127, round half to even"
    code_bits = 8
    absmax: float | None = None

    def fit(self, matrix: np.ndarray) -> Int8Tensor:
        return Int8Tensor(absmax=float(_absmax_by_chunks(matrix)))

    @property
    def fitted_absmax(self) -> np.float32:
        if self.absmax is None:
            raise RuntimeError("int8_tensor must be fitted to the matrix (Int8Tensor().fit(matrix)) before use")
        return np.float32(self.absmax)

    @property
    def tensor_scale(self) -> float:
        return float(self.fitted_absmax / np.float32(INT8_SYMMETRIC_MAX))

    def encode(self, rows: np.ndarray) -> Encoded:
        absmax = np.full((1, 1), self.fitted_absmax, dtype=np.float32)
        return Encoded(codes=absmax_int8(rows, absmax), scales=None, clipped=0)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        values = as_float32(encoded.codes, out)  # [n, dim]
        values *= np.float32(self.tensor_scale)
        return values


class Int8Row(Scheme):
    """Symmetric int8 with one float32 scale per row, the row's max |x| / 127 (absmax)."""

    name = "int8_row"
    description = "per-row absmax int8, scale = max|row| / 127 (float32), round half to even"
    code_bits = 8

    def block_for(self, dim: int) -> int:
        return dim

    def encode(self, rows: np.ndarray) -> Encoded:
        absmax = np.abs(rows).max(axis=1, keepdims=True)  # [n, 1]
        scales = absmax / np.float32(INT8_SYMMETRIC_MAX)  # [n, 1] float32
        return Encoded(codes=absmax_int8(rows, absmax), scales=scales, clipped=0)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        return scale_blocks(as_float32(encoded.codes, out), encoded.scales)


def absmax_int8(rows: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """int8 codes [n, dim] of ``rows`` scaled so that ``absmax`` [n or 1, 1] maps to 127.

    The scale comes from the absmax, so no value lies beyond the codes' range.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inverse = np.where(absmax > 0, np.float32(INT8_SYMMETRIC_MAX) / absmax, np.float32(0))
        scaled = rows * inverse  # [n, dim] float32
    overflowed = np.isinf(inverse)  # absmax below ~4e-37: divide first, then widen
    if overflowed.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(overflowed, rows / absmax * np.float32(INT8_SYMMETRIC_MAX), scaled)
    np.rint(scaled, out=scaled)
    # 127/absmax * absmax may land one ulp above 127; clip so no code wraps around.
    np.clip(scaled, -INT8_SYMMETRIC_MAX, INT8_SYMMETRIC_MAX, out=scaled)
    return scaled.astype(np.int8)


def _absmax_by_chunks(matrix: np.ndarray, rows_per_chunk: int = 8192) -> np.float32:
    """The largest |value| of ``matrix`` [vocab, dim], its chunks' extremes found on the cores
    and folded in chunk order (a chunk holding NaN leaves the peak as it was)."""
    from pipeline.core.parallel import chunk_map

    def extremes(start: int, stop: int) -> tuple[np.float32, np.float32] | None:
        chunk = matrix[start:stop]
        return (np.float32(chunk.max()), -np.float32(chunk.min())) if chunk.size else None

    peak = np.float32(0)
    for found in chunk_map(extremes, matrix.shape[0], rows_per_chunk):
        if found is not None:
            peak = max(peak, *found)
    return np.float32(peak)
