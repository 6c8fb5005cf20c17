"""Stage 1: activation-aware SVD (docs/math.md, Stage 1).

The rank-``r`` minimiser of the normalized output error

    NMSE(Ŵ) = tr(ΔW C ΔWᵀ) / tr(W C Wᵀ),   rank Ŵ ≤ r,

is ``Ŵ_r = U_r U_rᵀ W`` where ``W C Wᵀ = U Σ² Uᵀ`` (Eckart–Young on the
outputs ``Y = X Wᵀ``), with ``NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i²``. No inverse
of ``C`` is used, so a singular ``C`` is fine.
"""

from .errors import MrcError

__all__ = ["PSD_RTOL", "output_basis", "canonical_signs", "nmse_curve", "energy_curve", "factors", "nmse"]

#: An eigenvalue below ``-PSD_RTOL * max eigenvalue`` means the metric is not
#: positive semi-definite (round-off of a PSD float64 matrix is ~1e-16 relative;
#: float32-stored Grams reach ~1e-7).
PSD_RTOL = 1e-6


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
    pivot = xp.take_along_axis(U, xp.argmax(xp.abs(U), axis=0)[None, :], axis=0)
    return U * xp.where(pivot < 0, -1.0, 1.0).astype(U.dtype)


def output_basis(W, C, xp):
    """Output basis ``U`` and spectrum ``σ²`` of the output Gram ``W C Wᵀ``.

    When ``m ≤ n``: ``eigh(W C Wᵀ)`` (``m × m``). When ``m > n``: the thin SVD
    ``W S = U Σ Vᵀ`` with ``S = V_C Λ_C^{1/2}`` a square root of ``C``
    (``S Sᵀ = C``; eigenvalues clipped at 0), since ``W S (W S)ᵀ = W C Wᵀ``.

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
    lam, V = _descending_eigh(C, xp, "statistic C")
    U, sigma, _ = xp.linalg.svd(W @ (V * xp.sqrt(lam)), full_matrices=False)
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
