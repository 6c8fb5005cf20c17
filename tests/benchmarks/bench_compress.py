#!/usr/bin/env python
"""The default ``compress`` end to end on a DeiT-B-shaped model, split by
stage, for two source trees in one run (a script, not a pytest module).

What it does
------------
1. Builds, once and deterministically (seed 0), the inputs a real user has:

   * ``weights.safetensors``: a random DeiT-B-shaped ViT in timm layout
     (:func:`data_tools.synthetic.make_model`: block linears with a decaying
     spectrum ``σ_i ∝ exp(−4 i / min(m, n))`` plus full-rank noise; width 768,
     12 heads (``num_heads`` metadata), MLP 3072, ``--depth`` blocks (12),
     patch 16, 224×224 images (197 tokens), ``--classes`` classes (1000),
     float32);
   * ``images/``: ``--images`` random 256×256 RGB PNGs in two class
     sub-folders;
   * ``acts.h5``: ``python -m data_tools.capture weights.safetensors images
     -o acts.h5 --proxy-images P`` (``P = --proxy-images``, 32), so the
     statistics hold the block-0 tokens of ``P`` proxy images and the default
     ``--compensation auto`` runs the sequential Stage 3 on them.

   They go to a temporary folder, or to ``--workdir`` (one sub-folder per
   shape, reused by later runs: the capture of the full model takes minutes).
   Model, images and capture come from the repository this script lives in.

2. Runs ``python -m mrc_ref.compress weights.safetensors acts.h5 -o
   out.safetensors --report out.json --quiet`` (default options) as a
   subprocess with ``PYTHONPATH=<tree>``, first for ``--old`` and then for
   ``--new`` (default: this repository). ``compress`` records no stage
   timings (neither the report nor ``--quiet`` output has them), so the
   subprocess is a small driver that wraps the library's seams before running
   the command line's ``main`` unchanged, and records the wall time spent
   inside each (outermost calls only; the seams are the same in the old tree
   693e520 and now):

   * ``read``: ``formats.read_original`` and ``formats.read_proxy_tokens``
     (weights, and the proxy tokens' check);
   * ``stage1``: ``pipeline._stage1`` (reading and validating each layer's
     statistics, the activation-aware SVD);
   * ``stage2``: ``allocate.optimal`` (and ``allocate.allocate``,
     ``allocate.local_search`` when used): the rank allocation;
   * ``factors``: ``svd.factors`` (``A``, ``B`` at the chosen ranks);
   * ``stage3``: ``make_sequential`` and the sequential Stage 3 it returns
     (or ``compensate.solve`` for a local Stage 3);
   * ``write``: ``formats.safetensors_bytes``, ``formats.json_text``,
     ``formats.write_files``;
   * ``other``: the rest of ``main`` (argument parsing, opening files, the
     report), and ``startup``: interpreter start and imports (the
     subprocess's wall time minus ``main``).

   ``total`` is the subprocess's wall time, i.e. the time of ``python -m
   mrc_ref.compress`` (the wrappers cost microseconds).

3. Compares the two outputs: per factored layer the densified weight
   ``A B + P Q`` (:func:`mrc_ref.formats.densify`, float64) of the new tree
   against the old, relative Frobenius difference ``‖W_new − W_old‖_F /
   ‖W_old‖_F``, the maximum over layers (target ``<= 1e-9``), and whether the
   ranks ``r`` and ``q`` of the two reports are equal.

Output: a table, then JSON lines: ``machine`` (CPU, cores, NumPy, BLAS and
its threads, ``OPENBLAS_NUM_THREADS`` as set), ``run`` per tree (seconds per
stage, load average before and after), ``old_over_new`` per stage and for the
total (target for the total ``>= 2.5``), and ``outputs_match``. Timings are
single runs, never asserted; compare them only with the load figures in view
(BLAS threads are left as the environment sets them: by default all cores).

Usage::

    git -C REPO worktree add --detach /tmp/old693 693e520   # the baseline tree
    python tests/benchmarks/bench_compress.py --old /tmp/old693 --workdir /tmp/bench_compress
    python tests/benchmarks/bench_compress.py --old /tmp/old693 --quick   # depth 2, 8 proxy images

Options: ``--depth`` (12), ``--classes`` (1000), ``--images`` (64),
``--proxy-images`` (32), ``--old PATH`` (required), ``--new PATH`` (this
repository), ``--workdir DIR`` (temporary), ``--quick`` (depth 2, 16 images,
8 proxy images), ``--repeat N`` (best of N per tree, 1).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from mrc_ref import formats  # noqa: E402

#: Bump when the generated inputs change, so a --workdir does not reuse stale ones.
INPUTS_VERSION = 1

#: The driver run under each tree: it wraps the seams (outermost calls only),
#: runs the command line's main and writes the timings as JSON.
DRIVER = r'''
import json, os, sys, time
T0 = time.perf_counter()
timings_path, tree = sys.argv[1], sys.argv[2]
argv = sys.argv[3:]
import mrc_ref
import mrc_ref.compress as compress
from mrc_ref.compress import __main__ as cli
from mrc_ref import allocate, compensate, formats, pipeline, svd
here = os.path.realpath(mrc_ref.__file__)
if not here.startswith(os.path.realpath(tree) + os.sep):
    sys.exit(f"driver: mrc_ref imported from {here}, not from {tree}")
T_IMPORTED = time.perf_counter()
stages, depth = {}, [0]

def timed(fn, stage):
    def wrapper(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start
            depth[0] -= 1
        return result
    return wrapper

def patch(module, name, stage):
    if hasattr(module, name):
        setattr(module, name, timed(getattr(module, name), stage))

for module, name, stage in [(formats, "read_original", "read"), (formats, "read_proxy_tokens", "read"),
                            (pipeline, "_stage1", "stage1"), (allocate, "optimal", "stage2"),
                            (allocate, "allocate", "stage2"), (allocate, "local_search", "stage2"),
                            (svd, "factors", "factors"), (compensate, "solve", "stage3"),
                            (formats, "safetensors_bytes", "write"), (formats, "json_text", "write"),
                            (formats, "write_files", "write")]:
    patch(module, name, stage)
make_sequential = compress.make_sequential

def timed_make_sequential(*args, **kwargs):
    return timed(timed(make_sequential, "stage3")(*args, **kwargs), "stage3")

compress.make_sequential = timed_make_sequential
try:
    from threadpoolctl import threadpool_info
    blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()
            if i["user_api"] == "blas"]
except ImportError:
    blas = None
start = time.perf_counter()
code = cli.main(argv)
end = time.perf_counter()
stages["other"] = (end - start) - sum(stages.values())
with open(timings_path, "w") as f:
    json.dump({"stages": stages, "main": end - start, "import": T_IMPORTED - T0, "mrc_ref": here,
               "blas": blas}, f)
sys.exit(code)
'''

STAGES = ("startup", "read", "stage1", "stage2", "factors", "stage3", "write", "other")


def _machine():
    """CPU, cores, NumPy, BLAS and its threads, load, ``OPENBLAS_NUM_THREADS``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()
                if i["user_api"] == "blas"]
    except ImportError:
        blas = None
    return {"figure": "machine", "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas,
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load": os.getloadavg()}


def _write_images(folder, count, seed=0):
    """``count`` random 256×256 RGB PNGs, split over two class sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = os.path.join(folder, f"class{i % 2}")
        os.makedirs(sub, exist_ok=True)
        # smooth random colour fields plus noise: image-like, and the same on every run
        low = rng.uniform(0, 255, (8, 8, 3))
        pixels = np.kron(low, np.ones((32, 32, 1))) + rng.normal(0, 30, (256, 256, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(sub, f"img{i:04d}.png"))


def _inputs(root, args):
    """``(weights, acts)`` in a folder of ``root`` named by the shape, built if absent."""
    from data_tools.synthetic import make_model

    folder = os.path.join(root, f"deit_b_v{INPUTS_VERSION}_d{args.depth}_c{args.classes}"
                                f"_i{args.images}_p{args.proxy_images}")
    weights, acts = os.path.join(folder, "weights.safetensors"), os.path.join(folder, "acts.h5")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(weights):
        start = time.perf_counter()
        tensors = make_model(0, depth=args.depth, dim=768, num_heads=12, mlp_ratio=4, img_size=224, patch=16,
                             classes=args.classes, dtype=np.float32)
        formats.write_safetensors(weights, tensors, {"num_heads": "12"})
        print(f"# model written ({time.perf_counter() - start:.1f} s): {weights}", flush=True)
    if not os.path.exists(acts):
        images = os.path.join(folder, "images")
        if not os.path.isdir(images):
            _write_images(images + ".tmp", args.images)
            os.replace(images + ".tmp", images)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_tools.capture", weights, images, "-o", acts,
                        "--proxy-images", str(args.proxy_images), "--quiet"],
                       check=True, env={**os.environ, "PYTHONPATH": REPO})
        print(f"# statistics captured ({time.perf_counter() - start:.1f} s): {acts}", flush=True)
    return weights, acts


def _run(tree, label, weights, acts, folder):
    """One ``compress`` run under ``tree``: the stage timings, load before/after, outputs."""
    out, report = (os.path.join(folder, f"out_{label}.{ext}") for ext in ("safetensors", "json"))
    timings = os.path.join(folder, f"timings_{label}.json")
    driver = os.path.join(folder, "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    for path in (out, report, timings):
        if os.path.exists(path):
            os.remove(path)
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(os.path.join(folder, f"compress_{label}.log"), "w") as log:
        subprocess.run([sys.executable, driver, timings, tree, weights, acts, "-o", out, "--report", report,
                        "--quiet"], check=True, env={**os.environ, "PYTHONPATH": tree}, cwd=folder,
                       stdout=log)  # the command's summary table goes to compress_<tree>.log
    total = time.perf_counter() - start
    load_after = os.getloadavg()
    with open(timings) as f:
        t = json.load(f)
    seconds = {stage: t["stages"].get(stage, 0.0) for stage in STAGES if stage != "startup"}
    seconds["startup"] = total - t["main"]
    seconds["total"] = total
    return {"seconds": seconds, "load_before": load_before, "load_after": load_after, "blas": t["blas"],
            "mrc_ref": t["mrc_ref"], "output": out, "report": report}


def _compare(old, new):
    """Max over factored layers of ``‖W_new − W_old‖_F / ‖W_old‖_F`` (densified,
    float64) and whether the reports' ranks agree."""
    dense = {}
    for label, run in (("old", old), ("new", new)):
        tensors = formats.read_safetensors(run["output"])[0]
        dense[label] = formats.densify(tensors, dtype=np.float64)
    with open(old["report"]) as f:
        old_layers = json.load(f)["layers"]
    with open(new["report"]) as f:
        new_layers = json.load(f)["layers"]
    ranks_old = {e["name"]: (e["rank"], e["residual_rank"]) for e in old_layers}
    ranks_new = {e["name"]: (e["rank"], e["residual_rank"]) for e in new_layers}
    worst, worst_layer = 0.0, None
    for e in old_layers:
        key = e["name"] + ".weight"
        a, b = dense["old"][key].astype(np.float64), dense["new"][key].astype(np.float64)
        rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
        if rel >= worst:
            worst, worst_layer = rel, e["name"]
    same_keys = sorted(dense["old"]) == sorted(dense["new"])
    return {"figure": "outputs_match", "max_rel_frobenius": worst, "layer": worst_layer, "goal": "<= 1e-9",
            "ranks_equal": ranks_old == ranks_new, "same_tensors": same_keys,
            "layers": len(old_layers), "factored": sum(r is not None for r, _ in ranks_old.values())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="source tree of the baseline (e.g. a worktree at 693e520)")
    p.add_argument("--new", default=REPO, help="source tree measured (default: this repository)")
    p.add_argument("--depth", type=int, default=12, help="transformer blocks (default: %(default)s)")
    p.add_argument("--classes", type=int, default=1000, help="classes of the head (default: %(default)s)")
    p.add_argument("--images", type=int, default=64, help="calibration images (default: %(default)s)")
    p.add_argument("--proxy-images", type=int, default=32,
                   help="proxy images of the sequential Stage 3 (default: %(default)s)")
    p.add_argument("--workdir", help="keep the inputs here and reuse them (default: a temporary folder)")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs per tree (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="depth 2, 16 images, 8 proxy images")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.images, args.proxy_images = 2, 16, 8
    if args.proxy_images > args.images:
        p.error("--proxy-images exceeds --images")
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    for label, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "mrc_ref", "compress", "__main__.py")):
            p.error(f"--{label} {tree} is not an mrc_ref source tree")

    machine = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.abspath(args.workdir) if args.workdir else tmp
        weights, acts = _inputs(root, args)
        folder = os.path.dirname(weights)
        runs = {}
        for label in ("old", "new"):
            best = None
            for _ in range(args.repeat):
                run = _run(trees[label], label, weights, acts, folder)
                if best is None or run["seconds"]["total"] < best["seconds"]["total"]:
                    best = run
            runs[label] = best
        match = _compare(runs["old"], runs["new"])

    shape = {"depth": args.depth, "width": 768, "heads": 12, "mlp": 3072, "tokens": 197, "classes": args.classes,
             "images": args.images, "proxy_images": args.proxy_images}
    columns = list(STAGES) + ["total"]
    print(f"\ncompress (default options), DeiT-B shape {shape}; seconds per stage "
          f"(best of {args.repeat})")
    print(f"{'tree':<6}" + "".join(f"{c:>10}" for c in columns) + "   load before -> after")
    for label in ("old", "new"):
        s = runs[label]["seconds"]
        print(f"{label:<6}" + "".join(f"{s[c]:>10.2f}" for c in columns)
              + f"   {runs[label]['load_before'][0]:.2f} -> {runs[label]['load_after'][0]:.2f}")
    ratios = {c: (runs["old"]["seconds"][c] / runs["new"]["seconds"][c] if runs["new"]["seconds"][c] > 0 else None)
              for c in columns}
    print(f"{'old/new':<6}" + "".join(f"{r:>10.2f}" if r is not None else f"{'-':>10}" for r in
                                      (ratios[c] for c in columns)))
    print(f"outputs: max relative Frobenius difference {match['max_rel_frobenius']:.3e} (goal <= 1e-9), "
          f"ranks equal: {match['ranks_equal']}\n")

    print(json.dumps(machine))
    for label in ("old", "new"):
        r = runs[label]
        print(json.dumps({"figure": "run", "tree": label, "path": trees[label], "shape": shape,
                          "seconds": {k: round(v, 3) for k, v in r["seconds"].items()},
                          "load_before": r["load_before"], "load_after": r["load_after"], "blas": r["blas"],
                          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}))
    print(json.dumps({"figure": "old_over_new", "stages": {c: None if v is None else round(v, 3)
                                                           for c, v in ratios.items() if c != "total"}}))
    print(json.dumps({"figure": "old_over_new_total", "value": round(ratios["total"], 3), "goal": ">= 2.5",
                      "load": os.getloadavg()}))
    print(json.dumps(match))
    return 0


if __name__ == "__main__":
    sys.exit(main())
