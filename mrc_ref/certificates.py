"""Certificates of optimality, computed by their own route (docs/testing.md).

The quantities that a factorization cannot change (gauge-invariant), and
the optima to hold them against, each computed independently of the code
they certify: the Stage-1 optimum from SciPy's ``eigh`` of the output Gram
(:func:`output_spectrum`, not :mod:`mrc_ref.svd`), the Stage-3 optimum from
the singular values of the whitened regression residual
(:func:`certify_residual`, not :mod:`mrc_ref.compensate`). Inputs may be
anything :func:`as_host` accepts; the math runs in float64 on the host.
:mod:`mrc_ref.testing` turns these into assertions; ``python -m
mrc_ref.verify`` into a verdict on a model file.
"""

import numpy as np
import scipy.linalg

from . import threads
from .backend import to_host
from .compensate import DEFAULT_DAMP

__all__ = ["EXCESS_FLOOR", "as_host", "output_spectrum", "nmse_tail", "optimal_nmse_curve", "eigen_gap", "excess",
           "metric_norm_sq", "metric_root", "certify_stage1", "certify_residual", "rounding_bound",
           "matrix", "factor_pair", "case_name", "failure", "g8"]

#: Below this an NMSE or loss is round-off of an exact reconstruction: an
#: excess ratio with an optimum under it is reported as 1 (achieved also under
#: it) or infinite, not as a ratio of two round-off errors.
EXCESS_FLOOR = 1e-12


def as_host(a):
    """``a`` as a float64 NumPy array on the host.

    Accepts anything :func:`numpy.asarray` takes, torch tensors (detached,
    moved to the CPU and widened to float64 first, so ``requires_grad``,
    CUDA and bfloat16 tensors work) and CuPy arrays (copied to the host).
    ``None`` stays ``None``.
    """
    if a is None:
        return None
    if callable(getattr(a, "detach", None)) and callable(getattr(a, "cpu", None)):  # torch
        a = a.detach().cpu().double().numpy()
    elif type(a).__module__.split(".")[0] == "cupy":
        a = to_host(a)
    return np.asarray(a, dtype=np.float64)


def matrix(a, what):
    a = as_host(a)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {a.shape}")
    return a


def factor_pair(A, B, what="A B"):
    """Host float64 factors ``A (m, r)``, ``B (r, n)``; ``r = 0`` allowed."""
    A, B = matrix(A, f"{what}: left factor"), matrix(B, f"{what}: right factor")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"{what}: inner dimensions differ, {A.shape} and {B.shape}")
    return A, B


def case_name(case):
    """``"v2/near-tie"`` for a loaded case (a dict with ``version`` and
    ``id``), the string itself for a string; ``None`` stays ``None``."""
    if isinstance(case, dict):
        return f"{case.get('version', '?')}/{case.get('id', '?')}"
    return None if case is None else str(case)


def failure(layer, quantity, observed, allowed, tolerance, note="", *, case=None, rank=None):
    """The :class:`AssertionError` of a failed comparison, in two lines::

        [case <version/id>: ][layer <layer>: ][rank <r>: ]<quantity>: observed <o>, allowed <a>
          (<tolerance>)<note>

    the first saying where and what, the second how it was judged."""
    where = "".join(f"{label} {value}: " for label, value in
                    (("case", case_name(case)), ("layer", layer), ("rank", rank)) if value is not None)
    return AssertionError(f"{where}{quantity}: observed {observed}, allowed {allowed}\n  ({tolerance}){note}")


def g8(x):
    """A number to 8 significant digits, for messages."""
    return f"{x:.8g}"


# ----------------------------------------------------------------- Stage 1
def output_spectrum(W, C, vectors=False):
    """Eigenvalues ``σ_1² ≥ … ≥ σ_k² ≥ 0`` of the output Gram ``W C Wᵀ``,
    ``k = min(m, n)``, by SciPy on the smaller side.

    When ``m ≤ n``: ``eigh(W C Wᵀ)`` (m × m). When ``m > n``: ``F = W S``
    with ``S`` a square root of ``C`` (``S Sᵀ = C``: its Cholesky factor when
    ``C`` is positive definite, else ``V Λ^{1/2}`` from ``eigh(C)``, clipped
    at 0), and ``eigh(Fᵀ F)`` (n × n), which has the nonzero eigenvalues of
    ``F Fᵀ = W C Wᵀ``: one n × n eigendecomposition where ``C`` is definite.

    Parameters
    ----------
    W : array (m, n)
    C : array (n, n), symmetric positive semi-definite
    vectors : bool or int
        Also return an orthonormal basis ``U`` of the output directions,
        column ``i`` for ``σ_i²`` (only meaningful where ``σ_i² > 0``): all
        ``k`` columns, or the first ``vectors`` when an int.

    Returns
    -------
    s2 : ndarray (k,)
    U : ndarray (m, k or vectors), when ``vectors``
    """
    W, C = matrix(W, "W"), matrix(C, "C")
    m, n = W.shape
    if C.shape != (n, n):
        raise ValueError(f"C has shape {C.shape}, expected {(n, n)} for W of shape {W.shape}")
    keep = min(m, n) if vectors is True else int(vectors)
    s2, U, _ = _spectrum(W, (C + C.T) / 2, keep)
    return (s2, U) if vectors is not False else s2


def _spectrum(W, C, keep):
    """:func:`output_spectrum`'s work, with what it formed on the way:
    ``(s2, U (m, keep) or None, parts)``; ``parts`` is ``{"WC": W C}`` when
    ``m ≤ n``, ``{"F": W L, "L": L, "G": Fᵀ F}`` when ``m > n`` and ``C = L Lᵀ``
    is positive definite, and empty otherwise (``m > n``, the square root
    ``V Λ^{1/2}`` from ``eigh(C)``)."""
    m, n = W.shape
    if m <= n:
        WC = W @ C
        G = WC @ W.T
        s2, V = scipy.linalg.eigh((G + G.T) / 2)
        s2, U = s2[::-1], V[:, ::-1][:, :keep]
        parts = {"WC": WC}
    else:
        try:
            S, definite = scipy.linalg.cholesky(C, lower=True), True
        except np.linalg.LinAlgError:  # singular: the eigendecomposition's square root
            lam, V = scipy.linalg.eigh(C)
            S, definite = V * np.sqrt(np.clip(lam, 0, None)), False
        F = W @ S
        G = F.T @ F
        s2, V = scipy.linalg.eigh(G)
        s2, V = s2[::-1], V[:, ::-1]
        U = F @ V[:, :keep] / np.sqrt(np.where(s2[:keep] > 0, s2[:keep], 1)) if keep else None
        parts = {"F": F, "L": S, "G": G} if definite else {}
    return np.clip(s2, 0, None), U, parts


def _orth(a):
    """An orthonormal basis of the column space of ``a`` (m, r).

    Cholesky QR twice (``aᵀ a = L Lᵀ``, ``Q = a L⁻ᵀ``, repeated on ``Q``):
    products and an ``r × r`` factorization, several times cheaper than a
    pivoted QR. It is taken when it succeeds with ``‖Qᵀ Q − I‖_max ≤ 1e-12``,
    which needs ``cond(a)`` below ~1e7, so every singular value is above
    the rank rule's ``max(m, r) ε σ_1`` and the rank is ``r``, as the rule
    gives. Otherwise (rank-deficient or ill-conditioned ``a``): the
    rank-revealing pivoted QR, columns whose ``|R_ii|`` exceed
    ``max(m, r) ε |R_11|`` (the rank rule of :func:`scipy.linalg.orth`)."""
    if not a.shape[1]:
        return a
    with threads.one_blas_thread():  # r × r factorizations and thin products: BLAS threads only stall them
        return _orth_columns(a)


def _orth_columns(a):
    q = a
    try:
        for _ in range(2):
            L = scipy.linalg.cholesky(q.T @ q, lower=True)
            q = scipy.linalg.solve_triangular(L, q.T, lower=True).T
        if np.abs(q.T @ q - np.eye(q.shape[1])).max() <= 1e-12:
            return q
    except (np.linalg.LinAlgError, ValueError):  # not positive definite, or not finite
        pass
    q, r, _ = scipy.linalg.qr(a, mode="economic", pivoting=True)
    d = np.abs(np.diag(r))
    return q[:, : int(np.sum(d > max(a.shape) * np.finfo(np.float64).eps * (d[0] if d.size else 0)))]


def nmse_tail(s2):
    """``NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i²`` for ``r = 0 … k`` (tail sums).
    Written here rather than imported, so that the certificates stay
    independent of :mod:`mrc_ref.svd`."""
    s2 = np.clip(np.sort(as_host(s2).ravel())[::-1], 0, None)
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    if not tail[0] > 0:
        raise ValueError("the output Gram W C Wᵀ is zero: the NMSE is undefined")
    return tail / tail[0]


def optimal_nmse_curve(W, C):
    """The Stage-1 optimum at every rank, ``NMSE_opt(r) = Σ_{i>r} σ_i² / Σ_i σ_i²``
    for ``r = 0 … k`` (:func:`output_spectrum`).

    Returns
    -------
    ndarray (k + 1,)
    """
    return nmse_tail(output_spectrum(W, C))


def eigen_gap(s2, r):
    """Relative eigen-gap at the cut, ``(σ_r² − σ_{r+1}²) / σ_1²``, of a
    descending spectrum ``s2`` (``σ_{k+1}² = 0``); ``None`` at ``r = 0``. A
    small gap means the optimal rank-``r`` subspace, and the product ``A B``,
    are ill-determined (round-off ``ε`` moves them by about ``ε / gap``)
    while the NMSE at ``r`` is not."""
    if r <= 0 or not s2[0] > 0:
        return None
    nxt = s2[r] if r < len(s2) else 0.0
    return float((s2[r - 1] - nxt) / s2[0])


def excess(value, optimum):
    """``value / optimum``; 1 when both are below :data:`EXCESS_FLOOR`,
    infinite when only the optimum is."""
    if optimum > EXCESS_FLOOR:
        return float(value / optimum)
    return 1.0 if value <= EXCESS_FLOOR else float("inf")


def metric_norm_sq(D, C):
    """``tr(D C Dᵀ)`` (``‖D S‖²_F``), or ``‖D‖²_F`` when ``C`` is ``None``;
    clamped at 0, since round-off can make ``tr(D C Dᵀ)`` slightly negative
    for a positive semi-definite ``C`` (a singular ``C`` and ``D`` in its
    null space)."""
    return float(np.sum(D * D)) if C is None else max(float(np.sum((D @ C) * D)), 0.0)


def metric_root(C):
    """``S (n, k)`` with ``S Sᵀ = C`` on the numerical range of ``C``:
    ``S = V₊ Λ₊^{1/2}`` from ``eigh(C)``, eigenvalues at or below
    ``n ε λ_max`` dropped (float64 round-off of a positive semi-definite
    ``C``). ``‖D S‖_F`` is then ``‖D‖_C = tr(D C Dᵀ)^{1/2}`` to relative
    round-off, where the direct ``tr(D C Dᵀ)^{1/2}`` carries an absolute
    error of about ``(n ε λ_max)^{1/2} ‖D₀‖``, ``D₀`` the part of ``D`` on
    the null space of ``C``: two products that differ only there (which the
    data never reach) would differ by ~1e-8 instead of ~1e-15.

    Parameters
    ----------
    C : array (n, n), symmetric positive semi-definite

    Returns
    -------
    ndarray (n, k), ``k`` the numerical rank of ``C``
    """
    C = matrix(C, "C")
    lam, V = scipy.linalg.eigh((C + C.T) / 2)
    keep = lam > C.shape[0] * np.finfo(np.float64).eps * max(float(lam[-1]), 0.0)
    return V[:, keep] * np.sqrt(lam[keep])


def certify_stage1(W, C, A, B, *, residual=None):
    """Certificate of a Stage-1 factorization ``A B`` of ``W`` under ``C``.

    Compares the achieved normalized output error

        NMSE(A B) = tr(ΔW C ΔWᵀ) / tr(W C Wᵀ),   ΔW = W − A B,

    with the optimum at the same rank ``r``, ``Σ_{i>r} σ_i² / Σ_i σ_i²``
    (eigenvalues of ``W C Wᵀ``, :func:`output_spectrum`), and reports scaled
    residuals of the two stationarity conditions of ``min ‖(W − A B) S‖²``:
    with ``R = (W − A B) C``, ``Π_A R = 0`` and ``R Π_B = 0``, where ``Π_A``
    projects onto the column space of ``A`` and ``Π_B`` onto the row space of
    ``B`` (both gauge-invariant). Stationarity holds at every critical point;
    the NMSE ratio is what certifies the global optimum.

    One eigendecomposition of the output Gram gives the optimum at every
    rank (``nmse_optimal_curve``) and the optimal subspace. When ``m ≤ n``,
    ``W C`` is the one ``m × n × n`` product: the output Gram is
    ``(W C) Wᵀ`` and ``R = W C − A (B C)``. When ``m > n`` and ``C`` is positive
    definite, the products go through ``F = W L`` of :func:`output_spectrum`
    (``L`` its Cholesky factor; otherwise as for ``m ≤ n``): the NMSE is
    ``‖F − A (B L)‖²_F / ‖F‖²_F``, ``R = (D L) Lᵀ`` is applied as a product,
    and ``‖W C‖²_F = tr(Fᵀ F Lᵀ L)``.

    Parameters
    ----------
    W : array (m, n)
    C : array (n, n)
    A : array (m, r), B : array (r, n)
    residual : (P (m, q), Q (q, n)), optional
        The layer's residual pair: its whole NMSE, of ``A B + P Q``, is
        returned too (``nmse_layer``).

    Returns
    -------
    dict
        ``rank`` r; ``nmse`` achieved; ``nmse_optimal`` at rank r;
        ``nmse_optimal_curve`` (ndarray, every rank 0 … k); ``excess`` =
        nmse / nmse_optimal (1 when both are below :data:`EXCESS_FLOOR`,
        ``inf`` when only the optimum is); ``eigen_gap`` ``(σ_r² − σ_{r+1}²) / σ_1²`` (None at
        r = 0: a small gap means the optimal subspace, and the product, are
        ill-determined while the NMSE is not); ``max_angle`` the largest
        principal angle (radians) between the column space of ``A`` and the
        optimal output subspace ``span(U_r)`` (None at r = 0 or beyond the
        rank of ``W C Wᵀ``); ``stationarity_left`` ``‖Π_A R‖_F / ‖W C‖_F`` and
        ``stationarity_right`` ``‖R Π_B‖_F / ‖W C‖_F``; with ``residual``,
        ``nmse_layer``.
    """
    W, C = matrix(W, "W"), matrix(C, "C")
    A, B = factor_pair(A, B)
    m, n = W.shape
    if A.shape[0] != m or B.shape[1] != n:
        raise ValueError(f"A B has shape {(A.shape[0], B.shape[1])}, W has {W.shape}")
    r = A.shape[1]
    s2, U, parts = _spectrum(W, (C + C.T) / 2, min(r, min(m, n)))
    curve = nmse_tail(s2)
    optimal = float(curve[min(r, len(s2))])
    left, right = _orth(A), _orth(B.T)
    out = {}
    P, Q = factor_pair(*residual, "P Q") if residual is not None else (None, None)
    if "F" in parts:  # m > n, C = L Lᵀ definite: through F = W L, no m × n × n product, R = (D L) Lᵀ
        F, L = parts["F"], parts["L"]
        DL = F - A @ (B @ L)
        energy = max(float(np.sum(F * F)), 0.0)
        nmse = float(np.sum(DL * DL)) / energy
        scale = max(float(np.sum(parts["G"] * (L.T @ L))), 0.0) ** 0.5 or 1.0  # ‖W C‖_F² = tr(Fᵀ F Lᵀ L)
        stationarity = ((left.T @ DL) @ L.T, DL @ (L.T @ right))
        if P is not None:
            out["nmse_layer"] = float(np.sum((DL - P @ (Q @ L)) ** 2)) / energy
    else:  # m ≤ n (W C from the spectrum), or C not definite: R = (W − A B) C = W C − A (B C)
        WC = parts["WC"] if "WC" in parts else W @ C
        D = W - A @ B
        R = WC - A @ (B @ C)
        energy = max(float(np.sum(WC * W)), 0.0)
        nmse = max(float(np.sum(R * D)), 0.0) / energy
        scale = float(np.linalg.norm(WC)) or 1.0
        stationarity = (left.T @ R, R @ right)
        if P is not None:
            out["nmse_layer"] = max(float(np.sum((R - P @ (Q @ C)) * (D - P @ Q))), 0.0) / energy
    angle = None
    if 0 < r <= len(s2) and s2[r - 1] > 0 and left.shape[1]:
        # the largest principal angle: arcsin of the largest singular value of (I − Π_A) U_r, from the
        # largest eigenvalue of its r × r Gram (relative precision kept: it is the largest)
        with threads.one_blas_thread():  # m × r and r × r work, as in _orth
            away = U[:, :r] - left @ (left.T @ U[:, :r])
            top = max(float(scipy.linalg.eigvalsh(away.T @ away, subset_by_index=[r - 1, r - 1])[0]), 0.0)
        angle = float(np.arcsin(min(top ** 0.5, 1.0))) if left.shape[1] >= r else float(np.pi / 2)
    return {
        **out,
        "rank": r,
        "nmse": float(nmse),
        "nmse_optimal": optimal,
        "nmse_optimal_curve": curve,
        "excess": excess(nmse, optimal),
        "eigen_gap": eigen_gap(s2, min(r, len(s2))),
        "max_angle": angle,
        "stationarity_left": float(np.linalg.norm(stationarity[0])) / scale,
        "stationarity_right": float(np.linalg.norm(stationarity[1])) / scale,
    }


def certify_residual(W, A, B, P, Q, C, *, K=None, Ct=None, damp=DEFAULT_DAMP):
    """Certificate of a Stage-3 residual ``P Q`` against the exact optimum.

    The damped loss of ``Ŵ = A B + M``, ``M = P Q`` (rank ``q``), is

        L(M) = ( tr(W C Wᵀ) − 2 tr(Ŵ K Wᵀ) + tr(Ŵ C̃ Ŵᵀ) + δ ‖M‖²_F ) / tr(W C Wᵀ),

    with ``K = X̃ᵀ X`` and ``C̃ = X̃ᵀ X̃`` (both default to ``C``: local mode)
    and ``δ = damp · tr(C̃) / n``. Completing the square with
    ``R = W Kᵀ − A B C̃`` and ``C̃_δ = C̃ + δ I`` gives
    ``Z L(M) = Z L(0) − tr(R C̃_δ⁻¹ Rᵀ) + ‖(M − R C̃_δ⁻¹) S_δ‖²`` (``S_δ S_δᵀ = C̃_δ``),
    so over rank-``q`` residuals

        L* = L(0) − Σ_{i ≤ q} λ_i / tr(W C Wᵀ),

    ``λ_i`` the eigenvalues of ``R C̃_δ⁻¹ Rᵀ``, computed here as the squared
    singular values of ``R V Λ^{-1/2}`` (``C̃_δ = V Λ Vᵀ``; with ``δ = 0``
    the pseudo-inverse, eigenvalues at or below ``n ε λ_max`` dropped).

    Parameters
    ----------
    W : array (m, n)
    A : array (m, r), B : array (r, n)
        The frozen Stage-1 factors the residual was fitted to.
    P : array (m, q), Q : array (q, n)
    C : array (n, n)
    K, Ct : array (n, n), optional
    damp : float
        The ``damp`` of ``δ = damp · tr(C̃) / n`` the residual was fitted with
        (mrc_ref's default :data:`mrc_ref.compensate.DEFAULT_DAMP`).

    Returns
    -------
    dict
        ``rank`` q; ``loss`` the damped loss of ``A B + P Q``;
        ``loss_optimal`` ``L*``; ``loss_stage1`` ``L(0)``; ``nmse_stage3`` the
        undamped loss of ``A B + P Q``; ``excess`` loss / loss_optimal;
        ``eigen_gap`` ``(λ_q − λ_{q+1}) / λ_1`` (None when ``λ_1 = 0``);
        ``delta`` δ.
    """
    W, C = matrix(W, "W"), matrix(C, "C")
    A, B = factor_pair(A, B)
    P, Q = factor_pair(P, Q, "P Q")
    K = C if K is None else matrix(K, "K")
    Ct = C if Ct is None else matrix(Ct, "Ct")
    n = W.shape[1]
    q = P.shape[1]
    delta = damp * float(np.trace(Ct)) / n if damp else 0.0
    Z = metric_norm_sq(W, C)
    if not Z > 0:
        raise ValueError("tr(W C Wᵀ) = 0: the loss is undefined")
    AB, M = A @ B, P @ Q

    def loss(W_hat, M, d):
        return (Z - 2 * float(np.sum((W_hat @ K) * W)) + metric_norm_sq(W_hat, Ct) + d * float(np.sum(M * M))) / Z

    lam, V = scipy.linalg.eigh((Ct + Ct.T) / 2 + delta * np.eye(n))
    keep = lam > n * np.finfo(np.float64).eps * max(float(lam[-1]), 0.0)
    R = W @ K.T - AB @ Ct
    sv = scipy.linalg.svdvals((R @ V[:, keep]) / np.sqrt(lam[keep])) if keep.any() else np.zeros(1)
    ev = np.concatenate([sv**2, [0.0]])
    start = loss(AB, 0 * M, 0.0)
    optimal = start - float(np.sum(ev[:q])) / Z
    achieved = loss(AB + M, M, delta)
    gap = float((ev[q - 1] - ev[q]) / ev[0]) if q and ev[0] > 0 and q < len(ev) else None
    return {"rank": q, "loss": achieved, "loss_optimal": optimal, "loss_stage1": start,
            "nmse_stage3": loss(AB + M, M, 0.0), "excess": excess(achieved, optimal), "eigen_gap": gap,
            "delta": delta}


def rounding_bound(A, B, half_A, half_B, C):
    """An upper bound of ``‖(A B − Ã B̃) S‖_F`` (``S Sᵀ = C``) over every
    ``Ã``, ``B̃`` that round to the stored ``A``, ``B``: entries within half a
    quantization step, ``|Ã_ij − A_ij| ≤ half_A[i]``, ``|B̃_jk − B_jk| ≤ half_B[j]``.

    With ``E_A = Ã − A``, ``E_B = B̃ − B``: ``A B − Ã B̃ = −(E_A B + A E_B + E_A E_B)``,
    so by the triangle inequality and ``‖X Y‖_F ≤ ‖X‖_F ‖Y‖_2``

        ‖·‖ ≤ e_A ‖B S‖_2 + (‖A‖_2 + e_A) e_B √λ_max(C),
        e_A = (r Σ_i half_A[i]²)^½ ≥ ‖E_A‖_F,   e_B = (n Σ_j half_B[j]²)^½ ≥ ‖E_B‖_F.

    A certificate of int8 factors is then the optimum's up to this bound:
    the unrounded factors are unknown, so no closer claim can be made.

    Parameters
    ----------
    A : array (m, r), B : array (r, n)
        The dequantized factors as stored.
    half_A : array (m,) or None, half_B : array (r,) or None
        Half the quantization step of each row (``scale / 2``); None for a
        factor stored exactly.
    C : array (n, n)

    Returns
    -------
    float
    """
    A, B, C = matrix(A, "A"), matrix(B, "B"), matrix(C, "C")
    r, n = B.shape
    e_A = 0.0 if half_A is None else float(np.sqrt(r * np.sum(as_host(half_A) ** 2)))
    e_B = 0.0 if half_B is None else float(np.sqrt(n * np.sum(as_host(half_B) ** 2)))
    lam_C = float(scipy.linalg.eigvalsh((C + C.T) / 2, subset_by_index=[n - 1, n - 1])[0]) if n else 0.0
    G = B @ C @ B.T
    lam_BCB = float(scipy.linalg.eigvalsh((G + G.T) / 2)[-1]) if r else 0.0
    norm_A = float(np.linalg.norm(A, 2)) if A.size else 0.0
    return e_A * max(lam_BCB, 0.0) ** 0.5 + (norm_A + e_A) * e_B * max(lam_C, 0.0) ** 0.5
