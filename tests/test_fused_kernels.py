"""The fused numba kernels (pipeline/formats/fused.py) against the numpy dequantizers they
replaced (tests/numpy_dequantizers.py) and the ``gguf`` package, bit for bit: every float16
bit pattern in every fp16 field (NaN payloads, infinities, subnormals, negative zero), random
codes, and hypothesis-drawn blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_dequantizers import REFERENCE

from pipeline.formats.convert import fill_float32, rows_to_float32
from pipeline.formats.gguf import FUSED_TYPES, dequantize_rows

REPO = Path(__file__).resolve().parent.parent
QT = gguf.GGMLQuantizationType
EVERY_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # [65536] every float16 bit pattern
# Float16 bits a hostile file could hold: zeros, subnormals, extremes, infinities, quiet and signalling NaNs.
HOSTILE_HALVES = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
                  0x7C01, 0xFC01, 0x7D55, 0x7DFF, 0x7E00, 0xFE00, 0x7E01, 0x7FFF, 0xFFFF, 0x3C00, 0x2E66]
# Byte offsets of each type's fp16 fields in its block.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


def bits(matrix: np.ndarray) -> np.ndarray:
    return matrix.view(np.uint32)


def dequantized(name: str, raw: np.ndarray, dim: int) -> np.ndarray:
    """Ours, through the reader's entry point (slabs over the thread pool): [rows, dim] float32."""
    return dequantize_rows(raw, int(QT[name]), (raw.shape[0], dim), "token_embd.weight")


def reference(name: str, raw: np.ndarray, dim: int) -> np.ndarray:
    """The numpy dequantizer on ``raw`` [rows, bytes per row], run on the rows twice over: for a
    single block numpy's Q4_1 add takes another loop, which keeps m's NaN where both operands
    are NaN; every slab of more blocks (all that real tensors make) keeps the first operand's."""
    doubled = np.concatenate([raw, raw])  # [2 rows, bytes per row]
    out = np.empty((doubled.shape[0], dim), np.float32)  # [2 rows, dim]
    with np.errstate(all="ignore"):
        REFERENCE[name](out, doubled)
    return out[: raw.shape[0]]


def random_blocks(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, block bytes] uint8 of random codes and random (often hostile) fp16 fields."""
    return rng.integers(0, 256, (count, gguf.GGML_QUANT_SIZES[QT[name]][1]), dtype=np.uint8)


def set_half(blocks: np.ndarray, at: int, halves: np.ndarray) -> None:
    """Write float16 bits ``halves`` [count] into the field at byte ``at`` of each block [count, bytes]."""
    blocks[:, at : at + 2] = halves.astype("<u2").view(np.uint8).reshape(-1, 2)


def as_rows(name: str, blocks: np.ndarray) -> tuple[np.ndarray, int]:
    """Blocks [count, bytes] laid out as rows of 256 values: ([rows, bytes per row], 256)."""
    per_block = gguf.GGML_QUANT_SIZES[QT[name]][0]
    return blocks.reshape(-1, 256 // per_block * blocks.shape[1]), 256


def test_fused_types_are_the_compiled_kernels():
    from pipeline.formats.fused import GGML_KERNELS

    assert set(GGML_KERNELS) == set(FUSED_TYPES) == set(REFERENCE)


def test_float16_widening_equals_numpys_cast_for_every_bit_pattern():
    halves = EVERY_HALF.reshape(256, 256)  # [rows, cols]
    expected = halves.view(np.float16).astype(np.float32)
    assert np.array_equal(bits(rows_to_float32(halves.view(np.float16), "float16", "widen")), bits(expected))
    assert np.array_equal(bits(dequantized("F16", halves.view(np.uint8), 256)), bits(expected))
    assert np.array_equal(bits(dequantize(halves.view(np.uint8), QT.F16)), bits(expected))


def test_float16_widening_into_columns_and_from_strided_sources():
    """The Meta reader joins Llama 2 shards side by side (an output with a row stride), and a
    source may be a strided view: both take the kernel's general path."""
    halves = np.random.default_rng(2).permutation(EVERY_HALF).reshape(512, 128).view(np.float16)  # [rows, cols]
    out = np.empty((512, 256), np.float32)  # [rows, two shards' columns]
    fill_float32(out[:, :128], halves, "float16")
    fill_float32(out[:, 128:], halves[:, ::-1], "float16")
    assert np.array_equal(bits(out[:, :128]), bits(halves.astype(np.float32)))
    assert np.array_equal(bits(out[:, 128:]), bits(halves[:, ::-1].astype(np.float32)))


@pytest.mark.parametrize("name", sorted(HALF_FIELDS))
def test_every_float16_in_every_field_equals_numpy_and_gguf(name):
    rng = np.random.default_rng(11)
    for at in HALF_FIELDS[name]:
        blocks = random_blocks(name, len(EVERY_HALF), rng)  # [65536, bytes]: other fields random bits
        set_half(blocks, at, rng.permutation(EVERY_HALF))
        raw, dim = as_rows(name, blocks)
        ours = dequantized(name, raw, dim)
        assert np.array_equal(bits(ours), bits(reference(name, raw, dim))), (name, at)
        with np.errstate(all="ignore"):
            package = dequantize(raw, QT[name]).reshape(raw.shape[0], dim)
        assert np.array_equal(bits(ours), bits(package)), (name, at)


@pytest.mark.parametrize("name", sorted(HALF_FIELDS))
def test_sane_scales_equal_numpy_and_gguf(name):
    """Scales as real files hold them (small, signed): the values a model is read with."""
    rng = np.random.default_rng(12)
    blocks = random_blocks(name, 4096, rng)
    for at in HALF_FIELDS[name]:
        set_half(blocks, at, (rng.standard_normal(len(blocks)) * 0.02).astype(np.float16).view(np.uint16))
    raw, dim = as_rows(name, blocks)
    ours = dequantized(name, raw, dim)
    assert np.all(np.isfinite(ours))
    assert np.array_equal(bits(ours), bits(reference(name, raw, dim)))
    assert np.array_equal(bits(ours), bits(dequantize(raw, QT[name]).reshape(raw.shape[0], dim)))


half_bits = st.one_of(st.sampled_from(HOSTILE_HALVES), st.integers(0, 0xFFFF))


@st.composite
def hostile_rows(draw, name: str) -> tuple[np.ndarray, int]:
    """([rows, bytes per row] uint8, dim): random code bytes and fp16 fields from ``half_bits``."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[QT[name]]
    rows, per_row = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    count = rows * per_row
    blocks = np.frombuffer(draw(st.binary(min_size=count * block_bytes, max_size=count * block_bytes)), np.uint8)
    blocks = blocks.reshape(count, block_bytes).copy()
    for at in HALF_FIELDS[name]:
        set_half(blocks, at, np.array(draw(st.lists(half_bits, min_size=count, max_size=count)), np.uint16))
    return blocks.reshape(rows, per_row * block_bytes), per_row * per_block


@pytest.mark.parametrize("name", sorted(HALF_FIELDS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hostile_blocks_equal_numpy_bit_for_bit(name, data):
    raw, dim = data.draw(hostile_rows(name))
    assert np.array_equal(bits(dequantized(name, raw, dim)), bits(reference(name, raw, dim)))


@settings(max_examples=200, deadline=None)
@given(st.lists(half_bits, min_size=1, max_size=64))
def test_hostile_float16_values_equal_numpys_cast(halves):
    source = np.array(halves, np.uint16).view(np.float16).reshape(1, -1)  # [1, cols]
    assert np.array_equal(bits(rows_to_float32(source, "float16", "widen")), bits(source.astype(np.float32)))


def test_numba_is_imported_only_for_the_types_it_compiles():
    code = (
        "import sys, numpy as np, gguf\n"
        "import pipeline.formats\n"
        "from pipeline.formats.convert import rows_to_float32\n"
        "from pipeline.formats.gguf import dequantize_rows\n"
        "rows_to_float32(np.zeros((4, 8), np.uint16), 'bfloat16', 'x')\n"
        "rows_to_float32(np.zeros((4, 8), np.float64), 'float64', 'x')\n"
        "for name, width in (('BF16', 16), ('F32', 32), ('Q8_0', 34)):\n"
        "    dequantize_rows(np.zeros((4, width), np.uint8), int(gguf.GGMLQuantizationType[name]), (4, 8 if name != 'Q8_0' else 32), 'k')\n"
        "before = 'numba' in sys.modules\n"
        "rows_to_float32(np.zeros((4, 8), np.float16), 'float16', 'x')\n"
        "print(before, 'numba' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False True"
