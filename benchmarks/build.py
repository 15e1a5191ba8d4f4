"""Builders of the benchmark's derived inputs, each run once in its own process::

    python -m benchmarks.build safetensors META_DIR OUT_DIR     # the 1B as two HF shards
    python -m benchmarks.build meta-405b OUT_DIR                # embedding-only 405B shape
    python -m benchmarks.build gguf-q8_0 META_DIR OUT_FILE      # 1B-shaped Q8_0 GGUF
    python -m benchmarks.build pyarrow-default-parquet IN OUT   # the Parquet baseline

Each writes beside its output and renames when done, so an interrupted build is redone.
Heavy libraries are imported inside the builder that needs them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.inputs import DIM_405B, VOCAB

# Meta's Llama layer names -> transformers' LlamaForCausalLM names.
HF_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Llama 3.1 405B's params.json; only the embedding is written, so only its shape matters.
PARAMS_405B = {
    "dim": DIM_405B, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": VOCAB, "ffn_dim_multiplier": 1.2,
    "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
}
GGUF_ROWS_PER_BLOCK = 8192  # rows encoded at a time: bounds the float32 scratch


@contextmanager
def staged(dst: Path) -> Iterator[Path]:
    """A temporary name beside ``dst``, renamed to ``dst`` when the block succeeds."""
    tmp = dst.with_name(dst.name + ".tmp")
    yield tmp
    tmp.rename(dst)


def hf_name(key: str) -> str:
    if key == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    _, layer, rest = key.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{HF_NAMES[module]}.{leaf}"


def hf_config(params: dict, ffn_hidden: int) -> dict:
    dim, heads = params["dim"], params["n_heads"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": ffn_hidden,
        "num_attention_heads": heads, "num_key_value_heads": params["n_kv_heads"], "num_hidden_layers": params["n_layers"],
        "vocab_size": params["vocab_size"], "rms_norm_eps": params["norm_eps"], "rope_theta": params["rope_theta"],
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
        "head_dim": dim // heads, "hidden_act": "silu",
    }


def safetensors(src: Path, dst: Path) -> None:
    """The Meta checkpoint's tensors under transformers' Llama names, in two shards + index,
    with the config.json ``AutoModel.from_pretrained`` needs."""
    import torch
    from safetensors.torch import save_file

    params = json.loads((src / "params.json").read_text())
    state = torch.load(src / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
    keys = list(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    with staged(dst) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for n, part in enumerate(shards, 1):
            file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({hf_name(k): state[k].contiguous() for k in part}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({hf_name(k): file for k in part})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        ffn_hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
        (tmp / "config.json").write_text(json.dumps(hf_config(params, ffn_hidden), indent=1))


def meta_405b(dst: Path) -> None:
    """An embedding-only Meta checkpoint of the 405B shape, drawn like the synthetic 1B's."""
    import torch

    from pipeline.sources.synthetic import EMBEDDING, embedding_values, tensor_seed

    generator = torch.Generator().manual_seed(tensor_seed(0, EMBEDDING))
    table = embedding_values(VOCAB, DIM_405B, generator)
    with staged(dst) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({EMBEDDING: table}, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(PARAMS_405B))


def gguf_q8_0(src: Path, dst: Path) -> None:
    """The 1B embedding as the only tensor of a GGUF, Q8_0-encoded by our encoder (bit-exact
    with gguf's, and faster) and written by ``gguf.GGUFWriter``."""
    import gguf
    import numpy as np

    from pipeline.formats import read_embedding
    from pipeline.quant.ggml import Q8_0, ggml_blocks

    matrix = read_embedding("meta", src).matrix
    q = Q8_0()
    step = GGUF_ROWS_PER_BLOCK
    blocks = np.concatenate([ggml_blocks(q.encode(matrix[s : s + step]), q) for s in range(0, len(matrix), step)])
    with staged(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_tensor("token_embd.weight", blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def pyarrow_default_parquet(src: Path, dst: Path) -> None:
    """The embeddings rewritten with pyarrow's default settings: the Parquet baseline."""
    import pyarrow.parquet as pq

    dst.parent.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(src, columns=["token_id", "token", "vector"])
    with staged(dst) as tmp:
        pq.write_table(table, str(tmp))


BUILDERS = {
    "safetensors": safetensors,
    "meta-405b": meta_405b,
    "gguf-q8_0": gguf_q8_0,
    "pyarrow-default-parquet": pyarrow_default_parquet,
}


if __name__ == "__main__":
    BUILDERS[sys.argv[1]](*map(Path, sys.argv[2:]))
