"""Exact, deterministic PCA of an embedding matrix, shared by the pca, undertrained and export stages.

The rows are centred on their mean and the dim x dim covariance is accumulated block by
block (X^T X of the centred rows as a symmetric rank-k update, multiplied in float32 and
summed in float64, never more than one block in memory); LAPACK's MRRR eigensolver then
computes only the leading eigenvectors (from width FLOAT32_EIGH_DIM on, block Lanczos
does, :mod:`pipeline.core.lanczos`). That costs one pass over the matrix plus a
tridiagonal reduction of size dim, far less than an SVD of the whole [vocab, dim] matrix.
The two axes every token is projected on are then refined in float64 so that they do not
depend on the BLAS kernel; no seed is needed. Fits on fewer rows than dimensions (the word
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

from pipeline.core.device import compute_device, one_blas_thread
from pipeline.core.errors import DissectError
from pipeline.core.knn import iter_blocks
from pipeline.core.parallel import chunk_map, span_map
from pipeline.core.progress import progress_bar

BLOCK_ROWS = 8192  # 8192 x 2048 float32 = 64 MiB per block; fewer, larger products keep syrk near its peak
# Values converted to float64 at a time where rows are centred for a thin product (the
# projection, the refinement's passes): 2 MiB, so a block stays in cache between its
# conversion and its products. 32 MiB blocks took three times as long (0.65 s against 0.2 s
# to project the 1B, 3.5 s against 1.1 s at width 16384), 8 MiB ones twice.
CACHE_BLOCK_ELEMENTS = 2**18


def cache_block_rows(dim: int) -> int:
    """Rows of width ``dim`` in one CACHE_BLOCK_ELEMENTS block (at least one)."""
    return max(1, CACHE_BLOCK_ELEMENTS // max(dim, 1))


@dataclass(frozen=True)
class Pca:
    """A fitted PCA: the leading components, largest variance first."""

    mean: np.ndarray  # [dim] float64
    components: np.ndarray  # [n_axes, dim] float64, unit rows
    explained_variance: np.ndarray  # [n_axes] float64, ddof = 1
    explained_variance_ratio: np.ndarray  # [n_axes] float64

    def transform(self, rows: np.ndarray, n: int = 2, block_rows: int | None = None, published: bool = True) -> np.ndarray:
        """Coordinates of ``rows`` [m, dim] on the first ``n`` axes: (rows - mean) @ components[:n].T.

        Axes the fit does not have (fewer rows than n + 1) give coordinate 0. ``published``:
        each axis's coordinates on the grid PUBLISHED_BITS (20) binary digits below its
        standard deviation (:func:`pipeline.core.determinism.quantize`), far above the ~1e-15 that
        the refined axes still carry from the BLAS kernel, so they are exact in float32 and
        the same on every machine.
        """
        from pipeline.core.determinism import quantize, scale_quantum

        axes = self.components[:n]  # [<=n, dim]
        out = np.zeros((rows.shape[0], n), dtype=np.float64)  # [m, n]

        def project(start: int, stop: int) -> None:
            centred = rows[start:stop].astype(np.float64)  # [block, dim]
            centred -= self.mean
            out[start:stop, : len(axes)] = centred @ axes.T

        # Blocks of a fixed size whatever the core count, each projected alone: the same bits on any number of cores.
        chunk_map(project, rows.shape[0], block_rows or cache_block_rows(rows.shape[1]))
        if published:
            out[:, : len(axes)] = quantize(out[:, : len(axes)], scale_quantum(np.sqrt(self.explained_variance[: len(axes)])))
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
        scatter, spare = _scatter(matrix, mean, block_rows, bar.update)  # [dim, dim], upper triangle
    scatter /= max(n - 1, 1)  # the covariance, in place: at dim 16384 a copy is 2 GiB
    total = float(np.trace(scatter))
    screen = _symmetric_float32(scatter, spare)  # [dim, dim]: the covariance as Lanczos and the refinement use it
    # One more axis than refined, so the refinement knows the gap below the last refined one.
    solved = min(dim, max(keep, REFINED_AXES + 1))
    refined = min(REFINED_AXES, keep)
    if dim >= FLOAT32_EIGH_DIM:
        del scatter  # the float32 copy is all the solve and the refinement need
        eigenvalues, eigenvectors = _top_eigh_wide(screen, solved, refined, show_progress)
    else:
        eigenvalues, eigenvectors = _top_eigh_shown(scatter, solved, f"PCA eigenvectors ({keep} of {dim})", show_progress)
        del scatter
    eigenvalues[:refined], eigenvectors[:, :refined] = refine_axes(
        matrix, mean, screen, eigenvalues, eigenvectors[:, :refined], others=eigenvectors[:, refined:solved]
    )
    axes = _orthogonal_rest(eigenvectors[:, :keep], refined)
    variance = np.clip(eigenvalues[:keep], 0.0, None)  # rounding can leave tiny negatives
    return _pca(mean, fix_signs(axes.T), variance, total)


# From this width on, the eigenvectors are solved from the float32 covariance, by block
# Lanczos (:mod:`pipeline.core.lanczos`: products with 64 vectors at a time at the GEMM
# rate; the 51 leading pairs of the 405B-shaped [128256, 16384] covariance in 1408 basis
# vectors) where a dense solve's tridiagonal reduction would take minutes on one thread.
# Half the bytes also halve what the memory-bound dense fallback reads (dim 6144: 13 s
# against 25 s in float64). What float32 costs stays below what the pipeline publishes: the
# eigenvalues move by ~1e-7 of the largest (the float32 block products of the covariance
# already leave that much), and the refined axes are made exact in float64 below.
# Narrower matrices (every packaged model, the 1B) keep the dense float64 solve.
FLOAT32_EIGH_DIM = 4096
# Lanczos gives up, for the dense solve, past this share of the width: near the whole space
# a dense solve is cheaper than the basis (and on a spectrum with no gaps it never converges).
LANCZOS_MAX_SHARE = 0.5

# The axes that every token is projected on (pca.parquet, atlas.parquet, undertrained) are
# refined to float64 precision; the others only give explained variances.
REFINED_AXES = 2
REFINE_PASSES = 5  # passes over the matrix at most; two at float32 screen error 1e-7 and a clear gap
CONVERGED = 1e-11  # a residual this small (relative to the top variance) needs one last correction only
CG_STEPS = 2000
CG_TOLERANCE = 1e-10


def _orthogonal_rest(axes: np.ndarray, refined: int) -> np.ndarray:
    """``axes`` [dim, m] with columns refined.. made orthonormal to the first ``refined`` again
    (they moved by the refinement's ~1e-7); the first ``refined`` are kept as they are."""
    if refined == 0 or refined >= axes.shape[1]:
        return axes
    first, rest = axes[:, :refined], axes[:, refined:]
    rest = rest - first @ (first.T @ rest)
    rest, triangle = np.linalg.qr(rest)
    rest *= np.where(np.diag(triangle) < 0, -1.0, 1.0)  # keep each axis's direction
    return np.column_stack([first, rest])


SYMMETRIC_PANEL_COLUMNS = 512  # columns per copy task: the transposed reads stay within cache-sized tiles


def _symmetric_float32(scatter: np.ndarray, spare: np.ndarray | None = None) -> np.ndarray:
    """float32 copy, Fortran order, of the symmetric matrix whose upper triangle ``scatter``
    holds (half the memory of float64), both triangles filled, written into ``spare`` when
    that is a float32 [dim, dim] Fortran-order buffer (the block products' one, unless they
    ran in float64): at width 16384 a fresh GiB costs the first touch of every page again.

    Both triangles, so that Lanczos multiplies it with a plain GEMM: OpenBLAS's ssymm took
    0.24-0.28 s for 64 vectors at width 16384, the GEMM 0.15-0.17 s (the 2-core Intel
    machine of RESULTS-intel.md). Column panels are copied on every core; each value is
    copied, never computed, so the split changes no bit.
    """
    if spare is None or spare.dtype != np.float32 or spare.shape != scatter.shape or not spare.flags.f_contiguous:
        spare = np.empty(scatter.shape, dtype=np.float32, order="F")

    def copy_panel(start: int, stop: int) -> None:
        # Column panel [start, stop): the upper part from scatter's columns, the rest (below the
        # diagonal) from scatter's rows start..stop, transposed.
        spare[:stop, start:stop] = scatter[:stop, start:stop]
        spare[stop:, start:stop] = scatter[start:stop, stop:].T
        square = spare[start:stop, start:stop]
        below = np.tril_indices(stop - start, -1)
        square[below] = square.T[below]

    chunk_map(copy_panel, scatter.shape[1], SYMMETRIC_PANEL_COLUMNS)
    return spare


def refine_axes(
    matrix: np.ndarray, mean: np.ndarray, screen: np.ndarray, values: np.ndarray, vectors: np.ndarray,
    others: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The leading eigenpairs of the covariance to float64 precision: ([r] variances, [dim, r] axes).

    ``vectors`` [dim, r] come from the covariance accumulated in float32 (``screen``),
    whose last bits, and so the axes' last ~7 digits, depend on the BLAS kernel and thread
    count. Each pass over the matrix computes C V exactly enough in float64 (the centred
    rows in float64, 2 MiB of them at a time so they stay in cache, two thin products per
    block, on one BLAS thread per core), a Rayleigh-Ritz step in span(V) and the residuals
    R = C V - V diag(mu); the correction t of each axis solves (mu - screen) t = r
    orthogonally to V (conjugate gradients on the float32 covariance: an error of 1e-7
    there only slows convergence by that factor). The error shrinks by
    ~1e-7 / (relative eigengap) per pass, so two or three passes leave only float64
    rounding, ~1e-15, which the published values are rounded well above. Axes whose
    variance is not separated from the next one cannot be pinned down and are left as they are.

    ``others`` [dim, m]: the eigensolver's next axes, whose variances are ``values[r:r + m]``;
    they precondition the conjugate gradients (:class:`_Deflation`).
    """
    n, dim = matrix.shape
    r = vectors.shape[1]
    if n < 2 or r == 0 or values[0] <= 0:
        return values[:r], vectors
    next_value = values[r] if len(values) > r else 0.0
    if not values[r - 1] - next_value > 1e-6 * values[0]:
        return values[:r], vectors
    with one_blas_thread():  # thin products, and conjugate gradients' memory-bound symv: one thread is faster, and steady
        deflation = _Deflation.of(others, values[r:])
        return _refined(matrix, mean, screen, values[:r], vectors, cache_block_rows(dim), deflation)


def _refined(
    matrix: np.ndarray, mean: np.ndarray, screen: np.ndarray, values: np.ndarray, vectors: np.ndarray, block_rows: int,
    deflation: _Deflation | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`refine_axes` once the axes are known to be separated: the passes themselves."""
    axes = vectors.copy()
    mu = values.copy()
    for _ in range(REFINE_PASSES):
        product = _covariance_times(matrix, mean, axes, block_rows)  # [dim, r]
        ritz, rotation = np.linalg.eigh(axes.T @ product)  # ascending
        rotation = rotation[:, ::-1]
        mu, axes, product = ritz[::-1], axes @ rotation, product @ rotation
        residual = product - axes * mu  # [dim, r]
        if not np.isfinite(residual).all():
            return values, vectors
        small = float(np.abs(residual).max()) <= CONVERGED * mu[0]
        correction = np.column_stack([
            _solve_shifted(screen, value, axes, residual[:, j], deflation) for j, value in enumerate(mu)
        ])
        axes, _ = np.linalg.qr(axes + correction)
        if small:
            break
    return mu, axes


def _covariance_times(matrix: np.ndarray, mean: np.ndarray, axes: np.ndarray, block_rows: int) -> np.ndarray:
    """[dim, r] covariance times ``axes`` [dim, r], from the rows centred in float64: X_c^T (X_c V) / (n - 1).

    Each core sums its own span of rows; how the rows are split moves the float64 sum by
    rounding only (~1e-16), which the refinement's convergence leaves far below what it publishes.
    """
    def span_product(span: tuple[int, int]) -> np.ndarray:
        out = np.zeros(axes.shape)  # [dim, r]
        # Buffers reused by every block: a block's temporaries (2 MiB of rows, a [dim, r] product) allocated
        # afresh can each come from new pages, and the page faults then took longer than the arithmetic.
        centring = np.empty((block_rows, matrix.shape[1]))  # [block, dim] float64
        term = np.empty(axes.shape)  # [dim, r]
        for _, block in iter_blocks(matrix[span[0] : span[1]], block_rows):
            centred = centring[: len(block)]  # [block, dim]
            centred[...] = block  # float32 to float64, exact
            centred -= mean
            out += np.matmul(centred.T, centred @ axes, out=term)
        return out

    parts = span_map(span_product, matrix.shape[0])
    return sum(parts[1:], parts[0]) / max(matrix.shape[0] - 1, 1)


@dataclass(frozen=True)
class _Deflation:
    """Axes the eigensolver found below the refined ones, with their variances: a preconditioner
    for the refinement's conjugate gradients.

    CG on (shift - C) needs about sqrt(condition) steps, and the condition is set by the
    variances nearest the shift: on a flat spectrum the next axis lies close to it (0.6% below
    the second on the synthetic 1B, 1.4% on the 405B-shaped matrix). With these axes W and variances theta,
    M = W diag(1 / (shift - theta)) W^T + (I - W W^T) / (shift - theta_last) undoes (shift - C)
    on span(W) and scales the rest, whose variances lie below theta_last, into [1, condition of
    the rest]. It is applied as I / (shift - theta_last) + W diag(1 / (shift - theta) - 1 /
    (shift - theta_last)) W^T, the same for orthonormal W and positive definite for any W (a
    positive multiple of I plus a semi-definite term), so CG's answer is the same; only its
    steps are fewer. W need not be exact: the eigensolver's residuals (1e-4 at most) leave the
    preconditioned operator near the identity there.
    """

    vectors: np.ndarray  # [dim, m] float64
    values: np.ndarray  # [m] descending

    @staticmethod
    def of(vectors: np.ndarray | None, values: np.ndarray) -> _Deflation | None:
        if vectors is None or vectors.shape[1] == 0 or len(values) < vectors.shape[1]:
            return None
        return _Deflation(np.asarray(vectors, dtype=np.float64), np.asarray(values[: vectors.shape[1]], dtype=np.float64))

    def preconditioner(self, shift: float) -> Callable[[np.ndarray], np.ndarray] | None:
        """x -> M x for ``shift`` (None where the shift is not above every one of these variances)."""
        gaps = shift - self.values  # [m], increasing
        if not np.all(gaps > 0):
            return None
        rest = gaps[-1]  # shift - theta for any axis not in W is at least this
        extra = 1.0 / gaps - 1.0 / rest  # [m] >= 0

        def apply(x: np.ndarray) -> np.ndarray:
            return x / rest + self.vectors @ (extra * (self.vectors.T @ x))

        return apply


def _solve_shifted(
    screen: np.ndarray, shift: float, axes: np.ndarray, rhs: np.ndarray, deflation: _Deflation | None = None
) -> np.ndarray:
    """t orthogonal to ``axes`` with (shift - C) t = rhs there; C the symmetric ``screen`` (its upper triangle is read).

    Positive definite on that complement when shift lies above the covariance's other
    eigenvalues; conjugate gradients (preconditioned by ``deflation`` when given) stop at
    CG_TOLERANCE or on a direction of no curvature.
    """
    from scipy.linalg import blas

    symv = blas.ssymv if screen.dtype == np.float32 else blas.dsymv

    def project(x: np.ndarray) -> np.ndarray:
        return x - axes @ (axes.T @ x)

    def apply(x: np.ndarray) -> np.ndarray:
        y = symv(1.0, screen, x.astype(screen.dtype), lower=0).astype(np.float64)
        return project(shift * x - y)

    scaled = deflation.preconditioner(shift) if deflation is not None else None

    def precondition(x: np.ndarray) -> np.ndarray:
        return x if scaled is None else project(scaled(x))

    b = project(rhs)
    x = np.zeros_like(b)
    r = b.copy()
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    stop = (CG_TOLERANCE * np.sqrt(float(r @ r))) ** 2
    for _ in range(CG_STEPS):
        if float(r @ r) <= stop:
            break
        q = apply(p)
        curvature = float(p @ q)
        if not curvature > 0:
            break
        step = rz / curvature
        x += step * p
        r -= step * q
        z = precondition(r)
        rz_next = float(r @ z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return project(x)


def _scatter(
    matrix: np.ndarray, mean: np.ndarray, block_rows: int, progress: Callable[[int], object]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The upper triangle of sum_i (x_i - mean)(x_i - mean)^T, float64 [dim, dim] in Fortran order,
    and the [dim, dim] buffer the block products used (None on a torch device), free for reuse.

    Each block is centred and multiplied (a symmetric rank-k update, syrk) in the matrix's
    own precision, float32 for embeddings, at twice float64's speed, and the block products
    are summed in float64. The float32 rounding errors average out over the rows: on the
    synthetic Llama 3.2 1B matrix the top 50 eigenvalues agree with an all-float64 scatter
    to 1e-8 and the eigenvectors to |cos| > 0.999999999. The lower triangle is not filled.
    """
    from scipy.linalg import blas

    n, dim = matrix.shape
    dtype = np.float64 if matrix.dtype == np.float64 else np.float32
    shift = mean.astype(dtype)  # [dim]: the mean as the blocks can subtract it
    device = compute_device()
    spare = None
    if device is None:
        scatter, spare = _summed_block_products(matrix, shift, block_rows, progress)
    else:
        scatter = _summed_block_products_on(device, matrix, shift, block_rows, progress)
    # Centring on the rounded shift rather than the exact mean adds n * d d^T, d = mean - shift.
    offset = mean - shift.astype(np.float64)  # [dim]
    scatter = blas.dsyr(-float(n), offset, a=scatter, lower=0, overwrite_a=1)
    return scatter, spare


def _summed_block_products(
    matrix: np.ndarray, shift: np.ndarray, block_rows: int, progress: Callable[[int], object]
) -> tuple[np.ndarray, np.ndarray]:
    """float64 [dim, dim], Fortran order, upper triangle: the sum over blocks of C^T C, C a block
    minus ``shift``, each product a BLAS syrk in ``shift``'s precision; and that product's buffer."""
    from scipy.linalg import blas

    dim = matrix.shape[1]
    syrk = blas.dsyrk if shift.dtype == np.float64 else blas.ssyrk
    scatter = np.zeros((dim, dim), order="F")  # [dim, dim] float64
    product = np.zeros((dim, dim), dtype=shift.dtype, order="F")  # [dim, dim], reused by every block
    # One buffer for every block's centred rows: a fresh 64 MiB array each block costs its page faults again.
    centring = np.empty((min(block_rows, matrix.shape[0]), dim), dtype=shift.dtype)  # [block, dim]
    for _, block in iter_blocks(matrix, block_rows):
        centred = _centred_on_cores(block, shift, centring[: len(block)])  # [block, dim]
        # centred.T is a Fortran-order view, so BLAS takes it without a copy.
        product = syrk(1.0, centred.T, beta=0.0, c=product, overwrite_c=1, lower=0)
        _add_upper(scatter, product)
        progress(len(block))
    return scatter, product


def _centred_on_cores(block: np.ndarray, shift: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``block - shift`` in ``shift``'s precision, written into ``out`` (each value's one
    subtraction, so the cores' split of the rows changes nothing)."""
    def centre(span: tuple[int, int]) -> None:
        np.subtract(block[span[0] : span[1]], shift, out=out[span[0] : span[1]], dtype=shift.dtype)

    span_map(centre, len(block))
    return out


ADD_COLUMNS = 256  # columns of the upper triangle summed per task


def _add_upper(total: np.ndarray, part: np.ndarray) -> None:
    """``total += part`` on the upper triangles of two [dim, dim] Fortran-order arrays, the
    columns shared among the cores (each element's one addition is the same on any split;
    at width 16384 the whole square took 0.2 s on one core, 16 times a pass)."""
    def add(start: int, stop: int) -> None:
        total[:stop, start:stop] += part[:stop, start:stop]

    chunk_map(add, total.shape[1], ADD_COLUMNS)


def _summed_block_products_on(
    device: str, matrix: np.ndarray, shift: np.ndarray, block_rows: int, progress: Callable[[int], object]
) -> np.ndarray:
    """:func:`_summed_block_products` with each block's product on torch ``device`` (a GEMM, in
    ``shift``'s precision, strictly float32 there: :func:`pipeline.core.device.strict_float32`)
    and the sum in float64 there; the whole square comes back, of which the upper triangle is used."""
    import torch

    dim = matrix.shape[1]
    centre = torch.from_numpy(shift).to(device)  # [dim]
    scatter = torch.zeros((dim, dim), dtype=torch.float64, device=device)  # [dim, dim]
    for _, block in iter_blocks(matrix, block_rows):
        centred = torch.from_numpy(np.ascontiguousarray(block)).to(device).to(centre.dtype) - centre  # [block, dim]
        scatter += (centred.T @ centred).double()
        progress(len(block))
    return np.asfortranarray(scatter.cpu().numpy())


def _top_eigh_wide(screen: np.ndarray, keep: int, leading: int, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_eigh` for a wide float32 covariance ``screen`` (both triangles, Fortran
    order, not overwritten): block Lanczos, or the dense solve where Lanczos does not converge."""
    from pipeline.core.lanczos import leading_eigenpairs

    dim = screen.shape[0]

    def product(block: np.ndarray) -> np.ndarray:  # [dim, b] -> [dim, b]
        # screen is symmetric with both triangles filled: its transpose, a C-order view, is the same matrix.
        return np.matmul(screen.T, np.ascontiguousarray(block, dtype=np.float32)).astype(np.float64)

    max_columns = int(dim * LANCZOS_MAX_SHARE)
    desc = f"PCA eigenvectors ({keep} of {dim}, Lanczos basis)"
    with progress_bar(total=max_columns, desc=desc, unit="vectors", enabled=show_progress) as bar:
        solved = leading_eigenpairs(product, dim, keep, leading, max_columns, bar.update)
    if solved is not None:
        return solved
    return _top_eigh_shown(screen.copy(order="F"), keep, f"PCA eigenvectors ({keep} of {dim}, dense)", show_progress)


def _top_eigh_shown(covariance_upper: np.ndarray, keep: int, desc: str, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_eigh` under a one-step progress bar: one LAPACK call, half a second at dim
    2048 and minutes at 16384; the bar shows it runs."""
    with progress_bar(total=1, desc=desc, unit="solve", enabled=show_progress) as bar:
        solved = _top_eigh(covariance_upper, keep)  # [keep] descending, [dim, keep]
        bar.update(1)
    return solved


def _top_eigh(covariance_upper: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` largest eigenpairs of a symmetric matrix given by its upper triangle.

    LAPACK's dsyevr (MRRR) computes only the requested eigenvectors, so asking for 50 of
    2048 costs little more than the tridiagonal reduction. It runs on one BLAS thread: the
    reduction is a long run of small matrix-vector steps that OpenBLAS threads badly (for
    the full eigh at dim 2048 on 2 busy cores, one thread took 1.3 s and two took 13 s).
    The input is overwritten.
    """
    from scipy.linalg import eigh

    dim = covariance_upper.shape[0]
    with one_blas_thread():
        values, vectors = eigh(
            covariance_upper, lower=False, subset_by_index=[dim - keep, dim - 1], driver="evr",
            overwrite_a=True, check_finite=False,
        )  # ascending
    return values[::-1].astype(np.float64), vectors[:, ::-1].astype(np.float64)


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
    """[dim] float64 mean of the rows: the blocks' sums, computed on every core, added in block order
    (so the bits are those of one thread)."""
    def block_sum(start: int, stop: int) -> np.ndarray:
        return matrix[start:stop].sum(axis=0, dtype=np.float64)  # [dim]; NaN and Inf carry through a sum

    total = np.zeros(matrix.shape[1], dtype=np.float64)  # [dim]
    for start, sums in zip(range(0, matrix.shape[0], block_rows), chunk_map(block_sum, matrix.shape[0], block_rows)):
        if not np.isfinite(sums).all():
            _check_finite(matrix[start : start + block_rows], start)
            raise DissectError("the matrix's values are too large to sum in float64; PCA needs finite, representable values")
        total += sums
    return total / matrix.shape[0]


def _check_finite(block: np.ndarray, start: int) -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise DissectError(f"the matrix has NaN or Inf in row {row}; PCA is undefined: re-extract it from intact weights")
