"""Analyses of the 1B matrix (stats, all-pairs neighbours, PCA) against numpy and sklearn.

Ours call the engines the stages call (``matrix_stats``, ``knn_graph``, ``fit_pca``), on the
matrix read from the 1B embeddings.parquet before the timer starts.
"""

from __future__ import annotations

from benchmarks.cases.registry import case
from benchmarks.inputs import Inputs
from benchmarks.measure import Timer

# All-pairs neighbours run on the first rows of the 1B matrix, for ours, sklearn and the
# matmul limit alike (the whole matrix: ~5 min ours, more for sklearn).
KNN_ROWS = 32768
KNN_K = 10
KNN_BLOCK = 4096  # the tile size of ours, and of the plain matmuls that bound it
RECALL_ROWS = 2000  # rows whose neighbour lists sklearn's are compared with ours on
PCA_COMPONENTS = 50  # as the stage fits it (params.yaml pca.n_components)
PCA_SUBSET_ROWS = 32768  # sklearn's PCA in --quick mode

KNN_OURS_IDS = "knn_ours_ids.npy"  # scratch files: ours' answers, for the baselines to check
PCA_OURS = "pca_ours.npy"


def triangle_flops(rows: int, dim: int, block: int) -> float:
    """Multiply-adds of the upper triangle of ``block``-square tiles of a rows x rows product."""
    tiles = -(-rows // block)
    return 2.0 * dim * block * block * tiles * (tiles + 1) / 2


def unit_subset(inputs: Inputs, rows: int):
    from pipeline.core.knn import unit_rows

    return unit_rows(inputs.matrix_1b()[:rows].copy())


@case("stats_ours")
def stats_ours(inputs: Inputs) -> dict:
    matrix = inputs.matrix_1b()
    with Timer() as t:
        from pipeline.stages.stats import matrix_stats

        stats = matrix_stats(matrix)
    return {**t.result, "mean": stats.summary["values"]["mean"]}


@case("stats_numpy")
def stats_numpy(inputs: Inputs) -> dict:
    """What a notebook does: the whole matrix in float64, then numpy reductions (no duplicate search)."""
    import numpy as np

    matrix = inputs.matrix_1b()
    with Timer() as t:
        wide = matrix.astype(np.float64)
        summary = [wide.mean(), wide.std(), wide.min(), wide.max(), np.isnan(wide).sum(), np.isinf(wide).sum()]
        dims = [wide.mean(axis=0), wide.std(axis=0), wide.min(axis=0), wide.max(axis=0)]
        norms = np.linalg.norm(wide, axis=1)
        mean_row = wide.mean(axis=0)
        cos = wide @ mean_row / (norms * np.linalg.norm(mean_row))
        percentiles = np.percentile(norms, [1, 50, 99])
        max_abs = np.abs(wide).max(axis=1)
    # "_" keeps every result alive and used, so none of the work can be skipped.
    return {**t.result, "mean": float(summary[0]), "_": float(cos.sum() + percentiles.sum() + max_abs.sum() + dims[0].sum())}


@case("knn_all_ours")
def knn_all_ours(inputs: Inputs) -> dict:
    import numpy as np

    from pipeline.core.knn import knn_graph

    unit = unit_subset(inputs, KNN_ROWS)
    with Timer() as t:
        graph = knn_graph(unit, KNN_K, KNN_BLOCK)
    np.save(inputs.scratch / KNN_OURS_IDS, graph.ids)
    return {**t.result, "flops": triangle_flops(unit.shape[0], unit.shape[1], KNN_BLOCK)}


@case("knn_all_matmul_limit")
def knn_all_matmul_limit(inputs: Inputs) -> dict:
    """Plain fp32 matmuls of the same tiles (upper triangle, 4096 x 4096 x dim), nothing else."""
    import numpy as np

    unit = unit_subset(inputs, KNN_ROWS)
    b = KNN_BLOCK
    out = np.empty((b, b), np.float32)
    starts = list(range(0, unit.shape[0], b))
    np.matmul(unit[:b], unit[:b].T, out=out)  # warm-up
    with Timer() as t:
        for i, a in enumerate(starts):
            for c in starts[i:]:
                np.matmul(unit[a : a + b], unit[c : c + b].T, out=out)
    flops = triangle_flops(unit.shape[0], unit.shape[1], b)
    return {**t.result, "flops": flops, "gflops": flops / t.result["seconds"] / 1e9}


@case("knn_all_sklearn")
def knn_all_sklearn(inputs: Inputs) -> dict:
    import numpy as np

    unit = unit_subset(inputs, KNN_ROWS)
    with Timer() as t:
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=KNN_K + 1, algorithm="brute", metric="cosine").fit(unit)
        _, ids = index.kneighbors(unit)
    ours_file = inputs.scratch / KNN_OURS_IDS
    agree = None
    if ours_file.exists():
        ours, theirs = np.load(ours_file), ids[:, 1:]  # sklearn lists each row as its own first neighbour
        agree = float(np.mean([len(np.intersect1d(a, b)) / KNN_K for a, b in zip(ours[:RECALL_ROWS], theirs[:RECALL_ROWS])]))
    return {**t.result, "recall_vs_ours": agree}


@case("pca_ours")
def pca_ours(inputs: Inputs) -> dict:
    import numpy as np

    matrix = inputs.matrix_1b()
    with Timer() as t:
        from pipeline.core.pca import fit_pca

        pca = fit_pca(matrix, n_components=PCA_COMPONENTS)
    np.save(inputs.scratch / PCA_OURS, pca.components)
    return {**t.result, "input_bytes": matrix.nbytes}


def pca_sklearn(inputs: Inputs, rows: int | None) -> dict:
    """sklearn's exact PCA on the first ``rows`` rows (all when None); on all of them, also
    how closely its components agree with ours."""
    import numpy as np

    matrix = inputs.matrix_1b()
    matrix = matrix if rows is None else matrix[:rows].copy()
    with Timer() as t:
        from sklearn.decomposition import PCA

        model = PCA(n_components=PCA_COMPONENTS, svd_solver="full").fit(matrix)
    result = {**t.result, "input_bytes": matrix.nbytes, "rows": matrix.shape[0]}
    ours_file = inputs.scratch / PCA_OURS
    if rows is None and ours_file.exists():
        ours = np.load(ours_file)
        cos = np.abs(np.sum(ours * model.components_.astype(np.float64), axis=1)) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(model.components_, axis=1)
        )
        result["min_abs_cos_50"] = float(cos.min())
    return result


@case("pca_sklearn_full")
def pca_sklearn_full(inputs: Inputs) -> dict:
    return pca_sklearn(inputs, None)


@case("pca_sklearn_subset")
def pca_sklearn_subset(inputs: Inputs) -> dict:
    return pca_sklearn(inputs, PCA_SUBSET_ROWS)
