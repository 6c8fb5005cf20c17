"""Stage 1 against SVD-LLM's whitening route in PyTorch (a script, not a pytest module).

Figure ``stage1_deit_b_vs_torch``: Stage 1 for 16 DeiT-B shapes (4 blocks ×
qkv 2304×768, proj 768×768, fc1 3072×768, fc2 768×3072), float64, on
synthetic positive definite Grams (``C = G Gᵀ / 512 + 1e-3 I``, ``G`` n × 512
with column scales ``1/j``, as ``bench_core.py`` figure 2) and random weights.
Three routes do the same work per layer, the output basis and the NMSE curve
at every rank:

* ``ours``: :func:`mrc_ref.svd.output_basis` + :func:`mrc_ref.svd.nmse_curve`
  (m > n: Cholesky square root and the ``n × n`` Gram's ``eigh``; m ≤ n:
  ``eigh(W C Wᵀ)``);
* ``previous``: the route at commit 693e520, copied here (m > n: ``eigh(C)``,
  then the thin SVD of ``W S``), so the speed-up is visible;
* ``torch``: SVD-LLM's whitening route written in PyTorch, float64:
  ``S = cholesky(C)`` (the whitening matrix), ``torch.linalg.svd(W @ S,
  full_matrices=False)``, and the truncation curve ``Σ_{i>r} σ_i² / Σ σ_i²``
  for every rank ``r``.

Value: ours / torch (summed over the 16 layers, median over the repeats;
target ≤ 0.25), with previous / torch and ours / previous beside it. Runs are
interleaved layer by layer, so the load hits the three alike. Also printed:
the largest difference of the NMSE curves against torch's, the load average,
and the BLAS and torch thread counts.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported: torch's OpenMP
workers otherwise spin after each call and starve OpenBLAS's threads (NumPy
up to 5× slower in the same process). ``torch.set_num_threads`` is set to
the BLAS thread count.

Figure ``validate_deit_b``: :func:`mrc_ref.stats.validate` of the same
layers' statistics (``gram`` and ``gram_normalized`` present, statistic
``gram``), against the validation at commit 693e520 (copied here: ``eigvalsh``
of both matrices). Value: ours / previous (lower is better); the verdicts
(all pass) are compared.

Usage: ``python tests/benchmarks/bench_stage1.py [--quick] [--repeats N] [--blas-threads K]``
(``--quick``: one block, 4 layers, one repeat). One untimed warm-up pass over
a block comes first. Timings are never asserted.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) is loaded

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from mrc_ref import svd  # noqa: E402

BLOCK = [("qkv", 2304, 768), ("proj", 768, 768), ("fc1", 3072, 768), ("fc2", 768, 3072)]


def previous_output_basis(W, C, xp):
    """:func:`mrc_ref.svd.output_basis` at commit 693e520 (the speed-up's reference)."""
    m, n = W.shape
    if m <= n:
        s2, U = svd._descending_eigh(W @ C @ W.T, xp, "output Gram W C Wᵀ")
        return svd.canonical_signs(U, xp), s2
    lam, V = svd._descending_eigh(C, xp, "statistic C")
    U, sigma, _ = xp.linalg.svd(W @ (V * xp.sqrt(lam)), full_matrices=False)
    return svd.canonical_signs(U, xp), sigma**2


def previous_validate(raw, n):
    """The validation at commit 693e520: symmetry checks and ``eigvalsh`` of
    ``gram`` and of ``gram_normalized`` (only the PSD part differs from ours)."""
    from mrc_ref.svd import PSD_RTOL

    out = {}
    for key in ("gram", "gram_normalized"):
        c = np.asarray(raw[key], dtype=np.float64)
        if not np.isfinite(c).all() or np.abs(c - c.T).max() > 1e-5 * np.abs(c).max() or np.diag(c).min() < 0:
            raise ValueError(key)
        c = (c + c.T) / 2
        evals = np.linalg.eigvalsh(c)
        if evals[0] < -PSD_RTOL * evals[-1]:
            raise ValueError(key)
        out[key] = c
    return out


def synthetic_gram(n, rng, k=512, floor=1e-3):
    k = min(k, n)
    g = rng.standard_normal((n, k)) * (np.arange(1, k + 1) ** -1.0)
    c = (g @ g.T) / k
    c[np.diag_indices(n)] += floor
    return c


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one block (4 layers), one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--blas-threads", type=int, default=None, help="limit BLAS (and torch) threads")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.blocks = 1, 1

    limiter = None
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(args.blas_threads)
    import torch

    info = blas_threads()
    threads = args.blas_threads or (max(t for _, t in info) if info else os.cpu_count())
    torch.set_num_threads(threads)

    def torch_route(W, C):
        S = torch.linalg.cholesky(C)  # the whitening matrix, C = S Sᵀ
        _, sigma, _ = torch.linalg.svd(W @ S, full_matrices=False)  # U, Σ, Vᵀ of W S
        s2 = sigma**2
        tail = torch.cat([torch.flip(torch.cumsum(torch.flip(s2, (0,)), 0), (0,)), s2.new_zeros(1)])
        return tail / tail[0]

    def ours(W, C):
        U, s2 = svd.output_basis(W, C, np)
        return svd.nmse_curve(s2, np)

    def previous(W, C):
        U, s2 = previous_output_basis(W, C, np)
        return svd.nmse_curve(s2, np)

    rng = np.random.default_rng(0)
    layers = []
    for _ in range(args.blocks):
        for leaf, m, n in BLOCK:
            W = rng.standard_normal((m, n)) / np.sqrt(n)
            C = synthetic_gram(n, rng)
            layers.append((leaf, W, C, torch.from_numpy(W), torch.from_numpy(C)))

    for leaf, W, C, Wt, Ct in layers[: len(BLOCK)]:  # warm-up, not timed (thread pools, first-call costs)
        ours(W, C), previous(W, C), torch_route(Wt, Ct)
    totals = {"ours": [], "previous": [], "torch": []}
    per_leaf = {key: {} for key in totals}
    curve_diff = 0.0
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        run = {key: 0.0 for key in totals}
        for leaf, W, C, Wt, Ct in layers:
            t = time.perf_counter()
            c_ours = ours(W, C)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            c_prev = previous(W, C)
            t_prev = time.perf_counter() - t
            t = time.perf_counter()
            c_torch = torch_route(Wt, Ct).numpy()
            t_torch = time.perf_counter() - t
            for key, value in (("ours", t_ours), ("previous", t_prev), ("torch", t_torch)):
                run[key] += value
                per_leaf[key].setdefault(leaf, []).append(value)
            curve_diff = max(curve_diff, float(np.abs(c_ours - c_torch).max()), float(np.abs(c_prev - c_torch).max()))
        for key in totals:
            totals[key].append(run[key])
        load.append(os.getloadavg()[0])
    med = {key: statistics.median(v) for key, v in totals.items()}
    ratio = med["ours"] / med["torch"]
    print(json.dumps({
        "name": "stage1_deit_b_vs_torch",
        "value": round(ratio, 3),
        "unit": "ratio ours / torch (SVD-LLM whitening route, float64), Stage 1 basis + NMSE curve, "
                f"{len(layers)} DeiT-B layers",
        "target": "<= 0.25",
        "meets_target": bool(ratio <= 0.25),
        "previous_over_torch": round(med["previous"] / med["torch"], 3),
        "ours_over_previous": round(med["ours"] / med["previous"], 3),
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "seconds_runs": {k: [round(x, 3) for x in v] for k, v in totals.items()},
        "seconds_median_per_layer": {key: {leaf: round(statistics.median(v), 4) for leaf, v in d.items()}
                                     for key, d in per_leaf.items()},
        "max_nmse_curve_diff_vs_torch": curve_diff,
        "repeats": args.repeats,
        "loadavg_1m": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "blas_threads": info,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "notes": "runs interleaved layer by layer; shared machine: see loadavg",
    }))

    from mrc_ref import stats

    grams = {}
    for leaf, W, C, _, _ in layers:
        n = W.shape[1]
        if n not in grams:
            grams[n] = {"gram": C, "sum": np.ones(n), "rows": 1000, "gram_normalized": C / 1000}
    timing = {"ours": [], "previous": []}
    for _ in range(args.repeats):
        run = {"ours": 0.0, "previous": 0.0}
        for leaf, W, C, _, _ in layers:
            raw = grams[W.shape[1]]
            t = time.perf_counter()
            stats.validate(raw, W.shape[1], np, statistic="gram")
            run["ours"] += time.perf_counter() - t
            t = time.perf_counter()
            previous_validate(raw, W.shape[1])
            run["previous"] += time.perf_counter() - t
        for key in timing:
            timing[key].append(run[key])
    med = {key: statistics.median(v) for key, v in timing.items()}
    print(json.dumps({
        "name": "validate_deit_b",
        "value": round(med["ours"] / med["previous"], 3),
        "unit": f"ratio ours / previous, stats.validate of {len(layers)} DeiT-B layers (gram and gram_normalized "
                "present, statistic gram), float64",
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "blas_threads": info,
        "notes": "ours: O(n^2) checks of both matrices, Cholesky test of gram only; previous: eigvalsh of both",
    }))
    del limiter


if __name__ == "__main__":
    main()
