"""A downstream project's Stage 1, written without mrc_ref, and eight subtly
wrong variants of it: what tests/test_golden_kit.py and
tests/benchmarks/golden_kit_figures.py hold against the shipped cases.

The correct implementation is SVD-LLM's whitening by an eigendecomposition
of C (not a Cholesky factorization, which fails on a singular C):

    C = V Λ Vᵀ,  S = V₊ Λ₊^{1/2},  S⁺ = Λ₊^{-1/2} V₊ᵀ  (eigenvalues ≤ n ε λ_max dropped),
    W S = U Σ Tᵀ,  A = U_r Σ_r,  B = T_rᵀ S⁺,

so that ``‖(W − A B) S‖_F`` is minimal over rank-``r`` products: the
Stage-1 optimum under ``C = S Sᵀ`` (on the range of ``C``; a product is
determined only there). Pure NumPy; nothing here imports mrc_ref.
"""

import numpy as np

__all__ = ["whitening", "truncate", "stage1", "stage1_output_gram", "spectrum", "nmse_curve", "eigen_gap", "VARIANTS"]


def whitening(C, dtype=np.float64, cut=None):
    """``(S, S⁺)`` with ``S Sᵀ = C`` on the range of ``C``, from ``eigh(C)``
    in ``dtype``. Eigenvalues at or below ``cut · λ_max`` count as zero;
    default ``cut``: ``n ε`` in float64 (``ε`` of the dtype), and only the
    non-positive ones below float64 (a cut at ``n ε₃₂ λ_max`` would discard
    directions that carry output energy: docs/testing.md, "float32")."""
    C = np.asarray(C, dtype=dtype)
    if cut is None:
        cut = C.shape[0] * np.finfo(dtype).eps if np.finfo(dtype).bits >= 64 else 0.0
    lam, V = np.linalg.eigh((C + C.T) / 2)
    keep = lam > cut * max(float(lam[-1]), 0.0)
    root = np.sqrt(lam[keep])
    return V[:, keep] * root, (V[:, keep] / root).T


def truncate(F, S_pinv, rank):
    """``A = U_r Σ_r``, ``B = T_rᵀ S⁺`` from the SVD ``F = U Σ Tᵀ`` of the
    whitened weight; beyond the rank of ``F`` every completion is optimal:
    zero columns of ``A`` and rows of ``B``."""
    U, s, Vt = np.linalg.svd(F, full_matrices=False)
    A, B = U[:, :rank] * s[:rank], Vt[:rank] @ S_pinv
    pad = rank - A.shape[1]
    return np.pad(A, ((0, 0), (0, pad))), np.pad(B, ((0, pad), (0, 0)))


def stage1(W, C, rank, dtype=np.float64, cut=None):
    """The Stage-1 optimum of rank ``rank``: ``(A (m, rank), B (rank, n))``,
    by whitening (module docstring), every step in ``dtype``."""
    S, S_pinv = whitening(C, dtype, cut)
    return truncate(np.asarray(W, dtype=dtype) @ S, S_pinv, rank)


def stage1_output_gram(W, C, rank, dtype=np.float64):
    """The same optimum by the eigendecomposition of the output Gram
    ``W C Wᵀ`` (the route of docs/testing.md's PyTorch example):
    ``A = U_r`` (top eigenvectors), ``B = U_rᵀ W``; every step in ``dtype``."""
    W, C = np.asarray(W, dtype=dtype), np.asarray(C, dtype=dtype)
    G = W @ C @ W.T
    _, U = np.linalg.eigh((G + G.T) / 2)
    A = U[:, U.shape[1] - rank:] if rank else U[:, :0]
    return A, A.T @ W


def spectrum(W, C):
    """``σ_i²``, the eigenvalues of ``W C Wᵀ``, descending, ``min(m, n)`` of
    them (of the ``m × m`` Gram, as the PyTorch example of docs/testing.md)."""
    G = W @ C @ W.T
    return np.linalg.eigvalsh((G + G.T) / 2)[::-1][: min(W.shape)]


def nmse_curve(s2):
    """``NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i²``, ``r = 0 … k``."""
    s2 = np.clip(np.asarray(s2, dtype=np.float64), 0, None)
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return tail / tail[0]


def eigen_gap(s2, r):
    """``(σ_r² − σ_{r+1}²) / σ_1²`` (``σ_{k+1}² = 0``), ``None`` at ``r = 0``."""
    if r == 0:
        return None
    nxt = s2[r] if r < len(s2) else 0.0
    return float((s2[r - 1] - nxt) / s2[0])


# ----------------------------------------------------------------- eight wrong variants
def plain_svd(W, C, rank, layer):
    """The truncated SVD of the weights: ignores the activations."""
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :rank] * s[:rank], Vt[:rank]


def whiten_by_c(W, C, rank, layer):
    """Whitening by ``C`` instead of its square root: SVD of ``W C``, ``B = T_rᵀ C⁺``."""
    U, s, Vt = np.linalg.svd(W @ C, full_matrices=False)
    return U[:, :rank] * s[:rank], Vt[:rank] @ np.linalg.pinv(C, hermitian=True)


def ridge(W, C, rank, layer):
    """Whitening by ``C + 0.01 · mean(diag C) · I`` (a "stabilised" Gram)."""
    return stage1(W, C + 0.01 * np.mean(np.diag(C)) * np.eye(C.shape[0]), rank)


def transposed(W, C, rank, layer):
    """The right factors, returned transposed and swapped: ``(Bᵀ, Aᵀ)``."""
    A, B = stage1(W, C, rank)
    return B.T, A.T


def rank_minus_one(W, C, rank, layer):
    """Optimal, but at rank ``r − 1`` when asked for ``r`` (an off-by-one)."""
    return stage1(W, C, max(rank - 1, 0))


def centred(W, C, rank, layer):
    """Whitening by the mean-centred Gram ``C − s sᵀ / rows`` (a covariance)
    where the method's metric is the raw Gram."""
    st = layer["stats"]
    s = np.asarray(st["sum"], dtype=np.float64)
    return stage1(W, C - np.outer(s, s) / st["rows"], rank)


def float16_ws(W, C, rank, layer):
    """The whitened weight ``W S`` formed in float16 (the rest in float64)."""
    S, S_pinv = whitening(C)
    return truncate((W.astype(np.float16) @ S.astype(np.float16)).astype(np.float64), S_pinv, rank)


def rows_by_norm(W, C, rank, layer):
    """The full whitened factorization, truncated by keeping the ``r`` rows
    of ``B`` (and columns of ``A``) of largest norm rather than the largest
    singular values."""
    A, B = stage1(W, C, min(W.shape))
    keep = np.sort(np.argsort(-np.linalg.norm(B, axis=1), kind="stable")[:rank])
    return A[:, keep], B[keep]


#: name -> ``f(W, C, rank, layer)`` returning ``(A, B)``; ``layer`` is the
#: case's layer dict (for the raw statistics).
VARIANTS = {
    "plain weight SVD": plain_svd,
    "whitening by C": whiten_by_c,
    "C + 0.01 mean(diag) I": ridge,
    "transposed factors": transposed,
    "rank - 1": rank_minus_one,
    "mean-centred Gram": centred,
    "float16 W S": float16_ws,
    "B's rows by norm": rows_by_norm,
}
