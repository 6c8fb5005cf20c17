"""ONNX export benchmark: the compressed model on a real engine (a script, not a pytest module).

DeiT-S and DeiT-B shapes (timm: width 384 / 768, 6 / 12 heads, 12 blocks,
MLP 4×, 16×16 patches, 224×224 images, 1000 classes), random weights
(``data_tools.synthetic.random_vit``), compressed at reduction 0.6 with
q = 8 at the ranks of ``allocate.uniform`` (``data_tools.synthetic.factored``:
the timings and sizes depend on the shapes only), int8 as
``compress --quantize int8`` stores it (``quantize.quantize_tensors``).
Each model is exported by ``mrc_ref.export.build_model`` and run by
onnxruntime (CPU, ``intra_op_num_threads`` = ``--threads``, default 2,
graph optimizations at their default level).

Variants (ratios are to ``dense`` of the same model, measured in the same run):

- ``dense``: the float32 model;
- ``compressed``: the factored float32 model;
- ``int8``: the int8 model with onnxruntime's defaults (DequantizeLinear →
  MatMul of ``[B; Q]ᵀ`` and of the dense head become MatMulNBits at
  accuracy level 4, which quantizes the activations too: see
  ``rel_err_vs_forward``);
- ``int8-exact``: the same file, ``session.qdq_matmulnbits_accuracy_level=1``
  (float32 arithmetic, the logits of the dequantized model);
- ``int8-folded``: the same file, ``session.disable_quant_qdq=1`` (the
  dequantization is folded into float32 weights at load: float memory).

Figures, one JSON line each, every one with ``loadavg`` (1, 5, 15 min) and
``threads``:

- ``onnx_bytes``: the file's size (targets: compressed ≤ 0.42×, int8 ≤ 0.12× dense);
- ``latency_b1``, ``latency_b16``: median of ``--repeats`` (≥ 5) runs after
  one warm-up, variants interleaved so that load drifts hit all of them
  (target: compressed ≤ 0.7× dense at batch 16, on ``ratio_to_dense``, the
  ratio of the medians); steadier on a loaded machine are
  ``paired_ratio_to_dense``, the median over rounds of the ratio to dense in
  the same round, and ``min_ratio_to_dense``, the ratio of the fastest runs;
- ``peak_rss_b1``, ``peak_rss_b16``: VmHWM of a fresh process that imports
  onnxruntime, loads the session and runs batch 1 (16) once, and of one that
  only imports (``peak_rss``, ``baseline``);
- ``accuracy``: max |logits − vit.forward (float64)| / max |vit.forward| on 2 images;
- ``op_profile`` (``--profile``): onnxruntime's own profile of one batch-16
  run, time per operator type, and the MatMul shapes of one block.

Usage: ``python tests/benchmarks/bench_export.py [--models deit_s,deit_b] [--repeats 7]
[--threads 2] [--profile] > out.jsonl``; ``--table out.jsonl`` prints the
Markdown table of docs/export.md from a saved output.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from data_tools import synthetic
from mrc_ref import quantize, vit
from mrc_ref import export

MODELS = {"deit_s": dict(dim=384, heads=6), "deit_b": dict(dim=768, heads=12)}
VARIANTS = {
    "dense": ("dense", {}),
    "compressed": ("compressed", {}),
    "int8": ("int8", {}),
    "int8-exact": ("int8", {"session.qdq_matmulnbits_accuracy_level": "1"}),
    "int8-folded": ("int8", {"session.disable_quant_qdq": "1"}),
}
TARGETS = {("onnx_bytes", "compressed"): 0.42, ("onnx_bytes", "int8"): 0.12, ("latency_b16", "compressed"): 0.7}

RSS_SCRIPT = r"""
import sys, json, numpy as np, onnxruntime as ort
path, threads, config, batch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
if path != "-":
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, {"images": np.zeros((batch, 3, 224, 224), np.float32)})
status = open("/proc/self/status").read().split("\n")
print(json.dumps({l.split(":")[0]: int(l.split()[1]) for l in status if l.startswith(("VmHWM", "VmRSS"))}))
"""


def emit(**fields):
    fields["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(fields), flush=True)


def make_models(name):
    """``{"dense", "compressed", "int8"}`` tensors and the metadata of one DeiT shape."""
    shape = MODELS[name]
    t = synthetic.random_vit(np.random.default_rng(0), dim=shape["dim"], depth=12, mlp=4 * shape["dim"],
                             classes=1000, patch=16, grid=14, dtype=np.float32)
    compressed, ranks = synthetic.factored(t, reduction=0.6, residual_rank=8)
    meta = {"num_heads": str(shape["heads"])}
    return {"dense": t, "compressed": compressed, "int8": quantize.quantize_tensors(compressed)}, meta, ranks


def session(path, threads, config, profile=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def peak_rss(path, threads, config, batch):
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, str(threads), json.dumps(config), str(batch)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def op_profile(path, threads, x, prefix, runs=3):
    """Time per operator type, the median over ``runs`` profiled runs (after one
    warm-up), from onnxruntime's own profile; and the MatMul shapes of block 0."""
    s = session(path, threads, {}, profile=prefix)
    for _ in range(runs + 1):
        s.run(None, {"images": x})
    trace = s.end_profiling()
    with open(trace) as fh:
        events = json.load(fh)
    os.unlink(trace)
    model_runs = [e for e in events if e.get("name") == "model_run"][1:]
    per_run = [dict() for _ in model_runs]
    shapes = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, r in enumerate(model_runs):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                op = e["args"].get("op_name", "?")
                per_run[i][op] = per_run[i].get(op, 0) + e["dur"]
                matmul = op in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")
                if i == 0 and matmul and e["name"].startswith("blocks.0."):
                    shapes.append([e["name"].split("/")[0], op,
                                   [list(d.values())[0] for d in e["args"].get("input_type_shape", [])]])
    ops = {op: statistics.median(r.get(op, 0) for r in per_run) for op in per_run[0]}
    total = sum(ops.values())
    order = sorted(ops, key=lambda k: -ops[k])
    return {"run_ms": statistics.median(r["dur"] for r in model_runs) / 1e3, "runs": len(model_runs),
            "ops_ms": {k: round(ops[k] / 1e3, 2) for k in order},
            "ops_share": {k: round(ops[k] / total, 3) for k in order}, "block0_matmuls": shapes}


def bench_model(name, args, tmpdir):
    models, meta, ranks = make_models(name)
    params = {k: int(sum(v.size for v in t.values())) for k, t in models.items()}
    emit(model=name, figure="model", params=params, scale_elements=params["int8"] - params["compressed"],
         ranks=sorted(set(r for r in ranks.values())), residual_rank=8, reduction=0.6,
         note="random weights; uniform allocation; int8 = compress --quantize int8 layout")
    paths, sizes = {}, {}
    for kind, tensors in models.items():
        model = export.build_model(tensors, meta)
        paths[kind] = os.path.join(tmpdir, f"{name}-{kind}.onnx")
        with open(paths[kind], "wb") as fh:
            fh.write(model.SerializeToString())
        sizes[kind] = os.path.getsize(paths[kind])
        elements, scales = export.count_initializers(model)
        assert elements == params[kind], (kind, elements, params[kind])  # the export holds what the file stores
    for kind in ("dense", "compressed", "int8"):
        ratio = sizes[kind] / sizes["dense"]
        target = TARGETS.get(("onnx_bytes", kind))
        emit(model=name, figure="onnx_bytes", variant=kind, value=sizes[kind], unit="bytes",
             ratio_to_dense=round(ratio, 4), target=target,
             meets_target=None if target is None else ratio <= target)

    rng = np.random.default_rng(1)
    inputs = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in (1, 16)}
    sessions = {v: session(paths[kind], args.threads, cfg) for v, (kind, cfg) in VARIANTS.items()}

    # accuracy: each variant against the float64 forward pass of the tensors it was exported from
    x2 = inputs[16][:2]
    refs = {kind: vit.forward(t, x2.astype(np.float64), metadata=meta) for kind, t in models.items()}
    for v, (kind, _) in VARIANTS.items():
        y = sessions[v].run(None, {"images": x2})[0]
        err = float(np.abs(y - refs[kind]).max() / np.abs(refs[kind]).max())
        emit(model=name, figure="accuracy", variant=v, rel_err_vs_forward=err,
             note="max |ort - vit.forward(float64)| / max |vit.forward| over 2 images x 1000 logits")

    for batch in (1, 16):
        x = {"images": inputs[batch]}
        times = {v: [] for v in sessions}
        for s in sessions.values():  # warm-up
            s.run(None, x)
        for _ in range(args.repeats):
            for v, s in sessions.items():  # interleaved: load drifts hit every variant alike
                t0 = time.perf_counter()
                s.run(None, x)
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) for v, t in times.items()}
        for v in sessions:
            ratio = med[v] / med["dense"]
            target = TARGETS.get((f"latency_b{batch}", v))
            paired = statistics.median(t / d for t, d in zip(times[v], times["dense"]))
            emit(model=name, figure=f"latency_b{batch}", variant=v, value=round(med[v], 5), unit="s",
                 times=[round(t, 5) for t in times[v]], ratio_to_dense=round(ratio, 4),
                 min_ratio_to_dense=round(min(times[v]) / min(times["dense"]), 4),
                 paired_ratio_to_dense=round(paired, 4), threads=args.threads,
                 target=target, meets_target=None if target is None else ratio <= target)
    del sessions

    base = peak_rss("-", args.threads, {}, 1)["VmHWM"]
    emit(model=name, figure="peak_rss", variant="baseline", value=base, unit="kB",
         note="python + numpy + onnxruntime imported, no session")
    for batch in (1, 16):
        rss = {v: peak_rss(paths[kind], args.threads, cfg, batch)["VmHWM"] for v, (kind, cfg) in VARIANTS.items()}
        for v in VARIANTS:
            emit(model=name, figure=f"peak_rss_b{batch}", variant=v, value=rss[v], unit="kB", threads=args.threads,
                 ratio_to_dense=round(rss[v] / rss["dense"], 4),
                 ratio_to_dense_above_baseline=round((rss[v] - base) / (rss["dense"] - base), 4),
                 note=f"VmHWM of a fresh process: import, load the session, run batch {batch} once")

    if args.profile:
        for kind in ("dense", "compressed"):
            prof = op_profile(paths[kind], args.threads, inputs[16], os.path.join(tmpdir, f"prof-{name}-{kind}"))
            emit(model=name, figure="op_profile", variant=kind, batch=16, threads=args.threads, **prof)


def table(path):
    """The Markdown table of a JSON-lines output of this script (docs/export.md)."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    fig = {(r.get("model"), r["figure"], r.get("variant")): r for r in rows}
    out = ["| model | variant | ONNX file | latency batch 1 | latency batch 16 | peak RSS batch 1 | "
           "peak RSS batch 16 | logits rel. error |",
           "|---|---|---|---|---|---|---|---|"]
    for model in [m for m in MODELS if (m, "model", None) in fig]:
        for v, (kind, _) in VARIANTS.items():
            size = fig[(model, "onnx_bytes", kind)]
            cells = [model.replace("deit_", "DeiT-").upper().replace("DEIT", "DeiT"), v,
                     f"{size['value'] / 1e6:.1f} MB ({size['ratio_to_dense']:.3f}×)" if v in ("dense", "compressed",
                                                                                            "int8") else "same"]
            for b in (1, 16):
                r = fig[(model, f"latency_b{b}", v)]
                value = f"{r['value'] * 1e3:.0f} ms" if b == 1 else f"{r['value']:.2f} s"
                paired = r.get("paired_ratio_to_dense", float("nan"))
                load = r["loadavg"][0]
                cells.append(f"{value} ({r['ratio_to_dense']:.2f}×; paired {paired:.2f}×; load {load:.1f})")
            for b in (1, 16):
                r = fig[(model, f"peak_rss_b{b}", v)]
                cells.append(f"{r['value'] / 1e3:.0f} MB ({r['ratio_to_dense']:.2f}×)")
            cells.append(f"{fig[(model, 'accuracy', v)]['rel_err_vs_forward']:.1e}")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_s,deit_b", help="comma-separated: deit_s, deit_b (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure, after one warm-up (default: 7)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default: 2)")
    p.add_argument("--profile", action="store_true", help="also print onnxruntime's per-operator profile")
    p.add_argument("--table", metavar="JSONL", help="print the Markdown table of a saved output and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    import onnxruntime

    emit(figure="machine", cpus=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
         onnxruntime=onnxruntime.__version__, threads=args.threads, repeats=args.repeats,
         note="shared machine: timings are noisy, see loadavg")
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in args.models.split(","):
            bench_model(name.strip(), args, tmpdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
