#!/usr/bin/env python
"""Cost of ``data_tools.sensitivity`` (a script, not a pytest module).

Figures, one JSON line each:

* ``example``: wall and CPU seconds of the whole command on the embedded
  example (300 proxy images, 4 blocks of width 64, 16 layers, 3 points), and
  its cost model :func:`data_tools.sensitivity.block_passes` (block forward
  passes per proxy image) with the seconds per image-block.
* ``deit_b_block``: seconds per image of one DeiT-B-shaped block (width 768,
  12 heads, MLP 3072, 197 tokens, random weights) through ``mrc_ref.vit.block``,
  float32 and float64, median of ``--repeats`` after a warm-up.
* ``deit_b_stage1``: seconds of Stage 1 (``svd.output_basis`` on a random
  positive definite Gram) for one layer of each DeiT-B shape, times 12 blocks.
* ``deit_b_estimate``: the extrapolation to DeiT-B: block passes
  ``2·12 + 3·Σ_l (12 − b_l) = 960`` per image (48 layers, 3 points) times
  the seconds per image-block, plus Stage 1, for 32 and 256 proxy images.

Usage: ``python tests/benchmarks/bench_sensitivity.py [--repeats N] [--batch B]``.
Threads: whatever BLAS uses by default; set ``OPENBLAS_NUM_THREADS`` to pin.
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import numpy as np

from data_tools import example_data, sensitivity
from mrc_ref import svd, vit


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def deit_b_block(rng, dtype):
    d, f = 768, 3072
    p = {}
    for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f))):
        p[f"blocks.0.{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype)
        p[f"blocks.0.{name}.bias"] = np.zeros(shape[0], dtype)
    for norm in ("norm1", "norm2"):
        p[f"blocks.0.{norm}.weight"], p[f"blocks.0.{norm}.bias"] = np.ones(d, dtype), np.zeros(d, dtype)
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per timed DeiT-B block pass")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), cpu_seconds()
        measured, _ = sensitivity.run(example_data.WEIGHTS, example_data.ACTS, os.path.join(tmp, "s.json"))
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    passes = sensitivity.block_passes([vit.block_index(n) for n in measured], 4, 3)
    print(json.dumps({"figure": "example", "wall_s": wall, "cpu_s": cpu, "layers": len(measured), "images": 300,
                      "block_passes_per_image": passes, "wall_s_per_image_block": wall / (passes * 300)}))

    rng = np.random.default_rng(0)
    per_block = {}
    for dtype in (np.float32, np.float64):
        params = deit_b_block(rng, dtype)
        h = rng.standard_normal((args.batch, 197, 768)).astype(dtype)
        vit.block(params, 0, h, 12, np)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            vit.block(params, 0, h, 12, np)
            times.append((time.perf_counter() - t) / args.batch)
        per_block[np.dtype(dtype).name] = statistics.median(times)
        print(json.dumps({"figure": "deit_b_block", "dtype": np.dtype(dtype).name,
                          "s_per_image": per_block[np.dtype(dtype).name]}))

    stage1 = 0.0
    for m, n in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
        X = rng.standard_normal((2 * n, n))
        C, W = X.T @ X, rng.standard_normal((m, n)) / np.sqrt(n)
        t = time.perf_counter()
        svd.output_basis(W, C, np)
        stage1 += 12 * (time.perf_counter() - t)
    print(json.dumps({"figure": "deit_b_stage1", "s": stage1}))

    passes = sensitivity.block_passes([b for b in range(12) for _ in range(4)], 12, 3)
    for dtype, s in per_block.items():
        for images in (32, 256):
            print(json.dumps({"figure": "deit_b_estimate", "dtype": dtype, "images": images,
                              "block_passes_per_image": passes, "s": passes * images * s + stage1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
