"""The refinement's correction solve: conjugate gradients on (shift - C), preconditioned by the
eigensolver's next axes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import blas

from pipeline.core.pca import _Deflation, _solve_shifted


@pytest.fixture
def counted_symv(monkeypatch):
    """The number of symmetric matrix-vector products the solve makes (a list holding one count)."""
    count = [0]
    for name in ("ssymv", "dsymv"):
        real = getattr(blas, name)

        def counting(*args, _real=real, **kwargs):
            count[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(blas, name, counting)
    return count


def diagonal_screen(values: list[float]) -> np.ndarray:
    # float64, so that the steps are those of exact arithmetic (a float32 screen rounds each product).
    return np.asfortranarray(np.diag(np.array(values, dtype=np.float64)))  # [dim, dim]


def unit(dim: int, index: int) -> np.ndarray:
    vector = np.zeros(dim)
    vector[index] = 1.0
    return vector


def test_diagonal_covariance_by_hand(counted_symv):
    # C = diag(5, 4, 3, 2, 1), shift 5, the first axis refined: t_i = rhs_i / (5 - c_i) off it.
    screen = diagonal_screen([5, 4, 3, 2, 1])
    axes = unit(5, 0)[:, None]  # [5, 1]
    rhs = np.array([7.0, 1.0, 1.0, 1.0, 1.0])
    expected = np.array([0.0, 1.0, 1 / 2, 1 / 3, 1 / 4])

    plain = _solve_shifted(screen, 5.0, axes, rhs)
    plain_steps = counted_symv[0]
    # The next two axes known: M undoes (5 - C) on them and divides the rest by 5 - 3 = 2, so
    # the preconditioned operator has eigenvalues 1, 1, 1.5 and 2: three distinct ones, three steps.
    deflation = _Deflation.of(np.column_stack([unit(5, 1), unit(5, 2)]), np.array([4.0, 3.0]))
    deflated = _solve_shifted(screen, 5.0, axes, rhs, deflation)
    deflated_steps = counted_symv[0] - plain_steps

    np.testing.assert_allclose(plain, expected, atol=1e-12)
    np.testing.assert_allclose(deflated, expected, atol=1e-12)
    assert (plain_steps, deflated_steps) == (4, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inexact_axes_change_the_steps_not_the_answer(seed, counted_symv):
    # A flat spectrum like an embedding's: the next variance lies 1.2-2.5% below the shift (seeds 0-2).
    rng = np.random.default_rng(seed)
    dim = 60
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # [dim, dim] eigenvectors
    variances = np.sort(np.concatenate([[1.0], rng.uniform(0.2, 0.99, dim - 1)]))[::-1]  # [dim]
    screen = np.asfortranarray((basis * variances) @ basis.T)  # [dim, dim] float64
    axes, shift = basis[:, :1], float(variances[0])
    rhs = rng.standard_normal(dim)
    # The exact answer, from the eigenbasis: sum over k >= 1 of (u_k . rhs) / (shift - v_k) u_k.
    expected = basis[:, 1:] @ ((basis[:, 1:].T @ rhs) / (shift - variances[1:]))

    plain = _solve_shifted(screen, shift, axes, rhs)
    plain_steps = counted_symv[0]
    # The next 12 axes and variances as an eigensolver would give them: off by ~1e-4.
    others = basis[:, 1:13] + 1e-4 * rng.standard_normal((dim, 12))
    values = variances[1:13] * (1 + 1e-4 * rng.standard_normal(12))
    deflated = _solve_shifted(screen, shift, axes, rhs, _Deflation.of(others, values))
    deflated_steps = counted_symv[0] - plain_steps

    scale = np.linalg.norm(expected)
    assert np.linalg.norm(plain - expected) <= 1e-8 * scale
    assert np.linalg.norm(deflated - expected) <= 1e-8 * scale
    assert deflated_steps < plain_steps


def test_no_preconditioner_where_the_shift_is_not_above_the_axes():
    deflation = _Deflation.of(np.eye(3)[:, 1:], np.array([2.0, 1.0]))
    assert deflation.preconditioner(2.0) is None
    assert deflation.preconditioner(1.5) is None
    assert deflation.preconditioner(3.0) is not None


def test_no_deflation_without_axes():
    assert _Deflation.of(None, np.array([1.0])) is None
    assert _Deflation.of(np.empty((3, 0)), np.array([])) is None
