"""Stage 1: activation-aware SVD (docs/math.md, Stage 1).

The rank-``r`` minimiser of the normalized output error

    NMSE(Ŵ) = tr(ΔW C ΔWᵀ) / tr(W C Wᵀ),   rank Ŵ ≤ r,

is ``Ŵ_r = U_r U_rᵀ W`` where ``W C Wᵀ = U Σ² Uᵀ`` (Eckart–Young on the
outputs ``Y = X Wᵀ``), with ``NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i²``. No inverse
of ``C`` is used, so a singular ``C`` is fine.
"""

import contextlib

import numpy as np

from .errors import MrcError

__all__ = ["PSD_RTOL", "GRAM_ROUTE_RTOL", "output_basis", "cholesky", "canonical_signs", "nmse_curve",
           "energy_curve", "factors", "nmse"]

#: An eigenvalue below ``-PSD_RTOL * max eigenvalue`` means the metric is not
#: positive semi-definite (round-off of a PSD float64 matrix is ~1e-16 relative;
#: float32-stored Grams reach ~1e-7).
PSD_RTOL = 1e-6


#: The Gram route of :func:`output_basis` (``m > n``) is kept only when every
#: ``σ_i² ≥ GRAM_ROUTE_RTOL · σ_1²`` **[choice]**: forming ``(W S)ᵀ (W S)``
#: squares the condition number, so a column ``u_i`` is accurate to about
#: ``ε σ_1² / (σ_i² gap)`` instead of the SVD's ``ε σ_1 / (σ_i gap)``; below
#: ``1e-10`` (a ``σ`` ratio of ``1e5``) the thin SVD of ``W S`` is taken instead.
GRAM_ROUTE_RTOL = 1e-10


def cholesky(c, xp):
    """Lower Cholesky factor ``L`` of a symmetric ``c`` (n, n), ``c = L Lᵀ``, or
    ``None`` when ``c`` is not numerically positive definite.

    On NumPy, LAPACK's ``potrf`` through SciPy (its ``info``). Elsewhere,
    failure is what ``xp.linalg.cholesky`` raises (NumPy's ``LinAlgError``;
    CuPy raises it under ``cupyx.errstate(linalg="raise")``, set here), or a
    factor with a non-finite or non-positive diagonal (a failed pivot left in
    the factor, as by cuSOLVER).
    """
    if xp is np and c.dtype in (np.float32, np.float64):
        # LAPACK's potrf on the Fortran-ordered view cᵀ (= c): no copy into Fortran order, and
        # the factor's upper triangle there is L's lower one here (c = Uᵀ U, L = Uᵀ)
        from scipy.linalg import lapack

        potrf = lapack.dpotrf if c.dtype == np.float64 else lapack.spotrf
        U, info = potrf(c.T, lower=0, clean=1, overwrite_a=0)
        return U.T if info == 0 and bool(np.isfinite(np.diagonal(U)).all()) else None  # U.T: C-ordered
    guard = contextlib.nullcontext()
    if xp.__name__.split(".")[0] == "cupy":  # CuPy ignores a failed factorization by default
        import cupyx

        guard = cupyx.errstate(linalg="raise")
    try:
        with guard:
            L = xp.linalg.cholesky(c)
    except Exception as err:  # numpy.linalg.LinAlgError, or CuPy's
        if type(err).__name__ != "LinAlgError":
            raise
        return None
    d = xp.diagonal(L)
    if not (bool(xp.isfinite(d).all()) and float(d.min()) > 0):
        return None
    return L


def _descending_eigh(g, xp, what):
    evals, evecs = xp.linalg.eigh((g + g.T) / 2)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    top = float(evals[0])
    if not top > 0:
        raise MrcError(f"{what} has no positive eigenvalue (zero output energy)")
    if float(evals[-1]) < -PSD_RTOL * top:
        raise MrcError(f"{what} is not positive semi-definite (eigenvalue {float(evals[-1]):.3g})")
    return xp.clip(evals, 0, None), evecs


def canonical_signs(U, xp):
    """Fix the sign of each column of ``U``: its largest-magnitude entry is
    positive (the first such entry on a tie; as scikit-learn's ``svd_flip``).

    Eigen- and singular vectors are defined up to sign, so without this the
    stored factors could flip between runs, BLAS builds and devices while
    their product agrees.

    Parameters
    ----------
    U : array (m, k)

    Returns
    -------
    array (m, k)
        ``U · diag(s)``, ``s_j = sign(U[i_j, j])``, ``i_j = argmax_i |U[i, j]|``.
    """
    top, bottom = U.max(axis=0), U.min(axis=0)  # two streaming reductions, no |U| copy
    if bool((top == -bottom).any()):  # a tie between signs (or a zero column): the first entry decides
        pivot = xp.take_along_axis(U, xp.argmax(xp.abs(U), axis=0)[None, :], axis=0)
        return U * xp.where(pivot < 0, -1.0, 1.0).astype(U.dtype)
    return U * xp.where(-bottom > top, -1.0, 1.0).astype(U.dtype)


def output_basis(W, C, xp):
    """Output basis ``U`` and spectrum ``σ²`` of the output Gram ``W C Wᵀ``.

    ``W C Wᵀ = U Σ² Uᵀ``, ``U`` (m, k), ``k = min(m, n)``, by one of two routes:

    * ``m ≤ n``: ``eigh(W C Wᵀ)`` (``m × m``).
    * ``m > n``: with ``S`` a square root of ``C`` (``S Sᵀ = C``), ``B = W S``
      (m × n) has ``B Bᵀ = W C Wᵀ``, so ``U`` and ``σ`` are the left singular
      vectors and values of ``B``. ``S = L``, the Cholesky factor, when ``C`` is
      positive definite; then the ``n × n`` Gram ``Bᵀ B = Sᵀ Wᵀ W S = V Σ² Vᵀ``
      (``eigh``) gives ``U = B V Σ⁻¹``, made orthonormal to round-off by
      Newton–Schulz steps ``U ← U (I + E/2)``, ``E = I − Uᵀ U`` (one or two:
      ``E`` starts at about ``ε σ_1² / σ_k²``). This Gram route is
      taken in float64 only and when every ``σ_i² ≥`` :data:`GRAM_ROUTE_RTOL`
      ``· σ_1²`` (it squares the condition number). Otherwise — ``C`` singular,
      ``W S`` of small or zero singular values, or float32 — the route is the
      one before: ``S = V_C Λ_C^{1/2}`` (``eigh(C)``, eigenvalues clipped at
      0) and the thin SVD ``B = U Σ Vᵀ``.

    Parameters
    ----------
    W : array (m, n)
        Weight, output × input.
    C : array (n, n)
        Symmetric positive semi-definite metric (possibly singular).
    xp : module

    Returns
    -------
    U : array (m, k)
        Orthonormal columns, ``k = min(m, n)``, by descending ``σ²``, signs
        fixed by :func:`canonical_signs`.
    s2 : array (k,)
        Eigenvalues ``σ_i²`` of ``W C Wᵀ``, descending, ``≥ 0``.

    Raises
    ------
    MrcError
        If ``C`` is not positive semi-definite or ``W C Wᵀ = 0``.

    Examples
    --------
    ``U`` has orthonormal columns, and the spectrum is that of ``W C Wᵀ``,
    for a tall ``W`` (the ``W S`` route) as for a wide one:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((50, 6))
    >>> for W in (rng.standard_normal((9, 6)), rng.standard_normal((4, 6))):
    ...     U, s2 = output_basis(W, X.T @ X, np)
    ...     G = W @ X.T @ X @ W.T
    ...     print(np.allclose(U.T @ U, np.eye(U.shape[1])), np.allclose(U * s2 @ U.T, G))
    True True
    True True
    """
    m, n = W.shape
    if m <= n:
        s2, U = _descending_eigh(W @ C @ W.T, xp, "output Gram W C Wᵀ")
        return canonical_signs(U, xp), s2
    if np.dtype(W.dtype) == np.float64:
        S = cholesky((C + C.T) / 2, xp)
        if S is not None:  # C definite: the Gram route
            B = W @ S
            s2, V = xp.linalg.eigh(B.T @ B)
            s2, V = xp.clip(s2[::-1], 0, None), V[:, ::-1]
            if not float(s2[0]) > 0:
                raise MrcError("output Gram W C Wᵀ is zero (zero output energy)")
            if float(s2[-1]) >= GRAM_ROUTE_RTOL * float(s2[0]):
                U = (B @ V) / xp.sqrt(s2)
                return canonical_signs(_orthonormalize(U, xp), xp), s2
    # C singular, W S (nearly) rank-deficient, or float32: the eigenvalue square root and the thin SVD
    lam, V = _descending_eigh(C, xp, "statistic C")
    return _svd_route(W @ (V * xp.sqrt(lam)), xp)


def _orthonormalize(U, xp, steps=3):
    """Newton–Schulz steps toward the nearest orthonormal matrix (the polar
    factor): ``E = I − Uᵀ U``, ``U ← U (I + E / 2)``, so ``E ← −¾ E² + O(E³)``;
    repeated while ``max|E| > 16 ε`` (at most ``steps`` times), and not
    checked again after a step from ``(k max|E|)² ≤ 16 ε`` (then
    ``¾ ‖E‖₂² < 16 ε``). Products only, so every array module gives the same
    numbers."""
    k = U.shape[1]
    eye = xp.eye(k, dtype=U.dtype)
    tol = 16 * float(np.finfo(U.dtype).eps)
    for _ in range(steps):
        E = eye - U.T @ U
        size = float(xp.abs(E).max())
        if not size > tol:
            break
        U = U + 0.5 * (U @ E)
        if (k * size) ** 2 <= tol:  # ‖E‖₂ ≤ k max|E|, so the step left ¾‖E‖₂² < tol: no check needed
            break
    return U


def _svd_route(B, xp):
    """``U``, ``σ²`` from the thin SVD ``B = U Σ Vᵀ`` (m, n), ``m > n``."""
    U, sigma, _ = xp.linalg.svd(B, full_matrices=False)
    s2 = sigma**2
    if not float(s2[0]) > 0:
        raise MrcError("output Gram W C Wᵀ is zero (zero output energy)")
    return canonical_signs(U, xp), s2


def nmse_curve(s2, xp):
    """Normalized output error at every rank from one spectrum.

    ``NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i²`` for ``r = 0 … k`` (tail sums, not
    ``1 − cumsum``, so small errors keep their relative precision).

    Parameters
    ----------
    s2 : array (k,)
        Descending spectrum.

    Returns
    -------
    array (k + 1,)
        ``NMSE(0) = 1`` down to ``NMSE(k) = 0``.
    """
    tail = xp.concatenate([xp.cumsum(s2[::-1])[::-1], xp.zeros(1, dtype=s2.dtype)])
    return tail / tail[0]


def energy_curve(s2, xp):
    """Energy kept at every rank, ``E(r) = 1 − NMSE(r)``, ``r = 0 … k``."""
    return 1 - nmse_curve(s2, xp)


def factors(W, U, rank):
    """Principal factors ``A = U_r`` (m, r) and ``B = U_rᵀ W`` (r, n), so that
    ``A B = U_r U_rᵀ W`` is the Stage-1 solution at rank ``r``."""
    A = U[:, :rank]
    return A, A.T @ W


def nmse(W, W_hat, C, xp):
    """Normalized output error ``tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)``, ``ΔW = W − Ŵ``.

    Parameters
    ----------
    W, W_hat : array (m, n)
    C : array (n, n)
    """
    delta = W - W_hat
    return float(xp.sum((delta @ C) * delta) / xp.sum((W @ C) * W))
