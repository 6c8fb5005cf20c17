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
    _, _, history = cp.adam(W, A, B, P0, Q0, X.T @ X, steps=0, xp=np)
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
    P, Q, history = cp.adam(W, A, B, P0, Q0, X.T @ X, steps=3000, lr=1e-2, xp=np)
    floor, start = float(curve[r + q]), float(curve[r])
    assert np.all(history >= floor - 1e-12)
    best = raw_loss(X, X, W, A, B, P, Q)
    assert best == pytest.approx(history.min(), rel=1e-10)
    # closes at least 99 % of the gap between Stage 1 and the exact optimum
    assert best - floor <= 0.01 * (start - floor)


def test_inputs_not_modified_and_best_iterate_returned():
    """With a learning rate far too large the iterates diverge: the inputs stay
    untouched, and the P, Q returned are the lowest-loss iterate, their loss
    (from the raw rows) the minimum of the history and no more than the start's."""
    X, _, W, A, B, P, Q, _ = case()
    P0, Q0 = P.copy(), Q.copy()
    P_best, Q_best, history = cp.adam(W, A, B, P, Q, X.T @ X, steps=50, lr=10.0, xp=np)
    np.testing.assert_array_equal(P, P0)
    np.testing.assert_array_equal(Q, Q0)
    assert history[-1] > 10 * history.min()  # it did diverge: which iterate is returned matters
    best = raw_loss(X, X, W, A, B, P_best, Q_best)
    assert best == pytest.approx(history.min(), rel=1e-10)
    assert best <= raw_loss(X, X, W, A, B, P0, Q0) * (1 + 1e-12)


# ------------------------------------------------------------------ the exact solver
def damped_raw_loss(X, Xt, W, A, B, P, Q, delta):
    """The damped loss from raw rows: (‖X Wᵀ − X̃ Ŵᵀ‖² + δ‖P Q‖²) / ‖X Wᵀ‖²."""
    return raw_loss(X, Xt, W, A, B, P, Q) + delta * np.sum((P @ Q) ** 2) / np.sum((X @ W.T) ** 2)


def rrr_oracle(X, Xt, W, A, B, q, delta):
    """Reduced-rank ridge regression from raw rows, by an independent route:
    the targets Y = X Wᵀ − X̃ (A B)ᵀ regressed on X̃ with ridge δ as the
    augmented least-squares problem [X̃; √δ I] Mᵀ ≈ [Y; 0] (numpy.lstsq, the
    minimum-norm solution when singular), then the fitted values truncated to
    rank q by their SVD: M = M_ls V_q V_qᵀ (right singular vectors in output
    space). Returns M = P Q."""
    n = X.shape[1]
    Y = X @ W.T - Xt @ (A @ B).T
    design = np.vstack([Xt, np.sqrt(delta) * np.eye(n)]) if delta else Xt
    target = np.vstack([Y, np.zeros((n, Y.shape[1]))]) if delta else Y
    Mt, *_ = np.linalg.lstsq(design, target, rcond=None)  # (n, m) = M_lsᵀ
    _, _, Vt = np.linalg.svd(design @ Mt, full_matrices=False)
    Vq = Vt[:q].T
    return (Mt @ Vq @ Vq.T).T


def cholesky_route(W, A, B, C, K, Ct, q, delta):
    """A second derivation through the Cholesky factor: C̃_δ = L Lᵀ, the
    whitened residual R L⁻ᵀ = U Σ Vᵀ, and M = U_q U_qᵀ R C̃_δ⁻¹ (SciPy)."""
    from scipy import linalg

    R = W @ K.T - A @ B @ Ct
    Cd = Ct + delta * np.eye(len(Ct))
    L = linalg.cholesky(Cd, lower=True)
    U, _, _ = np.linalg.svd(linalg.solve_triangular(L, R.T, lower=True).T, full_matrices=False)
    return U[:, :q] @ U[:, :q].T @ linalg.cho_solve((L, True), R.T).T


@pytest.mark.parametrize("m,n,q", [(10, 7, 2), (7, 10, 3), (12, 12, 1)])
@pytest.mark.parametrize("damp", [0.0, 1e-3, 1e-1])
def test_exact_equals_the_independent_oracles(m, n, q, damp):
    """Gauge-invariant products P Q against (1) the raw-row reduced-rank ridge
    regression and (2) the Cholesky route; relative 1e-9: the Grams' condition
    number here is ~1e2, so round-off stays near 1e-13."""
    X, Xt, W, A, B, _, _, _ = case(m=m, n=n, rows=60, r=2, q=q, seed=m * n, shift=0.3)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    P, Q, info = cp.solve(W, A, B, q, C, K=K, Ct=Ct, damp=damp, xp=np)
    delta = cp.damping(Ct, damp)
    assert delta == pytest.approx(damp * np.trace(Ct) / n, rel=1e-15)
    M = P @ Q
    scale = np.linalg.norm(M)
    assert np.linalg.norm(M - rrr_oracle(X, Xt, W, A, B, q, delta)) <= 1e-9 * scale
    assert np.linalg.norm(M - cholesky_route(W, A, B, C, K, Ct, q, delta)) <= 1e-9 * scale
    assert info["loss_stage3"] == pytest.approx(damped_raw_loss(X, Xt, W, A, B, P, Q, delta), rel=1e-12)
    assert info["nmse_stage3"] == pytest.approx(raw_loss(X, Xt, W, A, B, P, Q), rel=1e-12)
    assert info["loss_stage1"] == pytest.approx(raw_loss(X, Xt, W, A, B, P * 0, Q), rel=1e-12)
    assert info["residual_norm"] == pytest.approx(scale / np.linalg.norm(W), rel=1e-12)


@pytest.mark.parametrize("damp", [0.0, 1e-3, 1e-1])
def test_exact_is_a_minimum_under_perturbations(damp):
    """No random perturbation of (P, Q), small or large, lowers the damped loss
    computed from raw rows (slack 1e-13 relative: round-off of the loss)."""
    X, Xt, W, A, B, _, _, _ = case(m=9, n=8, rows=50, r=2, q=3, seed=5, shift=0.2)
    Ct = Xt.T @ Xt
    P, Q, _ = cp.solve(W, A, B, 3, X.T @ X, K=Xt.T @ X, Ct=Ct, damp=damp, xp=np)
    delta = cp.damping(Ct, damp)
    best = damped_raw_loss(X, Xt, W, A, B, P, Q, delta)
    rng = np.random.default_rng(1)
    for scale in (1e-6, 1e-3, 1e-1, 1.0):
        for _ in range(50):
            dP, dQ = rng.standard_normal(P.shape), rng.standard_normal(Q.shape)
            assert damped_raw_loss(X, Xt, W, A, B, P + scale * dP, Q + scale * dQ, delta) >= best * (1 - 1e-13)


@pytest.mark.parametrize("m,n,r,q", [(12, 8, 2, 2), (8, 12, 3, 1), (16, 16, 1, 3)])
def test_exact_local_undamped_is_stage_one_at_rank_r_plus_q(m, n, r, q):
    """docs/math.md: in local mode with δ = 0, A B + P Q = U_{r+q} U_{r+q}ᵀ W
    (relative 1e-10 on the densified weight)."""
    X, _, W, A, B, _, _, s2 = case(m=m, n=n, rows=80, r=r, q=q, seed=m + n)
    P, Q, info = cp.solve(W, A, B, q, X.T @ X, damp=0.0, xp=np)
    U, _ = svd.output_basis(W, X.T @ X, np)
    A2, B2 = svd.factors(W, U, r + q)
    assert np.linalg.norm(A @ B + P @ Q - A2 @ B2) <= 1e-10 * np.linalg.norm(W)
    assert info["nmse_stage3"] == pytest.approx(float(svd.nmse_curve(s2, np)[r + q]), rel=1e-9)


def test_exact_with_singular_gram_is_the_minimum_norm_solution():
    """Fewer rows than features and δ = 0: the optimum is not unique; the exact
    solver returns the minimum-norm one, as lstsq does (fitted outputs and the
    product itself agree)."""
    X, Xt, W, A, B, _, _, _ = case(m=9, n=12, rows=7, r=1, q=2, seed=3, shift=0.1)
    P, Q, _ = cp.solve(W, A, B, 2, X.T @ X, K=Xt.T @ X, Ct=Xt.T @ Xt, damp=0.0, xp=np)
    M = rrr_oracle(X, Xt, W, A, B, 2, 0.0)
    np.testing.assert_allclose(Xt @ (P @ Q).T, Xt @ M.T, rtol=1e-8, atol=1e-10 * np.abs(Xt @ M.T).max())
    assert np.linalg.norm(P @ Q - M) <= 1e-8 * np.linalg.norm(M)


@pytest.mark.parametrize("damp", [0.0, 1e-3])
def test_adam_approaches_the_exact_loss_from_above(damp):
    """The exact optimum is Adam's oracle: its damped loss is a floor Adam's
    history never crosses (slack 1e-12) and nearly reaches (99 % of the gap
    from Stage 1 closed in 3000 steps)."""
    X, Xt, W, A, B, _, _, _ = case(m=12, n=8, rows=80, r=2, q=2, seed=7, shift=0.3)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    _, _, exact = cp.solve(W, A, B, 2, C, K=K, Ct=Ct, damp=damp, xp=np)
    P0, Q0 = cp.init_residual(12, 8, 2, 0, 0, np, np.float64)
    _, _, history = cp.adam(W, A, B, P0, Q0, C, K=K, Ct=Ct, steps=3000, lr=1e-2, damp=damp, xp=np)
    floor = exact["loss_stage3"]
    assert np.all(history >= floor - 1e-12)
    assert history.min() - floor <= 0.01 * (history[0] - floor)


def test_damped_gradients_match_finite_differences():
    X, Xt, W, A, B, P, Q, _ = case(shift=0.3)
    Ct = Xt.T @ Xt
    consts = cp.prepare(W, A, B, X.T @ X, K=Xt.T @ X, Ct=Ct, damp=0.05)
    delta = consts["delta"]
    loss, gP, gQ = cp.loss_and_grads(W, A @ B, P, Q, consts)
    assert float(loss) == pytest.approx(damped_raw_loss(X, Xt, W, A, B, P, Q, delta), rel=1e-12)
    h = 1e-6
    for grad, which in ((gP, 0), (gQ, 1)):
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            args = [P.copy(), Q.copy()]
            args[which][idx] += h
            up = damped_raw_loss(X, Xt, W, A, B, *args, delta)
            args[which][idx] -= 2 * h
            fd[idx] = (up - damped_raw_loss(X, Xt, W, A, B, *args, delta)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_canonical_signs():
    """The largest-magnitude entry of every column is positive, whatever the
    signs the decomposition returned; the stage-1 and stage-3 factors carry it."""
    rng = np.random.default_rng(0)
    U = rng.standard_normal((9, 5))
    flipped = U * rng.choice([-1.0, 1.0], size=5)
    np.testing.assert_array_equal(svd.canonical_signs(flipped, np), svd.canonical_signs(U, np))
    fixed = svd.canonical_signs(U, np)
    assert np.all(fixed[np.argmax(np.abs(fixed), axis=0), np.arange(5)] > 0)
    X, Xt, W, A, B, _, _, _ = case(shift=0.3)
    P, _, _ = cp.solve(W, A, B, 2, X.T @ X, K=Xt.T @ X, Ct=Xt.T @ Xt, damp=1e-3, xp=np)
    for F in (A, P):
        assert np.all(F[np.argmax(np.abs(F), axis=0), np.arange(F.shape[1])] > 0)


def test_nothing_to_compensate_gives_a_zero_residual():
    """Rank r = min(m, n): Stage 1 is exact and the residual is zero."""
    X, _, W, _, _, _, _, _ = case(m=6, n=5)
    U, _ = svd.output_basis(W, X.T @ X, np)
    A, B = svd.factors(W, U, 5)
    P, Q, info = cp.solve(W, A, B, 2, X.T @ X, damp=0.0, xp=np)
    assert P.shape == (6, 2) and Q.shape == (2, 5)
    assert info["nmse_stage3"] <= 1e-12
