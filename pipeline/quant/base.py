"""What every quantization scheme provides, and the recipe that rebuilds its floats.

A scheme turns float32 rows into codes plus scales (:meth:`Scheme.encode`) and back
(:meth:`Scheme.decode`). Rows are independent once the scheme is fitted, so the stage
streams the matrix through it in row chunks. The recipe (:meth:`Scheme.recipe`) is the
dequantization written as data, stored in each output file's metadata, so a reader with
only pyarrow and numpy can rebuild the float matrix:

    value = lookup[code] if lookup else code - offset     one per element
    x     = value * scale                                  one scale per block of `block` values

``scale`` is one number for the whole tensor, or a ``scales`` column with
``dim // block`` entries per row. 4-bit codes are packed two a byte: a run of
``nibble_span`` codes in one nibble (``low_nibble_first`` says which), then the next run in
the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.core.errors import DissectError


@dataclass(frozen=True)
class Encoded:
    """Codes and scales of a run of rows."""

    codes: np.ndarray  # [rows, code_width] of the scheme's codes_dtype: int8, uint8 (two 4-bit codes a byte), float16 or bfloat16 bits (uint16)
    scales: np.ndarray | None  # [rows, dim // block] float32; None when one scale covers the tensor
    clipped: int  # values beyond the range the codes can represent


class Scheme(ABC):
    """One quantization scheme; subclasses set the class attributes and the two kernels."""

    name: ClassVar[str]
    description: ClassVar[str]
    code_bits: ClassVar[int]  # bits a code takes in the format (4, 8, 16)
    block: ClassVar[int | None] = None  # elements per stored scale; None: a single per-tensor scale
    scale_bits: ClassVar[int] = 32  # bits of one scale in the format
    scale_format: ClassVar[str] = "float32"
    lookup: ClassVar[tuple[float, ...] | None] = None  # code -> value table (NF4)
    offset: ClassVar[int] = 0  # subtracted from integer codes before scaling
    low_nibble_first: ClassVar[bool] = True
    nibble_span: ClassVar[int] = 1
    float_format: ClassVar[str | None] = None  # 16-bit float schemes: "float16" or "bfloat16"

    def check(self, dim: int) -> None:
        """A :class:`DissectError` when rows of width ``dim`` cannot be encoded."""
        block = self.block_for(dim)
        if block is not None and dim % block:
            raise DissectError(
                f"{self.name} quantizes blocks of {block} values along each row, but the embedding dim is {dim} "
                f"(not a multiple of {block}); remove {self.name} from quantize.schemes for this model"
            )

    def block_for(self, dim: int) -> int | None:
        return self.block

    def fit(self, matrix: np.ndarray) -> Scheme:
        """The scheme with its per-tensor parameters taken from ``matrix`` [vocab, dim]."""
        return self

    @property
    def tensor_scale(self) -> float | None:
        """The one scale of per-tensor schemes (None when the scales are stored per row or block)."""
        return None

    @abstractmethod
    def encode(self, rows: np.ndarray) -> Encoded:
        """Codes of ``rows`` [n, dim] float32."""

    @abstractmethod
    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 rows [n, dim] that ``encoded`` stands for, written into ``out`` when given
        (schemes whose codes are already those rows return the codes instead)."""

    @property
    def codes_dtype(self) -> np.dtype:
        """dtype of the codes :meth:`encode` returns, as the ``codes`` column stores their bytes."""
        if self.code_bits == 16:
            return np.dtype(np.float16 if self.float_format == "float16" else np.uint16)
        return np.dtype({4: np.uint8, 8: np.int8}[self.code_bits])

    @property
    def codes_column(self) -> str:
        """What the bytes of the ``codes`` column hold, for a reader of the file's metadata."""
        if self.code_bits == 4:
            return "uint8, two 4-bit codes a byte"
        if self.float_format == "float16":
            return "float16 little-endian, the values rounded to IEEE half precision"
        if self.float_format == "bfloat16":
            return "uint16 little-endian, the bfloat16 bit pattern (the high 16 bits of the float32 value)"
        return "int8"

    def code_width(self, dim: int) -> int:
        """Codes per row, as the codes column stores them (a byte holds two 4-bit codes)."""
        return dim * self.code_bits // 8 if self.code_bits == 4 else dim

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Bits of the format per matrix element, scales included."""
        vocab, dim = shape
        block = self.block_for(dim)
        scales = vocab * dim / block if block else 1
        return self.code_bits + scales * self.scale_bits / (vocab * dim)

    def recipe(self, dim: int) -> dict[str, Any]:
        """How to rebuild float32 rows from the stored columns (see the module docstring)."""
        return {
            "scheme": self.name,
            "description": self.description,
            "dim": dim,
            "code_bits": self.code_bits,
            "codes_column": self.codes_column,
            "codes_dtype": self.codes_dtype.str,
            "float_format": self.float_format,
            "low_nibble_first": self.low_nibble_first if self.code_bits == 4 else None,
            "nibble_span": self.nibble_span if self.code_bits == 4 else None,
            "lookup": list(self.lookup) if self.lookup is not None else None,
            "offset": self.offset,
            "scale": self.tensor_scale,
            "block": self.block_for(dim) if self.tensor_scale is None else None,
            "scale_format": self.scale_format,
            "formula": "x = (lookup[code] if lookup else code - offset) * scale, one scale per block of `block` values in a row",
        }


def pack_nibbles(codes: np.ndarray, span: int, low_first: bool) -> np.ndarray:
    """uint8 [n, dim // 2] from 4-bit ``codes`` [n, dim]: runs of ``span`` codes share a nibble."""
    n = codes.shape[0]
    runs = codes.reshape(n, -1, 2, span)  # [n, dim // (2 span), 2, span]
    first, second = runs[:, :, 0, :], runs[:, :, 1, :]
    low, high = (first, second) if low_first else (second, first)
    return (low | (high << np.uint8(4))).reshape(n, -1)


def unpack_nibbles(packed: np.ndarray, span: int, low_first: bool) -> np.ndarray:
    """uint8 [n, 2 * bytes] 4-bit codes from ``packed`` [n, bytes]; inverse of :func:`pack_nibbles`."""
    n = packed.shape[0]
    low, high = packed & np.uint8(15), packed >> np.uint8(4)
    first, second = (low, high) if low_first else (high, low)
    runs = np.stack([first.reshape(n, -1, span), second.reshape(n, -1, span)], axis=2)  # [n, runs, 2, span]
    return runs.reshape(n, -1)


def as_float32(codes: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``codes`` as float32 (exactly: integer codes fit), into ``out`` (same shape) when given."""
    if out is None:
        return codes.astype(np.float32)
    np.copyto(out, codes)
    return out


def count_outside(values: np.ndarray, low: float, high: float) -> int:
    """How many of ``values`` lie below ``low`` or above ``high``."""
    if values.size and float(values.max()) <= high and float(values.min()) >= low:
        return 0  # the usual case, told by two passes without a temporary array (NaN falls through)
    return int(np.count_nonzero(values > high)) + int(np.count_nonzero(values < low))


def scale_blocks(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``values`` [n, dim] float32 times ``scales`` [n, dim // block], block by block."""
    n = values.shape[0]
    blocks = values.reshape(n, scales.shape[1], -1)  # [n, blocks, block]
    return np.multiply(blocks, scales[:, :, None], out=blocks).reshape(n, -1)
