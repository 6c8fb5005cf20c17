"""Assertions and certificates for holding an implementation of the method
against mrc_ref, in the style of :mod:`numpy.testing` (docs/testing.md).

**Inputs.** Every function takes anything :func:`numpy.asarray` takes
(NumPy arrays, nested lists, CPU torch tensors, JAX arrays on the CPU), torch
tensors that need a gradient or live on a GPU (detached and copied to the
host) and CuPy arrays (copied to the host). The math runs in float64 on the
host.

**Gauge invariance.** A factorization ``A B`` is defined only up to an
invertible ``r × r`` matrix ``G``: ``(A G)(G⁻¹ B)`` is the same layer. Nothing
here compares factors. What is compared: products ``A B`` (plainly, or under
the metric ``C`` as ``‖(A B − A' B') S‖_F`` with ``S Sᵀ = C``), NMSE values,
ranks, and principal angles between subspaces
(:func:`scipy.linalg.subspace_angles`).

**Independence.** Where a certificate needs an optimum it computes it by its
own route, not with the code it may be certifying: the Stage-1 optimum from
SciPy's ``eigvalsh`` of the output Gram (:func:`output_spectrum`), the
Stage-3 optimum from the singular values of the whitened regression residual
(:func:`certify_residual`). Only the exact Stage-2 optimum is mrc_ref's own
dynamic programme (:func:`mrc_ref.allocate.optimal`), itself tested against
brute force.

**Messages.** Each ``assert_*`` raises :class:`AssertionError` with a one-line
message naming the layer (when given), the quantity, the observed value, the
allowed value and the tolerance, e.g.::

    layer layers.2: Stage-1 NMSE at rank 4: observed 0.33745984, allowed ≤ 0.081788698
    (optimum 0.081788616 · (1 + rtol) + atol; rtol=1e-06, atol=1e-10); excess ratio 4.1260001

Reference cases: :func:`iter_cases` and :func:`load_case` (the files are
described in docs/testing.md), and :func:`assert_case_close` to compare a
value with a case's expected value under the tolerance the case states.
"""

from collections.abc import Mapping

import numpy as np
import scipy.linalg

from . import allocate, cases
from .backend import to_host
from .compensate import DEFAULT_DAMP

#: Default tolerances of :func:`assert_stage1_optimal`: the achieved NMSE may
#: exceed the optimum by ``rtol`` relative plus ``atol`` absolute. A float64
#: implementation lands within ~1e-12 of the optimum; ``rtol=1e-6`` also
#: admits float32 arithmetic on well-separated spectra, while any method that
#: is not the Stage-1 optimum (plain weight SVD, a wrong basis) misses by far
#: more. ``atol`` covers optima of ~0 (a rank at or above the rank of ``W C Wᵀ``).
STAGE1_RTOL, STAGE1_ATOL = 1e-6, 1e-10

#: Default tolerance of :func:`assert_factorization_close`: relative error of
#: the product (Frobenius, or under the metric ``C``); ~1e-13 for two float64
#: implementations of the same optimum with a clear eigen-gap at the cut.
PRODUCT_RTOL = 1e-7

#: Default tolerances of :func:`assert_residual_optimal` on the damped
#: Stage-3 loss (the same reasoning as :data:`STAGE1_RTOL`).
RESIDUAL_RTOL, RESIDUAL_ATOL = 1e-6, 1e-10

#: Below this an NMSE or loss is round-off of an exact reconstruction: an
#: excess ratio with an optimum under it is reported as 1 (achieved also under
#: it) or infinite, not as a ratio of two round-off errors.
EXCESS_FLOOR = 1e-12


# ----------------------------------------------------------------- inputs
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


def _matrix(a, what):
    a = as_host(a)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {a.shape}")
    return a


def _factors(A, B, what="A B"):
    """Host float64 factors ``A (m, r)``, ``B (r, n)``; ``r = 0`` allowed."""
    A, B = _matrix(A, f"{what}: left factor"), _matrix(B, f"{what}: right factor")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"{what}: inner dimensions differ, {A.shape} and {B.shape}")
    return A, B


def _fail(layer, quantity, observed, allowed, tolerance, note=""):
    where = f"layer {layer}: " if layer is not None else ""
    return AssertionError(f"{where}{quantity}: observed {observed}, allowed {allowed} ({tolerance}){note}")


def _g(x):
    return f"{x:.8g}"


# ----------------------------------------------------------------- Stage 1
def output_spectrum(W, C, vectors=False):
    """Eigenvalues ``σ_1² ≥ … ≥ σ_k² ≥ 0`` of the output Gram ``W C Wᵀ``,
    ``k = min(m, n)``, by SciPy on the smaller side.

    When ``m ≤ n``: ``eigh(W C Wᵀ)`` (m × m). When ``m > n``: ``F = W S`` with
    ``S = V Λ^{1/2}`` from ``eigh(C)`` (clipped at 0), and ``eigh(Fᵀ F)``
    (n × n), which has the nonzero eigenvalues of ``F Fᵀ = W C Wᵀ``.

    Parameters
    ----------
    W : array (m, n)
    C : array (n, n), symmetric positive semi-definite
    vectors : bool
        Also return an orthonormal basis ``U (m, k)`` of the output
        directions, column ``i`` for ``σ_i²`` (only meaningful where
        ``σ_i² > 0``).

    Returns
    -------
    s2 : ndarray (k,)
    U : ndarray (m, k), when ``vectors``
    """
    W, C = _matrix(W, "W"), _matrix(C, "C")
    m, n = W.shape
    if C.shape != (n, n):
        raise ValueError(f"C has shape {C.shape}, expected {(n, n)} for W of shape {W.shape}")
    C = (C + C.T) / 2
    if m <= n:
        G = W @ C @ W.T
        s2, V = scipy.linalg.eigh((G + G.T) / 2)
        s2, U = s2[::-1], V[:, ::-1]
    else:
        lam, V = scipy.linalg.eigh(C)
        F = W @ (V * np.sqrt(np.clip(lam, 0, None)))
        s2, V = scipy.linalg.eigh(F.T @ F)
        s2, V = s2[::-1], V[:, ::-1]
        U = F @ V / np.sqrt(np.where(s2 > 0, s2, 1))
    s2 = np.clip(s2, 0, None)
    return (s2, U) if vectors else s2


def _tail_curve(s2):
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
    return _tail_curve(output_spectrum(W, C))


def relative_gap(s2, r):
    """Relative eigen-gap at the cut, ``(σ_r² − σ_{r+1}²) / σ_1²``, of a
    descending spectrum ``s2`` (``σ_{k+1}² = 0``); ``None`` at ``r = 0``. A
    small gap means the optimal rank-``r`` subspace, and the product ``A B``,
    are ill-determined (round-off ``ε`` moves them by about ``ε / gap``)
    while the NMSE at ``r`` is not."""
    if r <= 0 or not s2[0] > 0:
        return None
    nxt = s2[r] if r < len(s2) else 0.0
    return float((s2[r - 1] - nxt) / s2[0])


def _excess(value, optimum):
    """``value / optimum``; 1 when both are below :data:`EXCESS_FLOOR`,
    infinite when only the optimum is."""
    if optimum > EXCESS_FLOOR:
        return float(value / optimum)
    return 1.0 if value <= EXCESS_FLOOR else float("inf")


def _metric_sq(D, C):
    """``tr(D C Dᵀ)`` (``‖D S‖²_F``), or ``‖D‖²_F`` when ``C`` is ``None``."""
    return float(np.sum(D * D)) if C is None else float(np.sum((D @ C) * D))


def certify_stage1(W, C, A, B):
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

    Parameters
    ----------
    W : array (m, n)
    C : array (n, n)
    A : array (m, r), B : array (r, n)

    Returns
    -------
    dict
        ``rank`` r; ``nmse`` achieved; ``nmse_optimal`` at rank r;
        ``nmse_optimal_curve`` (ndarray, every rank 0 … k); ``excess`` =
        nmse / nmse_optimal (1 when both are below :data:`EXCESS_FLOOR`,
        ``inf`` when only the optimum is); ``relative_gap`` ``(σ_r² − σ_{r+1}²) / σ_1²`` (None at
        r = 0: a small gap means the optimal subspace, and the product, are
        ill-determined while the NMSE is not); ``max_angle`` the largest
        principal angle (radians) between the column space of ``A`` and the
        optimal output subspace ``span(U_r)`` (None at r = 0 or beyond the
        rank of ``W C Wᵀ``); ``stationarity_left`` ``‖Π_A R‖_F / ‖W C‖_F`` and
        ``stationarity_right`` ``‖R Π_B‖_F / ‖W C‖_F``.
    """
    W, C = _matrix(W, "W"), _matrix(C, "C")
    A, B = _factors(A, B)
    m, n = W.shape
    if A.shape[0] != m or B.shape[1] != n:
        raise ValueError(f"A B has shape {(A.shape[0], B.shape[1])}, W has {W.shape}")
    r = A.shape[1]
    s2, U = output_spectrum(W, C, vectors=True)
    curve = _tail_curve(s2)
    D = W - A @ B
    nmse = _metric_sq(D, C) / _metric_sq(W, C)
    optimal = float(curve[min(r, len(s2))])
    R = D @ C
    scale = float(np.linalg.norm(W @ C)) or 1.0
    left = scipy.linalg.orth(A) if r else np.zeros((m, 0))
    right = scipy.linalg.orth(B.T) if r else np.zeros((n, 0))
    angle = None
    if 0 < r <= len(s2) and s2[r - 1] > 0 and left.shape[1]:
        angle = float(np.max(scipy.linalg.subspace_angles(left, U[:, :r])))
    return {
        "rank": r,
        "nmse": float(nmse),
        "nmse_optimal": optimal,
        "nmse_optimal_curve": curve,
        "excess": _excess(nmse, optimal),
        "relative_gap": relative_gap(s2, min(r, len(s2))),
        "max_angle": angle,
        "stationarity_left": float(np.linalg.norm(left.T @ R)) / scale,
        "stationarity_right": float(np.linalg.norm(R @ right)) / scale,
    }


def assert_stage1_optimal(W, C, A, B, rtol=STAGE1_RTOL, atol=STAGE1_ATOL, *, layer=None):
    """Assert that ``A B`` attains the Stage-1 optimum at its rank ``r``:

        NMSE(A B) ≤ NMSE_opt(r) · (1 + rtol) + atol

    (:func:`certify_stage1`). Robust to ties in the spectrum: any rank-``r``
    optimum passes, whichever of the tied directions it keeps.

    Raises
    ------
    AssertionError
        Naming the layer, the rank, the observed and allowed NMSE, the
        tolerance and the excess ratio.
    """
    cert = certify_stage1(W, C, A, B)
    allowed = cert["nmse_optimal"] * (1 + rtol) + atol
    if not cert["nmse"] <= allowed:
        raise _fail(layer, f"Stage-1 NMSE at rank {cert['rank']}", _g(cert["nmse"]), f"≤ {_g(allowed)}",
                    f"optimum {_g(cert['nmse_optimal'])} · (1 + rtol) + atol; rtol={rtol:g}, atol={atol:g}",
                    f"; excess ratio {_g(cert['excess'])}")


def assert_factorization_close(A, B, A_ref, B_ref, gram=None, rtol=PRODUCT_RTOL, atol=0.0, *, layer=None):
    """Assert that the products ``A B`` and ``A_ref B_ref`` agree:

        ‖A B − A_ref B_ref‖ ≤ atol + rtol · ‖A_ref B_ref‖,

    in the Frobenius norm, or with ``gram=C`` in the metric of the layer's
    outputs, ``‖D‖_C = tr(D C Dᵀ)^{1/2}``. Under ``C`` two products that
    differ only on the null space of ``C`` (dead input channels, fewer tokens
    than features), which give the same outputs on the data, are equal; use
    it whenever ``C`` may be singular. The ranks (inner dimensions) must be
    equal. The factors themselves are never compared.

    Parameters
    ----------
    A : array (m, r), B : array (r, n)
    A_ref : array (m, r), B_ref : array (r, n)
    gram : array (n, n), optional
    rtol, atol : float
    layer : str, optional
        Named in the message.
    """
    A, B = _factors(A, B)
    A_ref, B_ref = _factors(A_ref, B_ref, "reference")
    C = None if gram is None else _matrix(gram, "gram")
    shape, ref_shape = (A.shape[0], B.shape[1]), (A_ref.shape[0], B_ref.shape[1])
    if shape != ref_shape:
        raise _fail(layer, "product shape", shape, ref_shape, "exact")
    if A.shape[1] != A_ref.shape[1]:
        raise _fail(layer, "rank", A.shape[1], A_ref.shape[1], "exact")
    ref = A_ref @ B_ref
    err = _metric_sq(A @ B - ref, C) ** 0.5
    size = max(_metric_sq(ref, C), 0.0) ** 0.5
    allowed = atol + rtol * size
    if not err <= allowed:
        metric = "Frobenius" if C is None else "in the metric C"
        note = ""
        if A.shape[1] and np.linalg.matrix_rank(A) and np.linalg.matrix_rank(A_ref):
            angle = np.max(scipy.linalg.subspace_angles(scipy.linalg.orth(A), scipy.linalg.orth(A_ref)))
            note = f"; largest principal angle between the column spaces {angle:.3g} rad"
        relative = err / size if size else float("inf")
        raise _fail(layer, f"product A B ({metric})", f"‖error‖ {_g(err)} (relative {_g(relative)})",
                    f"≤ {_g(allowed)}", f"atol + rtol · ‖reference‖; rtol={rtol:g}, atol={atol:g}", note)


# ----------------------------------------------------------------- Stage 2
def _named(ranks, shapes):
    """``(names, ranks list, shapes list)`` from sequences or mappings."""
    if isinstance(ranks, Mapping):
        names = list(ranks)
        ranks = [ranks[k] for k in names]
        if isinstance(shapes, Mapping):
            missing = [k for k in names if k not in shapes]
            if missing:
                raise ValueError(f"no shape for layer(s) {', '.join(missing)}")
            shapes = [shapes[k] for k in names]
    else:
        ranks = list(ranks)
        names = list(shapes) if isinstance(shapes, Mapping) else [str(i) for i in range(len(ranks))]
        if isinstance(shapes, Mapping):
            shapes = [shapes[k] for k in names]
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    if len(shapes) != len(ranks):
        raise _fail(None, "number of layers", len(ranks), len(shapes), "exact: one rank per shape")
    return names, ranks, shapes


def assert_allocation_valid(ranks, shapes, budget, q, *, fixed=0):
    """Assert that an allocation is feasible.

    Each rank is ``None`` (the layer stays dense, ``m n`` parameters) or an
    integer with ``1 ≤ r`` and ``r + q ≤ min(m, n)`` (``(r + q)(m + n)``
    parameters), and the model's total ``fixed + Σ_l cost_l`` is at most
    ``budget``.

    Parameters
    ----------
    ranks : sequence of int or None, or mapping layer -> int or None
    shapes : sequence of (m, n), or mapping layer -> (m, n)
    budget : int
        The parameter budget ``P*`` of the whole model.
    q : int
        Residual rank stored with every factored layer.
    fixed : int
        Parameters outside the listed layers (the rest of the model).
    """
    names, ranks, shapes = _named(ranks, shapes)
    total = int(fixed)
    for name, r, (m, n) in zip(names, ranks, shapes):
        if r is None:
            total += m * n
            continue
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(m, n) - q:
            raise _fail(name, "rank", repr(r),
                        f"an integer 1 ≤ r ≤ min(m, n) − q = {min(m, n) - q}, or None (dense)",
                        f"exact; shape {m}x{n}, q={q}")
        total += (int(r) + q) * (m + n)
    if total > budget:
        raise _fail(None, "total parameters", total, f"≤ {budget}",
                    f"exact; fixed {fixed} + Σ (r + q)(m + n), or m n for dense layers")


def allocation_gap(ranks, spectra, shapes, budget, q, *, fixed=0):
    """The gap of an allocation to the exact Stage-2 optimum.

    Objective: ``Σ_l NMSE_l(r_l)`` with ``NMSE_l(r) = Σ_{i>r} σ_{l,i}² / Σ_i σ_{l,i}²``
    (0 for a dense layer), minimised over allocations that meet ``budget``.

    Parameters
    ----------
    ranks : sequence or mapping (as :func:`assert_allocation_valid`, which
        is asserted first)
    spectra : sequence or mapping of array (k_l,)
        Per layer, the eigenvalues ``σ²`` of ``W C Wᵀ`` (any order, any
        positive scale), e.g. from :func:`output_spectrum`.
    shapes, budget, q, fixed :
        As :func:`assert_allocation_valid`.

    Returns
    -------
    dict
        ``objective`` of ``ranks``; ``optimum`` (the exact optimum, or the
        best allocation found when the problem is too large to solve
        exactly); ``lower_bound`` (equal to ``optimum`` when ``exact``);
        ``exact``; ``gap`` ``(objective − lower_bound) / lower_bound`` (0
        when both are 0, None when only the bound is); ``optimal_ranks``
        (same container type as ``ranks``); ``params`` of ``ranks``.
    """
    assert_allocation_valid(ranks, shapes, budget, q, fixed=fixed)
    names, rank_list, shape_list = _named(ranks, shapes)
    if isinstance(spectra, Mapping):
        spectra = [spectra[k] for k in names] if isinstance(ranks, Mapping) else list(spectra.values())
    curves = [_tail_curve(s) for s in spectra]
    if len(curves) != len(rank_list):
        raise ValueError(f"{len(curves)} spectra for {len(rank_list)} layers")
    value = float(sum(0.0 if r is None else curves[i][min(int(r), len(curves[i]) - 1)]
                      for i, r in enumerate(rank_list)))
    if any(allocate.compressible(shape_list, q)):
        best, bound, exact = allocate.optimal(curves, shape_list, q, fixed, budget)
    else:  # no layer can be factored below its dense size: all dense is optimal
        best, bound, exact = [None] * len(shape_list), 0.0, True
    best_value = allocate.objective(curves, best)
    params = int(fixed) + sum(m * n if r is None else (int(r) + q) * (m + n)
                              for r, (m, n) in zip(rank_list, shape_list))
    return {
        "objective": value,
        "optimum": best_value,
        "lower_bound": float(bound),
        "exact": bool(exact),
        "gap": allocate.relative_gap(value, float(bound)),
        "optimal_ranks": dict(zip(names, best)) if isinstance(ranks, Mapping) else best,
        "params": params,
    }


# ----------------------------------------------------------------- Stage 3
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
        ``relative_gap`` ``(λ_q − λ_{q+1}) / λ_1`` (None when ``λ_1 = 0``);
        ``delta`` δ.
    """
    W, C = _matrix(W, "W"), _matrix(C, "C")
    A, B = _factors(A, B)
    P, Q = _factors(P, Q, "P Q")
    K = C if K is None else _matrix(K, "K")
    Ct = C if Ct is None else _matrix(Ct, "Ct")
    n = W.shape[1]
    q = P.shape[1]
    delta = damp * float(np.trace(Ct)) / n if damp else 0.0
    Z = _metric_sq(W, C)
    if not Z > 0:
        raise ValueError("tr(W C Wᵀ) = 0: the loss is undefined")
    AB, M = A @ B, P @ Q

    def loss(W_hat, M, d):
        return (Z - 2 * float(np.sum((W_hat @ K) * W)) + _metric_sq(W_hat, Ct) + d * float(np.sum(M * M))) / Z

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
            "nmse_stage3": loss(AB + M, M, 0.0), "excess": _excess(achieved, optimal), "relative_gap": gap,
            "delta": delta}


def assert_residual_optimal(W, A, B, P, Q, C, *, K=None, Ct=None, damp=DEFAULT_DAMP, rtol=RESIDUAL_RTOL,
                            atol=RESIDUAL_ATOL, layer=None):
    """Assert that the residual ``P Q`` attains the exact Stage-3 optimum for
    the given ``A, B``, Grams and ``damp`` (:func:`certify_residual`):

        L(P Q) ≤ L* · (1 + rtol) + atol.

    Robust to ties: it certifies ``P Q`` against the caller's own ``A B``, so
    any optimal ``A B`` (whichever tied direction it keeps) can be checked.
    """
    cert = certify_residual(W, A, B, P, Q, C, K=K, Ct=Ct, damp=damp)
    allowed = cert["loss_optimal"] * (1 + rtol) + atol
    if not cert["loss"] <= allowed:
        raise _fail(layer, f"Stage-3 damped loss at residual rank {cert['rank']} (damp={damp:g})", _g(cert["loss"]),
                    f"≤ {_g(allowed)}",
                    f"optimum {_g(cert['loss_optimal'])} · (1 + rtol) + atol; rtol={rtol:g}, atol={atol:g}",
                    f"; excess ratio {_g(cert['excess'])}")


# ----------------------------------------------------------------- reference cases
def iter_cases(version=None, tags=None, *, exclude=()):
    """Yield the shipped reference cases, loaded (:func:`load_case`), in id order.

    Parameters
    ----------
    version : str or int, optional
        ``"v1"`` or ``1``; default the latest version.
    tags : str or iterable of str, optional
        Only cases that carry every one of these tags.
    exclude : str or iterable of str
        Skip cases that carry any of these tags (e.g. ``"end-to-end"``).
    """
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    version = cases.resolve_version(version)
    for case_id in cases.case_ids(version):
        manifest = cases.read_manifest(cases.case_dir(case_id, version))
        have = set(manifest["tags"])
        if tags <= have and not exclude & have:
            yield load_case(case_id, version)


def load_case(case_id, version=None):
    """Load one reference case after checking every file against its manifest.

    Parameters
    ----------
    case_id : str
        ``"near-tie"``, ``"v1/near-tie"``, or the path of a case directory.
    version : str or int, optional
        Default: the version in ``case_id``, else the latest.

    Returns
    -------
    dict
        ``id``, ``version``, ``path``, ``description``, ``tags``,
        ``difficulty``, ``notes``, ``manifest``, ``tolerances`` (per quantity:
        ``kind``, ``rtol``, ``atol``, ``metric``, ``reason``), ``config``
        (the options, as ``pipeline.Config`` fields), ``expected`` (the
        expected values; products as ``(left, right)`` factor pairs whose
        product is the expected matrix), ``tensors`` and ``metadata`` (the
        weights as stored), ``layers`` (per selected layer: ``W`` and ``C``
        in float64, ``shape``, ``stats`` as stored, ``expected``), ``budget``,
        ``fixed``, ``residual_rank``, ``damp``, ``tokens`` (proxy tokens or
        None).

    Raises
    ------
    MrcError
        Unknown id, or a file that is missing or whose SHA-256 differs from
        the manifest.
    """
    return cases.read_case(cases.case_dir(case_id, version))


def _plain(value):
    """Containers and NumPy scalars as plain lists, dicts and numbers, so that
    ``(48, 32)`` equals ``[48, 32]`` in an exact comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _close(kind, actual, expected, tol, C):
    """``(ok, observed, allowed)`` of one comparison of :func:`assert_case_close`."""
    rtol, atol = float(tol.get("rtol", 0.0)), float(tol.get("atol", 0.0))
    if kind == "exact":
        return _plain(actual) == _plain(expected), repr(actual), repr(expected)
    if kind == "scalar":
        if expected is None or actual is None:
            return actual is expected, repr(actual), repr(expected)
        err = abs(float(actual) - float(expected))
        allowed = atol + rtol * abs(float(expected))
        return err <= allowed, f"{_g(float(actual))} (|error| {_g(err)})", f"{_g(float(expected))} ± {_g(allowed)}"
    if kind == "array":
        a, e = as_host(actual), as_host(expected)
        if a.shape != e.shape:
            return False, f"shape {a.shape}", f"shape {e.shape}"
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        allowed = atol + rtol * (float(np.max(np.abs(e))) if e.size else 0.0)
        return err <= allowed, f"max |error| {_g(err)}", f"≤ {_g(allowed)}"
    if kind == "product":
        left, right = _factors(*actual)
        ref_left, ref_right = _factors(*expected, "reference")
        if (left.shape[0], right.shape[1]) != (ref_left.shape[0], ref_right.shape[1]):
            return False, f"shape {(left.shape[0], right.shape[1])}", f"shape {(ref_left.shape[0], ref_right.shape[1])}"
        ref = ref_left @ ref_right
        err = _metric_sq(left @ right - ref, C) ** 0.5
        allowed = atol + rtol * max(_metric_sq(ref, C), 0.0) ** 0.5
        return err <= allowed, f"‖error‖ {_g(err)}", f"≤ {_g(allowed)}"
    raise ValueError(f"unknown tolerance kind {kind!r}")


def assert_case_close(actual, expected, case, quantity, *, layer=None, where=None):
    """Assert that ``actual`` matches a case's ``expected`` value within the
    tolerance the case states for ``quantity`` (``case["tolerances"]``).

    Tolerance kinds: ``exact`` (equality: ranks, shapes, counts);
    ``scalar`` ``|a − e| ≤ atol + rtol |e|``; ``array``
    ``max|a − e| ≤ atol + rtol max|e|`` (normwise, as LAPACK's scaled
    residuals); ``product`` (``actual`` and ``expected`` are factor pairs
    ``(left, right)`` or a matrix) ``‖a − e‖ ≤ atol + rtol ‖e‖``, Frobenius,
    or under the layer's metric ``C`` when the tolerance's ``metric`` is
    ``"C"``.

    Parameters
    ----------
    actual, expected :
        The value to check and the case's value.
    case : dict
        From :func:`load_case`.
    quantity : str
        A key of ``case["tolerances"]`` (``"spectrum"``, ``"stage1_product"``, …).
    layer : str, optional
        The layer, named in the message (and whose ``C`` a ``product``
        tolerance in the metric ``C`` uses).
    where : str, optional
        More context for the message (a rank, a rule).
    """
    tol = case["tolerances"].get(quantity)
    if tol is None:
        raise KeyError(f"case {case['id']} states no tolerance for {quantity!r}")
    C = None
    if tol["kind"] == "product":
        if tol.get("metric") == "C":
            if layer is None:
                raise ValueError(f"quantity {quantity!r} is compared under C: pass layer=")
            C = case["layers"][layer]["C"]
        actual = actual if isinstance(actual, tuple) else (actual, np.eye(np.shape(actual)[1]))
        expected = expected if isinstance(expected, tuple) else (expected, np.eye(np.shape(expected)[1]))
    ok, observed, allowed = _close(tol["kind"], actual, expected, tol, C)
    if not ok:
        name = quantity if where is None else f"{quantity} ({where})"
        metric = " in the metric C" if C is not None else ""
        raise _fail(layer, f"case {case['version']}/{case['id']}: {name}", observed, allowed,
                    f"{tol['kind']}{metric}, rtol={tol.get('rtol', 0):g}, atol={tol.get('atol', 0):g}: {tol['reason']}")


__all__ = [
    "as_host", "output_spectrum", "optimal_nmse_curve", "relative_gap", "certify_stage1",
    "assert_stage1_optimal", "assert_factorization_close", "assert_allocation_valid", "allocation_gap", "certify_residual", "assert_residual_optimal",
    "iter_cases", "load_case", "assert_case_close",
]
