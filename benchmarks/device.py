"""The products on a CUDA GPU (``compute.device: cuda``) against numpy on the CPU, on a
1B-shaped matrix (and, with ``--405b``, PCA on a 405B-shaped one): the time of each engine
and whether its answer is the same bytes.

    .venv/bin/python -m benchmarks.device [--rows N] [--405b] [--out PATH] [--code COMMIT]

``--code`` names the code measured, for a copy of the tree without its git history (the
page otherwise takes the checkout's commit).

Three engines, called as the stages call them: the all-pairs neighbour search
(:func:`pipeline.core.knn.knn_graph`, first 32768 rows, k = 10), PCA (:func:`pipeline.core.pca.fit_pca`,
50 components, the published coordinates compared) and the bfloat16-screened search of
quantize's recall (:class:`pipeline.core.knn.TopK`, 1000 query rows against every row). The
matrix is seeded numpy (a few strong directions plus noise, like an embedding), so nothing
needs building or downloading. Writes DEVICE.md beside this file (or ``--out``), again after
each engine, so a run cut short keeps the rows it finished; on a machine without a CUDA
device it stops with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

OUT = Path(__file__).resolve().parent / "DEVICE.md"
VOCAB, DIM = 128256, 2048
DIM_405B = 16384  # Llama 3.1 405B's width
GENERATED_ROWS = 8192  # rows drawn per seeded chunk
KNN_ROWS, K, BLOCK = 32768, 10, 4096
PCA_COMPONENTS = 50
QUERIES, CHUNK_ROWS = 1000, 4096


def embedding_like(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """[rows, dim] float32: 64 directions of decaying scale plus isotropic noise and an offset,
    drawn in float32 chunks of :data:`GENERATED_ROWS` rows, each from its own seeded stream (a
    405B-shaped matrix in float64 would need four times its 8.4 GB)."""
    basis = (np.random.default_rng([seed, 0]).standard_normal((64, dim)) / np.sqrt(dim)).astype(np.float32)  # [64, dim]
    scales = (0.9 ** np.arange(64)).astype(np.float32)  # [64]
    matrix = np.empty((rows, dim), dtype=np.float32)  # [rows, dim]
    for chunk, start in enumerate(range(0, rows, GENERATED_ROWS)):
        rng = np.random.default_rng([seed, 1 + chunk])
        part = matrix[start : start + GENERATED_ROWS]  # [chunk rows, dim]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part *= 0.02
        part += (rng.standard_normal((len(part), 64), dtype=np.float32) * scales) @ basis
        part += 0.01
    return matrix


def knn(matrix: np.ndarray) -> bytes:
    from pipeline.core.knn import knn_graph, unit_rows

    graph = knn_graph(unit_rows(matrix[:KNN_ROWS]), K, BLOCK)
    return graph.ids.tobytes() + graph.cosines.tobytes()


def pca(matrix: np.ndarray) -> bytes:
    from pipeline.core.pca import fit_pca

    fitted = fit_pca(matrix, n_components=PCA_COMPONENTS)
    ratios = np.round(fitted.explained_variance_ratio, 4)  # as pca_variance.json publishes them
    return fitted.transform(matrix).astype(np.float32).tobytes() + ratios.tobytes()


def screened_recall(matrix: np.ndarray) -> bytes:
    from pipeline.core.knn import TopK, excluding_own, unit_rows

    rows = np.random.default_rng(1).choice(len(matrix), QUERIES, replace=False)
    top = TopK(unit_rows(matrix[rows]), K, excluding_own(rows), screen="bfloat16")
    for start in range(0, len(matrix), CHUNK_ROWS):
        top.add(start, matrix[start : start + CHUNK_ROWS])
    found = top.finish()
    return found.ids.tobytes() + found.cosines.tobytes() + bytes([top.bound_held])


ENGINES_1B: dict[str, Callable[[np.ndarray], bytes]] = {
    f"all-pairs neighbours ({KNN_ROWS} rows, k={K})": knn,
    f"PCA ({PCA_COMPONENTS} components)": pca,
    f"bfloat16-screened search ({QUERIES} queries, k={K})": screened_recall,
}


ENGINES_405B: dict[str, Callable[[np.ndarray], bytes]] = {f"PCA ({PCA_COMPONENTS} components)": pca}


def timed(engine: Callable[[np.ndarray], bytes], matrix: np.ndarray, device: str | None) -> tuple[float, bytes]:
    from pipeline.core.device import computing_on

    with computing_on(device):
        start = time.perf_counter()
        answer = engine(matrix)
        return time.perf_counter() - start, answer


def machine(code: str) -> dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_info

    from benchmarks.report import cpu_description

    cpu = cpu_description()
    blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info() if i.get("user_api") == "blas"]
    return {
        "gpu": f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "blas": blas,
        "versions": f"torch {torch.__version__}, numpy {np.__version__}",
        "code": code,
    }


def commit_of_checkout() -> str:
    """The git commit the measured code is at (with "+ changes" when the tree differs from it):
    the page then says which code it measured."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}" + (" + changes" if changed.strip() else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=VOCAB, help="rows of each matrix")
    parser.add_argument("--405b", dest="with_405b", action="store_true", help="also PCA on a 405B-shaped matrix")
    parser.add_argument("--out", type=Path, default=OUT, help="the page to write")
    parser.add_argument("--code", help="the code measured (default: the checkout's commit)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    import torch

    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.device needs a CUDA device and a CUDA build of torch; this machine has neither")
    rows, out = args.rows, args.out
    from pipeline.core.device import use_device

    use_device("cuda")
    torch.ones(8, device="cuda") @ torch.ones(8, device="cuda")  # CUDA context and cuBLAS start outside the timings
    use_device(None)
    lines = [
        "# The products on a GPU",
        "",
        f"Generated by `benchmarks/device.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; do not edit by hand.",
        "",
        *(f"- {key}: {value}" for key, value in machine(args.code or commit_of_checkout()).items()),
        "- matrices: seeded float32 (`embedding_like` in benchmarks/device.py), made on the CPU; each CUDA time includes copying the matrix to the GPU;"
        " every engine ran once on a small matrix first, on both paths, so compiling and loading are outside the times",
        "",
        "| matrix | engine | CPU (numpy) | CUDA | CPU ÷ CUDA | same bytes |",
        "|---|---|---|---|---|---|",
    ]
    small = embedding_like(5000, 256, seed=1)
    for engine in ENGINES_1B.values():  # numba's kernels and torch's load outside the timings
        for device in (None, "cuda"):
            timed(engine, small, device)
    shapes = [(rows, DIM, ENGINES_1B)] + ([(rows, DIM_405B, ENGINES_405B)] if args.with_405b else [])
    for shape_rows, dim, engines in shapes:
        matrix = embedding_like(shape_rows, dim)
        for name, engine in engines.items():
            cpu_seconds, cpu_answer = timed(engine, matrix, None)
            gpu_seconds, gpu_answer = timed(engine, matrix, "cuda")
            lines.append(
                f"| [{shape_rows}, {dim}] | {name} | {cpu_seconds:.2f} s | {gpu_seconds:.2f} s | "
                f"{cpu_seconds / gpu_seconds:.1f}x | {cpu_answer == gpu_answer} |"
            )
            print(lines[-1], file=sys.stderr)
            out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        del matrix


if __name__ == "__main__":
    main(sys.argv[1:])
