"""Stage 3: analytic gradients, start point, and the exact local optimum."""

import numpy as np
import pytest

from mrc_ref import compensate as cp
from mrc_ref import svd


def case(m=10, n=7, rows=60, r=2, q=2, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)) @ np.diag(np.linspace(2, 0.3, n))
    Xt = X + shift * rng.standard_normal(X.shape)  # inputs of an already-compressed model
    W = rng.standard_normal((m, n))
    U, s2 = svd.output_basis(W, X.T @ X, np)
    A, B = svd.factors(W, U, r)
    P = rng.standard_normal((m, q))
    Q = rng.standard_normal((q, n))
    return X, Xt, W, A, B, P, Q, s2


def raw_loss(X, Xt, W, A, B, P, Q):
    """The definition, from raw rows: ‖X Wᵀ − X̃ (A B + P Q)ᵀ‖² / ‖X Wᵀ‖²."""
    Y = X @ W.T
    return np.sum((Y - Xt @ (A @ B + P @ Q).T) ** 2) / np.sum(Y**2)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_loss_equals_definition_and_gradients_match_finite_differences(shift):
    X, Xt, W, A, B, P, Q, _ = case(shift=shift)
    consts = cp.prepare(W, A, B, X.T @ X, K=Xt.T @ X, Ct=Xt.T @ Xt)
    loss, gP, gQ = cp.loss_and_grads(W, A @ B, P, Q, consts)
    assert float(loss) == pytest.approx(raw_loss(X, Xt, W, A, B, P, Q), rel=1e-12)
    h = 1e-6  # central differences: truncation O(h²) ≈ 1e-12, round-off ≈ 1e-16 / h ≈ 1e-10
    for grad, which in ((gP, 0), (gQ, 1)):
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            args = [P.copy(), Q.copy()]
            args[which][idx] += h
            up = raw_loss(X, Xt, W, A, B, *args)
            args[which][idx] -= 2 * h
            down = raw_loss(X, Xt, W, A, B, *args)
            fd[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_step_zero_is_stage_one():
    X, _, W, A, B, _, _, s2 = case()
    P0, Q0 = cp.init_residual(W.shape[0], W.shape[1], 2, seed=0, layer_index=3, xp=np, dtype=np.float64)
    assert not P0.any()
    _, _, history = cp.compensate(W, A, B, P0, Q0, X.T @ X, steps=0, xp=np)
    assert history[0] == pytest.approx(float(svd.nmse_curve(s2, np)[2]), rel=1e-12, abs=1e-15)


def test_init_is_seeded_and_per_layer():
    a = cp.init_residual(5, 4, 2, 7, 0, np, np.float64)[1]
    np.testing.assert_array_equal(a, cp.init_residual(5, 4, 2, 7, 0, np, np.float64)[1])
    assert not np.array_equal(a, cp.init_residual(5, 4, 2, 7, 1, np, np.float64)[1])
    assert not np.array_equal(a, cp.init_residual(5, 4, 2, 8, 0, np, np.float64)[1])


@pytest.mark.parametrize("m,n,r,q", [(12, 8, 2, 2), (8, 12, 3, 1), (16, 16, 1, 3)])
def test_local_mode_approaches_rank_r_plus_q_from_above(m, n, r, q):
    """With X̃ = X the optimum of P Q is the Stage-1 solution at rank r + q:
    NMSE(r + q) is a floor the loss never crosses and nearly reaches."""
    X, _, W, A, B, _, _, s2 = case(m=m, n=n, rows=80, r=r, q=q, seed=m + n)
    curve = svd.nmse_curve(s2, np)
    P0, Q0 = cp.init_residual(m, n, q, seed=0, layer_index=0, xp=np, dtype=np.float64)
    P, Q, history = cp.compensate(W, A, B, P0, Q0, X.T @ X, steps=3000, lr=1e-2, xp=np)
    floor, start = float(curve[r + q]), float(curve[r])
    assert np.all(history >= floor - 1e-12)
    best = raw_loss(X, X, W, A, B, P, Q)
    assert best == pytest.approx(history.min(), rel=1e-10)
    # closes at least 99 % of the gap between Stage 1 and the exact optimum
    assert best - floor <= 0.01 * (start - floor)


def test_inputs_not_modified_and_best_iterate_returned():
    X, _, W, A, B, P, Q, _ = case()
    P0, Q0 = P.copy(), Q.copy()
    _, _, history = cp.compensate(W, A, B, P, Q, X.T @ X, steps=50, lr=10.0, xp=np)  # lr far too large
    np.testing.assert_array_equal(P, P0)
    np.testing.assert_array_equal(Q, Q0)
    assert history.min() <= history[0]
