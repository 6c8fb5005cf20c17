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


# ------------------------------------------------------------------ the Gram route, m > n
def previous_route(W, C):
    """The previous route (thin SVD of W S), the oracle: ``S = V_C Λ_C^{1/2}`` and the thin
    SVD of ``W S``."""
    lam, V = np.linalg.eigh((C + C.T) / 2)
    U, s, _ = np.linalg.svd(W @ (V * np.sqrt(np.clip(lam, 0, None))), full_matrices=False)
    return svd.canonical_signs(U, np), s**2


class _CountSvd:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = np.linalg.svd

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(np.linalg, "svd", counted)


def activation_like(n, rows, seed):
    """A definite Gram of rows with a mean and decaying column scales (a
    spectrum over about 4 decades, as LayerNorm outputs give)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)) * np.exp(-np.arange(n) / n * 4) + rng.standard_normal(n)
    return X.T @ X


@pytest.mark.parametrize("m,n", [(300, 100), (2304 // 8, 768 // 8), (3072 // 8, 768 // 8)])
def test_gram_route_matches_the_previous_route(m, n, monkeypatch):
    """Products A B at several ranks to 1e-12 relative (or, at a cut whose
    spectral gap is small, no farther from the previous route than the brute
    force eigh of W C Wᵀ is: the conditioning of the cut, not of the route),
    NMSE curves to 1e-15 absolute, orthonormal U to 1e-14, and no SVD called."""
    rng = np.random.default_rng(m + n)
    W = rng.standard_normal((m, n)) / np.sqrt(n)
    C = activation_like(n, 4 * n, seed=m)
    U0, s0 = previous_route(W, C)
    counter = _CountSvd(monkeypatch)
    U, s2 = svd.output_basis(W, C, np)
    assert counter.calls == 0  # the Gram route
    assert U.shape == (m, n) and s2.shape == (n,)
    np.testing.assert_allclose(U.T @ U, np.eye(n), rtol=0, atol=1e-14)
    assert np.abs(svd.nmse_curve(s2, np) - svd.nmse_curve(s0, np)).max() <= 1e-15
    np.testing.assert_allclose(s2, s0, rtol=1e-10, atol=1e-13 * s0[0])
    G = W @ C @ W.T
    Ub = np.linalg.eigh(G)[1][:, ::-1]
    for r in (1, 2, 5, n // 4, n // 2, n - 1, n):
        ours = U[:, :r] @ (U[:, :r].T @ W)
        theirs = U0[:, :r] @ (U0[:, :r].T @ W)
        brute = np.linalg.norm(Ub[:, :r] @ (Ub[:, :r].T @ W) - theirs)
        assert np.linalg.norm(ours - theirs) <= max(1e-12 * np.linalg.norm(theirs), brute), r
    # and the brute force: W C Wᵀ = U Σ² Uᵀ
    np.testing.assert_allclose((U * s2) @ U.T, G, rtol=0, atol=1e-12 * np.abs(G).max())


@pytest.mark.parametrize("case", ["singular C", "rank-deficient W", "ill-conditioned W S", "float32"])
def test_thin_svd_where_the_gram_route_does_not_apply(case, monkeypatch):
    """Singular C (no Cholesky), W of rank < n (σ = 0), σ_k² < 1e-10 σ_1²,
    and float32 take the thin SVD of W S; U stays orthonormal with the
    spectrum of W C Wᵀ (brute force by eigh)."""
    m, n = 40, 12
    rng = np.random.default_rng(3)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((200, n))
    dtype = np.float64
    if case == "singular C":
        X = X[:5]  # rank 5
    elif case == "rank-deficient W":
        W = W[:, :4] @ rng.standard_normal((4, n))  # rank 4
    elif case == "ill-conditioned W S":
        X = X * np.r_[np.ones(n - 1), 1e-6]  # σ_k² ≈ 1e-12 σ_1²
    else:
        dtype = np.float32
    C = X.T @ X
    counter = _CountSvd(monkeypatch)
    U, s2 = svd.output_basis(W.astype(dtype), C.astype(dtype), np)
    assert counter.calls == 1
    assert U.dtype == dtype and U.shape == (m, n)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(U.T @ U, np.eye(n), rtol=0, atol=tol)
    evals = np.linalg.eigvalsh(W @ C @ W.T)[::-1][:n]
    np.testing.assert_allclose(s2, np.clip(evals, 0, None), rtol=0, atol=tol * evals[0])
    U0, _ = previous_route(W, C)
    rank = {"singular C": 5, "rank-deficient W": 4}.get(case, n)
    for r in range(1, rank + 1):
        ours = U[:, :r] @ (U[:, :r].T @ W)
        theirs = U0[:, :r] @ (U0[:, :r].T @ W)
        assert np.linalg.norm(ours - theirs) <= 1e3 * tol * np.linalg.norm(theirs), r


def test_cholesky_helper():
    """svd.cholesky: the factor of a definite matrix, None for a singular or
    indefinite one, and None for a factor with a NaN pivot (cuSOLVER's way,
    which the strict double reproduces)."""
    from strict_xp import xp as sx

    A = np.array([[4.0, 2.0], [2.0, 3.0]])
    L = svd.cholesky(A, np)
    np.testing.assert_allclose(L @ L.T, A)
    for bad in (np.array([[1.0, 1.0], [1.0, 1.0]]), np.diag([1.0, -1.0])):
        assert svd.cholesky(bad, np) is None
        assert svd.cholesky(sx.asarray(bad), sx) is None
    np.testing.assert_allclose(svd.cholesky(sx.asarray(A), sx).get(), L)


def test_canonical_signs_equals_the_argmax_rule():
    """The two-reduction form gives the argmax rule's signs exactly, ties
    between signs (first entry wins) and zero columns included."""
    def rule(U):
        pivot = np.take_along_axis(U, np.argmax(np.abs(U), axis=0)[None, :], axis=0)
        return U * np.where(pivot < 0, -1.0, 1.0)

    rng = np.random.default_rng(0)
    U = rng.standard_normal((30, 8))
    np.testing.assert_array_equal(svd.canonical_signs(U, np), rule(U))
    tied = np.array([[1.0, -2.0, 0.0], [-1.0, 2.0, 0.0], [0.5, 1.0, 0.0]])
    np.testing.assert_array_equal(svd.canonical_signs(tied, np), rule(tied))
    np.testing.assert_array_equal(svd.canonical_signs(tied, np)[:, :2], [[1.0, 2.0], [-1.0, -2.0], [0.5, -1.0]])
