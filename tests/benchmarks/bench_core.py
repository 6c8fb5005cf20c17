"""Core-path benchmarks of mrc_ref (a script, not a pytest module).

Prints one JSON line per figure: ``name``, ``value`` (and other values),
``unit``, ``target``, ``meets_target`` (bool). Timings are never asserted.

Figures
-------
1. ``gram_stream_vs_inmemory``: ``accumulate_gram`` fed by chunks read from an
   HDF5 file of float32 token rows, against ``X.T @ X`` on the same rows loaded
   in memory as float64. The streamed time INCLUDES the HDF5 reads (from the
   page cache: the file has just been written) and the float32 -> float64
   conversion; the in-memory time EXCLUDES loading and converting ``X``.
   Value: in-memory time / streamed time (target >= 0.9). Also timed: the
   chunks read with ``read_direct`` into one preallocated buffer.
2. ``stages12_deit_b_float64`` / ``..._float32``: ``output_basis`` +
   ``nmse_curve`` on the 48 DeiT-B linears plus ``greedy`` (q = 8, budget at
   reduction 0.6 of 86,567,656 parameters) on synthetic positive definite
   Grams with a decaying spectrum. Gram and weight construction are not timed.
   Target <= 30 s.
3. ``gram_stream_peak_memory``: tracemalloc peak (numpy buffers are tracked;
   HDF5's own C allocations are not) of streaming ``accumulate_gram`` from HDF5
   at 1x and 10x the token count, each in a fresh subprocess. Target: relative
   difference <= 10 %. The subprocess's VmHWM (peak RSS) is reported alongside.

4. ``allocation_optimal_deit_b``: the exact Stage-2 optimum (``allocate.optimal``,
   dynamic programming) for the 48 DeiT-B linears at reduction 0.6, q = 8,
   on synthetic spectra (the DP's cost depends on the shapes and the budget
   only), with the METHOD greedy's time and relative gap beside it. Target <= 5 s.
5. ``stage3_exact_vs_adam_fc1``: the exact Stage-3 solve (``compensate.solve``,
   ``solver="exact"``) against 500 Adam steps on a DeiT-B fc1 (3072 x 768),
   rank r = 64, q = 8, sequential-style Grams. Value: Adam time / exact time,
   with both damped losses.
6. ``sequential_peak_memory``: tracemalloc peak of the sequential Stage 3
   (``sequential.compensate_sequential`` with disk-backed scratch, proxy tokens
   read from HDF5 batch by batch) on the embedded example's model, at 300 and
   4,800 proxy images, each in a fresh subprocess. Target: relative
   difference <= 10 %.

Usage: ``python tests/benchmarks/bench_core.py [--quick] [--repeats N] [--only 1,2,3,4,5,6] [--blas-threads 1]``
(on a shared/loaded machine, ``--blas-threads 1`` gives far steadier timings).
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

from mrc_ref import allocate, compensate, stats, svd

#: DeiT-B: every stored tensor, as timm stores it.
DEIT_B_TOTAL_PARAMS = 86_567_656
DEIT_B_BLOCK = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # qkv, proj, fc1, fc2
DATASET = "tokens"


def emit(**fields):
    print(json.dumps(fields), flush=True)


def median_time(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def blas_threads():
    try:
        from threadpoolctl import threadpool_info

        return [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]
    except ImportError:  # optional
        return None


def machine():
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
        "blas_threads": blas_threads(),
        "note": "shared machine: timings are noisy, see loadavg",
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- HDF5 data


def write_tokens(path, rows, n, hdf5_chunk_rows, seed=0, dtype=np.float32):
    """Token rows of ``dtype`` with correlated features (not timed)."""
    import h5py

    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    block = 16384
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(DATASET, shape=(rows, n), dtype=dtype, chunks=(min(hdf5_chunk_rows, rows), n))
        for i in range(0, rows, block):
            k = min(block, rows - i)
            ds[i : i + k] = rng.standard_normal((k, n), dtype=np.float32) @ mix + 0.1


def chunks_slicing(ds, chunk):
    """Plain h5py slicing: a fresh array per chunk."""
    for i in range(0, ds.shape[0], chunk):
        yield ds[i : i + chunk]


def chunks_read_direct(ds, chunk, dtype=None):
    """``read_direct`` into one preallocated buffer (the same buffer is yielded
    every time: the consumer must be done with it before asking for the next)."""
    buf = np.empty((chunk, ds.shape[1]), dtype=dtype or ds.dtype)
    for i in range(0, ds.shape[0], chunk):
        k = min(chunk, ds.shape[0] - i)
        ds.read_direct(buf, np.s_[i : i + k], np.s_[0:k])
        yield buf[:k]


# --------------------------------------------------------------------------- figure 1


def bench_stream(args, tmpdir):
    import h5py

    rows, n, chunk = args.rows, args.features, args.chunk
    path = os.path.join(tmpdir, "tokens_stream.h5")
    write_tokens(path, rows, n, args.hdf5_chunk_rows, dtype=np.dtype(args.token_dtype))

    with h5py.File(path, "r") as f:
        ds = f[DATASET]
        x32 = ds[:]
    X = x32.astype(np.float64)  # load + convert: excluded from the baseline
    del x32

    def inmemory():
        return X.T @ X

    def inmemory_with_sum():
        return X.T @ X, X.sum(axis=0)

    def streamed(make_chunks, acc):
        def run():
            with h5py.File(path, "r") as f:
                return acc(make_chunks(f[DATASET], chunk), np)

        return run

    variants = {
        "inmemory": inmemory,
        "inmemory_with_sum": inmemory_with_sum,
        "stream_slicing": streamed(chunks_slicing, stats.accumulate_gram),
        "stream_read_direct": streamed(chunks_read_direct, stats.accumulate_gram),
    }
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    results = {}
    for fn in variants.values():  # warm-up: BLAS threads, page cache, allocator (not timed)
        fn()
    # interleave the variants so that load drifts hit all of them alike
    for _ in range(args.repeats):
        for name, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}

    ref = results["inmemory"]
    scale = float(np.abs(ref).max())
    errors = {
        name: float(np.abs(r["gram"] - ref).max() / scale)
        for name, r in results.items() if name.startswith("stream")
    }
    assert all(r["rows"] == rows for name, r in results.items() if name.startswith("stream"))

    # overhead breakdown of the streamed path (one pass each, medians over repeats)
    def read_only():
        with h5py.File(path, "r") as f:
            for c in chunks_slicing(f[DATASET], chunk):
                pass

    def read_direct_only():
        with h5py.File(path, "r") as f:
            for c in chunks_read_direct(f[DATASET], chunk):
                pass

    def convert_only():
        c32 = np.ones((chunk, n), np.float32)
        for _ in range(0, rows, chunk):
            np.asarray(c32, dtype=np.float64)

    def syrk_only():
        x = np.ones((chunk, n))
        for _ in range(0, rows, chunk):
            x.T @ x

    breakdown = {name: median_time(fn, args.repeats)[0]
                 for name, fn in [("read_slicing", read_only), ("read_direct", read_direct_only),
                                  ("convert_f32_to_f64_fresh_alloc", convert_only), ("syrk_chunks_only", syrk_only)]}
    os.remove(path)

    ratio = med["inmemory"] / med["stream_slicing"]
    best = min((v for k, v in med.items() if k.startswith("stream")))
    best_name = min((k for k in med if k.startswith("stream")), key=med.get)
    emit(
        name="gram_stream_vs_inmemory", token_dtype=args.token_dtype,
        value=round(ratio, 3),
        unit="ratio (in-memory time / streamed time, higher is better)",
        target=">= 0.9",
        meets_target=bool(ratio >= 0.9),
        streamed_variant="stats.accumulate_gram fed by h5py slicing",
        best_streamed_variant=best_name,
        best_ratio=round(med["inmemory"] / best, 3),
        ratio_vs_inmemory_with_sum=round(med["inmemory_with_sum"] / med["stream_slicing"], 3),
        median_s={k: round(v, 3) for k, v in med.items()},
        runs_s={k: [round(t, 3) for t in v] for k, v in times.items()},
        ratios={k: round(med["inmemory"] / v, 3) for k, v in med.items() if k.startswith("stream")},
        cpu_ratio=round(med_cpu["inmemory"] / med_cpu["stream_slicing"], 3),
        cpu_ratios={k: round(med_cpu["inmemory"] / v, 3) for k, v in med_cpu.items() if k.startswith("stream")},
        median_cpu_s={k: round(v, 3) for k, v in med_cpu.items()},
        overhead_breakdown_s={k: round(v, 3) for k, v in breakdown.items()},
        max_rel_gram_error_vs_inmemory=errors,
        rows=rows, features=n, chunk_rows=chunk, hdf5_chunk_rows=args.hdf5_chunk_rows,
        notes="streamed time includes HDF5 reads (warm page cache) and float32->float64 conversion; "
              "in-memory time excludes loading/converting X (float64 X.T @ X only); medians of interleaved runs "
              "after one warm-up each; value is the wall-clock ratio, cpu_ratio the same on process CPU time "
              "(less sensitive to other jobs when BLAS runs one thread)",
        blas_threads_requested=args.blas_threads,
        machine=machine(),
    )


# --------------------------------------------------------------------------- figure 2


def synthetic_gram(n, rng, dtype, k=512, floor=1e-3):
    """Positive definite ``C = G Gᵀ / k + floor·I`` with a decaying spectrum:
    ``G`` is ``n × k`` Gaussian with column scales ``j^-1`` (``k ≤ n`` keeps
    the construction cheap; the ridge makes ``C`` definite)."""
    k = min(k, n)
    g = rng.standard_normal((n, k)) * (np.arange(1, k + 1) ** -1.0)
    c = (g @ g.T) / k
    c[np.diag_indices(n)] += floor
    return c.astype(dtype)


def deit_b_shapes():
    return [s for _ in range(12) for s in DEIT_B_BLOCK]


def bench_stages(args, dtype):
    rng = np.random.default_rng(1)
    shapes = deit_b_shapes()[: args.layers]
    grams = {}
    stage1 = []
    stage1_cpu = []
    curves = []
    for m, n in shapes:
        if n not in grams or not args.share_grams:
            grams[n] = synthetic_gram(n, rng, dtype)  # not timed
        W = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(dtype)  # not timed
        C = grams[n]
        c0, t0 = time.process_time(), time.perf_counter()
        U, s2 = svd.output_basis(W, C, np)
        curve = svd.nmse_curve(s2, np)
        stage1.append(time.perf_counter() - t0)
        stage1_cpu.append(time.process_time() - c0)
        curves.append(curve)
        del U

    q = 8
    linear = sum(m * n for m, n in deit_b_shapes())
    fixed = DEIT_B_TOTAL_PARAMS - linear
    if args.layers < 48:  # scale the budget to the layers actually run
        linear = sum(m * n for m, n in shapes)
    budget = int((1 - 0.6) * (fixed + linear))
    t0 = time.perf_counter()
    ranks = allocate.greedy(curves, shapes, q, fixed, budget)
    t_greedy = time.perf_counter() - t0
    stored = allocate.total_params(shapes, ranks, q, fixed)
    per_shape = {}
    for (m, n), t in zip(shapes, stage1):
        per_shape.setdefault(f"{m}x{n}", []).append(t)
    return {
        "stage1_s": sum(stage1),
        "stage1_cpu_s": sum(stage1_cpu),
        "greedy_s": t_greedy,
        "total_s": sum(stage1) + t_greedy,
        "stage1_median_per_shape_s": {k: round(statistics.median(v), 4) for k, v in per_shape.items()},
        "budget": budget,
        "stored_params": stored,
        "fixed": fixed,
        "dense_layers": sum(r is None for r in ranks),
    }


def bench_stages_all(args):
    for dtype in (np.float64, np.float32):
        runs = [bench_stages(args, dtype) for _ in range(args.repeats)]
        totals = [r["total_s"] for r in runs]
        med = statistics.median(totals)
        mid = runs[totals.index(sorted(totals)[len(totals) // 2])]
        emit(
            name=f"stages12_deit_b_{np.dtype(dtype).name}",
            value=round(med, 3),
            unit="s (Stage 1 output_basis + nmse_curve over all layers, plus greedy)",
            target="<= 30",
            meets_target=bool(med <= 30),
            layers=args.layers,
            runs_total_s=[round(t, 3) for t in totals],
            stage1_s=round(mid["stage1_s"], 3),
            runs_stage1_cpu_s=[round(r["stage1_cpu_s"], 3) for r in runs],
            blas_threads_requested=args.blas_threads,
            greedy_s=round(mid["greedy_s"], 4),
            stage1_median_per_shape_s=mid["stage1_median_per_shape_s"],
            greedy_q=8, reduction=0.6, total_params=DEIT_B_TOTAL_PARAMS, fixed_params=mid["fixed"],
            budget=mid["budget"], stored_params=mid["stored_params"], dense_layers=mid["dense_layers"],
            notes="synthetic PD Grams (C = G G^T / 512 + 1e-3 I, G n x 512 with column scales 1/j), one per "
                  "layer unless --share-grams, and Gaussian W; "
                  "their construction is not timed; median over repeats",
            machine=machine(),
        )


# --------------------------------------------------------------------------- figure 3

def vm_hwm_kib():
    """Peak resident set of this process (``VmHWM``; unlike ``ru_maxrss`` it is
    not inherited from the parent across fork + exec). ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_child(path, chunk, variant):
    """Run in a fresh interpreter: tracemalloc peak of one streamed accumulation."""
    import tracemalloc

    import h5py

    tracemalloc.start()
    with h5py.File(path, "r") as f:
        ds = f[DATASET]
        if variant == "accumulate_gram":
            out = stats.accumulate_gram(chunks_slicing(ds, chunk), np)
        elif variant == "read_direct":
            out = stats.accumulate_gram(chunks_read_direct(ds, chunk), np)
        else:
            raise SystemExit(f"unknown variant {variant}")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"peak": peak, "rows": out["rows"], "maxrss_kib": vm_hwm_kib()}))


def bench_memory(args, tmpdir):
    n, chunk = args.features, args.chunk
    small = args.mem_rows
    counts = [small, 10 * small]
    variants = ("accumulate_gram", "read_direct")
    peaks = {v: [] for v in variants}
    rss = {v: [] for v in variants}
    for rows in counts:
        path = os.path.join(tmpdir, f"tokens_mem_{rows}.h5")
        write_tokens(path, rows, n, args.hdf5_chunk_rows, seed=2)
        for v in variants:
            p_runs, r_runs = [], []
            for _ in range(args.repeats):
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_mem-child", path, str(chunk), v],
                                      check=True, capture_output=True, text=True)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                assert res["rows"] == rows
                p_runs.append(res["peak"])
                r_runs.append(res["maxrss_kib"])
            peaks[v].append(statistics.median(p_runs))
            rss[v].append(statistics.median(r_runs))
        os.remove(path)
    rel = {v: (p[1] - p[0]) / p[0] for v, p in peaks.items()}
    main_v = "accumulate_gram"
    emit(
        name="gram_stream_peak_memory",
        value=[round(p / 2**20, 2) for p in peaks[main_v]],
        unit="MiB (tracemalloc peak of stats.accumulate_gram fed by h5py slicing, at 1x and 10x rows)",
        relative_difference=round(rel[main_v], 4),
        target="relative difference <= 0.10",
        meets_target=bool(abs(rel[main_v]) <= 0.10),
        rows=counts, features=n, chunk_rows=chunk,
        one_chunk_mib={"float32": round(chunk * n * 4 / 2**20, 2), "float64": round(chunk * n * 8 / 2**20, 2)},
        gram_mib=round(n * n * 8 / 2**20, 2),
        read_direct_peak_mib=[round(p / 2**20, 2) for p in peaks["read_direct"]],
        read_direct_relative_difference=round(rel["read_direct"], 4),
        peak_rss_mib={v: [round(r / 1024, 1) if r else None for r in rs] for v, rs in rss.items()},
        data_mib=[round(c * n * 4 / 2**20, 1) for c in counts],
        notes="fresh subprocess per measurement, median of repeats; tracemalloc tracks numpy buffers, not HDF5's "
              "C heap; peak_rss (VmHWM) is the whole process (interpreter, libraries, HDF5). The 1x row count must span "
              "at least two full chunks, else the 1x peak misses the steady state (previous chunk still alive)",
        machine=machine(),
    )


# --------------------------------------------------------------------------- figures 4 and 5
def synthetic_curves(shapes, rng):
    """NMSE curves of decaying spectra, one per layer (their values do not
    change the DP's cost)."""
    curves = []
    for m, n in shapes:
        k = min(m, n)
        s2 = np.sort(np.exp(-np.arange(k) / (k * rng.uniform(0.05, 0.4))) * rng.uniform(0.5, 1.5, size=k))[::-1]
        curves.append(svd.nmse_curve(s2, np))
    return curves


def bench_allocation(args):
    shapes = deit_b_shapes()
    curves = synthetic_curves(shapes, np.random.default_rng(2))
    q, fixed = 8, DEIT_B_TOTAL_PARAMS - sum(m * n for m, n in shapes)
    budget = allocate.parameter_budget(DEIT_B_TOTAL_PARAMS, 0.6)
    times, greedy_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ranks, bound, exact = allocate.optimal(curves, shapes, q, fixed, budget)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        greedy = allocate.greedy(curves, shapes, q, fixed, budget)
        greedy_times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    emit(name="allocation_optimal_deit_b", value=round(med, 3), unit="s (exact DP, 48 DeiT-B linears)",
         target="<= 5", meets_target=bool(med <= 5), runs_s=[round(t, 3) for t in times], exact=exact,
         objective=allocate.objective(curves, ranks), lower_bound=bound,
         greedy_s=round(statistics.median(greedy_times), 4),
         greedy_relative_gap=allocate.relative_gap(allocate.objective(curves, greedy), bound),
         reduction=0.6, q=q, budget=budget, machine=machine())


def bench_stage3(args):
    rng = np.random.default_rng(3)
    m, n, r, q = 3072, 768, 64, 8
    X = rng.standard_normal((8192, n)) * (np.arange(1, n + 1) ** -0.5)  # decaying input scales
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    W = rng.standard_normal((m, n)) / np.sqrt(n)
    A, B = svd.factors(W, svd.output_basis(W, C, np)[0], r)
    res = {}
    for solver in ("exact", "adam"):
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, _, info = compensate.solve(W, A, B, q, C, K=K, Ct=Ct, solver=solver, damp=compensate.DEFAULT_DAMP,
                                          steps=500, xp=np)
            runs.append(time.perf_counter() - t0)
        res[solver] = (statistics.median(runs), info)
    emit(name="stage3_exact_vs_adam_fc1", value=round(res["adam"][0] / res["exact"][0], 2),
         unit="Adam (500 steps) time / exact time, DeiT-B fc1 3072x768, r = 64, q = 8",
         exact_s=round(res["exact"][0], 3), adam_s=round(res["adam"][0], 3),
         exact_loss=res["exact"][1]["loss_stage3"], adam_loss=res["adam"][1]["loss_stage3"],
         damping=compensate.DEFAULT_DAMP, machine=machine())


# --------------------------------------------------------------------------- figure 6
def seq_child(path, images):
    """Run in a fresh interpreter: tracemalloc peak of the sequential Stage 3
    on the example's model with ``images`` proxy images read from ``path``."""
    import tracemalloc

    import h5py

    from data_tools import example_data
    from mrc_ref import formats, pipeline, sequential, vit

    tensors, meta = formats.read_safetensors(example_data.WEIGHTS)
    config = pipeline.Config()
    params = vit.prepare(tensors, np)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    factors = {}
    for index, name in enumerate(names):
        W = params[name + ".weight"]
        U = np.linalg.qr(np.random.default_rng(index).standard_normal((W.shape[0], 8)))[0]
        factors[name] = (index, W, U, U.T @ W)  # any rank-8 factors: memory, not quality, is measured
    with h5py.File(path, "r") as f, formats.scratch_space() as scratch:
        tokens = f["tokens"]
        tracemalloc.start()
        sequential.compensate_sequential(params, factors, tokens, config, num_heads=vit.resolve_num_heads(
            tensors, None, meta), xp=np, scratch=scratch)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(json.dumps({"peak": peak, "images": images, "maxrss_kib": vm_hwm_kib()}))


def bench_sequential_memory(args, tmpdir):
    import h5py

    from data_tools import example_data
    from mrc_ref import formats

    with formats.open_activations(example_data.ACTS) as f:
        proxy = formats.read_proxy_tokens(f)
    peaks, rss = [], []
    counts = (300, 4800) if not args.quick else (300, 1200)
    for count in counts:
        path = os.path.join(tmpdir, f"tokens{count}.h5")
        with h5py.File(path, "w") as f:  # the example's proxy tokens, repeated
            f["tokens"] = np.resize(proxy, (count,) + proxy.shape[1:])
        runs = []
        for _ in range(max(1, args.repeats)):
            out = subprocess.run([sys.executable, __file__, "--_seq-child", path, str(count)], check=True,
                                 capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        peaks.append(statistics.median(r["peak"] for r in runs))
        rss.append(statistics.median(r["maxrss_kib"] or 0 for r in runs))
    rel = (peaks[1] - peaks[0]) / peaks[0]
    emit(name="sequential_peak_memory", value=[round(p / 2**20, 2) for p in peaks],
         unit=f"MiB (tracemalloc peak of compensate_sequential at {counts[0]} and {counts[1]} proxy images)",
         relative_difference=round(rel, 4), target="<= 0.10", meets_target=bool(abs(rel) <= 0.10),
         peak_rss_mib=[round(r / 1024, 1) for r in rss], images=list(counts),
         notes="batches of 64 images; token streams in disk-backed scratch arrays; proxy tokens sliced from HDF5; "
               "peak_rss (VmHWM) is the whole process and includes the page cache of the memory-mapped streams",
         machine=machine())


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement (median reported)")
    p.add_argument("--only", default="1,2,3,4,5,6", help="comma list of figures to run (1,...,6)")
    p.add_argument("--rows", type=int, default=None, help="token rows for figure 1 (default 200000)")
    p.add_argument("--features", type=int, default=768)
    p.add_argument("--chunk", type=int, default=8192, help="rows per streamed chunk")
    p.add_argument("--token-dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the token rows in the HDF5 file of figure 1 (float64: like for like "
                        "with the in-memory baseline, no conversion)")
    p.add_argument("--hdf5-chunk-rows", type=int, default=1024, help="HDF5 storage chunk (rows)")
    p.add_argument("--mem-rows", type=int, default=None, help="1x token rows for figure 3 (default 20000)")
    p.add_argument("--layers", type=int, default=None, help="DeiT-B layers for figure 2 (default 48)")
    p.add_argument("--share-grams", action="store_true",
                   help="one synthetic Gram per input size instead of one per layer (faster setup)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="limit BLAS threads (threadpoolctl); default: BLAS's own setting")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--_mem-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_seq-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._seq_child:
        return seq_child(args._seq_child[0], int(args._seq_child[1]))
    if args._mem_child:
        path, chunk, variant = args._mem_child
        return mem_child(path, int(chunk), variant)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rows is None:
        args.rows = 40_000 if args.quick else 200_000
    if args.mem_rows is None:
        args.mem_rows = 20_000
    if args.layers is None:
        args.layers = 8 if args.quick else 48
    if args.quick:
        args.share_grams = True
    only = {s.strip() for s in args.only.split(",")}
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads)
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="mrc_bench_") as tmpdir:
        if "1" in only:
            bench_stream(args, tmpdir)
        if "2" in only:
            bench_stages_all(args)
        if "3" in only:
            bench_memory(args, tmpdir)
        if "4" in only:
            bench_allocation(args)
        if "5" in only:
            bench_stage3(args)
        if "6" in only:
            bench_sequential_memory(args, tmpdir)


if __name__ == "__main__":
    main()
