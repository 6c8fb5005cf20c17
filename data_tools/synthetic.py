"""Deterministic generated models and statistics, for tests and demos.

``python -m data_tools.synthetic OUTDIR`` writes ``weights.safetensors`` (a
small random ViT in timm layout) and ``acts.h5`` (statistics of synthetic,
correlated token rows with a decaying spectrum) — no download.
"""

import argparse
import os
import sys

import numpy as np

from mrc_ref import formats


def make_model(seed=0, *, depth=2, dim=64, num_heads=4, mlp_ratio=4, img_size=16, patch=4,
               classes=10, dtype=np.float32):
    """A random ViT in the timm state-dict layout.

    Weights ``~ N(0, 0.02²)`` with a low-rank-ish structure (a random matrix
    times a decaying diagonal) so activation-aware truncation has something
    to keep. Returns ``dict name -> ndarray`` of ``dtype``.
    """
    rng = np.random.default_rng(seed)
    hidden = dim * mlp_ratio
    tokens = (img_size // patch) ** 2 + 1

    def linear(m, n):
        decay = np.exp(-np.arange(min(m, n)) / (min(m, n) / 4))
        U = np.linalg.qr(rng.standard_normal((m, min(m, n))))[0]
        V = np.linalg.qr(rng.standard_normal((n, min(m, n))))[0]
        W = (U * decay) @ V.T
        W *= 0.02 * np.sqrt(m * n) / np.linalg.norm(W) + 0
        return W + 0.002 * rng.standard_normal((m, n)), 0.01 * rng.standard_normal(m)

    t = {
        "patch_embed.proj.weight": 0.02 * rng.standard_normal((dim, 3, patch, patch)),
        "patch_embed.proj.bias": np.zeros(dim),
        "cls_token": 0.02 * rng.standard_normal((1, 1, dim)),
        "pos_embed": 0.02 * rng.standard_normal((1, tokens, dim)),
    }
    for b in range(depth):
        p = f"blocks.{b}."
        for norm in ("norm1", "norm2"):
            t[p + norm + ".weight"] = 1 + 0.1 * rng.standard_normal(dim)
            t[p + norm + ".bias"] = 0.1 * rng.standard_normal(dim)
        for name, (m, n) in (("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                             ("mlp.fc1", (hidden, dim)), ("mlp.fc2", (dim, hidden))):
            t[p + name + ".weight"], t[p + name + ".bias"] = linear(m, n)
    t["norm.weight"] = np.ones(dim)
    t["norm.bias"] = np.zeros(dim)
    t["head.weight"], t["head.bias"] = linear(classes, dim)
    return {k: np.asarray(v, dtype=dtype) for k, v in t.items()}


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
    energy = np.einsum("btm,btm->b", images @ W.T, images @ W.T)
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_example(args.outdir, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
