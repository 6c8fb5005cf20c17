"""Deterministic generated models and statistics, for tests and demos.

``python -m data_tools.synthetic OUTDIR`` writes ``weights.safetensors`` (a
small random ViT in timm layout) and ``acts.h5`` (statistics of synthetic,
correlated token rows with a decaying spectrum) — no download.
"""

import os

import numpy as np

from mrc_ref import formats


def random_vit(rng, *, dim=32, depth=2, mlp=64, classes=5, patch=4, grid=3, dist=False, qkv_bias=True,
               dtype=np.float64):
    """A random ViT in the timm state-dict layout with weights of O(1) effect.

    Linear weights ``~ N(0, 1/n)``, biases ``~ N(0, 0.1²)``, norm scales
    ``1 + N(0, 0.2²)``; a DeiT distillation token and head when ``dist``.
    Input images are ``grid · patch`` pixels square.

    Returns
    -------
    dict of str -> ndarray of ``dtype``
    """
    p = {}

    def lin(name, m, n, bias=True):
        p[f"{name}.weight"] = rng.standard_normal((m, n)) / np.sqrt(n)
        if bias:
            p[f"{name}.bias"] = 0.1 * rng.standard_normal(m)

    def norm(name):
        p[f"{name}.weight"] = 1.0 + 0.2 * rng.standard_normal(dim)
        p[f"{name}.bias"] = 0.2 * rng.standard_normal(dim)

    p["patch_embed.proj.weight"] = rng.standard_normal((dim, 3, patch, patch)) / np.sqrt(3 * patch * patch)
    p["patch_embed.proj.bias"] = 0.1 * rng.standard_normal(dim)
    p["cls_token"] = rng.standard_normal((1, 1, dim))
    if dist:
        p["dist_token"] = rng.standard_normal((1, 1, dim))
    p["pos_embed"] = rng.standard_normal((1, 1 + dist + grid * grid, dim))
    for i in range(depth):
        norm(f"blocks.{i}.norm1")
        lin(f"blocks.{i}.attn.qkv", 3 * dim, dim, bias=qkv_bias)
        lin(f"blocks.{i}.attn.proj", dim, dim)
        norm(f"blocks.{i}.norm2")
        lin(f"blocks.{i}.mlp.fc1", mlp, dim)
        lin(f"blocks.{i}.mlp.fc2", dim, mlp)
    norm("norm")
    lin("head", classes, dim)
    if dist:
        lin("head_dist", classes, dim)
    return {k: np.asarray(v, dtype=dtype) for k, v in p.items()}


def make_model(seed=0, *, depth=2, dim=64, num_heads=4, mlp_ratio=4, img_size=16, patch=4,
               classes=10, dtype=np.float32):
    """A random ViT (:func:`random_vit`) whose block linears have a decaying
    spectrum (``σ_i ∝ exp(−4 i / min(m, n))`` plus a small full-rank noise), so
    activation-aware truncation has something to keep. ``num_heads`` is not
    stored in the tensors; :func:`write_example` records it in the metadata.
    """
    rng = np.random.default_rng(seed)
    t = random_vit(rng, dim=dim, depth=depth, mlp=dim * mlp_ratio, classes=classes, patch=patch,
                   grid=img_size // patch)
    for key, W in t.items():
        if key.startswith("blocks.") and key.endswith(".weight") and W.ndim == 2:
            m, n = W.shape
            k = min(m, n)
            U = np.linalg.qr(rng.standard_normal((m, k)))[0]
            V = np.linalg.qr(rng.standard_normal((n, k)))[0]
            W = (U * np.exp(-np.arange(k) / (k / 4))) @ V.T
            t[key] = W / np.linalg.norm(W) * np.sqrt(m) + 0.1 * rng.standard_normal((m, n)) / np.sqrt(n)
    return {k: np.asarray(v, dtype=dtype) for k, v in t.items()}


def factored(tensors, *, reduction=0.6, residual_rank=8, layers=None):
    """A compressed model at valid ranks without statistics: each selected
    linear ``W = U S Vᵀ`` becomes ``A = U_r``, ``B = U_rᵀ W`` and ``P = U_q``,
    ``Q = U_qᵀ W`` (the next ``q`` left singular vectors, so ``A B + P Q`` is
    the rank-``r + q`` truncation of ``W``), with the ranks ``r`` of
    :func:`mrc_ref.allocate.uniform` at the budget ``⌊(1 − reduction) P_total⌋``.

    For shapes and speed, not accuracy (the plain SVD, not the activation-aware
    one). ``layers`` defaults to the block linears; a layer the allocation
    leaves dense keeps its weight.

    Returns
    -------
    out : dict of str -> ndarray
        The compressed tensors, factors in the weight's dtype.
    ranks : dict of str -> int or None
        ``r`` per selected layer (None: dense).
    """
    from mrc_ref import allocate, pipeline

    names = list(layers) if layers is not None else pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    shapes = [tuple(tensors[f"{name}.weight"].shape) for name in names]
    total = pipeline.count_params(tensors)
    fixed = total - sum(m * n for m, n in shapes)
    ranks = allocate.uniform(shapes, residual_rank, fixed, allocate.parameter_budget(total, reduction))
    out = dict(tensors)
    for name, rank in zip(names, ranks):
        if rank is None:
            continue
        W = tensors[f"{name}.weight"]
        U = _left_singular_vectors(W.astype(np.float64), rank + residual_rank)
        B = U.T @ W.astype(np.float64)  # S_k V_kᵀ
        del out[f"{name}.weight"]
        out[f"{name}.lowrank_a"], out[f"{name}.lowrank_b"] = U[:, :rank], B[:rank]
        if residual_rank:
            q = slice(rank, rank + residual_rank)
            out[f"{name}.residual_p"], out[f"{name}.residual_q"] = U[:, q], B[q]
        for suffix in ("lowrank_a", "lowrank_b", "residual_p", "residual_q"):
            if f"{name}.{suffix}" in out:
                out[f"{name}.{suffix}"] = np.ascontiguousarray(out[f"{name}.{suffix}"], dtype=W.dtype)
    return out, dict(zip(names, ranks))


def _left_singular_vectors(W, k):
    """The ``k`` leading left singular vectors of ``W`` (m, n), from the
    eigenvectors of the smaller Gram matrix (one ``eigh`` of min(m, n)²: a
    fraction of the cost of an SVD, and well conditioned for the leading
    directions of a random matrix)."""
    if W.shape[0] <= W.shape[1]:
        _, U = np.linalg.eigh(W @ W.T)
        return U[:, ::-1][:, :k]
    evals, V = np.linalg.eigh(W.T @ W)
    V, s = V[:, ::-1][:, :k], np.sqrt(np.maximum(evals[::-1][:k], np.finfo(np.float64).tiny))
    return (W @ V) / s


def make_tokens(n, rows, seed, *, dtype=np.float64):
    """Correlated token rows ``X`` (rows × n): Gaussian rows with covariance
    spectrum ``∝ exp(−i / (n/6))`` in a random basis, plus a mean offset."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    scale = np.exp(-np.arange(n) / (n / 6))
    return ((rng.standard_normal((rows, n)) * scale) @ basis.T + 0.3 * rng.standard_normal(n)).astype(dtype)


def statistics_from_tokens(X, W, tokens_per_image):
    """The ``acts.h5`` statistics of token rows ``X`` (rows × n) for a layer
    with weight ``W`` (m × n): ``gram``, ``sum``, ``rows`` and the per-image
    ``gram_normalized = (1/N_img) Σ_i X_iᵀ X_i / ‖X_i Wᵀ‖²_F``."""
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    images = X.reshape(-1, tokens_per_image, X.shape[1])
    grams = np.einsum("btn,btk->bnk", images, images)
    outputs = images @ W.T
    energy = np.einsum("btm,btm->b", outputs, outputs)
    return {
        "gram": X.T @ X,
        "sum": X.sum(axis=0),
        "rows": X.shape[0],
        "gram_normalized": (grams / energy[:, None, None]).mean(axis=0),
    }


def make_statistics(tensors, names, *, images=8, tokens_per_image=17, seed=0):
    """Synthetic statistics for the layers ``names`` of ``tensors``."""
    out = {}
    for i, name in enumerate(names):
        W = tensors[name + ".weight"]
        X = make_tokens(W.shape[1], images * tokens_per_image, seed=seed * 1000 + i + 1)
        out[name] = statistics_from_tokens(X, W, tokens_per_image)
    return out


def write_example(outdir, seed=0, **model_kw):
    """Write ``weights.safetensors`` and ``acts.h5`` of a synthetic model into
    ``outdir``; return their paths."""
    os.makedirs(outdir, exist_ok=True)
    tensors = make_model(seed, **model_kw)
    names = [k[: -len(".weight")] for k in tensors if k.startswith("blocks.") and k.endswith(".weight")
             and tensors[k].ndim == 2]
    weights = os.path.join(outdir, "weights.safetensors")
    acts = os.path.join(outdir, "acts.h5")
    formats.write_safetensors(weights, tensors, {"num_heads": str(model_kw.get("num_heads", 4)),
                                                 "source": f"data_tools.synthetic seed={seed}"})
    formats.write_activations(acts, make_statistics(tensors, names, seed=seed),
                              attrs={"source": f"data_tools.synthetic seed={seed}"})
    return weights, acts
