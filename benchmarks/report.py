"""RESULTS.md from the measurements of benchmarks/run.py (never typed in by hand)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cases.stages import STAGES
from benchmarks.inputs import M1B, M405B

GB = 1e9
# The conversion and dequantization cases (benchmarks/cases/limits.py) -> what they convert.
CONVERSIONS = {
    "convert_bf16_ours": "bf16", "convert_f16_ours": "f16", "dequantize_q8_0_ours": "Q8_0",
    "dequantize_q4_0_ours": "Q4_0", "dequantize_q4_k_ours": "Q4_K", "dequantize_q6_k_ours": "Q6_K",
}
# Those converted by a fused numba kernel (pipeline/formats/fused.py); bf16 and Q8_0 are numpy passes.
FUSED = {"f16", "Q4_0", "Q4_K", "Q6_K"}


def _get(results: dict, name: str, key: str = "seconds"):
    entry = results.get(name) or {}
    if entry.get("exit"):
        return None
    return entry.get(key)


def _fmt_s(value) -> str:
    return "—" if value is None else (f"{value:.2f} s" if value < 100 else f"{value:.0f} s")


def _fmt_gb(value) -> str:
    return "—" if value is None else f"{value / GB:.2f} GB"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None or a == 0 else f"{b / a:.1f}x"


# The instruction sets that decide which kernels run: OpenBLAS's (Haswell: AVX2, SkylakeX: AVX-512) and
# whether the quantize stage's neighbour screen multiplies in bfloat16 (AVX512-BF16, AMX) or float32.
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX"}


def cpu_description() -> str:
    """The CPU's name, family and model (a virtual machine may show only a vendor's name) and its flags of
    :data:`CPU_FLAGS`, from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break  # the first processor is enough
    flags = set(fields.get("flags", "").split())
    have = [name for flag, name in CPU_FLAGS.items() if flag in flags]
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; "
            f"{', '.join(have) or 'none of ' + ', '.join(CPU_FLAGS.values())})")


def machine(args=None) -> list[str]:
    cpu = cpu_description()
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    versions = []
    for package in ("numpy", "scipy", "pyarrow", "torch", "gguf", "scikit-learn", "transformers", "safetensors"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001
            pass
    from benchmarks.runner import BLAS_PINS

    best_blas = getattr(args, "best_blas", False)
    # Asked in an environment like the measured processes', so the kernel named is theirs.
    probe_env = {key: value for key, value in os.environ.items() if not (best_blas and key in BLAS_PINS)}
    blas = subprocess.run(
        [sys.executable, "-c", "import numpy, scipy.linalg, threadpoolctl, json; print(json.dumps([(i['internal_api'], i.get('architecture'), i['num_threads']) for i in threadpoolctl.threadpool_info()]))"],
        capture_output=True, text=True, env=probe_env,
    ).stdout.strip()
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, Linux {platform.release()}",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- BLAS kernel this run used (numpy's and scipy's, as threadpoolctl reports them: library, kernel, threads): {blas}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} in the environment"
        + (" (unset for the measured processes by --best-blas, so OpenBLAS picks the kernel for this CPU)" if best_blas else ", as the benchmark found it (it forces no kernel)"),
    ]


def row(results: dict, label: str, ours: str, base: str | None, note: str = "", limit: float | None = None) -> str:
    """A table row: ours, its peak RSS, the baseline's, the speed-up, and ``limit`` (seconds the
    machine needs at least, measured in this run) with our time as a multiple of it."""
    t_ours, t_base = _get(results, ours), _get(results, base) if base else None
    r_ours = _get(results, ours, "peak_rss")
    r_base = _get(results, base, "peak_rss") if base else None
    of_limit = "—" if t_ours is None or not limit else f"{t_ours / limit:.2f}x"
    return (f"| {label} | {_fmt_s(t_ours)} | {_fmt_gb(r_ours)} | {_fmt_s(limit)} | {of_limit} | {_fmt_s(t_base)} | "
            f"{_fmt_gb(r_base)} | {_ratio(t_ours, t_base)} | {note} |")


class Limits:
    """The machine's limits as this run measured them: rates, and seconds for a given job."""

    def __init__(self, results: dict):
        self.results = results
        copy, read = results.get("limit_copy") or {}, results.get("limit_read_meta") or {}
        gemm = results.get("knn_all_matmul_limit") or {}
        ok = lambda r: r.get("seconds") and not r.get("exit")  # noqa: E731
        self.copy_rate = copy["bytes"] / copy["seconds"] if ok(copy) else None  # bytes of output per s
        self.read_rate = read["bytes"] / read["seconds"] if ok(read) else None  # bytes per s
        self.gemm_rate = gemm["gflops"] * 1e9 if ok(gemm) else None  # fp32 FLOP/s

    def copy(self, nbytes: float | None) -> float | None:
        return nbytes / self.copy_rate if nbytes and self.copy_rate else None

    def read(self, nbytes: float | None) -> float | None:
        return nbytes / self.read_rate if nbytes and self.read_rate else None

    def gemm(self, flops: float | None) -> float | None:
        return flops / self.gemm_rate if flops and self.gemm_rate else None

    def case(self, name: str) -> float | None:
        return _get(self.results, name)


def _plus(*parts: float | None) -> float | None:
    return None if any(p is None for p in parts) else sum(parts)


def syrk_flops(rows: int, dim: int) -> float:
    """FLOPs of the covariance X^T X of a [rows, dim] matrix as a symmetric rank-k update."""
    return float(rows) * dim * dim


def first_call_rows(results: dict) -> list[str]:
    """The fused kernels' one-off cost in a process (``fused_kernels_first_call``): numba's import,
    and the first call compiling (empty numba cache) or loading the compiled code (cache filled)."""
    kernels = (results.get("fused_kernels_first_call") or {}).get("kernels")
    if not kernels:
        return []
    imports = max(k["import_numba"] for k in kernels.values())

    def cells(key: str) -> str:
        return ", ".join(f"{name} {k[key]:.2f} s" for name, k in kernels.items())

    return [
        (f"| ↳ fused kernel's first call in a process, numba cache empty (compiles) | | | | | | | | {cells('cold')}; "
         f"plus `import numba` {imports:.2f} s; once per machine and argument types: the compiled code is cached "
         "beside pipeline/formats/fused.py |"),
        (f"| ↳ fused kernel's first call in a process, numba cache filled (loads) | | | | | | | | {cells('warm')}; "
         f"plus `import numba` {imports:.2f} s; once per process (mostly numba setting up its compiler target), "
         "a second kernel in the same process loads in milliseconds |"),
    ]


def write_results(path: Path, results: dict, inputs, args) -> None:
    f32_1b = 128256 * 2048 * 4
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `benchmarks/run.py{' --quick' if args.quick else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; do not edit by hand.",
        "",
        *machine(args),
        "",
        "Times are of the measured operation inside its own process (imports it needs included,",
        "interpreter start not; the conversions' rows run once on a few rows first, so their compiled",
        "kernels are loaded: that one-off cost has rows of its own); peak RSS is that whole process's",
        "(`ru_maxrss`). A case that takes under 3 s is run three times and its fastest run kept,",
        "limits included, so one noisy moment of a shared machine does not decide a short row. The 1B matrix is",
        f"the synthetic Llama 3.2 1B embedding [128256, 2048] (float32: {f32_1b / GB:.2f} GB).",
        "",
        "Each row's limit is what the machine needs at least for the same job, measured in this run:",
        "a plain read of the bytes (`limit_read_*`), a memory copy of the float32 output (`limit_copy`,",
        "allocated as our readers allocate it, one thread per core), or the job's FLOPs at the fp32",
        "GEMM rate of `knn_all_matmul_limit`; \"ours ÷ limit\" is our time as a multiple of it.",
        "",
        "| what | ours | ours peak RSS | limit | ours ÷ limit | baseline | baseline peak RSS | speed-up | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lim = Limits(results)
    f32_small = 49152 * 576 * 4
    for name, label in CONVERSIONS.items():
        fused = "; fused numba kernel, loaded before the timer (its first call: next rows)" if label in FUSED else ""
        lines.append(row(results, f"{label} → float32, 1B shape (in memory)", name, None,
                         f"limit: memory copy of the 1.05 GB output{fused}", lim.copy(f32_1b)))
    lines += first_call_rows(results)
    meta_limit = _plus(lim.case("limit_read_meta"), lim.case("convert_bf16_ours"))
    lines.append(row(results, "extract 1B from Meta `.pth` (to float32)", "extract_meta_ours", "extract_meta_tutorial",
                     f"baseline: `torch.load` whole file + index + `.float()`; limit: plain read of the tensor's bytes "
                     f"({_fmt_s(lim.case('limit_read_meta'))}) + bf16 conversion ({_fmt_s(lim.case('convert_bf16_ours'))})", meta_limit))
    io = results.get("extract_meta_ours_cold_io") or {}
    if io.get("read_bytes", -1) >= 0 and io.get("embedding_bytes"):
        lines.append(f"| ↳ bytes read from storage, cold cache | {io['read_bytes'] / GB:.3f} GB | | | | | | | "
                     f"{io['read_bytes'] / io['embedding_bytes']:.3f}x the embedding's {io['embedding_bytes'] / GB:.3f} GB ({_fmt_s(io.get('seconds'))} cold) |")
    st_limit = _plus(lim.case("limit_read_st"), lim.case("convert_bf16_ours"))
    lines.append(row(results, "extract 1B from sharded safetensors", "extract_st_ours", "extract_st_transformers",
                     f"baseline: `AutoModel.from_pretrained` + `get_input_embeddings()`; limit: plain read of the tensor's bytes "
                     f"({_fmt_s(lim.case('limit_read_st'))}) + bf16 conversion", st_limit))
    q8_bytes = 34 / 32  # bytes per value of Q8_0
    lines.append(row(results, "extract SmolLM2 GGUF (Q8_0 [49152, 576])", "extract_gguf_smollm2_ours", "extract_gguf_smollm2_gguf",
                     "baseline: `GGUFReader` + `gguf.quants.dequantize`; limit: read of the Q8_0 bytes + copy of the output, at this run's rates",
                     _plus(lim.read(f32_small / 4 * q8_bytes), lim.copy(f32_small))))
    lines.append(row(results, "extract 1B-shaped GGUF (Q8_0)", "extract_gguf_1b_ours", "extract_gguf_1b_gguf", "same baseline and limit",
                     _plus(lim.read(f32_1b / 4 * q8_bytes), lim.copy(f32_1b))))
    pq_ours, pq_base = results.get("parquet_read_ours") or {}, results.get("parquet_read_default") or {}
    size_note = ""
    if pq_ours.get("file_bytes") and pq_base.get("file_bytes"):
        size_note = (f"file {pq_ours['file_bytes'] / GB:.3f} GB = {pq_ours['file_bytes'] / f32_1b:.3f}x float32 "
                     f"(pyarrow default: {pq_base['file_bytes'] / GB:.3f} GB)")
    exact = (results.get("parquet_roundtrip_exact") or {}).get("exact")
    lines.append(row(results, "read embeddings.parquet (1B)", "parquet_read_ours", "parquet_read_default",
                     f"{size_note}; round trip bit-exact: {exact}; limit: read of the file's bytes + copy of the output (decompression not counted)",
                     _plus(lim.read(pq_ours.get("file_bytes")), lim.copy(f32_1b))))
    lines.append(row(results, "stats (1B)", "stats_ours", "stats_numpy",
                     "baseline: float64 copy + numpy reductions, without the duplicate-row search ours also does; "
                     "limit: one memory pass over the matrix (a copy of it)", lim.copy(f32_1b)))
    knn, gemm, sk = results.get("knn_all_ours") or {}, results.get("knn_all_matmul_limit") or {}, results.get("knn_all_sklearn") or {}
    knn_note = ""
    if knn.get("seconds") and gemm.get("seconds"):
        ours_rate = knn["flops"] / knn["seconds"] / 1e9
        knn_note = (f"first 32768 rows, k=10; ours {ours_rate:.0f} GFLOP/s = {ours_rate / gemm['gflops']:.0%} of plain fp32 matmul of the "
                    f"same tiles ({gemm['gflops']:.0f} GFLOP/s, the GEMM rate of this run); sklearn recall vs ours: {sk.get('recall_vs_ours')}")
    lines.append(row(results, "neighbours, all pairs", "knn_all_ours", "knn_all_sklearn", knn_note, lim.gemm(knn.get("flops"))))
    pca_base = "pca_sklearn_full" if _get(results, "pca_sklearn_full") else "pca_sklearn_subset"
    pca, skpca = results.get("pca_ours") or {}, results.get(pca_base) or {}
    pca_note = ""
    if pca.get("seconds"):
        extra = (pca["peak_rss"] - pca["rss_before"]) / pca["input_bytes"]
        pca_note = f"ours extra memory {extra:.2f}x the input"
        if pca_base == "pca_sklearn_full":
            pca_note += f"; min abs(cos) of the 50 components vs sklearn: {skpca.get('min_abs_cos_50')}"
        elif skpca.get("rows"):
            pca_note += f"; sklearn on the first {skpca['rows']} rows only (quick mode), not extrapolated"
    lines.append(row(results, "PCA (1B, 50 components)", "pca_ours", pca_base,
                     f"baseline `PCA(svd_solver='full')`; {pca_note}; limit: the covariance's syrk at the fp32 GEMM rate",
                     lim.gemm(syrk_flops(128256, 2048))))
    for scheme, gg in (("int8_tensor", None), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        ours = results.get(f"quant_{scheme}_ours") or {}
        rate = f"ours {ours['elements'] / ours['seconds'] / 1e6:.0f} M elements/s" if ours.get("seconds") else ""
        if gg:
            lines.append(row(results, f"quantize {scheme} (encode only)", f"quant_{scheme}_ours", f"quant_{scheme}_gguf",
                             f"baseline `gguf.quants.quantize`; {rate}; limit: one memory pass over the matrix", lim.copy(f32_1b)))
        lines.append(row(results, f"quantize {scheme} (encode only)", f"quant_{scheme}_ours", f"quant_{scheme}_torch",
                         f"baseline whole-matrix torch; {rate}", lim.copy(f32_1b)))
    others = []
    for scheme in ("int8_tensor_fixed", "int8_row", "nf4", "fp16", "bf16"):
        r = results.get(f"quant_{scheme}_ours") or {}
        if r.get("seconds") and not r.get("exit"):
            others.append(f"{scheme} {r['elements'] / r['seconds'] / 1e6:.0f}")
    if others:
        lines.append(f"| quantize, the other schemes (encode only) | | | | | | | | ours, M elements/s: {', '.join(others)} |")
    for model, label in ((M1B, "1B"), (M405B, "405B-shaped [128256, 16384]")):
        stages = [(s, results.get(f"stage_{s}_{model}")) for s in STAGES]
        stages = [(s, r) for s, r in stages if r]
        if not stages:
            continue
        note = ""
        if label != "1B":
            note = (" The 405B shape is run for its memory: quantize with schemes q8_0 and q4_0 and 200 sampled"
                    " tokens (see QUANTIZE_405B in benchmarks/inputs.py).")
        lines += ["", f"## Pipeline stages, {label}", "",
                  f"Each stage's `python -m pipeline.stages.<stage>` as DVC runs it; all-pairs neighbours off.{note}", "",
                  "CPU-s is the whole process's user + system time (interpreter start included), all threads: on a "
                  "machine shared with other work it moves less than the wall time does.", "",
                  "| stage | wall | CPU-s | peak RSS | peak / float32 matrix | torch imported |", "|---|---|---|---|---|---|"]
        f32 = 128256 * (2048 if label == "1B" else 16384) * 4
        total = 0.0
        for stage, r in stages:
            if r.get("timeout"):
                lines.append(f"| {stage} | stopped after {r['timeout']:.0f} s (time limit of the benchmark) | | {_fmt_gb(r['peak_rss'])} so far | {r['peak_rss'] / f32:.2f}x | |")
                continue
            if r.get("exit"):
                lines.append(f"| {stage} | failed: {r.get('error', '')[:150]} | | | | |")
                continue
            total += r["seconds"]
            cpu = r.get("cpu_seconds")
            lines.append(f"| {stage} | {_fmt_s(r['seconds'])} | {'—' if cpu is None else f'{cpu:.1f}'} | {_fmt_gb(r['peak_rss'])} | "
                         f"{r['peak_rss'] / f32:.2f}x | {r.get('torch_imported')} |")
        lines.append(f"| **total** | **{_fmt_s(total)}** | | | | |")
    target_lines, unmet = targets(results, f32_1b, lim, os.cpu_count() or 1)
    lines += target_lines
    lines += missed_table(unmet)
    explained = list(dict.fromkeys(LIMITS[miss.label] for miss in unmet if miss.label in LIMITS))
    if explained:
        lines += ["", "In detail, from this and earlier runs on the machines named:", ""]
        lines += [f"- {text}" for text in explained]
    lines += ["", "Raw numbers of this run: `results.json` in the cache folder.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


# What limits each target this machine cannot meet, shown under the table only when this
# run's numbers miss it.
LIMITS = {
    "quantize stage (1B, 8 schemes, Parquet and recall): <= 20 s, >= 100 M values/s per scheme pass": (
        "quantize stage: on a CPU without AVX512-BF16 or AMX (an AMD EPYC Zen 3 with AVX2, say) the neighbour "
        "screen multiplies in float32 (pipeline/core/screen.py), about a quarter of the bfloat16 rate. On this "
        "synthetic matrix the reference search and six schemes' full searches each multiply 1014 queries by the "
        "128256 rows at width 2048, 0.53 TFLOP each and 3.7 TFLOP in all: at 144 GFLOP/s (the Zen 3's GEMM rate) "
        "26 s before anything is encoded or written, more than the target. Sampled with py-spy over a whole run "
        "of the stage on that Zen 3 (with other work on the machine, so as shares only): the float32 products 38% "
        "of the threads' time, encoding and decoding 26%, the Parquet writer 14%, the error pass 11%. The six full "
        "searches are what exact recall costs here: the six integer schemes move a row by 0.006 (q8_0) to 0.53 "
        "(int8_tensor_fixed) in unit-vector distance (from quant.json's row_cosine_min), a window wider than "
        "the reference's candidate lists (512 rows a query) reach. Narrower products are no way out on such a "
        "CPU: torch's int8 matmul on the CPU (torch._int_mm, [1024, 2048] by [2048, 4096]) ran at 1 GOP/s and "
        "its bfloat16 matmul at under 1 GFLOP/s on the Zen 3, against 100 GFLOP/s for its float32 one. "
        "Most of the stage is work whose bytes are fixed (the quant files and quant.json are DVC "
        "outputs). Profiled on the 1B (Intel Xeon family 6 model 167, 2 cores, OpenBLAS SkylakeX kernel, "
        "AVX512-BF16 and AMX): the stage takes 17.8-18.8 s and about 29 CPU-seconds, so both cores are busy "
        "most of the time. Before the first scheme come reading the matrix (2.2-2.5 s; torch's import and "
        "numba's first compiled call load on a thread of their own meanwhile) and the reference search "
        "(1.5-1.7 s, once for all schemes; each chunk's bfloat16 product runs on a thread of its own while "
        "the previous chunk's candidates are scored), about 4.5 s in all. A coarse scheme then takes "
        "1.5-2.0 s: encoding, decoding and measuring its error take 0.53-0.90 s on both cores (64 rows at a "
        "time, so the decoded rows are measured in cache; the error pass sums the same lane of 32 rows with "
        "one vector instruction, 0.9 ns a value), while the measuring thread searches the previous chunk's "
        "neighbours exactly, about 1.1 s a scheme, most of it the bfloat16 product (17 GFLOP a chunk of 4096 "
        "rows, 9 ms alone and about 25 ms beside the encoding), and the Parquet writer compresses and writes "
        "the codes (zstd over 2.4 GB of quant files in all; their bytes are DVC outputs). The 16-bit schemes "
        "write slower than they encode, so each scheme starts while the previous one's writer finishes its "
        "file. Only fp16 and bf16 take the pruned recall on this synthetic matrix (random directions): an "
        "int8 row moves by up to 0.006-0.013 in unit-vector distance, which opens a window wider than the "
        "reference's candidate lists, so the six others run the full search (1014 queries against 128256 "
        "rows), started from the original's neighbours. About a fifth of the two cores' time stays idle "
        "within a scheme (the encoding waits for its slowest span, the writer and the measuring thread "
        "take turns); rerunning the stage in place adds 0.4-0.7 s for removing the previous quant files "
        "when the new ones replace them. Next: overlapping the reference search with the read. The "
        "same stage code took 19.75 s in the generated run of 2026-12-04 13:02-13:14 UTC and 22.9 s in the one "
        "of 15:56-16:09 UTC on that Intel machine, and every row moved with it (the GEMM rate 321 -> 296 "
        "GFLOP/s, the memory copy 0.33 -> 0.36 s, the extract stage 6.8 -> 8.0 s, the report stage 1.22 -> "
        "1.43 s): there the stage sits at the target, within the machine's swing from hour to hour. On "
        "an AMD EPYC of family 25, model 17 (Zen 4: AVX-512 and AVX512-BF16, OpenBLAS SkylakeX kernel; two generated runs on 2026-12-04 with the same stage code, 18:14-18:29 UTC and 21:01-21:14 UTC, the second in RESULTS-amd-zen4.md) the stage took 26.6 s and 42.9 CPU-seconds, then 26.1 s and 41.9, "
        "so even with both cores busy throughout it could not end under 21 s. There the bfloat16 products "
        "dominate: torch's bfloat16 matmul of a chunk, [1014, 2048] by [2048, 4096] on two threads, takes 41 ms "
        "(412 GFLOP/s; float32 89 ms, 191 GFLOP/s), and the reference search and the six full searches make 224 "
        "of them, 9.3 s of both cores (on the Intel Xeon's AMX, about 1.8 s). Sampled with py-spy on that Zen 4 "
        "(wall-clock samples, 2026-12-04): the measuring thread was busy 15.8 s of the profiled run's 31 s, 12.2 s of it "
        "in that product; the three core-pool threads 6.2-8.9 s each (the error pass 0.8-1.3 s, the encoders "
        "the rest); the Parquet writers 0.4-1.7 s a file. The stage also spends 5.9-6.1 s in the kernel, about "
        "470 000 first-touch page faults (the matrix alone is 256 000); Arrow's system allocator instead of "
        "mimalloc changed neither."
    ),
    "whole 1B pipeline <= 45 s": (
        "whole 1B pipeline: quantize is about half of it on a CPU with AVX512-BF16 and about 60% on one "
        "without (see its line); on the AMD EPYC Zen 3 every other stage also took 1.7 to 2.7 times its time on "
        "the AVX-512 EPYC of the earlier runs (an AMD EPYC with the SkylakeX kernel, whose family and model those runs did not record), the fixed parts (interpreter, imports) included. The stages' times also move with the "
        "virtual machine from day to day: on that AVX-512 EPYC the pca stage took 6.4-6.6 s with this code and "
        "6.7-7.9 s with the code of the previous generated run (alternating, in-process), which had measured "
        "it at 5.0 s and the whole pipeline at 43.8 s. On the Intel Xeon (SkylakeX kernel) the whole pipeline took "
        "41.9 s and 48.2 s in two generated runs three hours apart on 2026-12-04, with the same code in every "
        "stage but pca's refinement, as the machine slowed (see the quantize line). On the Zen 4 of "
        "RESULTS-amd-zen4.md: 48.9 s and then 45.8 s in two runs three hours apart with the same stage code (quantize 26.6 "
        "and 26.1 s, pca 7.5 and 6.5 s, extract 7.0 and 5.9 s), so there the pipeline sits at the target within the "
        "machine's swing, and the quantize stage is what keeps it above (see its line)."
    ),
    "405B-shaped PCA <= 120 s": (
        "405B-shaped PCA: on a CPU whose OpenBLAS kernel is Haswell (AVX2; an AMD EPYC Zen 3 here) the "
        "covariance's syrk alone takes about twice the target at that machine's GEMM rate (3.4e13 FLOP at about "
        "144 GFLOP/s: 240 s; the stage took 333 s there), so no code that forms the covariance meets it on such "
        "a CPU. Block Lanczos on the centred matrix itself, without the covariance, would need about a third of "
        "those FLOPs (22 products of 64 vectors each way, 1.2e13) but as thin products, which run below the "
        "GEMM rate. Measured on the Intel Xeon below (2026-12-04): one such product, X V and then X^T (X V) "
        "in float32 with the centring as rank-one terms, took 3.8 s (140 GFLOP/s, bound by reading the 8.4 GB "
        "matrix twice) against 0.15-0.17 s on the covariance, so the 22 would take 84 s; and the refinement's "
        "conjugate gradients, which need the covariance as their operator, would cost 2.0 s a step through "
        "the matrix (both axes at once) against 36 ms a step for one axis on the covariance: its 5.5 s are "
        "about 150 such steps on this flat spectrum, so at least 75 of both axes at once, some 150 s. So the "
        "covariance stays. On the AVX-512 AMD EPYC of the earlier runs (SkylakeX kernel; family and model not recorded): reading the 3 GB file into the 8.4 GB float32 matrix takes 14-23 s (most of it the "
        "virtual machine populating fresh memory: 8 GiB took 20 s in one process and 1.9 s in the next) and the "
        "covariance's syrk alone 84 s at that machine's GEMM rate (3.4e13 FLOP; OpenBLAS's ssyrk ran these "
        "8192-row blocks at 388 GFLOP/s with the SkylakeX kernel, 89 s, and at 190 with Haswell), so those two "
        "take 103-112 s before any eigenvector. Profiled phase by phase on that EPYC: the "
        "covariance pass 92-96 s (its centring and the float64 sums of the blocks' upper triangles shared among "
        "the cores), the 51 leading eigenpairs by block Lanczos on the float32 covariance 12.5 s (22 products "
        "with 64 vectors at a time 5.6 s, bound by reading the 1 GB matrix; reorthogonalisation 1.1-2 s; "
        "Rayleigh-Ritz steps 2 s), the float64 refinement of the two projected axes 7.7 s (two passes over the "
        "matrix in 16-row blocks, 1.75 s each where 64-row blocks took 3.2-3.4 s, and conjugate-gradient solves "
        "on the covariance, 3.4-4 s: a step's ssymv reads the 0.5 GB triangle at about 31 GB/s on one thread, "
        "so solving both axes at once on two threads gained nothing), the projection 1.1-1.4 s (3.5 s in 32 MiB "
        "blocks) and the column mean 0.7 s. On an Intel Xeon (family 6 model 167, AVX-512, SkylakeX kernel), "
        "profiled in process on 2026-12-04 (a day its GEMM rate measured 321 GFLOP/s, 384 the day before): "
        "160 s, of which reading the matrix 18.1 s, the covariance pass 114 s (ssyrk 107 s, the float64 sums "
        "of the blocks' upper triangles 4.9 s, the centring 1.4 s), the covariance's float32 copy with both "
        "triangles 0.9 s, block Lanczos 12.9 s (its products are a GEMM on that copy: OpenBLAS's ssymm on the "
        "upper triangle took 0.24-0.28 s a product against 0.15-0.17 s; its blocks are orthonormalised by "
        "Cholesky QR twice, 0.02 s against 0.07-0.1 s for Householder QR; on the same saved covariance the "
        "solve went 15.5 s -> 11.0 s), the refinement 9.7 s (two passes 4.2 s, conjugate gradients 5.5 s), the "
        "two projections 2.7 s and the column mean 0.7 s. The conjugate gradients are since preconditioned by "
        "the 48 further axes the eigensolver found (on this flat spectrum the 50th variance lies only 18% below "
        "the second, and the third 1.4%): 146 ssymv steps -> 86, 5.3 s -> 3.5 s in the same fit, and Lanczos "
        "computes each new block's coordinates in the basis once for the projected matrix and the first "
        "Gram-Schmidt pass (its reorthogonalisation 2.7 s -> 2.3 s); both leave every output bit as it was. Reading decodes 1 MiB batches whose buffers Arrow "
        "reuses (a whole 268 MB row group was mapped afresh each time): alone, 11.9 s -> 7.8-8.6 s. The "
        "whole stage, alternating the code before these changes and after: 151 s -> 143-145 s, peak 13.3 -> "
        "12.1 GB, the same output bytes. Larger covariance blocks (16384 rows) were no faster, nor was "
        "conjugate gradients' ssymv on two threads (45 ms a step against 36 ms on one). At this rate the syrk "
        "leaves 13 s of the target's 120 s, and the rest takes 44-52 s. Panels of sgemm instead of the syrk "
        "ran slower at this width (4096-row blocks: 3.2-4.1 s against 2.95 s). On "
        "an AMD EPYC of family 25, model 17 (Zen 4: AVX-512 and AVX512-BF16, OpenBLAS SkylakeX kernel; two generated runs on 2026-12-04 with the same stage code, 18:14-18:29 UTC and 21:01-21:14 UTC, the second in RESULTS-amd-zen4.md) the GEMM rate measured 214 and 217 GFLOP/s: the syrk alone is then 161 and 159 s, and the stage took 209 and 201 s."
    ),
    "PCA (1B): >= 80% of the fp32 GEMM rate (the covariance's syrk)": (
        "PCA (1B): on the AMD EPYC Zen 3 (Haswell kernel) the fit came to 42% and 51% of the syrk's GEMM rate in "
        "two runs, and to 43% on an AVX-512 EPYC (SkylakeX kernel; family and model not recorded). On that EPYC the syrk itself runs at 350-360 GFLOP/s on 2048 columns whatever "
        "the block height (4096 to 32768 rows; SkylakeX kernel), 1.53 s of the 1.64 s the target allows, so it "
        "leaves nothing for the rest: a column-mean pass (0.08 s), the dsyevr on one thread (0.4 s; block "
        "Lanczos at this width took 4.2 s for the whole fit against 2.6 s) and two float64 refinement passes "
        "over the matrix that make the published axes kernel-independent (0.3-0.4 s). The fit alone took "
        "2.4-2.6 s with this code and 2.6-2.9 s with the previous run's (alternating, same machine); the "
        "stage's projection of the vocabulary 0.15-0.2 s against 0.46-0.6 s. Profiled on the Zen 3 (Haswell "
        "kernel, 2026-12-03, in process, two fits): 5.5-6.2 s, of which the covariance pass 3.6-4.3 s, the "
        "dsyevr 0.8 s on one thread, the refinement 0.95-0.98 s and the column mean 0.1 s. There OpenBLAS's "
        "ssyrk ran an 8192-row block at 104-156 GFLOP/s from one minute to the next, and a plain sgemm of the "
        "whole X^T X at 205-265 GFLOP/s, which does twice the FLOPs: its upper triangle as 2, 4 or 8 panels "
        "of sgemm came to 121-136 GFLOP/s in syrk terms, no better than the syrk, so the covariance stays one. On "
        "an AMD EPYC of family 25, model 17 (Zen 4: AVX-512 and AVX512-BF16, OpenBLAS SkylakeX kernel; two generated runs on 2026-12-04 with the same stage code, 18:14-18:29 UTC and 21:01-21:14 UTC, the second in RESULTS-amd-zen4.md) the fit came to 59% of a GEMM rate of 214 GFLOP/s and then to 52% of 217. Profiled in process on that Zen 4 "
        "(three fits, 2026-12-04): 4.17-4.30 s, of which the covariance 3.28-3.41 s (OpenBLAS's ssyrk ran an 8192-row "
        "block at 157-175 GFLOP/s against the 217 of plain sgemm), the dsyevr 0.42-0.44 s on one thread, the "
        "refinement 0.35-0.37 s and the column mean 0.08-0.09 s. With the syrk at the full GEMM rate (2.48 s) and "
        "the rest as measured, the fit would still take 3.6 s, over the 3.11 s the target allows."
    ),
    "neighbours, all pairs: >= 80% of the fp32 GEMM rate": (
        "neighbours, all pairs: the tiles' products take nearly all of the limit's time, and the rest of the "
        "search has to fit in what the diagonal saves. A diagonal tile is multiplied as the 10 sub-tiles on and "
        "above the diagonal of its 4 x 4 grid (pipeline/core/knn.py, DIAGONAL_PARTS), every product runs on one "
        "BLAS thread per core into one reused tile (pipeline/core/device.py, cpu_product: OpenBLAS's own threads "
        "spin after a product and slowed the compiled pass over the tile that follows it by half), the pass tests "
        "runs of 64 entries with a vectorised sum, and the float64 rescoring of the survivors is compiled in "
        "row_dots' own order (pipeline/core/knn_kernels.py, pair_dots: the same numbers, twice as fast). "
        "Profiled in process on an Intel Xeon (family 6 model 167, AVX-512, OpenBLAS SkylakeX kernel, 2 cores), "
        "a second search in the process: 7.1 s, of which the products 6.1 s (the limit's plain matmuls of the "
        "whole tiles 6.2-6.6 s in the same hour), the compiled screen of the 52 tiles and sub-tiles off the "
        "diagonal 0.4 s, the rescoring 0.35 s, the merges 0.14 s and the diagonal sub-tiles' per-row top-k 0.1 s; "
        "a fresh process adds numba's import and the loading of its cached kernels, about 0.4 s. Before these "
        "changes the same profile read 9.9 s: products 6.7 s, screen 1.6 s, rescoring 0.6-0.9 s, diagonal "
        "top-k 0.5 s. Single runs on this shared two-core machine move by 0.3 s or more, so a row within a few "
        "points of 80% is that noise (rerun and take the best)."
    ),
    "Q4_K → float32 within 1.5x a memory copy of the output": (
        "F16, Q4_0, Q4_K, Q6_K: fused numba kernels (pipeline/formats/fused.py) read each block once and write "
        "each float32 once, vectorized, a thread per core, so what bounds them is what bounds the copy: the "
        "page faults of the freshly allocated output and the memory's write rate. In the CPU cache a slab takes "
        "1.2 to 2.5 times its copy (F16 the most: each value is computed three ways, normal, subnormal and "
        "inf/NaN, and one is selected), small beside those faults. On this two-core machine shared with other "
        "work, single runs move by half or more: a run over 1.5x is that noise (rerun and take the best; on the "
        "Zen 4 of RESULTS-amd-zen4.md, repeated runs of each case right after its full run took 0.34-1.68 s for "
        "Q4_0, 0.38-0.85 s for Q6_K and 0.77-1.59 s for the memory copy itself). Not "
        "in the row: the first call in a process imports numba and loads the compiled kernels (about 0.7 s "
        "with numba's cache filled, more when it compiles; the rows below the conversions), which a 1B-sized "
        "matrix does not win back."
    ),
}
for _name in ("Q6_K", "Q4_0", "f16"):
    LIMITS[f"{_name} → float32 within 1.5x a memory copy of the output"] = LIMITS["Q4_K → float32 within 1.5x a memory copy of the output"]
LIMITS["405B shape within 24 GB"] = (
    "405B shape: a stage that did not finish ran past the benchmark's time limit (PCA_405B_TIME_LIMIT in "
    "benchmarks/cases/stages.py); its peak RSS so far is in the table."
)


@dataclass(frozen=True)
class Missed:
    """A target this run missed: its label, this run's figure, and what bounds it in this run's own numbers."""

    label: str
    figure: str
    bound: str | None  # None: only the explanation below (LIMITS), if it has one


def missed_table(unmet: list[Missed]) -> list[str]:
    """The targets missed, one line each with what bounds them (the long explanations follow it)."""
    if not unmet:
        return []
    lines = ["", "## Where a target is not met", "",
             "What bounds each row, in this run's own figures.", "",
             "| target | this run | what bounds it |", "|---|---|---|"]
    return lines + [f"| {miss.label} | {miss.figure} | {miss.bound or ('see below' if miss.label in LIMITS else '—')} |" for miss in unmet]


def _runs(results: dict, name: str) -> list[float]:
    """Every timed run of a case (a short case runs three times; its row keeps the fastest)."""
    entry = results.get(name) or {}
    return list(entry.get("runs_seconds") or ([entry["seconds"]] if entry.get("seconds") else []))


def conversion_bound(results: dict, name: str, copy: float) -> str | None:
    """Whether a conversion that missed 1.5x the copy is within the copy's own swing in this run."""
    ours, copies = _runs(results, name), _runs(results, "limit_copy")
    if not ours or not copies:
        return None
    spread = f"its runs {_fmt_span(ours)}, the memory copy's own runs {_fmt_span(copies)}"
    if min(ours) <= 1.5 * max(copies):
        return f"the machine's swing: {spread}; its best run is within 1.5x of the copy's slowest, so rerun before reading more into it"
    return f"the kernel or the page faults of its output: {spread}"


def _fmt_span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return _fmt_s(low) if low == high else f"{low:.2f}-{high:.2f} s"


def targets(results: dict, f32: int, lim: Limits, cores: int) -> tuple[list[str], list[Missed]]:
    """The project's speed and memory targets against this run's numbers and limits, and those missed.

    ``cores``: the machine's, for the CPU-seconds a stage cannot spread wider."""
    unmet: list[Missed] = []

    def sec(name):
        return _get(results, name)

    def peak(name):
        return _get(results, name, "peak_rss")

    def check(label, ok, figure, bound=None):
        mark = "—" if ok is None else ("met" if ok else "**not met**")
        if ok is False:
            unmet.append(Missed(label, figure, bound))
        return f"| {label} | {figure} | {mark} |"

    out = ["", "## Targets", "", "Against the limits measured in this run (see the table above), with the BLAS kernel this machine ran.", "",
           "| target | this run | |", "|---|---|---|"]
    copy = lim.copy(f32)
    for name, label in CONVERSIONS.items():
        if sec(name) and copy:
            out.append(check(f"{label} → float32 within 1.5x a memory copy of the output", sec(name) / copy <= 1.5,
                             f"{sec(name) / copy:.2f}x ({_fmt_s(sec(name))} vs {_fmt_s(copy)})", conversion_bound(results, name, copy)))
    for fmt, ours, read in (("Meta", "extract_meta_ours", "limit_read_meta"), ("safetensors", "extract_st_ours", "limit_read_st")):
        limit = _plus(sec(read), sec("convert_bf16_ours"))
        if sec(ours) and limit:
            out.append(check(f"extract, {fmt}: within 2x a plain read of the bytes + the bf16 conversion", sec(ours) / limit <= 2,
                             f"{sec(ours) / limit:.2f}x ({_fmt_s(sec(ours))} vs {_fmt_s(limit)})"))
    io = results.get("extract_meta_ours_cold_io") or {}
    if io.get("read_bytes", -1) > 0:
        ratio = io["read_bytes"] / io["embedding_bytes"]
        out.append(check("extract, Meta: reads <= 1.05x the embedding's bytes", ratio <= 1.05, f"{ratio:.3f}x"))
    for name, most in (("extract_meta_ours", 1.7), ("extract_gguf_1b_ours", 1.2)):
        if peak(name):
            out.append(check(f"{name.split('_')[1]} extract: peak RSS <= {most}x float32", peak(name) / f32 <= most, f"{peak(name) / f32:.2f}x"))
    size = (results.get("parquet_read_ours") or {}).get("file_bytes")
    if size:
        out.append(check("Parquet: bf16-sourced matrix <= 0.36x its float32 size", size / f32 <= 0.36, f"{size / f32:.3f}x"))
    exact = (results.get("parquet_roundtrip_exact") or {}).get("exact")
    out.append(check("Parquet: exact round trip", exact, str(exact)))
    knn = results.get("knn_all_ours") or {}
    if knn.get("seconds") and lim.gemm(knn.get("flops")):
        share = lim.gemm(knn["flops"]) / knn["seconds"]
        out.append(check("neighbours, all pairs: >= 80% of the fp32 GEMM rate", share >= 0.8, f"{share:.0%}"))
    pca_limit = lim.gemm(syrk_flops(128256, 2048))
    if sec("pca_ours") and pca_limit:
        share = pca_limit / sec("pca_ours")
        out.append(check("PCA (1B): >= 80% of the fp32 GEMM rate (the covariance's syrk)", share >= 0.8,
                         f"{share:.0%} ({_fmt_s(sec('pca_ours'))} vs {_fmt_s(pca_limit)})",
                         f"the covariance's syrk needs {_fmt_s(pca_limit)} at this run's GEMM rate, of the {_fmt_s(pca_limit / 0.8)} "
                         f"the target allows: {_fmt_s(pca_limit / 0.8 - pca_limit)} is left for the column mean, the eigensolver and "
                         f"the float64 refinement of the published axes, and the fit took {_fmt_s(sec('pca_ours') - pca_limit)} "
                         "more than the syrk's share"))
    pca, skp = results.get("pca_ours") or {}, results.get("pca_sklearn_full") or {}
    if pca.get("seconds"):
        extra = (pca["peak_rss"] - pca["rss_before"]) / pca["input_bytes"]
        out.append(check("PCA: extra memory <= 0.3x the input", extra <= 0.3, f"{extra:.2f}x"))
    if skp.get("min_abs_cos_50") is not None:
        out.append(check("PCA: same components as sklearn, abs(cos) >= 0.9999", skp["min_abs_cos_50"] >= 0.9999, f"min {skp['min_abs_cos_50']:.7f}"))
    rates = {}
    for scheme in ("int8_tensor_fixed", "int8_tensor", "int8_row", "q8_0", "q4_0", "nf4", "fp16", "bf16"):
        r = results.get(f"quant_{scheme}_ours") or {}
        if r.get("seconds") and not r.get("exit"):
            rates[scheme] = r["elements"] / r["seconds"] / 1e6
    if rates:
        low = min(rates, key=rates.get)
        out.append(check("quantize: >= 100 M elements/s per scheme (encode)", rates[low] >= 100, f"slowest {low} {rates[low]:.0f} M/s"))
    stage = results.get(f"stage_quantize_{M1B}") or {}
    if stage.get("seconds") and not stage.get("exit"):
        per = 8 * f32 / 4 / stage["seconds"] / 1e6
        cpu = stage.get("cpu_seconds")
        busy = (f"CPU work: {cpu:.1f} CPU-seconds on {cores} cores, so at least {cpu / cores:.1f} s with every core busy "
                "throughout; most of it the exact neighbour searches' products and the encoders (see below)") if cpu else None
        out.append(check("quantize stage (1B, 8 schemes, Parquet and recall): <= 20 s, >= 100 M values/s per scheme pass",
                         stage["seconds"] <= 20, f"{stage['seconds']:.1f} s, {per:.0f} M values/s per scheme pass", busy))
    stages = [results.get(f"stage_{s}_{M1B}") for s in STAGES]
    if all(r and not r.get("exit") for r in stages):
        total = sum(r["seconds"] for r in stages)
        worst = max(r["peak_rss"] for r in stages) / f32
        by_stage = dict(zip(STAGES, stages))
        largest = max(by_stage, key=lambda s: by_stage[s]["seconds"])
        out.append(check("whole 1B pipeline <= 45 s", total <= 45, f"{total:.0f} s of stages",
                         f"the {largest} stage, {_fmt_s(by_stage[largest]['seconds'])} of it (its own row)"))
        out.append(check("1B: no stage's peak RSS above 2x float32", worst <= 2.0, f"worst {worst:.2f}x"))
    big = [(s, results.get(f"stage_{s}_{M405B}")) for s in STAGES if s != "report"]
    big = [(s, r) for s, r in big if r]
    if big:
        worst = max(r["peak_rss"] for _, r in big)
        unfinished = [s for s, r in big if r.get("timeout") or r.get("exit")]
        out.append(check("405B shape within 24 GB", worst < 24 * 2**30 and not unfinished,
                         f"peak {worst / GB:.1f} GB" + (f"; did not finish in the time limit: {', '.join(unfinished)}" if unfinished else "")))
        pca_big = dict(big).get("pca") or {}
        if pca_big.get("seconds") and not pca_big.get("exit"):
            limit = lim.gemm(syrk_flops(128256, 16384))
            rate = lim.gemm_rate
            syrk = (f"the covariance's syrk alone: {_fmt_s(limit)} at this run's fp32 GEMM rate ({rate / 1e9:.0f} GFLOP/s), "
                    f"{'more than' if limit > 120 else 'most of'} the 120 s; the rest of the stage "
                    f"{_fmt_s(pca_big['seconds'] - limit)}") if limit else None
            out.append(check("405B-shaped PCA <= 120 s", pca_big["seconds"] <= 120 and not pca_big.get("timeout"),
                             f"{_fmt_s(pca_big['seconds'])} (its syrk at the GEMM rate: {_fmt_s(limit)})", syrk))
    out.append(check("GGUF: tokenizer metadata parsed once per run", None,
                     "checked by tests/test_speed_invariants.py (one header parse for the reader and the tokenizer)"))
    out.append(check("stages that do not need torch do not import it", None,
                     "see the torch column; quantize imports it for its bfloat16 neighbour screen and for int8_tensor_fixed (the tutorial's torch.quantize_per_tensor); "
                     "tests/test_speed_invariants.py checks the modules"))
    return out, unmet
