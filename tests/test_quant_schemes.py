"""Quantization schemes: hand-worked examples, error bounds, and the reference encoders."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core.errors import DissectError
from pipeline.quant import SCHEMES, schemes_for
from pipeline.quant.base import Encoded, pack_nibbles, unpack_nibbles
from pipeline.quant.floats import round_to_bf16
from pipeline.quant.ggml import Q4_0, Q8_0, ggml_blocks
from pipeline.quant.integer import Int8Row, Int8Tensor, Int8TensorFixed
from pipeline.quant.nf4 import NF4, NF4_CODE, NF4_THRESHOLDS

F32 = np.float32


def roundtrip(scheme, x: np.ndarray) -> tuple[object, np.ndarray]:
    fitted = scheme.fit(x)
    encoded = fitted.encode(x)
    return encoded, fitted.decode(encoded)


def matrices(max_abs: float = 1e3, dims=(32, 64, 128)):
    """float32 [rows, dim] with dim a multiple of every block size used here.

    Magnitudes are 0 or at least 1e-30: a block whose largest value is nearer 0 has a
    scale (absmax / 127) so small that its reciprocal leaves float32's range, where GGML's
    own encoder produces undefined codes.
    """
    magnitude = st.one_of(st.just(0.0), st.floats(float(F32(1e-30)), float(F32(max_abs)), width=32))
    element = st.tuples(magnitude, st.booleans()).map(lambda pair: -pair[0] if pair[1] else pair[0])
    return st.sampled_from(dims).flatmap(lambda dim: arrays(np.float32, st.tuples(st.integers(1, 5), st.just(dim)), elements=element))


# ---------------------------------------------------------------------------------------
# Hand-checkable examples: every number worked out in the comments.


def test_int8_tensor_fixed_by_hand():
    # scale 0.01: 0.5 -> 50; -0.013 -> -1.3 -> -1; 1.3 -> 130, clamped to 127 (1.27);
    # -1.3 -> -130, clamped to -128 (-1.28). The last two lie beyond the codes' range.
    x = np.array([[0.5, -0.013, 1.3, -1.3]], F32)
    encoded, restored = roundtrip(Int8TensorFixed(), x)
    assert encoded.codes.tolist() == [[50, -1, 127, -128]]
    assert encoded.clipped == 2
    assert np.allclose(restored, [[0.5, -0.01, 1.27, -1.28]])


def test_int8_tensor_by_hand():
    # absmax 127/64 = 1.984375, so 127/absmax = 64 and the scale is 1/64, all exact:
    # 0.5*64 = 32; -0.25*64 = -16; (1/128)*64 = 0.5 -> 0 (ties to even); (3/128)*64 = 1.5 -> 2.
    x = np.array([[0.5, -0.25], [1 / 128, 3 / 128], [1.984375, 0.0]], F32)
    encoded, restored = roundtrip(Int8Tensor(), x)
    assert encoded.codes.tolist() == [[32, -16], [0, 2], [127, 0]]
    assert Int8Tensor().fit(x).tensor_scale == 1 / 64
    assert restored.tolist() == [[0.5, -0.25], [0.0, 2 / 64], [1.984375, 0.0]]


def test_int8_row_by_hand():
    # row 0: absmax 1.984375, scale 1/64 -> codes 127, -32, 0 (0.5 ties to even), 2 (1.5 -> 2).
    # row 1: absmax 0.25, 127/0.25 = 508: -0.25 -> -127; 0.125 -> 63.5 -> 64 (even); zeros stay 0.
    x = np.array([[1.984375, -0.5, 1 / 128, 3 / 128], [-0.25, 0.125, 0.0, 0.0]], F32)
    encoded, restored = roundtrip(Int8Row(), x)
    assert encoded.codes.tolist() == [[127, -32, 0, 2], [-127, 64, 0, 0]]
    assert encoded.scales[:, 0].tolist() == [1 / 64, float(F32(0.25) / F32(127))]
    assert restored[1, 1] == F32(64) * (F32(0.25) / F32(127))  # 0.12598...: the row's step is 0.25/127


def test_q8_0_by_hand():
    # absmax 127/64, so d = 1/64 (fp16 0x2400, bytes 00 24) and x/d = 64x:
    # 1.984375 -> 127; -0.5 -> -32; 1/128 -> 0.5 -> 1 and -1/128 -> -1 (ties away from zero,
    # unlike int8_row); 3/128 -> 1.5 -> 2; 5/128 -> 2.5 -> 3.
    x = np.zeros((1, 32), F32)
    x[0, :6] = [1.984375, -0.5, 1 / 128, -1 / 128, 3 / 128, 5 / 128]
    encoded, restored = roundtrip(Q8_0(), x)
    assert encoded.codes[0, :7].tolist() == [127, -32, 1, -1, 2, 3, 0]
    assert encoded.scales.tolist() == [[1 / 64]]
    assert ggml_blocks(encoded, Q8_0())[0, :8].tobytes() == bytes([0x00, 0x24, 127, 256 - 32, 1, 255, 2, 3])
    assert restored[0, :6].tolist() == [1.984375, -0.5, 1 / 64, -1 / 64, 2 / 64, 3 / 64]


def test_q4_0_by_hand():
    # Row 0: the peak is -1.0 (first of the two values of magnitude 1), d = -1/-8 = 0.125,
    # 1/d = 8 and code = trunc(8x + 8.5): -1 -> 0; 0.5 -> 12; 1.0 -> 16, clamped to 15 (it
    # decodes to 7 * 0.125 = 0.875: clipped); 0.0625 -> 9 (half a step rounds up); 0 -> 8.
    # Row 1: the peak is +1.0, so d = -0.125: 1.0 -> 0 and -1.0 -> 15 (clipped to -0.875).
    x = np.zeros((2, 32), F32)
    x[0, :4] = [-1.0, 0.5, 1.0, 0.0625]
    x[1, :2] = [1.0, -1.0]
    encoded, restored = roundtrip(Q4_0(), x)
    assert encoded.scales.tolist() == [[0.125], [-0.125]]
    assert encoded.clipped == 2
    # byte j = code j | code (j + 16) << 4, and codes 16..31 are all 8.
    assert encoded.codes[0, :5].tolist() == [0x80, 0x8C, 0x8F, 0x89, 0x88]
    assert encoded.codes[1, :3].tolist() == [0x80, 0x8F, 0x88]
    assert restored[0, :4].tolist() == [-1.0, 0.5, 0.875, 0.125]
    assert restored[1, :2].tolist() == [1.0, -0.875]
    assert ggml_blocks(encoded, Q4_0())[0, :2].tobytes() == bytes([0x00, 0x30])  # fp16 0.125


def test_nf4_by_hand():
    # absmax 2, so the block is scaled by 1/2: 2 -> 1.0 (code 15); -2 -> -1.0 (code 0);
    # 0.1 -> 0.05, nearer 0.0796 (code 8, 0.0296 away) than 0.0 (0.05 away); 0.07 -> 0.035,
    # nearer 0.0 (code 7); -0.5 -> -0.25, nearer -0.2844 (code 4) than -0.1848. Zeros -> 7.
    x = np.zeros((1, 64), F32)
    x[0, :5] = [2.0, -2.0, 0.1, 0.07, -0.5]
    encoded, restored = roundtrip(NF4(), x)
    # Pairs packed first-high: (15, 0) -> 0xF0, (8, 7) -> 0x87, (4, 7) -> 0x47, (7, 7) -> 0x77.
    assert encoded.codes[0, :4].tolist() == [0xF0, 0x87, 0x47, 0x77]
    assert encoded.scales.tolist() == [[2.0]]
    code = np.array(NF4_CODE, F32)
    assert restored[0, :5].tolist() == (code[[15, 0, 8, 7, 4]] * F32(2)).tolist()


def test_fp16_by_hand():
    # fp16 keeps 10 mantissa bits: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> 1 (even);
    # 1 + 3*2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9 -> 1 + 2^-9 (even); 70000 is beyond
    # 65504 -> inf (clipped); 1e-8 is below half the smallest subnormal (2^-24) -> 0.
    x = np.array([[1.0, 1 + 2**-11, 1 + 3 * 2**-11, 70000.0, 1e-8]], F32)
    encoded, restored = roundtrip(SCHEMES["fp16"](), x)
    assert restored.tolist() == [[1.0, 1.0, 1 + 2**-9, np.inf, 0.0]]
    assert encoded.clipped == 1


def test_bf16_by_hand():
    # bf16 keeps 7 mantissa bits: 1 + 2^-8 is a tie -> 1 (even); 1 + 3*2^-8 is a tie -> 1 + 2^-6
    # (even); 1 + 2^-8 + 2^-20 is just past the tie -> 1 + 2^-7.
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5]], F32)
    _, restored = roundtrip(SCHEMES["bf16"](), x)
    assert restored.tolist() == [[1.0, 1 + 2**-6, 1 + 2**-7, -2.5]]


# ---------------------------------------------------------------------------------------
# Every element within the scheme's error bound.


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(-1, size)


@settings(max_examples=60, deadline=None)
@given(x=matrices())
def test_int8_schemes_within_half_a_step(x):
    for scheme in (Int8Tensor(), Int8Row()):
        encoded, restored = roundtrip(scheme, x)
        absmax = np.abs(x).max(axis=1, keepdims=True) if scheme.name == "int8_row" else np.abs(x).max()
        step = absmax.astype(np.float64) / 127
        assert np.all(np.abs(restored - x.astype(np.float64)) <= step * 0.5 * (1 + 1e-5) + 1e-30), scheme.name
        assert encoded.clipped == 0


@settings(max_examples=60, deadline=None)
@given(x=matrices(max_abs=3.0))
def test_int8_tensor_fixed_within_half_a_step_or_saturated(x):
    encoded, restored = roundtrip(Int8TensorFixed(), x)
    beyond = (x.astype(np.float64) > 127 * 0.01) | (x.astype(np.float64) < -128 * 0.01)
    assert encoded.clipped == np.count_nonzero(beyond)
    inside_error = np.abs(restored - x.astype(np.float64))[~beyond]
    assert np.all(inside_error <= 0.005 * (1 + 1e-5))
    assert set(np.unique(encoded.codes[beyond]).tolist()) <= {-128, 127}


@settings(max_examples=60, deadline=None)
@given(x=matrices())
def test_q8_0_within_half_a_step_plus_scale_rounding(x):
    encoded, restored = roundtrip(Q8_0(), x)
    d = _blocks(np.abs(x), 32).max(axis=1, keepdims=True).astype(np.float64) / 127  # [blocks, 1]
    d16 = encoded.scales.reshape(-1, 1).astype(np.float64)
    bound = 0.5 * d * (1 + 1e-5) + 127 * np.abs(d - d16)
    assert np.all(np.abs(_blocks(restored, 32) - _blocks(x, 32).astype(np.float64)) <= bound)


@settings(max_examples=60, deadline=None)
@given(x=matrices())
def test_q4_0_within_half_a_step_or_one_step_when_clipped(x):
    encoded, restored = roundtrip(Q4_0(), x)
    blocks = _blocks(x, 32).astype(np.float64)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 8  # |d|
    d16 = np.abs(encoded.scales.reshape(-1, 1).astype(np.float64))
    error = np.abs(_blocks(restored, 32) - blocks)
    # Inside the codes' range (at most 7 steps on the side away from the peak) the error is
    # half a step; a clipped value is at most one step beyond code 15.
    assert np.all(error <= d * (1 + 1e-5) + 8 * np.abs(d - d16))
    peak_side = np.sign(np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1))
    inside = -blocks * peak_side <= 7 * d * (1 - 1e-6)
    assert np.all(error[inside] <= (0.5 * d * (1 + 1e-5) + 8 * np.abs(d - d16)).repeat(32, axis=1)[inside])


@settings(max_examples=60, deadline=None)
@given(x=matrices(dims=(64, 128)))
def test_nf4_within_half_the_widest_gap(x):
    _, restored = roundtrip(NF4(), x)
    absmax = _blocks(np.abs(x), 64).max(axis=1, keepdims=True).astype(np.float64)
    half_gap = np.diff(np.array(NF4_CODE)).max() / 2  # 0.152, between -1 and -0.696
    assert np.all(np.abs(_blocks(restored, 64) - _blocks(x, 64)) <= absmax * half_gap * (1 + 1e-5))


@settings(max_examples=60, deadline=None)
@given(x=matrices(max_abs=6e4))
def test_float_casts_within_half_an_ulp(x):
    _, fp16 = roundtrip(SCHEMES["fp16"](), x)
    _, bf16 = roundtrip(SCHEMES["bf16"](), x)
    wide = np.abs(x.astype(np.float64))
    assert np.all(np.abs(fp16 - x) <= np.maximum(wide * 2**-11, 2**-25))
    assert np.all(np.abs(bf16 - x) <= np.maximum(wide * 2**-8, 2**-133))


# ---------------------------------------------------------------------------------------
# Reference implementations.


def gguf_bytes(x: np.ndarray, qtype: GGMLQuantizationType) -> bytes:
    return gguf.quants.quantize(x, qtype).tobytes()


def adversarial_blocks() -> np.ndarray:
    """Blocks that hit GGML's corner cases: ties, equal +/- peaks, zeros, the float below 0.5."""
    rng = np.random.default_rng(7)
    rows = [
        np.zeros(32),  # d = 0
        np.r_[3.0, -3.0, rng.uniform(-3, 3, 30)],  # +/- peak tie: the first one sets the sign
        np.r_[-3.0, 3.0, rng.uniform(-3, 3, 30)],
        np.r_[127.0, np.arange(-15, 16) + 0.5],  # x/d = k + 0.5: ties
        np.r_[1.0, np.full(31, F32(0.5 - 2**-25) / 127)],  # x/d = 0.49999997: must round to 0
        np.r_[8.0, np.arange(-7.5, 8.0, 0.5)[:31]],  # Q4_0 codes on every tie
        rng.standard_normal(32) * 1e-6,  # fp16 scale underflows
        rng.standard_normal(32) * 1e5,
    ]
    return np.array(rows, dtype=F32).reshape(2, -1)  # [2, 128]


@settings(max_examples=60, deadline=None)
@given(x=matrices())
def test_q8_0_and_q4_0_equal_gguf_encoder(x):
    for scheme, qtype in ((Q8_0(), GGMLQuantizationType.Q8_0), (Q4_0(), GGMLQuantizationType.Q4_0)):
        assert ggml_blocks(scheme.encode(x), scheme).tobytes() == gguf_bytes(x, qtype), scheme.name


def test_q8_0_and_q4_0_equal_gguf_encoder_on_corner_cases_and_real_values():
    rng = np.random.default_rng(0)
    for x in (adversarial_blocks(), (rng.standard_normal((257, 576)) * 0.05).astype(F32)):
        for scheme, qtype in ((Q8_0(), GGMLQuantizationType.Q8_0), (Q4_0(), GGMLQuantizationType.Q4_0)):
            assert ggml_blocks(scheme.encode(x), scheme).tobytes() == gguf_bytes(x, qtype), scheme.name


def test_ggml_decode_equals_gguf_dequantize():
    x = (np.random.default_rng(1).standard_normal((64, 96)) * 0.1).astype(F32)
    for scheme, qtype in ((Q8_0(), GGMLQuantizationType.Q8_0), (Q4_0(), GGMLQuantizationType.Q4_0)):
        expected = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        assert np.array_equal(scheme.decode(scheme.encode(x)), expected), scheme.name


def test_q8_0_rounds_half_away_from_zero_as_ggml():
    # A block whose peak is 127 has d = 1: its codes are its values rounded, ties away from zero.
    rng = np.random.default_rng(3)
    special = np.array([0.5, -0.5, 1.5, -2.5, 0.5 - 2**-25, -(0.5 - 2**-25), 126.5, -126.5, 0.0, -0.0], F32)
    values = np.concatenate([special, rng.uniform(-127, 127, 31 * 3000).astype(F32), np.arange(-1270, 1271, dtype=F32) / 10])
    values = np.resize(values, (-(-len(values) // 31), 31))  # [blocks, 31]
    blocks = np.concatenate([np.full((len(values), 1), 127, F32), values], axis=1)  # [blocks, 32]
    codes = Q8_0().encode(blocks).codes
    assert np.array_equal(codes[:, 1:], gguf.quants.np_roundf(values).astype(np.int8))


def test_int8_tensor_fixed_equals_torch_and_clips_exactly_beyond_1_27():
    above, below = np.nextafter(F32(1.27), F32(2)), np.nextafter(F32(-1.28), F32(-2))
    edge = np.array([1.27, above, 1.274, 1.276, 5.0, -1.27, -1.28, below, -1.2849, -7.0], F32)
    x = np.concatenate([edge, (np.random.default_rng(4).standard_normal(990) * 0.6).astype(F32)]).reshape(10, 100)
    encoded, restored = roundtrip(Int8TensorFixed(), x)
    reference = torch.quantize_per_tensor(torch.from_numpy(x), 0.01, 0, torch.qint8)
    assert np.array_equal(encoded.codes, reference.int_repr().numpy())
    assert np.array_equal(restored, reference.dequantize().numpy())
    beyond = (x.astype(np.float64) > 127 * 0.01) | (x.astype(np.float64) < -128 * 0.01)
    assert beyond[0, :10].tolist() == [False, True, True, True, True, False, False, True, True, True]
    assert encoded.clipped == np.count_nonzero(beyond)


def bnb_quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' default-backend quantize_4bit (nf4), transcribed, for whole blocks."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    blocks = x.reshape(-1, blocksize)
    absmax = torch.abs(blocks).max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1 / absmax.view(-1, 1)), -1, 1).reshape(-1)
    quantized = torch.argmin(torch.abs(scaled.view(-1, 1) - code), dim=-1, keepdim=True).to(torch.uint8)
    packed = quantized[::2] << 4 | quantized[1::2]
    return packed.reshape(-1), absmax


def bnb_dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    out = torch.empty(packed.numel() * 2, dtype=torch.int64)
    out[1::2] = (packed & 0xF).long()
    out[::2] = (packed >> 4).long()
    return (code[out].view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)


@settings(max_examples=40, deadline=None)
@given(x=matrices(dims=(64, 128)))
def test_nf4_equals_bitsandbytes_reference(x):
    x = x[np.abs(x).reshape(len(x), -1, 64).max(axis=2).min(axis=1) > 0]  # the reference divides 0 by 0
    if not len(x):
        return
    encoded, restored = roundtrip(NF4(), x)
    packed, absmax = bnb_quantize_nf4(torch.from_numpy(x))
    assert np.array_equal(encoded.codes.reshape(-1), packed.numpy())
    assert np.array_equal(encoded.scales.reshape(-1), absmax.numpy())
    assert np.array_equal(restored.reshape(-1), bnb_dequantize_nf4(packed, absmax).numpy())


def test_nf4_equals_bitsandbytes_reference_at_every_decision_threshold():
    # The values either side of each threshold, scaled by an absmax of 1 (first element).
    edges = np.concatenate([[t, np.nextafter(t, F32(2)), np.nextafter(t, F32(-2))] for t in NF4_THRESHOLDS]).astype(F32)
    x = np.zeros(64, F32)  # one block: 1.0 then 45 edge values
    x[0] = 1.0
    x[1 : 1 + len(edges)] = edges
    x = np.concatenate([x, (np.random.default_rng(5).standard_normal(64 * 200) * 0.02).astype(F32)]).reshape(-1, 64)
    encoded, _ = roundtrip(NF4(), x)
    packed, _ = bnb_quantize_nf4(torch.from_numpy(x))
    assert np.array_equal(encoded.codes.reshape(-1), packed.numpy())


def test_int8_rows_of_subnormals_still_round_trip():
    # 127 / 1e-39 overflows float32, so these rows are divided by their absmax first.
    x = np.array([[1e-39, -5e-40, 0.0, 2e-40], [1.0, 0.5, 0.0, -1.0]], F32)
    for scheme in (Int8Row(), Int8Tensor()):
        encoded, _ = roundtrip(scheme, x[:1] if scheme.name == "int8_tensor" else x)
        assert encoded.codes[0].tolist() == [127, -64, 0, 25], scheme.name


def test_nf4_zero_block_decodes_to_zero():
    encoded, restored = roundtrip(NF4(), np.zeros((1, 64), F32))
    assert encoded.codes.tolist() == [[0x77] * 32] and not restored.any()


def test_bf16_and_fp16_equal_torch_casts():
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(F32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, 65519.0, 65520.0], F32)])
    torch_bf16 = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    ours = round_to_bf16(x)
    same = (ours.view(np.uint32) == torch_bf16.view(np.uint32)) | (np.isnan(ours) & np.isnan(torch_bf16))
    assert same.all()
    finite = x[np.isfinite(x)]
    assert np.array_equal(SCHEMES["fp16"]().round(finite.reshape(1, -1))[0], torch.from_numpy(finite).half().float().numpy())


def test_fp16_codes_are_numpys_float16_bits():
    # The codes come from torch's vectorised cast; they must be numpy's round to nearest
    # even, bit for bit: subnormal halves, ties, overflow to inf and signed zeros included.
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(F32)
    edges = [65504.0, 65519.996, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26, -0.0, 1e-40, np.inf]
    x = np.concatenate([x[~np.isnan(x)], np.array(edges, F32)]).reshape(1, -1)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    codes = SCHEMES["fp16"]().encode(x).codes
    assert codes.dtype == np.float16 and np.array_equal(codes.view(np.uint16), expected.view(np.uint16))
    assert np.array_equal(SCHEMES["fp16"]().decode(Encoded(codes, None, 0)), expected.astype(F32))


def test_bf16_codes_are_the_high_half_of_the_rounded_float32():
    x = np.array([[1.0, 1.00390625, 1.01171875, -2.5, np.nan, np.inf, 3.4e38]], F32)  # a tie down, a tie up
    codes = SCHEMES["bf16"]().encode(x).codes
    assert codes.dtype == np.uint16
    assert codes[0].tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7FC0, 0x7F80, 0x7F80]


@settings(max_examples=40, deadline=None)
@given(
    codes=arrays(np.uint8, st.tuples(st.integers(1, 4), st.sampled_from([32, 64])), elements=st.integers(0, 15)),
    low_first=st.booleans(),
)
def test_nibbles_round_trip(codes, low_first):
    for span in (1, 16):
        packed = pack_nibbles(codes, span, low_first)
        assert packed.shape == (codes.shape[0], codes.shape[1] // 2)
        assert np.array_equal(unpack_nibbles(packed, span, low_first), codes)


@settings(max_examples=60, deadline=None)
@given(matrices(max_abs=1e5, dims=(64, 128)), st.sampled_from(list(SCHEMES)))
def test_decoding_into_a_given_array_equals_decoding(x, name):
    encoded, decoded = roundtrip(SCHEMES[name](), x)
    scheme = SCHEMES[name]().fit(x)
    out = np.full(x.shape, np.nan, dtype=F32)
    written = scheme.decode(encoded, out=out)
    assert np.shares_memory(written, out) and written.shape == x.shape
    assert np.array_equal(written, decoded, equal_nan=True)



def test_float_casts_count_what_lies_beyond_their_range():
    x = np.array([[1.0, -7e4, 7e4, np.inf, np.nan, 65504.0, -65504.0, 3e38]], dtype=F32)
    assert SCHEMES["fp16"]().encode(x).clipped == 4  # -7e4, 7e4, inf, 3e38; NaN is not beyond
    assert SCHEMES["bf16"]().encode(x).clipped == 1  # inf
    assert SCHEMES["fp16"]().encode(np.full((2, 32), 65504.0, F32)).clipped == 0


def test_bits_per_weight_counts_the_scales():
    shape = (1000, 64)
    bits = {name: cls().bits_per_weight(shape) for name, cls in SCHEMES.items()}
    assert bits["q8_0"] == 8.5 and bits["q4_0"] == 4.5 and bits["nf4"] == 4.5
    assert bits["int8_row"] == 8 + 32 / 64
    assert bits["int8_tensor"] == 8 + 32 / 64000
    assert bits["fp16"] == bits["bf16"] == 16


def test_scheme_names_are_checked():
    with pytest.raises(DissectError, match="unknown quantization scheme 'q3_k'.*use one of"):
        schemes_for(["q8_0", "q3_k"], 64)
    with pytest.raises(DissectError, match="non-empty list"):
        schemes_for([], 64)
    with pytest.raises(DissectError, match="twice"):
        schemes_for(["nf4", "nf4"], 64)


def test_block_formats_need_whole_blocks():
    with pytest.raises(DissectError, match=r"q4_0 quantizes blocks of 32.*dim is 48.*remove q4_0 from quantize.schemes"):
        schemes_for(["int8_row", "q4_0"], 48)
    with pytest.raises(DissectError, match=r"nf4 quantizes blocks of 64.*dim is 96"):
        schemes_for(["nf4"], 96)
    assert [s.name for s in schemes_for(["int8_row", "int8_tensor", "fp16"], 7)] == ["int8_row", "int8_tensor", "fp16"]


def test_float_casts_take_read_only_arrays_without_a_warning(recwarn):
    x = np.linspace(-3, 3, 64, dtype=F32).reshape(2, 32)
    x.flags.writeable = False
    for name in ("fp16", "bf16"):
        scheme = SCHEMES[name]()
        codes = scheme.encode(x).codes
        codes.flags.writeable = False
        assert np.array_equal(scheme.decode(Encoded(codes, None, 0)), scheme.round(x.copy()))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_torchs_deprecation_of_quantize_per_tensor_stays_filtered_after_an_encode():
    # The stage encodes on a thread per core and torch warns once, on whichever thread calls
    # first: a filter set inside warnings.catch_warnings() around the call (not thread-safe)
    # is gone again when another thread leaves its own, so the filter must outlive the call.
    import warnings

    rows = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    SCHEMES["int8_tensor_fixed"]().fit(rows).encode(rows)  # the scheme that calls torch's quantize_per_tensor
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("torch.quantize_per_tensor, torch.quantize_per_channel ... are deprecated", UserWarning)
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_int8_tensors_peak_is_found_across_chunks_on_the_cores():
    from pipeline.quant.integer import _absmax_by_chunks

    matrix = np.array([[0.5, -0.25], [1.0, 0.0], [0.1, -3.0], [2.0, 2.0], [np.nan, 9.0], [0.0, 0.0]], np.float32)
    # Chunks of two rows: peaks 1, 3 (from -3.0), and NaN, which leaves the peak as it was.
    assert _absmax_by_chunks(matrix, rows_per_chunk=2) == np.float32(3.0)
    assert _absmax_by_chunks(matrix[:4], rows_per_chunk=1) == np.float32(3.0)
    assert _absmax_by_chunks(matrix[:0]) == np.float32(0.0)
    assert SCHEMES["int8_tensor"]().fit(np.repeat(matrix[:4], 300, axis=0)).absmax == 3.0
