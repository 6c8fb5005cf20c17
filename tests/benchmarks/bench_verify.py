"""``python tests/benchmarks/bench_verify.py [--depth 12] [--dim 384]``

The cost of ``python -m mrc_ref.verify`` against mrc_ref's own Stage 1 on
the same layers, measured in one run: a DeiT-S-shaped model (by default 12
blocks, width 384, MLP 1536: 48 linears up to 1536×384) with random weights
of decaying spectra and positive-definite Grams, compressed by mrc_ref
(Stage 1 factors at reduction 0.6, no residual), then

- ``stage1``: :func:`mrc_ref.pipeline.stage1` (read, validate, decompose),
- ``verify``: :func:`mrc_ref.verify.verify_files` on the compressed file.

Prints one JSON line per figure, with the load average and the BLAS threads.
Goal: verify ≤ 1.5 × stage1.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from mrc_ref import formats, pipeline
from mrc_ref.compress import compress_files
from mrc_ref.verify import verify_files


def _model(depth, dim, seed=0):
    rng = np.random.default_rng(seed)
    t = {"cls_token": rng.standard_normal((1, 1, dim)).astype(np.float32),
         "pos_embed": rng.standard_normal((1, 5, dim)).astype(np.float32),
         "patch_embed.proj.weight": rng.standard_normal((dim, 3, 4, 4)).astype(np.float32),
         "patch_embed.proj.bias": np.zeros(dim, np.float32),
         "norm.weight": np.ones(dim, np.float32), "norm.bias": np.zeros(dim, np.float32),
         "head.weight": rng.standard_normal((10, dim)).astype(np.float32), "head.bias": np.zeros(10, np.float32)}
    shapes = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}
    stats = {}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            t[f"blocks.{i}.{norm}.weight"] = np.ones(dim, np.float32)
            t[f"blocks.{i}.{norm}.bias"] = np.zeros(dim, np.float32)
        for leaf, (m, n) in shapes.items():
            k = min(m, n)
            U, _ = np.linalg.qr(rng.standard_normal((m, k)))
            V, _ = np.linalg.qr(rng.standard_normal((n, k)))
            W = (U * np.exp(-np.arange(k) / (0.2 * k))) @ V.T
            t[f"blocks.{i}.{leaf}.weight"] = W.astype(np.float32)
            t[f"blocks.{i}.{leaf}.bias"] = np.zeros(m, np.float32)
            X = rng.standard_normal((2 * n, n)) * np.exp(-np.arange(n) / (0.3 * n))
            stats[f"blocks.{i}.{leaf}"] = {"gram": X.T @ X, "sum": X.sum(0), "rows": 2 * n}
    return t, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeat", type=int, default=2, help="best of N for each (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        from threadpoolctl import threadpool_info
        threads = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    except ImportError:
        threads = None
    with tempfile.TemporaryDirectory() as d:
        tensors, stats = _model(args.depth, args.dim)
        weights, acts, out = (os.path.join(d, f) for f in ("w.safetensors", "a.h5", "c.safetensors"))
        formats.write_safetensors(weights, tensors, {"num_heads": str(args.dim // 64)})
        formats.write_activations(acts, stats)
        config = pipeline.Config(reduction=0.6, compensation="none")
        compress_files(weights, acts, out, config)

        def stage1():
            tensors, _ = formats.read_original(weights)
            with formats.open_activations(acts) as f:
                pipeline.stage1(tensors, lambda n: formats.read_layer_stats(f, n, acts,
                                                                             n=tensors[n + ".weight"].shape[1]),
                                config, xp=np, files=(weights, acts))

        def verify():
            report = verify_files(out, weights, acts)
            assert report["passed"], report["failures"][:2]

        times = {}
        for label, fn in (("stage1", stage1), ("verify", verify)):
            best = np.inf
            for _ in range(args.repeat):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[label] = best
    layers = 4 * args.depth
    for label, seconds in times.items():
        print(json.dumps({"figure": f"{label}_seconds", "layers": layers, "value": round(seconds, 3),
                          "load": os.getloadavg(), "blas_threads": threads}))
    print(json.dumps({"figure": "verify_over_stage1", "value": round(times["verify"] / times["stage1"], 3),
                      "goal": "<= 1.5", "load": os.getloadavg(), "blas_threads": threads}))


if __name__ == "__main__":
    sys.exit(main())
