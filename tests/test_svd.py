"""Stage 1 against independent derivations (docs/math.md, Stage 1)."""

import numpy as np
import pytest
import scipy.linalg

from mrc_ref import svd
from mrc_ref.errors import MrcError

# float64 throughout: agreements are at round-off (1e-9 relative covers the
# conditioning of Grams built from a few hundred random rows).
RTOL = 1e-9


def random_case(m, n, rows, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)) @ np.diag(np.exp(-np.arange(n) / n * 3))
    W = rng.standard_normal((m, n))
    return W, X


def whitened_solution(W, C, r):
    """The SVD-LLM form: C = L Lᵀ (Cholesky), W L = U Σ Vᵀ,
    Ŵ = U_r Σ_r V_rᵀ L⁻¹. A second derivation, valid for C positive definite."""
    L = np.linalg.cholesky(C)
    U, s, Vt = np.linalg.svd(W @ L, full_matrices=False)
    return scipy.linalg.solve_triangular(L.T, (U[:, :r] * s[:r] @ Vt[:r]).T, lower=False).T


def direct_output_solution(W, X, r):
    """Eckart–Young on the outputs Y = X Wᵀ from raw X: the best rank-r
    approximation of Y is Y V_r V_rᵀ (right singular vectors of Y), i.e.
    Ŵ = V_rᵀ-projected W. Also returns the optimal error ‖Y − Ŷ‖²/‖Y‖²."""
    Y = X @ W.T
    _, s, Vt = np.linalg.svd(Y, full_matrices=False)
    V = Vt[:r].T  # (m, r): the output directions
    return V @ V.T @ W, np.sum(s[r:] ** 2) / np.sum(s**2)


@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (9, 9)])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_matches_whitened_form(m, n, r):
    W, X = random_case(m, n, 200, seed=m * 100 + n * 10 + r)
    C = X.T @ X
    U, s2 = svd.output_basis(W, C, np)
    A, B = svd.factors(W, U, r)
    ours = X @ (A @ B).T
    theirs = X @ whitened_solution(W, C, r).T
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * np.abs(theirs).max())


@pytest.mark.parametrize("m,n,rows", [(10, 6, 50), (6, 10, 50), (10, 20, 7), (20, 10, 4)])
def test_matches_direct_svd_of_outputs(m, n, rows):
    """Includes singular C (fewer rows than features)."""
    W, X = random_case(m, n, rows, seed=rows)
    C = X.T @ X
    U, s2 = svd.output_basis(W, C, np)
    curve = svd.nmse_curve(s2, np)
    for r in range(1, min(m, n, rows) + 1):
        A, B = svd.factors(W, U, r)
        W_direct, err = direct_output_solution(W, X, r)
        np.testing.assert_allclose(X @ (A @ B).T, X @ W_direct.T, rtol=1e-8, atol=1e-8 * np.abs(X @ W.T).max())
        # (c) the NMSE equals the spectral tail, and the brute-force error
        np.testing.assert_allclose(curve[r], err, rtol=1e-8, atol=1e-13)
        Y = X @ W.T
        brute = np.sum((Y - X @ (A @ B).T) ** 2) / np.sum(Y**2)
        np.testing.assert_allclose(curve[r], brute, rtol=1e-8, atol=1e-13)
        np.testing.assert_allclose(svd.nmse(W, A @ B, C, np), brute, rtol=1e-8, atol=1e-13)


def test_singular_C_fewer_rows_than_features():
    W, X = random_case(8, 16, 3, seed=1)
    U, s2 = svd.output_basis(W, X.T @ X, np)
    curve = svd.nmse_curve(s2, np)
    assert curve[3] == pytest.approx(0, abs=1e-12)  # rank 3 reproduces the outputs exactly
    assert curve[2] > 1e-6


def test_both_branches_agree():
    """A tall W (m > n) goes through the SVD of W S; its spectrum and basis
    must agree with a direct eigendecomposition of W C Wᵀ."""
    W, X = random_case(14, 6, 40, seed=5)
    C = X.T @ X
    U, s2 = svd.output_basis(W, C, np)  # SVD branch
    evals = np.linalg.eigvalsh(W @ C @ W.T)[::-1][:6]
    np.testing.assert_allclose(s2, evals, rtol=1e-9, atol=1e-9 * evals[0])
    np.testing.assert_allclose(U.T @ U, np.eye(6), atol=1e-12)


def test_curve_endpoints_and_monotone():
    s2 = np.array([5.0, 3.0, 1.0, 0.0])
    curve = svd.nmse_curve(s2, np)
    np.testing.assert_allclose(curve, [1, 4 / 9, 1 / 9, 0, 0])
    np.testing.assert_allclose(svd.energy_curve(s2, np), 1 - curve)


def test_not_psd_is_an_error():
    W = np.eye(3)
    C = np.diag([1.0, 1.0, -0.5])
    with pytest.raises(MrcError, match="positive semi-definite"):
        svd.output_basis(W, C, np)
    with pytest.raises(MrcError, match="positive semi-definite"):
        svd.output_basis(np.ones((5, 3)) + np.eye(5, 3), C, np)


def test_zero_output_energy_is_an_error():
    W = np.zeros((4, 3))
    with pytest.raises(MrcError, match="zero output energy"):
        svd.output_basis(W, np.eye(3), np)
