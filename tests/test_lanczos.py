"""Block Lanczos for the leading eigenpairs of a wide covariance (pipeline.core.lanczos)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.core.lanczos as lanczos
from pipeline.core.lanczos import leading_eigenpairs


def symmetric_with_spectrum(values: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[d, d] Q diag(values) Q^T for a random orthogonal Q, and Q (its columns the eigenvectors)."""
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(values), len(values))))
    return (rotation * values) @ rotation.T, rotation


def product_of(matrix: np.ndarray):
    return lambda block: matrix @ block


def test_known_spectrum_is_found(monkeypatch):
    monkeypatch.setattr(lanczos, "BLOCK", 8)
    # Ten leading values that are apart, then a bulk below them.
    spectrum = np.concatenate([10.0 - np.arange(10), np.linspace(0.5, 0.0, 190)])
    matrix, eigenvectors = symmetric_with_spectrum(spectrum, seed=3)
    values, vectors = leading_eigenpairs(product_of(matrix), 200, keep=6, leading=2, max_columns=120)
    assert np.allclose(values, spectrum[:6], rtol=0, atol=1e-8 * spectrum[0])
    assert np.allclose(np.abs(np.sum(vectors[:, :2] * eigenvectors[:, :2], axis=0)), 1.0, atol=1e-10)
    assert np.allclose(vectors.T @ vectors, np.eye(6), atol=1e-12)


def test_agrees_with_a_dense_solve_on_a_clustered_spectrum(monkeypatch):
    """Leading values 1e-3 apart, as at the edge of a random matrix's spectrum."""
    monkeypatch.setattr(lanczos, "BLOCK", 16)
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((4000, 300))
    covariance = rows.T @ rows / 3999
    values, vectors = leading_eigenpairs(product_of(covariance), 300, keep=20, leading=2, max_columns=300)
    dense_values, dense_vectors = np.linalg.eigh(covariance)
    dense_values, dense_vectors = dense_values[::-1], dense_vectors[:, ::-1]
    # Apart pairs: each value within residual^2 / gap of its eigenvalue.
    gap = np.diff(-dense_values[:21]).min()
    bound = (lanczos.ALL_TOLERANCE * dense_values[0]) ** 2 / gap
    assert np.abs(values - dense_values[:20]).max() <= bound
    residual = covariance @ vectors - vectors * values
    assert (np.linalg.norm(residual, axis=0) <= lanczos.ALL_TOLERANCE * values[0]).all()
    assert (np.linalg.norm(residual[:, :2], axis=0) <= lanczos.LEADING_TOLERANCE * values[0]).all()
    assert np.allclose(np.abs(np.sum(vectors[:, :2] * dense_vectors[:, :2], axis=0)), 1.0, atol=1e-9)


def test_low_rank_matrix_runs_out_of_directions_and_goes_on(monkeypatch):
    """Rank 3 < keep: the Krylov space closes after one block; fresh directions fill the rest."""
    monkeypatch.setattr(lanczos, "BLOCK", 4)
    spectrum = np.zeros(50)
    spectrum[:3] = [5.0, 3.0, 1.0]
    matrix, _ = symmetric_with_spectrum(spectrum, seed=11)
    values, vectors = leading_eigenpairs(product_of(matrix), 50, keep=6, leading=2, max_columns=50)
    assert np.allclose(values, [5, 3, 1, 0, 0, 0], atol=1e-12)
    assert np.allclose(vectors.T @ vectors, np.eye(6), atol=1e-12)


def test_gives_up_when_the_basis_would_grow_too_large(monkeypatch):
    monkeypatch.setattr(lanczos, "BLOCK", 4)
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((3000, 200))
    covariance = rows.T @ rows / 2999  # a dense spectrum with no clear leading values
    calls = []
    assert leading_eigenpairs(product_of(covariance), 200, keep=10, leading=2, max_columns=16, progress=calls.append) is None
    assert sum(calls) == 16  # progress counts the basis vectors made


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(12, 60), keep=st.integers(1, 5))
def test_returned_pairs_are_eigenpairs_within_the_tolerance(seed, dim, keep):
    lanczos_block = 4
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((2 * dim, dim)) * rng.uniform(0.1, 10.0, dim)
    covariance = rows.T @ rows
    original = lanczos.BLOCK
    lanczos.BLOCK = lanczos_block
    try:
        solved = leading_eigenpairs(product_of(covariance), dim, keep=keep, leading=min(2, keep), max_columns=dim)
    finally:
        lanczos.BLOCK = original
    dense = np.linalg.eigvalsh(covariance)[::-1]
    if solved is None:  # only when the whole space did not settle it, which a full basis always does
        pytest.fail("a basis of the whole space must give exact pairs")
    values, vectors = solved
    residual = np.linalg.norm(covariance @ vectors - vectors * values, axis=0)
    assert (residual <= lanczos.ALL_TOLERANCE * dense[0]).all()
    # Each Ritz value is within its residual of an eigenvalue, and these are the leading ones.
    assert np.allclose(values, dense[:keep], rtol=0, atol=lanczos.ALL_TOLERANCE * dense[0])


def test_orthonormal_columns_by_hand():
    # Columns (3, 4, 0) and (1, 0, 0): norms 5; the second's part orthogonal to the first is
    # (1, 0, 0) - (3/25)(3, 4, 0) = (16, -12, 0) / 25, of norm 4/5.
    block = np.array([[3.0, 1.0], [4.0, 0.0], [0.0, 0.0]])
    q, r = lanczos.orthonormal_columns(block)
    assert np.allclose(q, [[0.6, 0.8], [0.8, -0.6], [0.0, 0.0]], atol=1e-15)
    assert np.allclose(r, [[5.0, 0.6], [0.0, 0.8]], atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(8, 200), columns=st.integers(1, 8), scale=st.floats(0, 6),
       spread=st.floats(-5, 0))
def test_orthonormal_columns_is_a_qr_of_the_block(seed, rows, columns, scale, spread):
    rng = np.random.default_rng(seed)
    # Columns of very different lengths, as an image's are, and nearly parallel ones (all within
    # 10^spread of a common direction): condition numbers up to ~1e5, where one Cholesky pass
    # alone would leave the columns orthogonal to only ~1e-6.
    directions = rng.standard_normal((rows, 1)) + 10.0**spread * rng.standard_normal((rows, columns))
    block = directions * 10.0 ** rng.uniform(-scale, scale, columns)
    q, r = lanczos.orthonormal_columns(block)
    assert np.allclose(q.T @ q, np.eye(columns), rtol=0, atol=1e-12)
    assert np.allclose(q @ r, block, rtol=0, atol=1e-12 * np.abs(block).max())
    assert np.array_equal(r, np.triu(r))


def test_orthonormal_columns_falls_back_to_householder_on_dependent_columns():
    # The third column is the sum of the first two: the Gram matrix is singular, so Cholesky fails
    # (or leaves a tiny pivot) and Householder QR answers, with a zero on R's diagonal.
    first, second = np.arange(1.0, 7.0), np.array([1.0, 0.0, 2.0, 0.0, 3.0, 0.0])
    block = np.column_stack([first, second, first + second])
    q, r = lanczos.orthonormal_columns(block)
    householder_q, householder_r = np.linalg.qr(block)
    assert np.array_equal(q, householder_q) and np.array_equal(r, householder_r)
    assert abs(r[2, 2]) <= 1e-12 * abs(r[0, 0])
