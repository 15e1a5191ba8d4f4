"""4-bit NormalFloat (NF4) with a float32 absmax per block of 64, as bitsandbytes defines it.

bitsandbytes scales each block by ``1 / absmax`` (clamped to [-1, 1]) and picks the nearest
of its 16 NF4 values, the lower code on a tie (``argmin`` of ``|x - code|`` in float32).
Codes are packed two a byte, the first of each pair in the high nibble. An all-zero block
gets the code of 0.0 (bitsandbytes divides 0 by 0 there and stores code 0 = -1.0, which
also decodes to 0 once scaled by the zero absmax).
"""

from __future__ import annotations

import numpy as np

from pipeline.quant.base import Encoded, Scheme

NF4_BLOCK = 64
# bitsandbytes' NF4 table (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE), float32.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_TABLE = np.array(NF4_CODE, dtype=np.float32)  # [16]


def nearest_code(value: np.float32) -> int:
    """bitsandbytes' rule for one value: the nearest code in float32, the lower one on a tie."""
    return int(np.argmin(np.abs(np.float32(value) - NF4_TABLE)))


def _decision_thresholds() -> np.ndarray:
    """float32 [15]: code i+1 is chosen exactly when the value is above threshold i.

    Each threshold is the largest float32 that :func:`nearest_code` still sends to code i,
    found by stepping one ulp at a time from the midpoint, so comparing against them gives
    the same codes as the argmin over all 16 values while costing one comparison each.
    """
    thresholds = []
    up, down = np.float32(2), np.float32(-2)
    for i in range(len(NF4_TABLE) - 1):
        t = np.float32((np.float64(NF4_TABLE[i]) + np.float64(NF4_TABLE[i + 1])) / 2)
        while nearest_code(t) > i:
            t = np.nextafter(t, down)
        while nearest_code(np.nextafter(t, up)) <= i:
            t = np.nextafter(t, up)
        thresholds.append(t)
    return np.array(thresholds, dtype=np.float32)


NF4_THRESHOLDS = _decision_thresholds()


class NF4(Scheme):
    name = "nf4"
    description = "bitsandbytes NF4: blocks of 64, float32 absmax, nearest of 16 NormalFloat values (lower on ties)"
    code_bits = 4
    block = NF4_BLOCK
    scale_bits = 32
    lookup = NF4_CODE
    low_nibble_first = False  # bitsandbytes: packed = code[2i] << 4 | code[2i + 1]
    nibble_span = 1

    def encode(self, rows: np.ndarray) -> Encoded:
        from pipeline.quant.kernels import nf4_blocks

        n, dim = rows.shape
        blocks = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, NF4_BLOCK)  # [n * dim / 64, 64]
        packed = np.empty((len(blocks), NF4_BLOCK // 2), dtype=np.uint8)  # [blocks, 32]
        absmax = np.empty(len(blocks), dtype=np.float32)  # [blocks]
        # As bitsandbytes: x * (1 / absmax), not x / absmax, then the nearest code (the
        # thresholds decide it exactly as the argmin over the 16 values would).
        nf4_blocks(blocks, NF4_THRESHOLDS, packed, absmax)
        return Encoded(codes=packed.reshape(n, -1), scales=absmax.reshape(n, -1), clipped=0)

    def decode(self, encoded: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        from pipeline.quant.kernels import nf4_decode_blocks

        packed = np.ascontiguousarray(encoded.codes)  # [n, dim / 2]
        n, dim = packed.shape[0], packed.shape[1] * 2
        values = np.empty((n, dim), dtype=np.float32) if out is None else out  # [n, dim]
        scales = np.ascontiguousarray(encoded.scales, dtype=np.float32).reshape(-1)  # [blocks]
        nf4_decode_blocks(packed.reshape(len(scales), -1), scales, NF4_TABLE, values.reshape(len(scales), -1))
        return values
