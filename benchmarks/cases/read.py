"""Reading a matrix: the weight readers (extract) and embeddings.parquet, against the
libraries a user would load the same file with, and a plain read of the bytes as the limit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.cases.registry import case
from benchmarks.inputs import M1B, VOCAB, Inputs
from benchmarks.measure import Timer, evict, io_read_bytes

CHECK_STRIDE = 4096  # rows summed into a checksum: proves the values were materialised


def checksum(matrix) -> float:
    return float(matrix[::CHECK_STRIDE].sum())


def read_ours(fmt: str, path: Path) -> dict:
    """Our reader for ``fmt``, to float32 (its imports timed: they are part of the cost)."""
    with Timer() as t:
        from pipeline.formats import read_embedding

        matrix = read_embedding(fmt, path).matrix
        check = checksum(matrix)
    return {**t.result, "torch_imported": "torch" in sys.modules, "check": check, "float32_bytes": matrix.nbytes}


@case("extract_meta_ours")
def extract_meta_ours(inputs: Inputs) -> dict:
    return read_ours("meta", inputs.meta_1b)


@case("extract_meta_ours_cold_io")
def extract_meta_ours_cold_io(inputs: Inputs) -> dict:
    """The same read after evicting the file from the page cache: bytes fetched from storage."""
    evict(inputs.meta_1b / "consolidated.00.pth")
    before = io_read_bytes()
    with Timer() as t:
        from pipeline.formats import read_embedding

        read_embedding("meta", inputs.meta_1b)
    read = io_read_bytes() - before
    dim = json.loads((inputs.meta_1b / "params.json").read_text())["dim"]
    return {**t.result, "read_bytes": read, "embedding_bytes": VOCAB * dim * 2}  # bf16: 2 bytes a value


@case("extract_meta_tutorial")
def extract_meta_tutorial(inputs: Inputs) -> dict:
    with Timer() as t:
        import torch

        state = torch.load(inputs.meta_1b / "consolidated.00.pth", map_location="cpu", weights_only=True)
        matrix = state["tok_embeddings.weight"].to(torch.float32).numpy()
        check = checksum(matrix)
    return {**t.result, "check": check}


@case("extract_st_ours")
def extract_st_ours(inputs: Inputs) -> dict:
    return read_ours("safetensors", inputs.st_1b)


@case("extract_st_transformers")
def extract_st_transformers(inputs: Inputs) -> dict:
    with Timer() as t:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(inputs.st_1b, dtype=torch.bfloat16)
        matrix = model.get_input_embeddings().weight.detach().to(torch.float32).numpy()
        check = checksum(matrix)
    return {**t.result, "check": check}


def read_gguf_package(path: Path) -> dict:
    with Timer() as t:
        import gguf

        reader = gguf.GGUFReader(path)
        tensor = next(item for item in reader.tensors if item.name == "token_embd.weight")
        matrix = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        check = checksum(matrix)
    return {**t.result, "check": check, "float32_bytes": matrix.nbytes}


@case("extract_gguf_smollm2_ours")
def extract_gguf_smollm2_ours(inputs: Inputs) -> dict:
    return read_ours("gguf", inputs.gguf_small)


@case("extract_gguf_smollm2_gguf")
def extract_gguf_smollm2_gguf(inputs: Inputs) -> dict:
    return read_gguf_package(inputs.gguf_small)


@case("extract_gguf_1b_ours")
def extract_gguf_1b_ours(inputs: Inputs) -> dict:
    return read_ours("gguf", inputs.gguf_1b)


@case("extract_gguf_1b_gguf")
def extract_gguf_1b_gguf(inputs: Inputs) -> dict:
    return read_gguf_package(inputs.gguf_1b)


@case("parquet_read_ours")
def parquet_read_ours(inputs: Inputs) -> dict:
    with Timer() as t:
        from pipeline.core.parquet import read_vectors

        _, matrix = read_vectors(inputs.embeddings(M1B))
    return {**t.result, "file_bytes": inputs.embeddings(M1B).stat().st_size, "float32_bytes": matrix.nbytes}


@case("parquet_read_default")
def parquet_read_default(inputs: Inputs) -> dict:
    """pyarrow-default file, read the way the README shows for pyarrow."""
    with Timer() as t:
        import pyarrow.parquet as pq

        vectors = pq.read_table(inputs.default_parquet, columns=["vector"]).column("vector").combine_chunks()
        matrix = vectors.flatten().to_numpy().reshape(len(vectors), -1)
    return {**t.result, "file_bytes": inputs.default_parquet.stat().st_size, "float32_bytes": matrix.nbytes}


@case("parquet_roundtrip_exact")
def parquet_roundtrip_exact(inputs: Inputs) -> dict:
    """The stored matrix against the one read from the weights, bit for bit."""
    import numpy as np

    from pipeline.core.parquet import read_vectors
    from pipeline.formats import read_embedding

    with Timer() as t:
        source = read_embedding("meta", inputs.meta_1b).matrix
        _, stored = read_vectors(inputs.embeddings(M1B))
        exact = bool(np.array_equal(source.view(np.uint32), stored.view(np.uint32)))
    return {**t.result, "exact": exact}
