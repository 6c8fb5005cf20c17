"""Stage 3: layer-wise error compensation (docs/math.md, Stage 3).

With ``A, B`` frozen, the residual ``M = P Q`` (``P`` m×q, ``Q`` q×n)
minimises the damped normalized output loss

    L(P, Q) = ( ‖X Wᵀ − X̃ Ŵᵀ‖²_F + δ ‖P Q‖²_F ) / ‖X Wᵀ‖²_F,   Ŵ = A B + P Q,

computed from three Grams,

    C = Xᵀ X,   K = X̃ᵀ X,   C̃ = X̃ᵀ X̃      (each n × n),

    Z · L = tr(W C Wᵀ) − 2 tr(Ŵ K Wᵀ) + tr(Ŵ C̃ Ŵᵀ) + δ tr(M Mᵀ),
    ∂L/∂P = −2 (G − δ M) Qᵀ / Z,   ∂L/∂Q = −2 Pᵀ (G − δ M) / Z,   G = W Kᵀ − Ŵ C̃,

with ``Z = tr(W C Wᵀ)`` and ``δ = damp · tr(C̃) / n`` **[choice]** (GPTQ's
form of dampening). ``local`` mode is ``X̃ = X`` (``K = C̃ = C``), so it needs
the Gram alone; ``sequential`` mode passes the Grams of the original and the
already-compressed model's inputs.

Two solvers: :func:`exact`, the closed-form optimum (default), and
:func:`adam`, Adam with analytic gradients (the paper's procedure),
whose loss approaches the exact one from above.
"""

import numpy as np

from . import svd
from .errors import MrcError

__all__ = ["SOLVERS", "DEFAULT_DAMP", "solve", "exact", "adam", "damping", "init_residual", "prepare",
           "loss_and_grads", "losses"]

#: Adam's constants (Kingma & Ba defaults).
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

#: The Stage-3 solvers (``--solver``).
SOLVERS = ("exact", "adam")

#: Default ``damp`` of ``δ = damp · tr(C̃) / n`` **[choice]**, chosen on
#: held-out images of the embedded example (docs/math.md, "Stage 3").
DEFAULT_DAMP = 1e-3


def damping(Ct, damp):
    """``δ = damp · tr(C̃) / n``: the damping of the loss, on the scale of
    the mean eigenvalue of ``C̃`` (``C̃`` is n × n)."""
    return damp * float(Ct.trace()) / Ct.shape[0] if damp else 0.0


def init_residual(m, n, q, seed, layer_index, xp, dtype):
    """Initial residual: ``P = 0`` (so step 0 is the Stage-1 solution) and
    ``Q_ij ~ N(0, 1/n)`` **[choice]**, drawn on the host from
    ``numpy.random.default_rng([seed, layer_index])`` so CPU and GPU runs start
    from the same numbers.

    Returns
    -------
    P : array (m, q)
    Q : array (q, n)
    """
    rng = np.random.default_rng([int(seed), int(layer_index)])
    Q = rng.standard_normal((q, n)) / np.sqrt(n)
    return xp.zeros((m, q), dtype=dtype), xp.asarray(Q, dtype=dtype)


def loss_and_grads(W, AB, P, Q, consts):
    """Loss and its analytic gradients at ``(P, Q)``.

    Parameters
    ----------
    W, AB : array (m, n)
    P : array (m, q)
    Q : array (q, n)
    consts : dict
        From :func:`prepare`: ``WKt = W Kᵀ``, ``ABCt = A B C̃``, ``Ct``,
        ``Z``, ``delta``.

    Returns
    -------
    loss : 0-d array
        The damped loss ``L``.
    grad_P : array (m, q)
    grad_Q : array (q, n)
    """
    M = P @ Q
    W_hat = AB + M
    G = consts["WKt"] - consts["ABCt"] - P @ (Q @ consts["Ct"])  # W Kᵀ − Ŵ C̃
    Z, delta = consts["Z"], consts["delta"]
    # Z L = Z − ⟨Ŵ, W Kᵀ⟩ − ⟨Ŵ, G⟩ + δ⟨M, M⟩  (= Z − 2⟨Ŵ, W Kᵀ⟩ + ⟨Ŵ, Ŵ C̃⟩ + δ‖M‖²)
    loss = (Z - (W_hat * consts["WKt"]).sum() - (W_hat * G).sum() + delta * (M * M).sum()) / Z
    D = G - delta * M if delta else G
    return loss, -2 * (D @ Q.T) / Z, -2 * (P.T @ D) / Z


def prepare(W, A, B, C, K=None, Ct=None, damp=0.0):
    """Constants of the loss: ``Z = tr(W C Wᵀ)``, ``W Kᵀ``, ``A B C̃``, ``C̃``
    and ``δ`` (:func:`damping`). ``K`` and ``C̃`` default to ``C`` (local mode)."""
    K = C if K is None else K
    Ct = C if Ct is None else Ct
    Z = ((W @ C) * W).sum()
    if not float(Z) > 0:
        raise MrcError("zero output energy tr(W C Wᵀ); cannot normalize the loss")
    return {"Z": Z, "WKt": W @ K.T, "ABCt": A @ (B @ Ct), "Ct": Ct, "delta": damping(Ct, damp)}


def losses(W, AB, P, Q, consts):
    """The figures reported per layer for a residual ``P Q``.

    Returns
    -------
    dict
        ``loss_stage1``: the undamped loss at ``P Q = 0`` (in sequential mode
        it includes the error arriving from upstream); ``nmse_stage3``: the
        undamped loss ``‖X Wᵀ − X̃ Ŵᵀ‖² / ‖X Wᵀ‖²``; ``loss_stage3``: the
        damped loss ``L``; ``residual_norm``: ``‖P Q‖_F / ‖W‖_F``.
    """
    undamped = dict(consts, delta=0.0)
    start = loss_and_grads(W, AB, P[:, :0], Q[:0], undamped)[0]
    plain = loss_and_grads(W, AB, P, Q, undamped)[0]
    sq = float(((P.T @ P) * (Q @ Q.T)).sum())  # ‖P Q‖² = tr(PᵀP Q Qᵀ)
    return {"loss_stage1": float(start), "nmse_stage3": float(plain),
            "loss_stage3": float(plain) + consts["delta"] * sq / float(consts["Z"]),
            "residual_norm": (max(sq, 0.0) / float((W * W).sum())) ** 0.5}


def _right_solve(R, Ct_d, delta, xp):
    """``R C̃_δ⁻¹`` for ``C̃_δ = C̃ + δ I``: an LU solve when ``δ > 0`` (``C̃_δ``
    is positive definite); when ``δ = 0`` the pseudo-inverse through
    ``eigh(C̃)``, eigenvalues at or below ``n · eps · λ_max`` taken as zero
    (SciPy ``pinvh``'s default), i.e. the minimum-norm least-squares
    solution when ``C̃`` is singular."""
    if delta > 0:
        return xp.linalg.solve(Ct_d, R.T).T
    lam, V = xp.linalg.eigh(Ct_d)
    keep = lam > Ct_d.shape[0] * float(xp.finfo(Ct_d.dtype).eps) * float(lam[-1])
    inv = xp.where(keep, 1 / xp.where(keep, lam, 1), 0)
    return ((R @ V) * inv) @ V.T


def exact(W, q, consts, xp):
    """The closed-form optimum of the damped loss at rank ``q``.

    With ``R = W Kᵀ − A B C̃`` and ``C̃_δ = C̃ + δ I``, completing the square
    gives ``Z · L(M) = const + tr((M − M_ls) C̃_δ (M − M_ls)ᵀ)`` with the
    unconstrained minimiser

        M_ls = R C̃_δ⁻¹,

    so the rank-``q`` optimum is Stage 1 applied to ``M_ls`` in the metric
    ``C̃_δ`` (a reduced-rank regression): ``M_ls C̃_δ M_lsᵀ = U Σ² Uᵀ``,
    ``P = U_q``, ``Q = U_qᵀ M_ls`` (:func:`mrc_ref.svd.output_basis`, with its
    sign convention). Unique up to ties in the spectrum at ``q``. With
    ``δ = 0`` in local mode (``K = C̃ = C``) it is the Stage-1 solution at
    rank ``r + q``.

    Parameters
    ----------
    W : array (m, n)
        Original weight (its shape and dtype).
    q : int
    consts : dict
        From :func:`prepare` for the frozen ``A, B``.

    Returns
    -------
    P : array (m, q)
    Q : array (q, n)

    Examples
    --------
    Undamped, in local mode, ``A B + P Q`` is Stage 1 at rank ``r + q``:

    >>> import numpy as np
    >>> from mrc_ref import svd
    >>> rng = np.random.default_rng(0)
    >>> X, W = rng.standard_normal((40, 8)), rng.standard_normal((10, 8))
    >>> C = X.T @ X
    >>> U, _ = svd.output_basis(W, C, np)
    >>> A, B = svd.factors(W, U, 2)
    >>> P, Q = exact(W, 3, prepare(W, A, B, C), np)
    >>> A5, B5 = svd.factors(W, U, 5)
    >>> bool(np.allclose(A @ B + P @ Q, A5 @ B5))
    True
    """
    Ct, delta = consts["Ct"], consts["delta"]
    Ct_d = Ct + delta * xp.eye(Ct.shape[0], dtype=Ct.dtype) if delta else Ct
    M = _right_solve(consts["WKt"] - consts["ABCt"], Ct_d, delta, xp)  # R C̃_δ⁻¹
    if not float(xp.abs(M).max()) > 0:  # nothing left to compensate
        return xp.zeros((W.shape[0], q), dtype=W.dtype), xp.zeros((q, W.shape[1]), dtype=W.dtype)
    U, _ = svd.output_basis(M, Ct_d, xp)
    P = U[:, :q]
    return P, P.T @ M


def solve(W, A, B, q, C, *, K=None, Ct=None, solver="exact", damp=0.0, steps=500, lr=1e-2, seed=0,
          layer_index=0, xp):
    """Stage 3 for one layer with the named solver; returns ``P, Q`` and the
    reported figures (:func:`losses`).

    Parameters
    ----------
    W, A, B : arrays
        Original weight (m, n) and frozen Stage-1 factors.
    q : int
        Residual rank.
    C, K, Ct : array (n, n)
        The Grams of the loss (``K``, ``Ct`` default to ``C``: local mode).
    solver : {"exact", "adam"}
    damp : float
        ``δ = damp · tr(C̃) / n``.
    steps, lr, seed, layer_index :
        Adam's steps and learning rate, and the seed of its initial ``Q``
        (:func:`init_residual`); unused by ``exact``.

    Returns
    -------
    P : array (m, q), Q : array (q, n), info : dict
    """
    consts = prepare(W, A, B, C, K, Ct, damp)
    AB = A @ B
    if solver == "exact":
        P, Q = exact(W, q, consts, xp)
    elif solver == "adam":
        P0, Q0 = init_residual(W.shape[0], W.shape[1], q, seed, layer_index, xp, W.dtype)
        P, Q, _ = _adam(W, AB, P0, Q0, consts, steps, lr, xp)
    else:
        raise MrcError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return P, Q, losses(W, AB, P, Q, consts)


def adam(W, A, B, P, Q, C, *, K=None, Ct=None, steps=500, lr=1e-2, damp=0.0, xp):
    """Train the residual ``P, Q`` by Adam on the damped normalized output loss.

    Parameters
    ----------
    W : array (m, n)
        Original weight.
    A : array (m, r), B : array (r, n)
        Frozen Stage-1 factors.
    P : array (m, q), Q : array (q, n)
        Initial residual (see :func:`init_residual`); not modified.
    C : array (n, n)
        ``Xᵀ X`` of the original model's inputs.
    K, Ct : array (n, n), optional
        ``X̃ᵀ X`` and ``X̃ᵀ X̃``; default ``C`` (local mode).
    steps : int
        Adam steps (full batch).
    lr : float
        Adam learning rate.
    damp : float
        ``δ = damp · tr(C̃) / n``.

    Returns
    -------
    P, Q : arrays
        The iterate with the lowest loss seen **[choice]**, so Stage 3 never
        ends above its starting point.
    history : ndarray (steps + 1,)
        Damped loss at every step, on the host; ``history[0]`` is the
        Stage-1 loss.
    """
    return _adam(W, A @ B, P, Q, prepare(W, A, B, C, K, Ct, damp), steps, lr, xp)


def _adam(W, AB, P, Q, consts, steps, lr, xp):
    """The Adam loop of :func:`adam` on the constants of :func:`prepare`."""
    if steps < 0:
        raise MrcError(f"steps must be ≥ 0, got {steps}")
    params = [P.copy(), Q.copy()]
    moments = [[xp.zeros_like(p), xp.zeros_like(p)] for p in params]
    best_loss, best = np.inf, [p.copy() for p in params]
    history = np.empty(steps + 1)
    for t in range(steps + 1):
        loss, gP, gQ = loss_and_grads(W, AB, params[0], params[1], consts)
        history[t] = float(loss)
        if history[t] < best_loss:
            best_loss, best = history[t], [p.copy() for p in params]
        if t == steps:
            break
        for p, g, (mom, vel) in zip(params, (gP, gQ), moments):
            mom *= BETA1
            mom += (1 - BETA1) * g
            vel *= BETA2
            vel += (1 - BETA2) * g * g
            m_hat = mom / (1 - BETA1 ** (t + 1))
            v_hat = vel / (1 - BETA2 ** (t + 1))
            p -= lr * m_hat / (xp.sqrt(v_hat) + EPS)
    return best[0], best[1], history
