"""Quantization schemes for the quantize stage, by the names params.yaml uses.

Each scheme is a :class:`~pipeline.quant.base.Scheme`: ``fit`` (per-tensor parameters),
``encode`` / ``decode`` of row chunks, and the dequantization ``recipe`` written into each
output file.
"""

from __future__ import annotations

from pipeline.core.errors import DissectError
from pipeline.quant.base import Encoded, Scheme
from pipeline.quant.floats import BF16, FP16
from pipeline.quant.ggml import Q4_0, Q8_0
from pipeline.quant.integer import Int8Row, Int8Tensor, Int8TensorFixed
from pipeline.quant.nf4 import NF4

SCHEMES: dict[str, type[Scheme]] = {
    scheme.name: scheme for scheme in (Int8TensorFixed, Int8Tensor, Int8Row, Q8_0, Q4_0, NF4, FP16, BF16)
}


def schemes_for(names: object, dim: int) -> list[Scheme]:
    """The schemes ``names`` (from ``quantize.schemes``), checked against rows of width ``dim``."""
    if not isinstance(names, (list, tuple)) or not names:
        raise DissectError(f"quantize.schemes must be a non-empty list of scheme names; pick from {', '.join(SCHEMES)}")
    unknown = [name for name in names if name not in SCHEMES]
    if unknown:
        raise DissectError(f"unknown quantization scheme {unknown[0]!r} in quantize.schemes; use one of {', '.join(SCHEMES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DissectError(f"quantize.schemes lists {repeated[0]!r} twice; list each scheme once")
    schemes = [SCHEMES[name]() for name in names]
    for scheme in schemes:
        scheme.check(dim)
    return schemes


__all__ = ["SCHEMES", "Encoded", "Scheme", "schemes_for"]
