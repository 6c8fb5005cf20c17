#!/usr/bin/env python
"""Speed of the NumPy forward pass (mrc_ref.vit) against PyTorch and against
the previous implementation, and of the factored model against the dense one
(a script, not a pytest module).

Every figure is a ratio of two timings measured in the same run, the
implementations timed in turn in each round (one untimed warm-up each, then
the median of ``--repeats`` rounds), with the machine's load average and the
BLAS / torch thread counts printed beside it (one JSON line per figure).
Nothing is asserted; the targets are printed with ``meets_target``.

Figures, per model (``deit_s``: width 384, 6 heads, MLP 1536, 12 blocks;
``deit_b``: width 768, 12 heads, MLP 3072, 12 blocks; 224×224 images, 197
tokens; random weights, random images), dtype (float32, float64) and batch
size (8, 16):

* ``forward_numpy_over_torch``: images/s of ``vit.embed`` + ``vit.blocks``
  (the engine, default settings) over those of the same ViT in ``torch.nn``
  (tests/benchmarks/bench_capture.py's model: ``F.scaled_dot_product_attention``,
  exact GELU); target ``>= 1.0``.
* ``capture_numpy_over_torch``: :func:`data_tools.capture.capture_statistics`
  over the same statistics accumulated with PyTorch forward hooks
  (bench_capture's ``torch_capture``); target ``>= 1.0``.
* ``forward_speedup_over_693e520`` and ``capture_speedup_over_693e520``:
  the engine over the previous implementation (mrc_ref/vit.py
  as of commit 693e520, read with ``git show`` at run time; the capture runs it by swapping the
  module that data_tools.capture calls); no target: the speed-up over that commit.
* ``max_rel_diff_vs_693e520``: max |new − old| / max |old| of the last
  block's output (float32 <= 1e-6, float64 <= 1e-14).
* ``stacked_vs_unstacked_max_rel_diff`` (with ``--factored``): per factored
  layer, on its own inputs, max |stacked − unstacked| / max |output|, the
  largest over the layers (float32 <= 5e-7, float64 <= 9e-16); also the
  same after all blocks (``after_all_blocks``, no target: the difference
  grows through the blocks like any round-off).

Factored model (``--factored``, float32 and float64, batch 8): every block
linear replaced by ``A B + P Q`` with ``q = 8`` and the rank ``r`` giving a
60 % parameter reduction per layer (``(r + q)(m + n) = 0.4 m n``; DeiT-B:
r = 222 for qkv, 145 for proj, 237 for fc1 and fc2):

* ``factored_speedup_over_dense``: dense forward time / factored forward
  time, both on the engine, factors stacked by ``vit.prepare``; target
  ``>= 2.0``. Also printed: ``unstacked`` (each factor its own array, four
  products per layer) and ``693e520`` (the previous implementation's dense /
  factored ratio, 1.34× in the issue).

Why ``OMP_WAIT_POLICY=PASSIVE``: PyTorch's OpenMP workers spin for a while
after each parallel region (the default ``ACTIVE``-like policy of its libgomp),
and on a machine with as many cores as threads they then starve OpenBLAS's own
threads, slowing NumPy up to 5× when torch runs in the same process. The
script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before importing
torch, so that both libraries sleep when idle; the value is printed.

Usage: ``python tests/benchmarks/bench_forward.py [--quick] [--repeats N]
[--model deit_s,deit_b] [--dtype float32,float64] [--batch 8,16]
[--threads T] [--no-torch] [--no-capture] [--no-old] [--factored]``.
``--quick``: deit_s with 4 blocks (``--blocks``), batch 8, float32 and
float64, one repeat, the factored figure too (about a minute on two idle
cores; the ratios per block are those of the 12-block model). Threads: ``--threads``
(default 2) sets every OpenBLAS and torch's intra-op threads; the engine
follows the BLAS count (or ``MRC_THREADS``).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_capture as bc  # noqa: E402  (the torch model, torch hooks, BLAS thread helpers)

import data_tools.capture as capture_module  # noqa: E402
import mrc_ref  # noqa: E402
from data_tools.synthetic import random_vit  # noqa: E402
from mrc_ref import vit  # noqa: E402

SHAPES = bc.SHAPES
REDUCTION, RESIDUAL = 0.6, 8



#: The previous implementation, timed in the same run: mrc_ref/vit.py at this
#: commit, read with git from this checkout (None with --no-old).
OLD_REV = "693e520"
old_vit = None


def load_old_vit(rev=OLD_REV):
    """``mrc_ref/vit.py`` as of commit ``rev`` (``git show``), imported as a
    module of today's package, so its relative imports find today's
    ``layout`` and ``quantize``."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "-C", HERE, "show", f"{rev}:mrc_ref/vit.py"], capture_output=True,
                            text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="mrc_vit_"), f"vit_{rev}.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location(f"{mrc_ref.__name__}.vit_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = mrc_ref.__name__
    spec.loader.exec_module(module)
    return module


def emit(**fields):
    print(json.dumps(fields), flush=True)


def machine(torch):
    out = bc.machine(torch)
    out["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    out["MRC_THREADS"] = os.environ.get("MRC_THREADS")
    out["engine_threads"] = vit.Engine().resolved_threads()
    return out


def median_times(fns, repeats):
    times = bc.interleaved_times(fns, repeats)
    return {key: statistics.median(ts) for key, ts in times.items()}


def model(label, blocks=None, seed=0):
    c = SHAPES[label]
    params = random_vit(np.random.default_rng(seed), dim=c["dim"], depth=blocks or c["depth"], mlp=c["mlp"],
                        classes=1000, patch=c["patch"], grid=c["grid"], dtype=np.float32)
    return params, c["heads"]


def images(label, count, seed=1):
    side = SHAPES[label]["patch"] * SHAPES[label]["grid"]
    return np.random.default_rng(seed).standard_normal((count, 3, side, side)).astype(np.float32)


def factored(params, seed=2):
    """Every block linear as A B + P Q at 60 % fewer parameters, q = 8."""
    rng = np.random.default_rng(seed)
    out, ranks = dict(params), {}
    for name in bc.block_linear_names(params):
        w = out.pop(f"{name}.weight")
        m, n = w.shape
        r = int(round((1.0 - REDUCTION) * m * n / (m + n))) - RESIDUAL
        ranks[name.split(".", 2)[-1]] = r
        out[f"{name}.lowrank_a"] = (rng.standard_normal((m, r)) / np.sqrt(r)).astype(w.dtype)
        out[f"{name}.lowrank_b"] = (rng.standard_normal((r, n)) / np.sqrt(n)).astype(w.dtype)
        out[f"{name}.residual_p"] = (0.1 * rng.standard_normal((m, RESIDUAL)) / np.sqrt(RESIDUAL)).astype(w.dtype)
        out[f"{name}.residual_q"] = (rng.standard_normal((RESIDUAL, n)) / np.sqrt(n)).astype(w.dtype)
    return out, ranks


def unstacked(prepared):
    return {k: (v.copy() if v.base is not None else v) for k, v in prepared.items()}


def new_forward(prepared, heads, x):
    return vit.blocks(prepared, vit.embed(prepared, x, np), heads, np)


def old_forward(prepared, heads, x):
    return old_vit.blocks(prepared, old_vit.embed(prepared, x, np), heads, np)


def numpy_capture(prepared, heads, x, batch, module):
    saved = capture_module.vit
    capture_module.vit = module
    try:
        return capture_module.capture_statistics(prepared, bc.batches(x, batch), num_heads=heads, proxy_images=0,
                                                 xp=np, dtype=prepared["cls_token"].dtype)[0]
    finally:
        capture_module.vit = saved


def run_case(label, dtype, batch, args, torch):
    params, heads = model(label, args.blocks)
    x = images(label, batch).astype(dtype)
    prepared = vit.prepare(params, np, np.dtype(dtype))
    old_prepared = None if old_vit is None else old_vit.prepare(params, np, np.dtype(dtype))
    common = {"model": label, "blocks": vit.depth(params), "dtype": dtype, "batch": batch,
              "load_1m": round(os.getloadavg()[0], 2)}
    new, old = new_forward(prepared, heads, x), (None if args.no_old else old_forward(old_prepared, heads, x))
    if old is not None:
        diff = float(np.abs(new - old).max() / np.abs(old).max())
        tol = 1e-6 if dtype == "float32" else 1e-14
        emit(name="max_rel_diff_vs_693e520", value=diff, target=f"<= {tol:g}", meets_target=diff <= tol, **common)
    fns = {"new_forward": lambda: new_forward(prepared, heads, x)}
    if not args.no_old:
        fns["old_forward"] = lambda: old_forward(old_prepared, heads, x)
    names = bc.block_linear_names(params)
    tmodel = None
    if torch is not None:
        tmodel = bc.torch_model(params, heads, dtype)
        fns["torch_forward"] = lambda: bc.torch_forward(tmodel, x, batch)
    if not args.no_capture:
        fns["new_capture"] = lambda: numpy_capture(prepared, heads, x, batch, vit)
        if not args.no_old:
            fns["old_capture"] = lambda: numpy_capture(old_prepared, heads, x, batch, old_vit)
        if tmodel is not None:
            fns["torch_capture"] = lambda: bc.torch_capture(tmodel, x, batch, names)
    t = median_times(fns, args.repeats)
    emit(name="times_s", value={k: round(v, 4) for k, v in t.items()}, **common, machine=machine(torch))
    for what in ("forward", "capture"):
        if f"new_{what}" not in t:
            continue
        if f"torch_{what}" in t:
            ratio = t[f"torch_{what}"] / t[f"new_{what}"]
            emit(name=f"{what}_numpy_over_torch", value=round(ratio, 3), unit="numpy images/s / torch images/s",
                 target=">= 1.0", meets_target=bool(ratio >= 1.0), **common)
        if f"old_{what}" in t:
            emit(name=f"{what}_speedup_over_693e520", value=round(t[f"old_{what}"] / t[f"new_{what}"], 3),
                 unit="693e520 time / new time", **common)


def run_factored(label, dtype, batch, args, torch):
    params, heads = model(label, args.blocks)
    comp, ranks = factored(params)
    x = images(label, batch).astype(dtype)
    dense = vit.prepare(params, np, np.dtype(dtype))
    fact = vit.prepare(comp, np, np.dtype(dtype))
    fact_unstacked = unstacked(fact)
    common = {"model": label, "blocks": vit.depth(params), "dtype": dtype, "batch": batch, "reduction": REDUCTION,
              "residual_rank": RESIDUAL, "ranks": ranks, "load_1m": round(os.getloadavg()[0], 2)}
    # exactness of the stacking, per layer: (x Rᵀ) Lᵀ vs (x Bᵀ) Aᵀ + (x Qᵀ) Pᵀ on the layer's own inputs
    inputs = {}
    vit.blocks(fact_unstacked, vit.embed(fact_unstacked, x, np), heads, np,
               hook=lambda name, a: inputs.__setitem__(name, a))
    layer = max(float(np.abs(vit.linear(fact, n, a, np) - (y := vit.linear(fact_unstacked, n, a, np))).max()
                      / np.abs(y).max()) for n, a in inputs.items())
    out_s, out_u = new_forward(fact, heads, x), new_forward(fact_unstacked, heads, x)
    tol = 5e-7 if dtype == "float32" else 9e-16
    emit(name="stacked_vs_unstacked_max_rel_diff", value=layer, unit="max over layers of max |diff| / max |y|",
         target=f"<= {tol:g}", meets_target=layer <= tol,
         after_all_blocks=float(np.abs(out_s - out_u).max() / np.abs(out_u).max()), **common)
    fns = {"dense": lambda: new_forward(dense, heads, x), "factored": lambda: new_forward(fact, heads, x),
           "factored_unstacked": lambda: new_forward(fact_unstacked, heads, x)}
    if not args.no_old:
        od, of = old_vit.prepare(params, np, np.dtype(dtype)), old_vit.prepare(comp, np, np.dtype(dtype))
        fns["old_dense"] = lambda: old_forward(od, heads, x)
        fns["old_factored"] = lambda: old_forward(of, heads, x)
    t = median_times(fns, args.repeats)
    emit(name="times_s", value={k: round(v, 4) for k, v in t.items()}, **common, machine=machine(torch))
    ratio = t["dense"] / t["factored"]
    emit(name="factored_speedup_over_dense", value=round(ratio, 3), unit="dense time / factored time",
         target=">= 2.0", meets_target=bool(ratio >= 2.0),
         unstacked=round(t["dense"] / t["factored_unstacked"], 3),
         **({"693e520": round(t["old_dense"] / t["old_factored"], 3)} if "old_dense" in t else {}), **common)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="deit_s, batch 8, one repeat (about a minute)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="deit_s,deit_b")
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--batch", default="8,16")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of each model (default 12; --quick: 4)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every OpenBLAS and of torch (default 2)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-capture", action="store_true")
    ap.add_argument("--no-old", action="store_true", help="skip the 693e520 implementation")
    ap.add_argument("--factored", action="store_true", help="also the factored-model figure (on by --quick)")
    args = ap.parse_args(argv)
    global old_vit
    if not args.no_old:
        old_vit = load_old_vit()
    if args.quick:
        args.repeats, args.model, args.batch, args.factored = 1, "deit_s", "8", True
        args.blocks = args.blocks or 4
    torch = None
    if not args.no_torch:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime: see the docstring
        try:
            import torch
        except ImportError:
            emit(name="torch", available=False, note="PyTorch is not installed: no numpy/torch ratios")
    import scipy.linalg.blas  # noqa: F401  (load SciPy's OpenBLAS too, so that its threads are set and shown)

    bc.set_openblas_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    emit(name="machine", **machine(torch))
    for label in args.model.split(","):
        if label not in SHAPES:
            sys.exit(f"unknown model {label!r}")
        for dtype in args.dtype.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                run_case(label, dtype, batch, args, torch)
        if args.factored:
            for dtype in args.dtype.split(","):
                run_factored(label, dtype, 8, args, torch)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    emit(name="wall_s", value=round(time.perf_counter() - t0, 1))
    sys.exit(code)
