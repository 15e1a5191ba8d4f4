"""Encoding the 1B matrix with each quantization scheme (encode only, no file written), ours
against the gguf package's encoder and the whole-matrix torch a user would write."""

from __future__ import annotations

from functools import partial

from benchmarks.cases.registry import case
from benchmarks.inputs import Inputs
from benchmarks.measure import Timer

# Schemes with a baseline: ours -> (gguf's quantization type or None, the torch recipe).
BASELINED = {"int8_tensor": (None, "int8"), "q8_0": ("Q8_0", "q8_0"), "q4_0": ("Q4_0", "q4_0")}
# The rest of quantize's schemes, measured for their rate only.
OTHERS = ("int8_tensor_fixed", "int8_row", "nf4", "fp16", "bf16")
ENCODE_ROWS = 4096  # rows encoded at a time, as the stage does


def case_names() -> list[str]:
    """The quant cases in the order a run measures them: each baselined scheme's ours, gguf
    (where gguf has the scheme) and torch, then the other schemes'."""
    names = []
    for scheme, (gguf_name, _) in BASELINED.items():
        names += [f"quant_{scheme}_ours", *([f"quant_{scheme}_gguf"] if gguf_name else []), f"quant_{scheme}_torch"]
    return names + [f"quant_{scheme}_ours" for scheme in OTHERS]


def encode_ours(inputs: Inputs, scheme_name: str) -> dict:
    from pipeline.quant import schemes_for
    from pipeline.stages.quantize import encode_rows

    matrix = inputs.matrix_1b()
    with Timer() as t:
        scheme = schemes_for([scheme_name], matrix.shape[1])[0].fit(matrix)
        for start in range(0, matrix.shape[0], ENCODE_ROWS):
            encode_rows(scheme, matrix[start : start + ENCODE_ROWS])
    return {**t.result, "elements": int(matrix.size)}


def encode_gguf(inputs: Inputs, qtype_name: str) -> dict:
    matrix = inputs.matrix_1b()
    with Timer() as t:
        import gguf

        gguf.quants.quantize(matrix, gguf.GGMLQuantizationType[qtype_name])
    return {**t.result, "elements": int(matrix.size)}


def torch_int8(x) -> None:
    import torch

    scale = float(x.abs().max()) / 127
    torch.quantize_per_tensor(x, scale, 0, torch.qint8).int_repr()


def torch_q8_0(x) -> None:
    import torch

    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    torch.round(blocks / d).to(torch.int8)
    d.to(torch.float16)


def torch_q4_0(x) -> None:
    import torch

    blocks = x.reshape(-1, 32)
    peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = peak / -8
    codes = torch.clamp(torch.trunc(blocks / d + 8.5), 0, 15).to(torch.uint8)
    (codes[:, :16] | (codes[:, 16:] << 4))
    d.to(torch.float16)


# The whole-matrix torch a user would write for each scheme (outputs discarded).
TORCH_RECIPES = {"int8": torch_int8, "q8_0": torch_q8_0, "q4_0": torch_q4_0}


def encode_torch(inputs: Inputs, kind: str) -> dict:
    matrix = inputs.matrix_1b()
    with Timer() as t:
        import torch

        TORCH_RECIPES[kind](torch.from_numpy(matrix))
    return {**t.result, "elements": int(matrix.size)}


def register() -> None:
    for scheme, (gguf_name, torch_kind) in BASELINED.items():
        case(f"quant_{scheme}_ours")(partial(encode_ours, scheme_name=scheme))
        if gguf_name:
            case(f"quant_{scheme}_gguf")(partial(encode_gguf, qtype_name=gguf_name))
        case(f"quant_{scheme}_torch")(partial(encode_torch, kind=torch_kind))
    for scheme in OTHERS:
        case(f"quant_{scheme}_ours")(partial(encode_ours, scheme_name=scheme))


register()
