"""Exact, deterministic PCA of an embedding matrix, shared by the pca, undertrained and export stages.

The rows are centred on their mean and the dim x dim covariance is accumulated block by
block (X^T X of the centred rows as a symmetric rank-k update, multiplied in float32 and
summed in float64, never more than one block in memory); LAPACK's MRRR eigensolver then
computes only the leading eigenvectors. That costs one pass over the matrix plus a
tridiagonal reduction of size dim, far less than an SVD of the whole [vocab, dim] matrix.
Nothing is random, so the fit needs no seed. Fits on fewer rows than dimensions (the word
vectors) use an SVD of the centred rows instead, which is exact and cheaper there.

An axis's sign is arbitrary in any PCA; here each component is flipped so that its
largest-|loading| element is positive (the first such element if several tie).
Explained variance uses n - 1 (as scikit-learn); a matrix whose rows are all equal has
no variance to explain, and its ratios are 0 rather than NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.core.knn import iter_blocks
from pipeline.core.progress import progress_bar

BLOCK_ROWS = 8192  # 8192 x 2048 float32 = 64 MiB per block; fewer, larger products keep syrk near its peak


@dataclass(frozen=True)
class Pca:
    """A fitted PCA: the leading components, largest variance first."""

    mean: np.ndarray  # [dim] float64
    components: np.ndarray  # [n_axes, dim] float64, unit rows
    explained_variance: np.ndarray  # [n_axes] float64, ddof = 1
    explained_variance_ratio: np.ndarray  # [n_axes] float64

    def transform(self, rows: np.ndarray, n: int = 2, block_rows: int = BLOCK_ROWS) -> np.ndarray:
        """Coordinates of ``rows`` [m, dim] on the first ``n`` axes: (rows - mean) @ components[:n].T.

        Axes the fit does not have (fewer rows than n + 1) give coordinate 0.
        """
        axes = self.components[:n]  # [<=n, dim]
        out = np.zeros((rows.shape[0], n), dtype=np.float64)  # [m, n]
        for start, block in iter_blocks(rows, block_rows):
            out[start : start + len(block), : len(axes)] = (block.astype(np.float64) - self.mean) @ axes.T
        return out


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-|loading| element (the first, on ties) is positive."""
    pivot = np.argmax(np.abs(components), axis=1)  # [n_axes]
    signs = np.where(components[np.arange(len(components)), pivot] < 0, -1.0, 1.0)
    return components * signs[:, None]


def fit_pca(
    matrix: np.ndarray,
    n_components: int | None = None,
    block_rows: int = BLOCK_ROWS,
    show_progress: bool = False,
) -> Pca:
    """Exact PCA of the rows of ``matrix`` [n, dim], centred on their mean.

    Keeps the first ``n_components`` axes (all of them when None or more than dim); their
    explained variance ratios are fractions of the total variance over all dim axes. One
    row has no variance: its fit has a single axis of variance 0. ``show_progress`` puts a
    bar on stderr for each of the two long steps.
    """
    n, dim = matrix.shape
    if n == 0:
        raise DissectError("PCA needs at least one row and the matrix has none; check the embeddings")
    keep = dim if n_components is None else max(1, min(n_components, dim))
    if n < dim:
        return _first_axes(_fit_by_svd(matrix), keep)
    mean = _column_mean(matrix, block_rows)
    with progress_bar(total=n, desc="PCA covariance", unit="rows", enabled=show_progress) as bar:
        scatter = _scatter(matrix, mean, block_rows, bar.update)  # [dim, dim], upper triangle
    scatter /= max(n - 1, 1)  # the covariance, in place: at dim 16384 a copy is 2 GiB
    total = float(np.trace(scatter))
    # One opaque LAPACK call: seconds at dim 2048, minutes at 16384; the bar shows it runs.
    with progress_bar(total=1, desc=f"PCA eigenvectors ({keep} of {dim})", unit="solve", enabled=show_progress) as bar:
        eigenvalues, eigenvectors = _top_eigh(scatter, keep)  # [keep] descending, [dim, keep]
        bar.update(1)
    variance = np.clip(eigenvalues, 0.0, None)  # rounding can leave tiny negatives
    return _pca(mean, fix_signs(eigenvectors.T), variance, total)


def _scatter(matrix: np.ndarray, mean: np.ndarray, block_rows: int, progress: Callable[[int], object]) -> np.ndarray:
    """The upper triangle of sum_i (x_i - mean)(x_i - mean)^T, float64 [dim, dim] in Fortran order.

    Each block is centred and multiplied (a symmetric rank-k update, syrk) in the matrix's
    own precision, float32 for embeddings, at twice float64's speed, and the block products
    are summed in float64. The float32 rounding errors average out over the rows: on the
    synthetic Llama 3.2 1B matrix the top 50 eigenvalues agree with an all-float64 scatter
    to 1e-8 and the eigenvectors to |cos| > 0.999999999. The lower triangle is not filled.
    """
    from scipy.linalg import blas

    n, dim = matrix.shape
    wide = matrix.dtype == np.float64
    dtype, syrk = (np.float64, blas.dsyrk) if wide else (np.float32, blas.ssyrk)
    shift = mean.astype(dtype)  # [dim]: the mean as the blocks can subtract it
    scatter = np.zeros((dim, dim), order="F")  # [dim, dim] float64
    product = np.zeros((dim, dim), dtype=dtype, order="F")  # [dim, dim], reused by every block
    for _, block in iter_blocks(matrix, block_rows):
        centred = np.subtract(block, shift, dtype=dtype)  # [block, dim]
        # centred.T is a Fortran-order view, so BLAS takes it without a copy.
        product = syrk(1.0, centred.T, beta=0.0, c=product, overwrite_c=1, lower=0)
        scatter += product
        progress(len(block))
    # Centring on the rounded shift rather than the exact mean adds n * d d^T, d = mean - shift.
    offset = mean - shift.astype(np.float64)  # [dim]
    return blas.dsyr(-float(n), offset, a=scatter, lower=0, overwrite_a=1)


def _top_eigh(covariance_upper: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` largest eigenpairs of a symmetric matrix given by its upper triangle.

    LAPACK's dsyevr (MRRR) computes only the requested eigenvectors, so asking for 50 of
    2048 costs little more than the tridiagonal reduction. It runs on one BLAS thread: the
    reduction is a long run of small matrix-vector steps that OpenBLAS threads badly (for
    the full eigh at dim 2048 on 2 busy cores, one thread took 1.3 s and two took 13 s).
    The input is overwritten.
    """
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    dim = covariance_upper.shape[0]
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = eigh(
            covariance_upper, lower=False, subset_by_index=[dim - keep, dim - 1], driver="evr",
            overwrite_a=True, check_finite=False,
        )  # ascending
    return values[::-1], vectors[:, ::-1]


def _fit_by_svd(matrix: np.ndarray) -> Pca:
    wide = np.asarray(matrix, dtype=np.float64)
    _check_finite(wide, 0)
    mean = wide.mean(axis=0)
    _, singular, vt = np.linalg.svd(wide - mean, full_matrices=False)  # vt [n, dim]
    variance = singular**2 / max(len(wide) - 1, 1)
    return _pca(mean, fix_signs(vt), variance, float(variance.sum()))


def _first_axes(pca: Pca, keep: int) -> Pca:
    return Pca(
        mean=pca.mean,
        components=pca.components[:keep],
        explained_variance=pca.explained_variance[:keep],
        explained_variance_ratio=pca.explained_variance_ratio[:keep],
    )


def _pca(mean: np.ndarray, components: np.ndarray, variance: np.ndarray, total: float) -> Pca:
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    return Pca(mean=mean, components=components, explained_variance=variance, explained_variance_ratio=ratio)


def _column_mean(matrix: np.ndarray, block_rows: int) -> np.ndarray:
    total = np.zeros(matrix.shape[1], dtype=np.float64)  # [dim]
    for start, block in iter_blocks(matrix, block_rows):
        sums = block.sum(axis=0, dtype=np.float64)  # [dim]; NaN and Inf carry through a sum
        if not np.isfinite(sums).all():
            _check_finite(block, start)
            raise DissectError("the matrix's values are too large to sum in float64; PCA needs finite, representable values")
        total += sums
    return total / matrix.shape[0]


def _check_finite(block: np.ndarray, start: int) -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise DissectError(f"the matrix has NaN or Inf in row {row}; PCA is undefined: re-extract it from intact weights")
