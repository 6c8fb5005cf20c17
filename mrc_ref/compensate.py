"""Stage 3: layer-wise error compensation (METHOD.md, Stage 3).

With ``A, B`` frozen, the residual ``P (m×q)``, ``Q (q×n)`` minimises

    L(P, Q) = ‖X Wᵀ − X̃ Ŵᵀ‖²_F / ‖X Wᵀ‖²_F,   Ŵ = A B + P Q,

by Adam with analytic gradients. Everything is computed from three Grams,

    C = Xᵀ X,   K = X̃ᵀ X,   C̃ = X̃ᵀ X̃      (each n × n),

    Z · L = tr(W C Wᵀ) − 2 tr(Ŵ K Wᵀ) + tr(Ŵ C̃ Ŵᵀ),
    ∂L/∂P = −2 G Qᵀ / Z,   ∂L/∂Q = −2 Pᵀ G / Z,   G = W Kᵀ − Ŵ C̃,

with ``Z = tr(W C Wᵀ)``. ``local`` mode is ``X̃ = X`` (``K = C̃ = C``), so it
needs the Gram alone; ``sequential`` mode passes the Grams of the original
and the already-compressed model's inputs.
"""

import numpy as np

from .errors import MrcError

#: Adam's constants (Kingma & Ba defaults).
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


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
        From :func:`prepare`: ``WKt = W Kᵀ``, ``ABCt = A B C̃``, ``Ct``, ``Z``.

    Returns
    -------
    loss : 0-d array
    grad_P : array (m, q)
    grad_Q : array (q, n)
    """
    W_hat = AB + P @ Q
    G = consts["WKt"] - consts["ABCt"] - P @ (Q @ consts["Ct"])  # W Kᵀ − Ŵ C̃
    Z = consts["Z"]
    # Z L = Z − ⟨Ŵ, W Kᵀ⟩ − ⟨Ŵ, G⟩  (= Z − 2⟨Ŵ, W Kᵀ⟩ + ⟨Ŵ, Ŵ C̃⟩)
    loss = (Z - (W_hat * consts["WKt"]).sum() - (W_hat * G).sum()) / Z
    return loss, -2 * (G @ Q.T) / Z, -2 * (P.T @ G) / Z


def prepare(W, A, B, C, K=None, Ct=None):
    """Constants of the loss: ``Z = tr(W C Wᵀ)``, ``W Kᵀ``, ``A B C̃``, ``C̃``.
    ``K`` and ``C̃`` default to ``C`` (local mode)."""
    K = C if K is None else K
    Ct = C if Ct is None else Ct
    Z = ((W @ C) * W).sum()
    if not float(Z) > 0:
        raise MrcError("zero output energy tr(W C Wᵀ); cannot normalize the loss")
    return {"Z": Z, "WKt": W @ K.T, "ABCt": A @ (B @ Ct), "Ct": Ct}


def compensate(W, A, B, P, Q, C, *, K=None, Ct=None, steps=500, lr=1e-2, xp):
    """Train the residual ``P, Q`` by Adam on the normalized output loss.

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

    Returns
    -------
    P, Q : arrays
        The iterate with the lowest loss seen **[choice]**, so Stage 3 never
        ends above its starting point.
    history : ndarray (steps + 1,)
        Loss at every step, on the host; ``history[0]`` is the Stage-1 loss.
    """
    if steps < 0:
        raise MrcError(f"steps must be ≥ 0, got {steps}")
    AB = A @ B
    consts = prepare(W, A, B, C, K, Ct)
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
