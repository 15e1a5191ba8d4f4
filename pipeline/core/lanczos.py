"""The leading eigenpairs of a wide covariance by block Lanczos, for PCA at widths like 16384.

A dense eigensolver first reduces the whole d x d matrix to tridiagonal form: (4/3) d^3
memory-bound steps on one thread, three and a half minutes at d = 16384 on this project's
2-core reference machine, however few eigenvectors are asked for. Block Lanczos touches
the matrix only through its products with BLOCK vectors at a time (a symmetric
matrix-matrix product, at the BLAS's GEMM rate) and keeps an orthonormal basis of the
Krylov space span{Q0, C Q0, C^2 Q0, ...}, in which the leading eigenvectors appear first;
a Rayleigh-Ritz step in that basis gives them. Every basis block is orthogonalised against
all earlier ones twice (full reorthogonalisation), so the basis stays orthonormal to
float64 precision and no eigenvalue is found twice.

The basis grows until each wanted Ritz pair's residual ||C y - theta y|| is small enough
(see the tolerances below), which is a proof of accuracy rather than a guess: an
eigenvalue lies within the residual of each Ritz value, and within residual^2 / gap once
the pairs are apart. The start block is drawn from a fixed seed, so a run is repeatable;
what PCA publishes does not depend on it (the two projected axes are refined in float64
afterwards, the explained variances are rounded far above the solve's accuracy).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BLOCK = 64  # vectors per product: on the 405B-shaped covariance 64 needed fewer products in all than 128
START_SEED = 0
# Residuals relative to the largest eigenvalue. All kept pairs: their eigenvalues are then
# within ~residual^2 / gap, 1e-8 of the largest on the 405B-shaped matrix, below the ~1e-7
# that accumulating the covariance in float32 already leaves. The pairs that are refined
# afterwards are solved close to float32's floor (~5e-8 there), so the refinement starts
# near its answer.
ALL_TOLERANCE = 1e-4
LEADING_TOLERANCE = 1e-6


def leading_eigenpairs(
    product: Callable[[np.ndarray], np.ndarray],
    dim: int,
    keep: int,
    leading: int,
    max_columns: int,
    progress: Callable[[int], object] = lambda columns: None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``keep`` largest eigenpairs of a symmetric positive semi-definite [dim, dim] matrix C.

    ``product(block)`` returns C @ block for a float64 [dim, b] block (as float64).
    Returns (values [keep] descending, vectors [dim, keep]) once every pair's residual is
    below ALL_TOLERANCE and the first ``leading`` ones' below LEADING_TOLERANCE (relative
    to the largest value), or None when the basis would pass ``max_columns`` first: the
    caller then solves densely. ``progress(columns)`` is called after each block.
    """
    keep = min(keep, dim)
    block = min(BLOCK, dim)
    columns = min(max_columns, dim)
    # Column-major, so the filled part basis[:, :m] is one contiguous array for BLAS.
    basis = np.empty((dim, columns), order="F")  # [dim, columns] orthonormal
    images = np.empty((dim, columns), order="F")  # [dim, columns]: C @ basis
    projected = np.zeros((columns, columns))  # basis^T C basis, upper triangle filled
    start = np.random.default_rng(START_SEED).standard_normal((dim, block))  # [dim, block]
    current, _ = orthonormal_columns(start)
    filled = 0
    while filled + current.shape[1] <= columns:
        width = current.shape[1]
        image = product(current)  # [dim, width]
        basis[:, filled : filled + width] = current
        images[:, filled : filled + width] = image
        filled += width
        along = basis[:, :filled].T @ image  # [filled, width]: the image's coordinates in the basis
        projected[:filled, filled - width : filled] = along
        progress(width)
        more = filled < dim and filled + min(block, dim - filled) <= columns
        # What the last block's image adds outside the basis: the next block's directions, and
        # (times a Ritz vector's last coefficients) that vector's residual in exact arithmetic.
        fresh = _orthogonalised(basis[:, :filled], image, along) if more else None  # [dim, width]
        if filled >= keep + block:
            solved = _ritz_pairs(basis[:, :filled], images[:, :filled], projected[:filled, :filled], keep, leading, fresh)
            if solved is not None:
                return solved
        if not more:
            break
        current = _next_block(basis[:, :filled], fresh, min(block, dim - filled), np.linalg.norm(image, axis=0).max(initial=0.0))
    return None


def _ritz_pairs(
    basis: np.ndarray, images: np.ndarray, projected_upper: np.ndarray, keep: int, leading: int,
    fresh: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``keep`` leading Ritz pairs in span(basis) if they are accurate enough, else None.

    ``fresh`` [dim, b]: the last block's image orthogonalised against the basis. In exact
    arithmetic a Ritz vector's residual is ``fresh`` times its last b coefficients, which
    costs nothing to form; the true residual (from every image, so it counts the products'
    rounding too) is only computed once that estimate passes.
    """
    from scipy.linalg import eigh

    m = projected_upper.shape[0]
    values, rotation = eigh(
        projected_upper, lower=False, subset_by_index=[m - keep, m - 1], driver="evr", check_finite=False
    )  # ascending
    values, rotation = values[::-1], rotation[:, ::-1]
    scale = max(values[0], np.finfo(float).tiny)
    if fresh is not None and not _accurate(np.linalg.norm(fresh @ rotation[m - fresh.shape[1] :], axis=0) / scale, leading):
        return None
    vectors = basis @ rotation  # [dim, keep]
    residual = images @ rotation - vectors * values  # [dim, keep]
    return (values, vectors) if _accurate(np.linalg.norm(residual, axis=0) / scale, leading) else None


def _accurate(size: np.ndarray, leading: int) -> bool:
    """Every relative residual in ``size`` [keep] within ALL_TOLERANCE, the first ``leading`` within LEADING_TOLERANCE."""
    return bool(size.max() <= ALL_TOLERANCE and size[:leading].max(initial=0.0) <= LEADING_TOLERANCE)


def _next_block(basis: np.ndarray, fresh: np.ndarray, width: int, image_scale: float) -> np.ndarray:
    """``fresh``, the part of the last image orthogonal to ``basis``, orthonormalised (its
    first ``width`` columns): the next basis block. ``image_scale`` is the image's largest
    column norm, what a column of ``fresh`` is small against.

    Where the image has no new direction left (C's range is exhausted, or two columns
    coincide) a column is replaced by a fixed pseudo-random one made orthogonal to the
    basis, so the search goes on in the rest of the space.
    """
    current, triangle = orthonormal_columns(fresh[:, :width])  # [dim, width]
    lost = np.abs(np.diag(triangle)) <= 1e-10 * max(image_scale, np.finfo(float).tiny)
    if lost.any():
        rng = np.random.default_rng(START_SEED + basis.shape[1])
        kept = current[:, ~lost]
        extra = rng.standard_normal((basis.shape[0], int(lost.sum())))
        extra = _orthogonalised(np.column_stack([basis, kept]), extra)
        extra, _ = orthonormal_columns(extra)
        current = np.column_stack([kept, extra])
    return current


def _orthogonalised(basis: np.ndarray, block: np.ndarray, along: np.ndarray | None = None) -> np.ndarray:
    """``block`` with its components along the orthonormal ``basis`` removed, twice (one
    classical Gram-Schmidt pass loses orthogonality in proportion to the block's growth).
    ``along``: ``basis.T @ block`` where the caller has it already (the projected matrix's
    new columns), so the first pass does not compute it again."""
    for done in range(2):
        coordinates = along if done == 0 and along is not None else basis.T @ block
        block = block - basis @ coordinates
    return block


def orthonormal_columns(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin QR of ``block`` [dim, b]: (Q [dim, b] with orthonormal columns, R [b, b] upper triangular).

    Cholesky QR twice (the Gram matrix's Cholesky factor, applied by a triangular solve, then
    once more on the result), which restores orthogonality to float64 rounding for any block
    whose condition number is below ~1e7; Householder QR (LAPACK's, through numpy) takes over
    where the Gram matrix is not safely positive definite (a lost or nearly repeated
    direction). At [16384, 64] Householder QR took 0.07-0.1 s, the Cholesky route 0.02 s
    (a Gram product and a triangular solve of the block per pass, both level-3 BLAS; the
    2-core Intel machine of RESULTS-intel.md).
    """
    from scipy.linalg import LinAlgError, cholesky, solve_triangular

    factors = []
    current = block
    try:
        for _ in range(2):
            gram = current.T @ current  # [b, b]
            triangle = cholesky(gram, lower=False, check_finite=False)  # [b, b] upper
            diagonal = np.abs(np.diag(triangle))
            if not np.isfinite(triangle).all() or diagonal.min(initial=np.inf) <= CHOLESKY_FLOOR * diagonal.max(initial=0.0):
                raise LinAlgError("nearly dependent columns")
            current = solve_triangular(triangle, current.T, trans="T", lower=False, check_finite=False).T  # [dim, b]
            factors.append(triangle)
    except LinAlgError:
        return np.linalg.qr(block)
    return current, factors[1] @ factors[0]


# Below this ratio of the smallest to the largest diagonal of the Cholesky factor the columns
# are too close to dependent for Cholesky QR (its error grows with the condition number squared).
CHOLESKY_FLOOR = 1e-6
