"""What the machine allows, measured in the same run as the cases it bounds, and the
conversions held against it.

* ``limit_read_*``: a plain read of a tensor's bytes from its file into a buffer (page
  cache warm, as the extract cases run);
* ``limit_copy``: a memory copy of a 1B-sized float32 output: allocated the way our readers
  allocate (``empty_float32``) and filled by one thread per core, the bound of every
  conversion and dequantization (they write that much and read less);
* the fp32 GEMM rate is ``knn_all_matmul_limit`` (:mod:`benchmarks.cases.analysis`);
* ``convert_*`` and ``dequantize_*``: our bf16/f16 widening and GGML dequantizers on a
  1B-shaped source made in memory before the timer starts (random codes, sane scales),
  writing the same float32 output. The conversion runs once on a few rows before the timer:
  a numba kernel's compilation (or its load from numba's cache) and numba's import are paid
  once per process, not per matrix, and are measured apart, by ``fused_kernels_first_call``.
"""

from __future__ import annotations

import json
import struct

from benchmarks.cases.registry import case
from benchmarks.inputs import VOCAB, Inputs
from benchmarks.measure import Timer

DIM = 2048  # the 1B's width
SLAB_ROWS = 256  # rows copied at a time by one thread

# GGML types measured: name -> (values per block, bytes per block, byte offsets of fp16 fields)
GGML_BLOCKS = {"Q8_0": (32, 34, (0,)), "Q4_0": (32, 18, (0,)), "Q4_K": (256, 144, (0, 2)), "Q6_K": (256, 210, (208,))}


def read_span(path, offset: int, nbytes: int) -> dict:
    import numpy as np

    buffer = np.empty(nbytes, np.uint8)
    for _ in range(2):  # the first read warms the page cache and the buffer; the second is timed
        with Timer() as t, open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            view, done = memoryview(buffer), 0
            while done < nbytes:
                done += handle.readinto(view[done:])
    return {**t.result, "bytes": nbytes}


@case("limit_read_meta")
def limit_read_meta(inputs: Inputs) -> dict:
    """A plain read of the embedding's bytes (its span in the .pth zip) into memory."""
    from benchmarks.locate import pth_tensor_span

    file = inputs.meta_1b / "consolidated.00.pth"
    return read_span(file, *pth_tensor_span(file, "tok_embeddings.weight"))


@case("limit_read_st")
def limit_read_st(inputs: Inputs) -> dict:
    """A plain read of the embedding's bytes in its safetensors shard."""
    index = json.loads((inputs.st_1b / "model.safetensors.index.json").read_text())
    file = inputs.st_1b / index["weight_map"]["model.embed_tokens.weight"]
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    start, stop = header["model.embed_tokens.weight"]["data_offsets"]
    return read_span(file, 8 + length + start, stop - start)


def parallel_rows(rows: int, work) -> None:
    """``work(start, stop)`` over slabs of rows, one thread per core (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.core.memory import worker_count

    with ThreadPoolExecutor(max_workers=worker_count()) as pool:
        list(pool.map(lambda start: work(start, min(start + SLAB_ROWS, rows)), range(0, rows, SLAB_ROWS)))


@case("limit_copy")
def limit_copy(inputs: Inputs) -> dict:
    """Allocate a [128256, 2048] float32 output and copy a resident matrix into it."""
    import numpy as np

    from pipeline.core.memory import empty_float32

    source = np.ones((VOCAB, DIM), np.float32)
    with Timer() as t:
        out = empty_float32(source.shape)
        parallel_rows(VOCAB, lambda a, b: np.copyto(out[a:b], source[a:b]))
    return {**t.result, "bytes": out.nbytes}


def float_source(dtype_name: str):
    import numpy as np

    rng = np.random.default_rng(0)
    values = rng.standard_normal((VOCAB, DIM), dtype=np.float32) * 0.02
    if dtype_name == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(np.float16)


WARM_UP_ROWS = 8  # rows converted before the timer, so that the timed call finds its kernel loaded


def convert(dtype_name: str) -> dict:
    from pipeline.formats.convert import rows_to_float32

    source = float_source(dtype_name)
    rows_to_float32(source[:WARM_UP_ROWS], dtype_name, "warm up")
    with Timer() as t:
        out = rows_to_float32(source, dtype_name, "convert")
    return {**t.result, "bytes": out.nbytes}


@case("convert_bf16_ours")
def convert_bf16_ours(inputs: Inputs) -> dict:
    return convert("bfloat16")


@case("convert_f16_ours")
def convert_f16_ours(inputs: Inputs) -> dict:
    return convert("float16")


def ggml_source(name: str):
    """[VOCAB, row bytes] uint8 blocks of type ``name``: random codes, every fp16 field 0.01."""
    import numpy as np

    per_block, block_bytes, scales = GGML_BLOCKS[name]
    blocks = np.random.default_rng(0).integers(0, 256, (VOCAB, DIM // per_block, block_bytes), dtype=np.uint8)
    for at in scales:
        blocks[:, :, at : at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(VOCAB, -1)


def dequantize(name: str) -> dict:
    import gguf

    from pipeline.formats.gguf import dequantize_rows

    blocks = ggml_source(name)
    type_id = int(gguf.GGMLQuantizationType[name])
    dequantize_rows(blocks[:WARM_UP_ROWS], type_id, (WARM_UP_ROWS, DIM), "warm up")
    with Timer() as t:
        out = dequantize_rows(blocks, type_id, (VOCAB, DIM), "token_embd.weight")
    return {**t.result, "bytes": out.nbytes}


# The fused kernels' first call in a fresh process, on a read-only source as the readers pass it:
# kernel -> code run after `import numba` (names: np, rows_to_float32, dequantize_rows, gguf).
FIRST_CALLS = {
    "F16": "rows_to_float32(np.zeros((8, 64), np.float16), 'float16', 'first call')",
    **{
        name: f"dequantize_rows(np.frombuffer(bytes(8 * {block_bytes}), np.uint8).reshape(8, {block_bytes}), "
        f"int(gguf.GGMLQuantizationType.{name}), (8, {per_block}), 'first call')"
        for name, (per_block, block_bytes) in {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}.items()
    },
}
FIRST_CALL_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import numba
imported = time.perf_counter()
import gguf, numpy as np
from pipeline.formats.convert import rows_to_float32
from pipeline.formats.gguf import dequantize_rows
ready = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"import_numba": imported - start, "first_call": time.perf_counter() - ready}))
"""


def first_call(code: str, cache_dir) -> dict:
    """``code`` in a fresh interpreter whose numba cache is ``cache_dir``: seconds of numba's import and of the call."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT, code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@case("fused_kernels_first_call")
def fused_kernels_first_call(inputs: Inputs) -> dict:
    """Each fused kernel's first call in a new process: with an empty numba cache (compiled) and
    again with the cache it left (loaded), numba's import timed apart."""
    import tempfile

    kernels = {}
    with Timer() as t:  # the whole measurement, interpreters' starts included; the figures are in "kernels"
        for name, code in FIRST_CALLS.items():
            with tempfile.TemporaryDirectory() as cache_dir:
                cold, warm = first_call(code, cache_dir), first_call(code, cache_dir)
            kernels[name] = {"cold": cold["first_call"], "warm": warm["first_call"], "import_numba": warm["import_numba"]}
    return {**t.result, "kernels": kernels}


def register() -> None:
    for name in GGML_BLOCKS:
        case(f"dequantize_{name.lower()}_ours")(lambda inputs, name=name: dequantize(name))


register()
