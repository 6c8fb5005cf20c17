"""The golden kit's figures (docs/testing.md), one JSON line each: how many
probes of the latest cases each wrong variant of Stage 1 fails under the
README/docs recipe (defaults and ``testing.FLOAT32``); the largest excess of
float32 Stage-1 routes over the optimum; the attainability margins of the
case tolerances for correct float64 implementations (observed error over
allowed error, the largest over all probes: < 1 means attainable); the
product differences on singular Grams.

    python tests/benchmarks/golden_kit_figures.py [--version v2]

Not a timing: the figures do not depend on the load (printed anyway) or the
thread count, beyond round-off.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for downstream.py

import downstream as ds  # noqa: E402

from mrc_ref import certificates, svd, testing  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def emit(**fields):
    print(json.dumps({**fields, "load": os.getloadavg()[0]}))


def probes(version):
    for case in testing.iter_cases(version=version):
        for name, layer in case["layers"].items():
            for rank, item in layer["expected"]["stage1"].items():
                yield case, name, layer, rank, item


def mrc_ref_factors(W, C, rank):
    U, _ = svd.output_basis(W, C, np)
    return svd.factors(W, U, rank)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=None, help="case version (default: the latest)")
    args = parser.parse_args(argv)
    everything = list(probes(args.version))
    version = everything[0][0]["version"]

    routes = {
        "float32 output Gram eigendecomposition": lambda W, C, r, lay: ds.stage1_output_gram(W, C, r, np.float32),
        "float32 whitening, every positive eigenvalue kept": lambda W, C, r, lay: ds.stage1(W, C, r, np.float32),
        "float32 whitening, cut at eps lambda_max": lambda W, C, r, lay: ds.stage1(W, C, r, np.float32, EPS32),
        "float32 whitening, cut at n eps lambda_max": lambda W, C, r, lay: ds.stage1(W, C, r, np.float32,
                                                                                     C.shape[0] * EPS32),
        "float64 whitening (independent)": lambda W, C, r, lay: ds.stage1(W, C, r),
        "float64 output Gram (independent)": lambda W, C, r, lay: ds.stage1_output_gram(W, C, r),
        "mrc_ref svd.factors": lambda W, C, r, lay: mrc_ref_factors(W, C, r),
    }
    presets = {"defaults": {}, "FLOAT32": dict(testing.FLOAT32)}
    for label, impl in {**routes, **ds.VARIANTS}.items():
        failed = {p: 0 for p in presets}
        worst_abs = worst_rel = 0.0
        nmse_off = product_off = 0.0
        for case, name, layer, rank, item in everything:
            W, C = layer["W"], layer["C"]
            A, B = impl(W, C, rank, layer)
            for preset, tol in presets.items():
                try:
                    testing.assert_stage1_optimal(W, C, A, B, rank=rank, layer=name, case=case, **tol)
                except AssertionError:
                    failed[preset] += 1
            if np.shape(A) != (W.shape[0], rank) or np.shape(B) != (rank, W.shape[1]):
                continue
            cert = testing.certify_stage1(W, C, A, B)
            excess = cert["nmse"] - cert["nmse_optimal"]
            worst_abs = max(worst_abs, excess)
            if cert["nmse_optimal"] > testing.EXCESS_FLOOR:
                worst_rel = max(worst_rel, excess / cert["nmse_optimal"])
            nmse_off = max(nmse_off, abs(cert["nmse"] - item["nmse"]))
            if item["product"] is not None:
                L, R = item["product"]
                S = certificates.metric_root(C)  # ‖D‖_C as the kit computes it
                product_off = max(product_off, np.linalg.norm((A @ B - L @ R) @ S) / np.linalg.norm(L @ R @ S))
        emit(version=version, implementation=label, probes=len(everything),
             failed_defaults=failed["defaults"], failed_float32_preset=failed["FLOAT32"],
             max_excess_abs=worst_abs, max_excess_rel=worst_rel, max_nmse_minus_expected=nmse_off,
             max_product_error_in_metric_c=product_off)

    # attainability margins: observed / allowed of every case tolerance, correct float64 implementations
    for label in ("float64 whitening (independent)", "float64 output Gram (independent)", "mrc_ref svd.factors"):
        margins = {}
        for case, name, layer, rank, item in everything:
            W, C = layer["W"], layer["C"]
            A, B = routes[label](W, C, rank, layer)
            tol = case["tolerances"]
            nmse = testing.certify_stage1(W, C, A, B)["nmse"]
            allowed = tol["stage1_nmse"].get("atol", 0) + tol["stage1_nmse"].get("rtol", 0) * abs(item["nmse"])
            margins["stage1_nmse"] = max(margins.get("stage1_nmse", 0), abs(nmse - item["nmse"]) / allowed)
            s2 = ds.spectrum(W, C)
            gap = ds.eigen_gap(s2, rank)
            if gap is not None:
                allowed = tol["stage1_gap"].get("atol", 0) + tol["stage1_gap"].get("rtol", 0) * abs(item["eigen_gap"])
                margins["stage1_gap"] = max(margins.get("stage1_gap", 0), abs(gap - item["eigen_gap"]) / allowed)
            expected = np.asarray(layer["expected"]["spectrum"])
            allowed = tol["spectrum"]["rtol"] * expected.max() + tol["spectrum"].get("atol", 0)
            margins["spectrum"] = max(margins.get("spectrum", 0), np.max(np.abs(s2 - expected)) / allowed)
            curve = ds.nmse_curve(s2)
            margins["nmse_curve"] = max(margins.get("nmse_curve", 0), np.max(np.abs(
                curve - np.asarray(layer["expected"]["nmse_curve"]))) / tol["nmse_curve"]["atol"])
            if item["product"] is not None:
                L, R = item["product"]
                D, ref = A @ B - L @ R, L @ R
                S = certificates.metric_root(C)  # ‖D‖_C as the kit computes it
                err_c, size_c = np.linalg.norm(D @ S), np.linalg.norm(ref @ S)
                margins["stage1_product (metric C)"] = max(margins.get("stage1_product (metric C)", 0),
                                                           err_c / (tol["stage1_product"]["rtol"] * size_c))
                margins["assert_factorization_close gram=C"] = max(
                    margins.get("assert_factorization_close gram=C", 0), err_c / (testing.PRODUCT_RTOL * size_c))
                if np.linalg.matrix_rank(C) == C.shape[0]:
                    margins["assert_factorization_close Frobenius"] = max(
                        margins.get("assert_factorization_close Frobenius", 0),
                        np.linalg.norm(D) / (testing.PRODUCT_RTOL * np.linalg.norm(ref)))
                else:
                    margins["Frobenius difference where C is singular"] = max(
                        margins.get("Frobenius difference where C is singular", 0),
                        np.linalg.norm(D) / np.linalg.norm(ref))
        for comparison, value in margins.items():
            emit(version=version, implementation=label, comparison=comparison, max_observed_over_allowed=value)


if __name__ == "__main__":
    main()
