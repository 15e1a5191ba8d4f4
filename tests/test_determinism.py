"""The same bytes from every BLAS kernel and thread count (README, Reproducibility).

First the rules, on inputs small enough to check by hand: the tie rule of every ranking,
the fixed-order float64 sums, the rounding grids. Then the promise itself: every stage
after extract runs on a real model in subprocesses under several OpenBLAS kernels and
thread counts, and with the device code path, and every output file must have the same md5.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.determinism import (
    cosine_table,
    float32_dot_error,
    quantize,
    round_decimal,
    row_dots,
    row_dots_at,
    scale_quantum,
    top_k_pairs,
)
from pipeline.core.device import DEVICE_ENV, TORCH_ON_CPU
from pipeline.core.knn import knn_graph, nearest_keys, unit_rows
from pipeline.core.pca import fit_pca

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# The tie rule: higher score first, then the lower id; -1 / -inf for missing slots


def test_top_k_pairs_by_hand():
    # query 0: rows 5 and 3 tie at 0.5, row 7 is best; query 1 has one row; query 2 none.
    query = np.array([0, 0, 0, 1])
    row = np.array([5, 3, 7, 4])
    score = np.array([0.5, 0.5, 0.9, -0.25])
    ids, scores = top_k_pairs(query, row, score, queries=3, k=2)
    assert ids.tolist() == [[7, 3], [4, -1], [-1, -1]]
    assert scores.tolist() == [[0.9, 0.5], [-0.25, -np.inf], [-np.inf, -np.inf]]


def test_neighbours_of_a_tie_group_wider_than_any_margin():
    # Twelve identical rows (ids 2..13) and a query pointing between them and row 0: every
    # one of the twelve has the same cosine, so the lowest ids win, whatever the blocks.
    matrix = np.zeros((16, 4), dtype=np.float32)
    matrix[0] = [1, 0, 0, 0]
    matrix[1] = [0, 0, 1, 0]
    matrix[2:14] = [1, 1, 0, 0]
    matrix[14] = [0, 0, 0, 0]  # zero row: cosine 0 with everything
    matrix[15] = [0, 1, 0, 0]
    unit = unit_rows(matrix)
    query = unit_rows(np.array([[1, 1, 0.001, 0]], dtype=np.float32))
    for block_rows in (1, 3, 16):
        found = nearest_keys(query, unit, k=5, block_rows=block_rows, exclude=[np.array([3])])
        assert found.ids.tolist() == [[2, 4, 5, 6, 7]]
        graph = knn_graph(unit, k=3, block_rows=block_rows)
        assert graph.ids[14].tolist() == [0, 1, 2]  # the zero row: all cosines 0, lowest ids
        assert graph.ids[0].tolist() == [2, 3, 4] and graph.ids[5].tolist() == [2, 3, 4]
        assert graph.cosines[14].tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(2, 120), dim=st.integers(1, 40), k=st.integers(1, 8))
def test_knn_graph_is_the_float64_ranking_whatever_the_blocks(seed, rows, dim, k):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    matrix[rng.random(rows) < 0.2] = matrix[0]  # duplicated rows: exact ties
    unit = unit_rows(matrix)
    results = [knn_graph(unit, k, block_rows) for block_rows in (1, 7, 64, 4096)]
    for other in results[1:]:
        assert np.array_equal(other.ids, results[0].ids) and np.array_equal(other.cosines, results[0].cosines)
    cos = np.clip(row_dots(np.repeat(unit, rows, axis=0), np.tile(unit, (rows, 1))), -1, 1).reshape(rows, rows)
    for q in range(rows):
        others = np.delete(np.arange(rows), q)
        expected = others[np.lexsort((others, -cos[q, others]))][:k]
        assert results[0].ids[q, : len(expected)].tolist() == expected.tolist()
        assert np.array_equal(results[0].cosines[q, : len(expected)], cos[q, expected].astype(np.float32) + np.float32(0))


# --------------------------------------------------------------------------------------
# Fixed-order sums and the float32 error bound


def test_row_dots_are_exact_products_summed_in_float64():
    a = np.array([[1.0, 2.0, 3.0], [0.5, -0.25, 0.0]], dtype=np.float32)
    b = np.array([[4.0, -5.0, 6.0], [2.0, 4.0, 7.0]], dtype=np.float32)
    assert row_dots(a, b).tolist() == [12.0, 0.0]  # 4 - 10 + 18; 1 - 1 + 0
    # float32 x float32 is exact in float64: (1 + 2^-23)^2 keeps its 2^-46 term.
    x = np.array([[1 + 2.0**-23]], dtype=np.float32)
    assert row_dots(x, x)[0] == (1 + 2.0**-23) ** 2


def test_row_dots_do_not_depend_on_order_or_chunking():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((9000, 50)).astype(np.float32), rng.standard_normal((9000, 50)).astype(np.float32)
    whole = row_dots(a, b)
    order = rng.permutation(9000)
    assert np.array_equal(row_dots(a[order], b[order]), whole[order])
    assert np.array_equal(row_dots_at(a, order, b, order), whole[order])


def test_cosine_table_by_hand():
    vectors = np.array([[3, 4], [0, 0], [4, -3], [6, 8]], dtype=np.float32)
    table = cosine_table(vectors)
    assert table.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    assert np.array_equal(table, table.T)


@pytest.mark.parametrize("dim", [3, 64, 576, 2048])
def test_float32_dot_error_bounds_blas(dim):
    rng = np.random.default_rng(dim)
    unit = unit_rows(rng.standard_normal((300, dim)).astype(np.float32))
    unit[1] = unit[0]  # parallel rows: cosine 1, where float32 can overshoot
    fast = np.clip(unit @ unit.T, -1, 1).astype(np.float64)
    exact = np.clip(row_dots(np.repeat(unit, 300, axis=0), np.tile(unit, (300, 1))), -1, 1).reshape(300, 300)
    bound = float32_dot_error(dim)
    assert np.abs(fast - exact).max() <= bound
    assert bound == pytest.approx(dim * 2.0**-24, rel=0.01, abs=2**-23)


# --------------------------------------------------------------------------------------
# Rounding grids


def test_quantize_rounds_to_nearest_even_on_a_power_of_two_grid():
    assert quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.74, 0.76]), 1.0).tolist() == [0, 2, 2, -0, -2, 1, 1]
    assert quantize(np.array([0.3, 0.375, 0.625]), 0.25).tolist() == [0.25, 0.5, 0.5]
    assert quantize(np.array([np.inf, -np.inf]), 0.5).tolist() == [np.inf, -np.inf]
    assert np.isnan(quantize(np.array([np.nan]), 0.5)[0])


def test_scale_quantum_by_hand():
    # 3 = 0.75 * 2^2: two bits below it is 2^0; 0.1 = 0.8 * 2^-3: twenty bits below is 2^-23.
    assert scale_quantum(3.0, 2) == 1.0
    assert scale_quantum(0.1, 20) == 2.0**-23
    assert scale_quantum(np.array([4.0, 0.0]), 3).tolist() == [1.0, 2.0**-2]  # 0: the grid of 1


def test_round_decimal_by_hand():
    assert round_decimal(0.123456789, 4) == 0.1235
    assert round_decimal(123456.0, 3) == 123000.0
    assert round_decimal(0.0, 5) == 0.0 and round_decimal(float("inf"), 5) == float("inf")


def test_published_pca_coordinates_do_not_depend_on_the_block_shape():
    # Block shape changes the float32 scatter in its last bits, as a BLAS kernel does; the
    # refined axes and the published grid absorb it.
    rng = np.random.default_rng(5)
    scales = 1.5 ** -np.arange(48)
    matrix = (rng.standard_normal((6000, 48)) * scales + rng.standard_normal(48)).astype(np.float32)
    published = [fit_pca(matrix, n_components=10, block_rows=b).transform(matrix).astype(np.float32) for b in (97, 1000, 8192)]
    for other in published[1:]:
        assert np.array_equal(other, published[0])
    precise = fit_pca(matrix.astype(np.float64), n_components=2)
    assert np.allclose(np.abs(published[0]), np.abs(precise.transform(matrix, published=False)), atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------
# Every stage, every output file, several kernels and thread counts


def kernels_this_cpu_runs() -> list[str]:
    """OpenBLAS core types this CPU can run, newest first (x86: from /proc/cpuinfo's flags)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    kernels = []
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        kernels.append("SkylakeX")
    if {"avx2", "fma"} <= flags:
        kernels.append("Haswell")
    if "avx" in flags:
        kernels.append("Sandybridge")
    if len(kernels) < 2 and "sse3" in flags:
        kernels.append("Prescott")
    return kernels or ["ARMV8", "NEOVERSEN1"]


# (OPENBLAS_CORETYPE, CPUs the stage may use, compute device): two kernels at least, one and
# all CPUs, and the device code path (torch) run on the CPU, as a CUDA GPU would run it. Each
# configuration once: a CPU with two kernels (AVX2 without AVX-512: Haswell and Sandybridge)
# runs its second kernel on one CPU and on two.
def configurations() -> list[tuple[str, int, str]]:
    kernels = kernels_this_cpu_runs()
    cpus = len(os.sched_getaffinity(0))
    first, last = kernels[0], kernels[-1]
    second = kernels[1] if len(kernels) > 1 else first
    wanted = [(first, cpus, "cpu"), (second, 1, "cpu"), (last, max(cpus, 2), "cpu"), (second, cpus, TORCH_ON_CPU)]
    return list(dict.fromkeys(wanted))


def test_configurations_are_distinct_and_cover_two_kernels_and_one_and_all_cpus(monkeypatch):
    # Every CPU kind this runs on: AVX-512 (three kernels), AVX2 only (two), and one CPU.
    for kernels in (["SkylakeX", "Haswell", "Sandybridge"], ["Haswell", "Sandybridge"], ["ARMV8", "NEOVERSEN1"]):
        for cpus in (1, 2, 8):
            monkeypatch.setattr(sys.modules[__name__], "kernels_this_cpu_runs", lambda kernels=kernels: kernels)
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)))
            found = configurations()
            assert len(found) == len(set(found)) >= 3
            assert {kernel for kernel, _, device in found if device == "cpu"} >= set(kernels[:2])
            assert {1, cpus} <= {count for _, count, _ in found}


STAGES = [
    ("stats", "minilm-l6"),
    ("words", "minilm-l6"),
    ("similarity", "minilm-l6"),
    ("pca", "minilm-l6"),
    ("quantize", "minilm-l6"),
    ("undertrained", "minilm-l6"),
    ("drift", "minilm-l6-q4_0"),
    ("export", "minilm-l6"),
    ("report", "minilm-l6"),
    ("compare", None),
]


def project_params() -> dict:
    """The project's params.yaml for minilm-l6 alone, with a drift pair and an export of it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = {"minilm-l6": yaml.safe_load((ROOT / "conf" / "model" / "minilm-l6.yaml").read_text())}
    params["drift"]["pairs"] = {"minilm-l6-q4_0": {"base": "artifacts/minilm-l6/embeddings.parquet",
                                                   "other": "artifacts/minilm-l6/quant/q4_0.parquet"}}
    params["export"]["models"] = ["minilm-l6"]
    params["series"] = {}  # one model here, and a series needs two versions
    params["quantize"]["sample_tokens"] = 300  # enough queries for recall, a third of the time
    return params


def run_stages(root: Path, extracted: Path, kernel: str, cpus: int, device: str) -> dict[str, str]:
    """Every stage after extract in ``root`` under OPENBLAS_CORETYPE=kernel on ``cpus`` CPUs with
    its products on ``device`` (EMBEDDING_DISSECT_DEVICE); md5 of every output."""
    model_dir = root / "artifacts" / "minilm-l6"
    model_dir.mkdir(parents=True)
    for name in ("embeddings.parquet", "tokenizer.json"):
        shutil.copy(extracted / name, model_dir / name)
    (root / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    threads = str(cpus)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDDING_DISSECT_NO_PROGRESS": "1", "OPENBLAS_CORETYPE": kernel,
           "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, DEVICE_ENV: device}
    allowed = sorted(os.sched_getaffinity(0))[:cpus] if cpus <= len(os.sched_getaffinity(0)) else None
    for stage, argument in STAGES:
        command = [sys.executable, "-m", f"pipeline.stages.{stage}"] + ([argument] if argument else [])
        result = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, allowed)) if allowed else None,
        )
        assert result.returncode == 0, f"{stage} under {kernel} on {cpus} CPUs, device {device}, failed:\n{result.stderr[-3000:]}"
    inputs = {model_dir / "embeddings.parquet", model_dir / "tokenizer.json", root / "params.yaml"}
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file() and path not in inputs
    }


def test_every_output_is_byte_identical_across_kernels_and_thread_counts(minilm_artifacts, tmp_path):
    runs = {config: run_stages(tmp_path / "-".join(map(str, config)), minilm_artifacts, *config) for config in configurations()}
    (first, reference), *others = runs.items()
    assert len(reference) >= 30  # stats, words, similarity, pca, quant/*, undertrained, drift, export, reports
    for config, hashes in others:
        differ = sorted(name for name in reference.keys() | hashes.keys() if reference.get(name) != hashes.get(name))
        assert not differ, f"{config} wrote other bytes than {first}: {differ}"
