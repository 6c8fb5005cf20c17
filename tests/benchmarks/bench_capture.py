#!/usr/bin/env python
"""Images per second of the NumPy capture against PyTorch (a script, not a pytest module).

Both capture the same statistics of the same images in one run: per block
linear ``gram = Σ XᵀX``, ``sum``, ``rows`` and ``gram_normalized =
Σ_i X_iᵀX_i / ‖X_i Wᵀ‖²_F``, with each batch's products in the compute
dtype and the sums across batches in float64.

* NumPy: :func:`data_tools.capture.capture_statistics` (``mrc_ref.vit``
  forward with a hook), ``dtype`` float32 and float64.
* PyTorch: a timm-layout ViT written below with ``torch.nn`` (``Conv2d``
  patch embedding, ``LayerNorm``, ``F.scaled_dot_product_attention``, exact
  ``GELU``) and forward hooks on every block ``nn.Linear`` that accumulate
  the same statistics (``‖X_i Wᵀ‖²`` from the layer's output minus its
  bias, as one would write it in PyTorch). Before timing, its statistics are
  checked against ours on the first images (figure ``torch_matches_numpy``):
  float64 to 1e-10 of each matrix's largest entry (only the order of float64
  operations differs), float32 to 1e-4 (float32 rounding through 12 blocks).

Figures (one JSON line each; ``value`` in images/s, median of ``--repeats``
timed runs after one untimed warm-up, the implementations timed in turn in
each round; image loading is not timed):

* ``capture_images_per_s`` for ``impl`` numpy / torch and ``dtype``
  float32 / float64;
* ``forward_images_per_s``: the forward pass alone (no statistics), to
  separate the model from the statistics;
* ``numpy_over_torch``: the ratio of images/s, per dtype and figure (target
  for the capture: NumPy at least half PyTorch's, ``>= 0.5``; the forward
  alone has no target).

Models: ``deit_s`` (a random DeiT-S-shaped ViT: width 384, 12 blocks, 6
heads, MLP 1536, 224×224 images, 197 tokens; 4.6 G multiply-adds per image
for the forward) and ``deit_b`` (width 768, 12 heads, MLP 3072; 17.6 G),
fed the embedded example's calibration digits resized by the DeiT eval
transform; ``example`` (the embedded 2-block width-64 model on its own 16×16
images). PyTorch is optional: without it the script says so in one
JSON line and prints the NumPy figures only.

Usage: ``python tests/benchmarks/bench_capture.py [--quick] [--repeats N]
[--images N] [--batch-size B] [--model deit_s,deit_b,example] [--threads T]``. On processors where
``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` are set, unset them for this
command only (``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...``);
the thread counts are printed with every figure.
"""

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from mrc_ref import example as example_data
from data_tools.capture import block_linear_names, capture_statistics
from mrc_ref.images import list_images, load_image
from data_tools.synthetic import random_vit
from mrc_ref import vit
from mrc_ref.formats import read_safetensors

SHAPES = {"deit_s": {"dim": 384, "depth": 12, "mlp": 1536, "patch": 16, "grid": 14, "heads": 6},
          "deit_b": {"dim": 768, "depth": 12, "mlp": 3072, "patch": 16, "grid": 14, "heads": 12}}
MATCH_RTOL = {"float64": 1e-10, "float32": 1e-4}


def emit(**fields):
    print(json.dumps(fields), flush=True)


def openblas_threads():
    """``{library file: threads}`` of every OpenBLAS loaded in this process
    (NumPy and SciPy each ship their own)."""
    out = {}
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for symbol in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                       "openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(handle, symbol, None)
            if fn is not None:
                out[os.path.basename(lib)] = int(fn())
                break
    return out


def set_openblas_threads(n):
    """Set the thread count of every OpenBLAS loaded in this process."""
    for lib in openblas_threads() or {}:
        path = next(line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(lib))
        handle = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                       "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, symbol, None)
            if fn is not None:
                fn(int(n))
                break


def machine(torch=None):
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
        "openblas_threads": openblas_threads(),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "python": platform.python_version(),
    }


def interleaved_times(fns, repeats):
    """``{key: [seconds] * repeats}``: one untimed warm-up of each function
    (BLAS threads, caches, lazy imports), then ``repeats`` rounds that time
    every function once in turn, so that a change of load on a shared
    machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------- models and images
def deit_params(label, seed=0):
    """A random ViT of the shapes ``SHAPES[label]`` (float32) and its head count."""
    rng = np.random.default_rng(seed)
    c = SHAPES[label]
    return random_vit(rng, dim=c["dim"], depth=c["depth"], mlp=c["mlp"], classes=1000, patch=c["patch"],
                      grid=c["grid"], dtype=np.float32), c["heads"]


def calibration_images(count, size):
    paths = list_images(example_data.CALIB_IMAGES)[0]
    paths = [paths[i % len(paths)] for i in range(count)]
    return np.stack([load_image(p, size=size) for p in paths])


def batches(x, batch_size):
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


# ----------------------------------------------------------------- PyTorch
def torch_model(params, num_heads, dtype):
    """A timm-layout ViT in ``torch.nn`` loaded with ``params`` (head excluded)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d = params["cls_token"].shape[-1]
    p = params["patch_embed.proj.weight"].shape[-1]
    depth = vit.depth(params)
    mlp = params["blocks.0.mlp.fc1.weight"].shape[0]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.proj(o.transpose(1, 2).reshape(b, t, d))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=vit.LN_EPS), nn.LayerNorm(d, eps=vit.LN_EPS)
            self.attn, self.mlp = Attention(), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, d, p, stride=p)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(params["pos_embed"].shape))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))

        def forward(self, x):
            x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            return x

    model = ViT()
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in params.items() if not k.startswith(("head", "norm."))}
    model.load_state_dict(state, strict=True)
    return model.to(getattr(torch, dtype)).eval()


def torch_capture(model, images, batch_size, names):
    """Run ``model`` over ``images`` with hooks that accumulate the statistics;
    returns ``{name: {gram, sum, rows, gram_normalized}}`` as float64 NumPy."""
    import torch

    acc, handles = {}, []

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            b, t, n = x.shape
            flat = x.reshape(b * t, n)
            if name not in acc:
                acc[name] = {"gram": torch.zeros(n, n, dtype=torch.float64), "sum": torch.zeros(n, dtype=torch.float64),
                             "rows": 0, "gram_normalized": torch.zeros(n, n, dtype=torch.float64)}
            st = acc[name]
            st["gram"] += (flat.T @ flat).double()
            st["sum"] += flat.sum(0, dtype=torch.float64)
            st["rows"] += b * t
            y = output - module.bias
            energy = (y * y).reshape(b, -1).sum(1, dtype=torch.float64)
            scaled = (x * energy.rsqrt().to(x.dtype)[:, None, None]).reshape(b * t, n)
            st["gram_normalized"] += (scaled.T @ scaled).double()

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    dtype = next(model.parameters()).dtype
    try:
        with torch.inference_mode():
            count = 0
            for chunk in batches(images, batch_size):
                model(torch.from_numpy(chunk).to(dtype))
                count += len(chunk)
    finally:
        for h in handles:
            h.remove()
    return {name: {"gram": st["gram"].numpy(), "sum": st["sum"].numpy(), "rows": st["rows"],
                   "gram_normalized": (st["gram_normalized"] / count).numpy()} for name, st in acc.items()}


def torch_forward(model, images, batch_size):
    import torch

    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for chunk in batches(images, batch_size):
            model(torch.from_numpy(chunk).to(dtype))


# ----------------------------------------------------------------- figures
def numpy_capture(params, heads, images, batch_size, dtype, prepared=None):
    return capture_statistics(prepared or params, batches(images, batch_size), num_heads=heads, proxy_images=0,
                              xp=np, dtype=np.dtype(dtype))[0]


def numpy_forward(prepared, heads, images, batch_size, dtype):
    for chunk in batches(images, batch_size):
        vit.blocks(prepared, vit.embed(prepared, chunk.astype(dtype), np), heads, np)


def max_rel_diff(a, b):
    worst = 0.0
    for name, st in a.items():
        for key in ("gram", "sum", "gram_normalized"):
            ref = st[key]
            worst = max(worst, float(np.abs(b[name][key] - ref).max() / np.abs(ref).max()))
        if st["rows"] != b[name]["rows"]:
            return math.inf
    return worst


def run_model(label, params, heads, images, args, torch):
    names = block_linear_names(params)
    common = {"model": label, "images": len(images), "batch_size": args.batch_size, "tokens": int(
        params["pos_embed"].shape[1]), "width": int(params["cls_token"].shape[-1]), "blocks": vit.depth(params)}
    for dtype in ("float32", "float64"):
        prepared = vit.prepare(params, np, np.dtype(dtype))
        models = {}
        if torch is not None:
            model = torch_model(params, heads, dtype)
            check = images[: min(len(images), 2 * args.batch_size)]
            diff = max_rel_diff(numpy_capture(params, heads, check, args.batch_size, dtype, prepared),
                                torch_capture(model, check, args.batch_size, names))
            ok = diff <= MATCH_RTOL[dtype]
            emit(name="torch_matches_numpy", dtype=dtype, value=diff, unit="max |torch - numpy| / max |numpy| per matrix",
                 target=f"<= {MATCH_RTOL[dtype]:g}", meets_target=bool(ok), **common)
            if ok:
                models["torch"] = model
        fns = {("numpy", "capture_images_per_s"): lambda: numpy_capture(params, heads, images, args.batch_size,
                                                                         dtype, prepared),
               ("numpy", "forward_images_per_s"): lambda: numpy_forward(prepared, heads, images, args.batch_size,
                                                                         dtype)}
        if "torch" in models:
            m = models["torch"]
            fns["torch", "capture_images_per_s"] = lambda: torch_capture(m, images, args.batch_size, names)
            fns["torch", "forward_images_per_s"] = lambda: torch_forward(m, images, args.batch_size)
        times = interleaved_times(fns, args.repeats)
        rate = {}
        for (impl, figure), ts in times.items():
            med = statistics.median(ts)
            rate[impl, figure] = len(images) / med
            emit(name=figure, impl=impl, dtype=dtype, value=round(len(images) / med, 3), unit="images/s",
                 median_s=round(med, 4), times_s=[round(t, 4) for t in ts], **common, machine=machine(torch))
        if "torch" in models:
            for figure in ("capture_images_per_s", "forward_images_per_s"):
                ratio = rate["numpy", figure] / rate["torch", figure]
                target = figure == "capture_images_per_s"  # the forward alone is reported, not targeted
                emit(name="numpy_over_torch", of=figure, dtype=dtype, value=round(ratio, 3),
                     unit="numpy images/s / torch images/s", target=">= 0.5" if target else None,
                     meets_target=bool(ratio >= 0.5) if target else None, **common)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few images, one repeat: a smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=32, help="images per timed run of deit_s/deit_b (example: 10x)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="deit_s,example")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every OpenBLAS and of torch (default: as the libraries start)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.images, args.batch_size = 1, 4, 4
    try:
        import torch
    except ImportError:
        torch = None
        emit(name="torch", available=False,
             note="PyTorch is not installed: NumPy figures only (pip install torch==2.13.0 for the comparison)")
    import scipy.linalg.blas  # noqa: F401  (load SciPy's OpenBLAS too, so that its threads are set and shown)

    if args.threads is not None:
        set_openblas_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    emit(name="machine", **machine(torch))
    for label in args.model.split(","):
        if label in SHAPES:
            params, heads = deit_params(label)
            images = calibration_images(args.images, SHAPES[label]["patch"] * SHAPES[label]["grid"])
        elif label == "example":
            tensors, meta = read_safetensors(example_data.WEIGHTS)
            params, heads = tensors, vit.resolve_num_heads(tensors, None, meta)
            images = calibration_images(10 * args.images, 16)
        else:
            sys.exit(f"unknown model {label!r}")
        run_model(label, params, heads, images, args, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
