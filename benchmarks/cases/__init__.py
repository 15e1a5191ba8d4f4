"""The measured cases, one function each (see :mod:`benchmarks.cases.registry`), by topic:

* :mod:`~benchmarks.cases.limits`: what the machine allows (plain reads, a memory copy) and
  the conversions and dequantizations held against it;
* :mod:`~benchmarks.cases.read`: extract from each weight format, read embeddings.parquet;
* :mod:`~benchmarks.cases.analysis`: stats, all-pairs neighbours, PCA;
* :mod:`~benchmarks.cases.quant`: each quantization scheme's encoder;
* :mod:`~benchmarks.cases.stages`: whole stages on the 1B and the 405B shape.
"""

from __future__ import annotations

from benchmarks.cases import analysis, limits, quant, read, stages  # noqa: F401  (importing registers the cases)
from benchmarks.cases.registry import CASES, TIME_LIMITS
from benchmarks.inputs import M1B, M405B

__all__ = ["CASES", "TIME_LIMITS", "plan"]


def plan(quick: bool) -> list[str]:
    """The cases of a run, in order: a baseline that checks its answer against ours runs
    after ours (knn, PCA). ``quick`` leaves out the 405B shape and sklearn's PCA on all rows."""
    cases = [
        "limit_copy", "convert_bf16_ours", "convert_f16_ours",
        *(f"dequantize_{name.lower()}_ours" for name in limits.GGML_BLOCKS), "fused_kernels_first_call",
        "limit_read_meta", "extract_meta_ours", "extract_meta_tutorial", "extract_meta_ours_cold_io",
        "limit_read_st", "extract_st_ours", "extract_st_transformers",
        "extract_gguf_smollm2_ours", "extract_gguf_smollm2_gguf", "extract_gguf_1b_ours", "extract_gguf_1b_gguf",
        "parquet_read_ours", "parquet_read_default", "parquet_roundtrip_exact",
        "stats_ours", "stats_numpy",
        "knn_all_ours", "knn_all_matmul_limit", "knn_all_sklearn",
        "pca_ours", "pca_sklearn_subset",
    ]
    if not quick:
        cases.append("pca_sklearn_full")
    cases += quant.case_names()
    cases += [f"stage_{s}_{M1B}" for s in stages.STAGES]
    if not quick:
        cases += [f"stage_{s}_{M405B}" for s in stages.STAGES if s != "report"]
    return cases
