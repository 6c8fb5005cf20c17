#!/usr/bin/env python
"""CPU (NumPy) against GPU (CuPy) timings of mrc_ref (a script, not a pytest module).

Each figure runs the same inputs through ``xp = numpy`` and ``xp = cupy`` in
one process and prints one JSON line: ``name``, ``cpu_s``, ``gpu_s``,
``ratio`` (= cpu_s / gpu_s, the GPU speed-up), ``max_rel_diff`` (how far the
GPU result is from the CPU one, on a sign-invariant quantity), the sizes and
the machine. Times are medians over ``--repeats`` runs after one untimed
warm-up (BLAS threads, cuBLAS/cuSOLVER handles, CuPy kernel compilation);
the GPU is synchronized before every timer starts and before it stops.
Math is float64 (``--dtype float32`` to compare the other one).

Figures
-------
1. ``gram_accumulate``: :func:`mrc_ref.stats.accumulate_gram` over
   ``--rows`` × 768 float32 token rows held on the host in chunks (as read
   from acts.h5); the GPU time INCLUDES the host → device copy of every
   chunk (that is how capture/compress feed it). ``gpu_resident_s``: the
   same with the chunks already on the GPU.
2. ``stage1_deit_b``: :func:`mrc_ref.svd.output_basis` + ``nmse_curve`` on
   one DeiT-B block's shapes (qkv 2304×768, proj 768×768, fc1 3072×768, fc2
   768×3072) with synthetic positive definite Grams; inputs already on the
   device (transfers excluded).
3. ``stage3_fc1_100_steps``: :func:`mrc_ref.compensate.adam`, 100 Adam
   steps (local mode, q = 8) on fc1 (3072×768) at Stage-1 rank 256, inputs on
   the device.
4. ``vit_forward``: :func:`mrc_ref.vit.forward` of a random DeiT-S (or
   ``--model deit_b``) state dict on a batch of 32 224×224 images; the
   parameters are prepared on the device beforehand (not timed), the images
   are copied in within the timed call.

Without CuPy or a usable GPU it first prints one JSON line saying so
(``"gpu": false`` and the reason), then still runs the CPU half (``gpu_s``
and ``ratio`` null) and exits 0; ``--quick`` shrinks every size so that this
takes seconds.

Usage: ``python tests/benchmarks/bench_gpu.py [--quick] [--repeats N]
[--only gram,stage1,stage3,forward] [--model deit_s|deit_b] [--dtype float64|float32]``
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from mrc_ref import backend, compensate, stats, svd, vit
from mrc_ref.errors import MrcError

DEIT_B_BLOCK = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
MODELS = {"deit_s": dict(dim=384, depth=12, heads=6), "deit_b": dict(dim=768, depth=12, heads=12)}
FIGURES = ("gram", "stage1", "stage3", "forward")


def emit(**fields):
    print(json.dumps(fields), flush=True)


def machine(cp):
    info = {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "numpy": np.__version__,
            "python": platform.python_version()}
    if cp is not None:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props.get("name", b"?")
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        info["cupy"] = getattr(cp, "__version__", "?")
    return info


def timed(fn, xp, cp, repeats):
    """Median wall time of ``fn()`` (after one warm-up) and its last result;
    the GPU is synchronized around each run."""
    def sync():
        if xp is cp and cp is not None:
            cp.cuda.Device().synchronize()

    result = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def both(name, make, cp, args, diff, **sizes):
    """Time ``make(xp)()`` for NumPy and (when present) CuPy; emit one line.

    ``make(xp)`` prepares the inputs on ``xp`` (not timed) and returns the
    function to time; ``diff(cpu_result, gpu_result)`` gives max_rel_diff."""
    cpu_s, cpu_result = timed(make(np), np, cp, args.repeats)
    gpu_s = ratio = rel = None
    if cp is not None:
        gpu_s, gpu_result = timed(make(cp), cp, cp, args.repeats)
        ratio = round(cpu_s / gpu_s, 2)
        rel = diff(cpu_result, gpu_result)
    emit(name=name, cpu_s=round(cpu_s, 4), gpu_s=None if gpu_s is None else round(gpu_s, 4), ratio=ratio,
         unit="s (median); ratio = cpu_s / gpu_s", max_rel_diff=rel, dtype=args.dtype, repeats=args.repeats,
         quick=args.quick, **sizes, machine=machine(cp))


def rel_diff(a, b):
    a, b = backend.to_host(a), backend.to_host(b)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def synthetic_gram(n, rng, k=512, floor=1e-3):
    """Positive definite ``C = G Gᵀ / k + floor·I`` with a decaying spectrum."""
    k = min(k, n)
    g = rng.standard_normal((n, k)) * (np.arange(1, k + 1) ** -1.0)
    c = (g @ g.T) / k
    c[np.diag_indices(n)] += floor
    return c


# --------------------------------------------------------------------------- figures
def bench_gram(args, cp, dtype):
    rows, n, chunk = args.rows, 768, args.chunk
    rng = np.random.default_rng(0)
    mix = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    chunks = [rng.standard_normal((min(chunk, rows - i), n), dtype=np.float32) @ mix + 0.1
              for i in range(0, rows, chunk)]

    def make(xp):
        return lambda: stats.accumulate_gram(iter(chunks), xp, dtype)["gram"]

    resident_s = None
    if cp is not None:  # the same with the rows already on the GPU
        on_gpu = [cp.asarray(c) for c in chunks]
        resident_s, _ = timed(lambda: stats.accumulate_gram(iter(on_gpu), cp, dtype)["gram"], cp, cp, args.repeats)
        resident_s = round(resident_s, 4)
        del on_gpu
    both("gram_accumulate", make, cp, args, rel_diff, gpu_resident_s=resident_s, rows=rows, features=n,
         chunk_rows=chunk,
         notes="host float32 chunks; gpu_s includes host->device copies, gpu_resident_s does not")


def bench_stage1(args, cp, dtype):
    rng = np.random.default_rng(1)
    scale = 4 if args.quick else 1
    shapes = {k: (m // scale, n // scale) for k, (m, n) in DEIT_B_BLOCK.items()}
    grams = {n: synthetic_gram(n, rng).astype(dtype) for n in {n for _, n in shapes.values()}}
    weights = {k: (rng.standard_normal(s) / np.sqrt(s[1])).astype(dtype) for k, s in shapes.items()}

    def make(xp):
        W = {k: xp.asarray(w) for k, w in weights.items()}
        C = {n: xp.asarray(c) for n, c in grams.items()}

        def run():
            out = {}
            for k, w in W.items():
                _, s2 = svd.output_basis(w, C[w.shape[1]], xp)
                out[k] = (s2, svd.nmse_curve(s2, xp))
            return out

        return run

    def diff(a, b):  # spectra and NMSE curves: sign-invariant
        return max(max(rel_diff(a[k][0], b[k][0]), float(np.abs(backend.to_host(a[k][1]) -
                                                                 backend.to_host(b[k][1])).max())) for k in a)

    both("stage1_deit_b", make, cp, args, diff, shapes={k: list(s) for k, s in shapes.items()},
         notes="output_basis + nmse_curve per layer, inputs on the device; max_rel_diff over spectra "
               "(relative) and NMSE curves (absolute)")


def bench_stage3(args, cp, dtype):
    rng = np.random.default_rng(2)
    m, n = DEIT_B_BLOCK["fc1"]
    if args.quick:
        m, n = m // 4, n // 4
    rank, q, steps = (256, 8, 100) if not args.quick else (64, 8, 10)
    C = synthetic_gram(n, rng).astype(dtype)
    W = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(dtype)

    def make(xp):
        Wx, Cx = xp.asarray(W), xp.asarray(C)
        U, _ = svd.output_basis(Wx, Cx, xp)
        A, B = svd.factors(Wx, U, rank)
        P0, Q0 = compensate.init_residual(m, n, q, 0, 0, xp, dtype)
        return lambda: compensate.adam(Wx, A, B, P0, Q0, Cx, steps=steps, lr=1e-2, xp=xp)[2]

    both(f"stage3_fc1_{steps}_steps", make, cp, args, rel_diff, shape=[m, n], rank=rank, residual_rank=q,
         steps=steps, notes="local-mode Adam incl. prepare(); max_rel_diff over the loss history")


def random_vit(dim, depth, heads, *, img=224, patch=16, classes=1000, seed=0):
    """A random timm-layout ViT state dict (float32, as stored)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1] if len(shape) == 2
                                                                                  else np.prod(shape[1:]))))

    tokens = (img // patch) ** 2 + 1
    p = {"patch_embed.proj.weight": w(dim, 3, patch, patch), "patch_embed.proj.bias": np.zeros(dim, np.float32),
         "cls_token": w(1, 1, dim), "pos_embed": 0.02 * w(1, tokens, dim),
         "norm.weight": np.ones(dim, np.float32), "norm.bias": np.zeros(dim, np.float32),
         "head.weight": w(classes, dim), "head.bias": np.zeros(classes, np.float32)}
    for i in range(depth):
        for leaf, (m, n) in (("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                             ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))):
            p[f"blocks.{i}.{leaf}.weight"], p[f"blocks.{i}.{leaf}.bias"] = w(m, n), np.zeros(m, np.float32)
        for norm in ("norm1", "norm2"):
            p[f"blocks.{i}.{norm}.weight"] = np.ones(dim, np.float32)
            p[f"blocks.{i}.{norm}.bias"] = np.zeros(dim, np.float32)
    return p


def bench_forward(args, cp, dtype):
    spec = dict(MODELS[args.model])
    batch, img = 32, 224
    if args.quick:
        spec.update(depth=2)
        batch = 2
    params = random_vit(spec["dim"], spec["depth"], spec["heads"], img=img)
    images = np.random.default_rng(3).standard_normal((batch, 3, img, img)).astype(np.float32)

    def make(xp):
        prepared = vit.prepare(params, xp, dtype)
        return lambda: vit.forward(prepared, images, num_heads=spec["heads"], xp=xp, dtype=dtype)

    both("vit_forward", make, cp, args, rel_diff, model=args.model, **spec, batch=batch, image_size=img,
         notes="parameters prepared on the device beforehand; images copied in inside the timed call; "
               "max_rel_diff over the logits")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds), e.g. to check the script runs")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3, 1 with --quick)")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--model", default="deit_s", choices=sorted(MODELS), help="ViT of the forward figure")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--rows", type=int, default=None, help="token rows of the Gram figure (default 200000)")
    p.add_argument("--chunk", type=int, default=16384, help="rows per chunk of the Gram figure")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rows = args.rows or (20_000 if args.quick else 200_000)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(only) - set(FIGURES)
    if unknown:
        p.error(f"unknown figures {sorted(unknown)}; expected some of {', '.join(FIGURES)}")
    try:
        cp = backend.get_xp("cuda")
    except MrcError as err:
        cp = None
        emit(name="bench_gpu", gpu=False, reason=str(err),
             note="no usable GPU: running the CPU half only (gpu_s and ratio are null)", machine=machine(None))
    dtype = np.dtype(args.dtype).type
    for figure in only:
        {"gram": bench_gram, "stage1": bench_stage1, "stage3": bench_stage3, "forward": bench_forward}[figure](
            args, cp, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
