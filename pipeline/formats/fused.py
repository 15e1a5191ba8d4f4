"""Fused per-element kernels, compiled with numba: float16 widening and GGML dequantization.

Each kernel reads a slab's raw bytes once and writes each float32 value once, with no
temporaries, so a slab runs near the rate of a memory copy of its output. They compute
exactly the float32 expressions of the numpy formulas they replace (the ``gguf``
package's), operation by operation and in the same order, without fastmath: the output is
bit-identical, NaN payloads and signed zeros included.

This module imports numba; the readers import it only when a tensor needs one of these
kernels, so reading bfloat16 or float32 never pays for the import. ``nogil`` lets the
thread-per-core slabs of :func:`pipeline.formats.convert.parallel_rows` run in parallel;
``cache`` keeps the compiled code beside this file, so a DVC stage's process loads it
instead of compiling again.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_F32_EXPONENT_REBIAS = np.uint32((127 - 15) << 23)  # float16 -> float32 exponent bias, in place
_F32_SPECIAL_EXPONENT = np.uint32(0x7F800000)  # all ones: inf or NaN
_HALF_SUBNORMAL_UNIT = np.float32(2.0**-24)  # value of the lowest float16 mantissa bit at exponent 0


@numba.njit(nogil=True, cache=True)
def _half_to_float32_bits(half):
    """The float32 bits of the float16 with bits ``half`` (an integer 0..65535), exactly as numpy casts it.

    Normals move by integer arithmetic (the exponent rebiased); subnormals are a small
    integer times 2**-24, whose product is a float32 normal, so no float op ever sees a
    subnormal and flush-to-zero settings cannot change a bit; inf and NaN keep their
    mantissa bits (NaN payloads, signalling ones too, as numpy's cast keeps them).
    """
    half = np.uint32(half)
    sign = (half & np.uint32(0x8000)) << np.uint32(16)
    magnitude = half & np.uint32(0x7FFF)
    shifted = magnitude << np.uint32(13)
    normal = shifted + _F32_EXPONENT_REBIAS
    subnormal = np.float32(np.float32(magnitude) * _HALF_SUBNORMAL_UNIT).view(np.uint32)
    special = shifted | _F32_SPECIAL_EXPONENT
    if magnitude >= np.uint32(0x7C00):
        bits = special
    elif magnitude >= np.uint32(0x0400):
        bits = normal
    else:
        bits = subnormal
    return bits | sign


@numba.njit(nogil=True, cache=True)
def _half_field(raw, row, at):
    """The little-endian float16 at bytes ``at``, ``at + 1`` of ``raw[row]``, as float32."""
    half = np.uint32(raw[row, at]) | (np.uint32(raw[row, at + 1]) << np.uint32(8))
    return np.uint32(_half_to_float32_bits(half)).view(np.float32)


@numba.njit(nogil=True, cache=True)
def widen_float16(out_bits, half_bits):
    """``out_bits`` [rows, cols] uint32 (a float32 matrix's bits) from ``half_bits`` [rows, cols] uint16."""
    for row in range(half_bits.shape[0]):
        for col in range(half_bits.shape[1]):
            out_bits[row, col] = _half_to_float32_bits(half_bits[row, col])


@numba.njit(nogil=True, cache=True)
def _q4_0(out, raw, run):
    """``out`` [rows, dim] float32 from Q4_0 blocks ``raw`` [rows, dim / 32 * 18]: fp16 d, 16 bytes of
    nibbles (low nibbles are values 0..15, high ones 16..31); value = (q - 8) * d. ``run`` is 16
    (see :func:`_vectorized`)."""
    for row in range(raw.shape[0]):
        for block in range(raw.shape[1] // 18):
            at, to = block * 18, block * 32
            d = _half_field(raw, row, at)
            for i in range(run):
                code = raw[row, at + 2 + i]
                out[row, to + i] = (np.float32(code & np.uint8(15)) - np.float32(8.0)) * d
                out[row, to + 16 + i] = (np.float32(code >> np.uint8(4)) - np.float32(8.0)) * d


@numba.njit(nogil=True, cache=True)
def _add_keeping_first_nan(first, second):
    """``first + second``, where a NaN ``first`` is the answer even if ``second`` is NaN too.

    x86 returns the first operand's NaN when both are NaN, and numpy's add does so; LLVM may
    swap the operands of an add, so a NaN ``first`` (a product, hence already quiet) is
    chosen explicitly.
    """
    return first if math.isnan(first) else first + second


@numba.njit(nogil=True, cache=True)
def _q4_1(out, raw, run):
    """``out`` [rows, dim] float32 from Q4_1 blocks ``raw`` [rows, dim / 32 * 20]: fp16 d, fp16 m, 16 bytes
    of nibbles laid out as Q4_0's; value = (q - 0) * d + m (the subtraction of zero kept, as numpy does it).
    ``run`` is 16."""
    for row in range(raw.shape[0]):
        for block in range(raw.shape[1] // 20):
            at, to = block * 20, block * 32
            d, m = _half_field(raw, row, at), _half_field(raw, row, at + 2)
            for i in range(run):
                code = raw[row, at + 4 + i]
                low = (np.float32(code & np.uint8(15)) - np.float32(0.0)) * d
                high = (np.float32(code >> np.uint8(4)) - np.float32(0.0)) * d
                out[row, to + i] = _add_keeping_first_nan(low, m)
                out[row, to + 16 + i] = _add_keeping_first_nan(high, m)


@numba.njit(nogil=True, cache=True)
def _k_scale_and_min(raw, row, at, j):
    """Q4_K's 6-bit (scale, min) of sub-block ``j`` (0..7) from the 12 packed bytes at ``raw[row, at:]``."""
    if j < 4:
        return raw[row, at + j] & np.uint8(0x3F), raw[row, at + 4 + j] & np.uint8(0x3F)
    mixed, low, high = raw[row, at + 4 + j], raw[row, at + j - 4], raw[row, at + j]
    return (mixed & np.uint8(0x0F)) | ((low >> np.uint8(2)) & np.uint8(0x30)), (mixed >> np.uint8(4)) | (
        (high >> np.uint8(2)) & np.uint8(0x30)
    )


@numba.njit(nogil=True, cache=True)
def _q4_k(out, raw, run):
    """``out`` [rows, dim] float32 from Q4_K super-blocks ``raw`` [rows, dim / 256 * 144]: fp16 d, fp16 dmin,
    12 bytes of 6-bit scales and mins, 128 bytes of nibbles; value = (d * scale) * q - dmin * min for each
    32-value sub-block (sub-block 2c: low nibbles of bytes 32c.., 2c + 1: their high nibbles). ``run`` is 32."""
    for row in range(raw.shape[0]):
        for block in range(raw.shape[1] // 144):
            at, to = block * 144, block * 256
            d, dmin = _half_field(raw, row, at), _half_field(raw, row, at + 2)
            for chunk in range(4):
                scale_low, min_low = _k_scale_and_min(raw, row, at + 4, 2 * chunk)
                scale_high, min_high = _k_scale_and_min(raw, row, at + 4, 2 * chunk + 1)
                step_low, offset_low = d * np.float32(scale_low), dmin * np.float32(min_low)
                step_high, offset_high = d * np.float32(scale_high), dmin * np.float32(min_high)
                codes, values = at + 16 + 32 * chunk, to + 64 * chunk
                for i in range(run):
                    code = raw[row, codes + i]
                    out[row, values + i] = np.float32(code & np.uint8(15)) * step_low - offset_low
                    out[row, values + 32 + i] = np.float32(code >> np.uint8(4)) * step_high - offset_high


@numba.njit(nogil=True, cache=True)
def _q6_k_value(nibble, pair, step):
    """One Q6_K value: a 4-bit ``nibble`` below a 2-bit ``pair`` make a 6-bit code; (code - 32) * ``step``."""
    return np.float32(np.int8(nibble | (pair << np.uint8(4))) - np.int8(32)) * step


@numba.njit(nogil=True, cache=True)
def _q6_k(out, raw, run):
    """``out`` [rows, dim] float32 from Q6_K super-blocks ``raw`` [rows, dim / 256 * 210]: 128 bytes of low
    nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d; value = (d * scale) * (q - 32) for each 16-value
    sub-block. Value ``i`` of quarter ``q`` in half ``h`` (at 128h + 32q + i) takes nibble q // 2 of low
    byte 64h + 32(q % 2) + i and bit pair q of high byte 32h + i; its scale is 8h + 2q + i // 16.
    ``run`` is 16: each pass writes the four quarters of one 16-value column of a half."""
    for row in range(raw.shape[0]):
        for block in range(raw.shape[1] // 210):
            at, to = block * 210, block * 256
            d = _half_field(raw, row, at + 208)
            for half in range(2):
                low, high, values = at + 64 * half, at + 128 + 32 * half, to + 128 * half
                for sub in range(2):
                    scales = at + 192 + 8 * half + sub  # quarter q's scale is 2q further
                    step_0 = d * np.float32(np.int8(raw[row, scales]))
                    step_1 = d * np.float32(np.int8(raw[row, scales + 2]))
                    step_2 = d * np.float32(np.int8(raw[row, scales + 4]))
                    step_3 = d * np.float32(np.int8(raw[row, scales + 6]))
                    for column in range(run):
                        i = 16 * sub + column
                        low_first, low_second, pairs = raw[row, low + i], raw[row, low + 32 + i], raw[row, high + i]
                        out[row, values + i] = _q6_k_value(low_first & np.uint8(15), pairs & np.uint8(3), step_0)
                        out[row, values + 32 + i] = _q6_k_value(low_second & np.uint8(15), (pairs >> np.uint8(2)) & np.uint8(3), step_1)
                        out[row, values + 64 + i] = _q6_k_value(low_first >> np.uint8(4), (pairs >> np.uint8(4)) & np.uint8(3), step_2)
                        out[row, values + 96 + i] = _q6_k_value(low_second >> np.uint8(4), pairs >> np.uint8(6), step_3)


def _vectorized(kernel, run: int):
    """``kernel(out, raw)`` with the length of its innermost loop, ``run``, given at call time.

    A loop of constant length is unrolled by LLVM before its loop vectorizer runs, and the
    unrolled code stays scalar because ``out`` and ``raw`` could overlap; a loop whose length
    is known only at run time is vectorized, behind a run-time check that they do not
    (about four times faster per slab).
    """

    def call(out: np.ndarray, raw: np.ndarray) -> None:
        kernel(out, raw, run)

    return call


def f16(out: np.ndarray, raw: np.ndarray) -> None:
    """GGUF F16 rows: ``out`` [rows, dim] float32 from ``raw`` [rows, 2 * dim] bytes."""
    widen_float16(out.view(np.uint32), raw.view(np.uint16))


GGML_KERNELS = {
    "Q4_0": _vectorized(_q4_0, 16),
    "Q4_1": _vectorized(_q4_1, 16),
    "Q4_K": _vectorized(_q4_k, 32),
    "Q6_K": _vectorized(_q6_k, 16),
    "F16": f16,
}
