"""Calibrated mixed-rank allocation on the embedded example.

``python -m data_tools.sensitivity_table [--reductions 0.6 0.7 0.8]``
measures the per-layer sensitivity weights of the example from its proxy
tokens (the 300 calibration digits; ``data_tools.sensitivity``), then
compresses it with the uniform, the optimal (``Σ NMSE``) and the optimal
calibrated (``Σ w·NMSE``, ``--sensitivity``) allocations, each without
compensation (``--compensation none``) and with the default sequential exact
compensation at residual rank 8 (the default) and 4 (at reduction 0.8 the
example cannot hold rank 1 + 8 in every layer), at each reduction. It prints
one JSON line per run and a Markdown table on the 497 held-out test digits
(top-1 and the logits NMSE against the original model), with each run's
predictors: ``Σ w_l NMSE_l`` and ``Σ NMSE_l`` at Stage 1 (the allocations'
objectives) and ``Σ w_l NMSE_l`` after Stage 3 (``nmse_stage3``, measured on
the proxy tokens: compensation included); then the Spearman correlation of
each predictor with the measured held-out output NMSE, across all runs and
per compensation. Nothing is tuned on the test digits: they are only measured.
"""

import argparse
import contextlib
import io
import json
import os
import tempfile

from scipy.stats import spearmanr

from mrc_ref import compress, formats, metrics
from mrc_ref.evaluate import model_logits

from . import example_data, sensitivity

ALLOCATIONS = {"uniform": ["--allocation", "uniform"], "optimal": ["--allocation", "optimal"],
               "optimal + sensitivity": ["--allocation", "optimal", "--sensitivity"]}
COMPENSATIONS = {"none": ["--compensation", "none"],
                 "sequential exact, q=8": ["--compensation", "sequential", "--residual-rank", "8"],
                 "sequential exact, q=4": ["--compensation", "sequential", "--residual-rank", "4"]}
PREDICTORS = {"Σ w·NMSE": "predicted_weighted", "Σ NMSE": "predicted_unweighted",
              "Σ w·NMSE after stage 3": "predicted_weighted_stage3"}


def run(reduction, flags, weights, reference, labels, tmp):
    """Compress the example with ``flags``; return the held-out figures and
    both predictors, or ``None`` when the budget is infeasible."""
    out, report = os.path.join(tmp, "c.safetensors"), os.path.join(tmp, "c.json")
    with contextlib.redirect_stdout(io.StringIO()):
        code = compress.main([example_data.WEIGHTS, example_data.ACTS, "-o", out, "--report", report, "--quiet",
                              "--reduction", str(reduction), *flags])
    if code:
        return None
    with open(report) as fh:
        rep = json.load(fh)
    logits, _ = model_logits(out, example_data.TEST_IMAGES)
    layers = rep["layers"]
    return {"top1": metrics.topk_accuracy(logits, labels), "output_nmse": metrics.output_nmse(logits, reference),
            "predicted_weighted": sum(weights[e["name"]] * e["nmse_stage1"] for e in layers),
            "predicted_unweighted": sum(e["nmse_stage1"] for e in layers),
            "predicted_weighted_stage3": sum(weights[e["name"]] * e["nmse_stage3"] for e in layers),
            "layers_factored": rep["totals"]["layers_factored"]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.sensitivity_table",
                                     description="Calibrated mixed-rank allocation on the embedded example.")
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.6, 0.7, 0.8],
                        help="fractions of the stored parameters removed (default: %(default)s)")
    args = parser.parse_args(argv)
    reference, labels = model_logits(example_data.WEIGHTS, example_data.TEST_IMAGES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sens = os.path.join(tmp, "sensitivity.json")
        _, seconds = sensitivity.run(example_data.WEIGHTS, example_data.ACTS, sens)
        weights = {k: v["weight"] for k, v in formats.read_sensitivity(sens)["layers"].items()}
        print(json.dumps({"sensitivity_seconds": seconds, "weights": weights}), flush=True)
        for reduction in args.reductions:
            for comp, cflags in COMPENSATIONS.items():
                for method, aflags in ALLOCATIONS.items():
                    flags = aflags + ([sens] if aflags[-1] == "--sensitivity" else []) + cflags
                    figures = run(reduction, flags, weights, reference, labels, tmp)
                    rows.append((reduction, comp, method, figures))
                    print(json.dumps({"reduction": reduction, "compensation": comp, "method": method,
                                      **(figures or {"infeasible": True})}), flush=True)
    print(f"\noriginal: top-1 {metrics.topk_accuracy(reference, labels):.2%}; sensitivity measured in "
          f"{seconds:.1f} s from the proxy tokens\n")
    print("| reduction | compensation | allocation | top-1 | output NMSE | Σ w·NMSE | Σ NMSE | Σ w·NMSE after stage 3 |\n"
          "|---|---|---|---|---|---|---|---|")
    for reduction, comp, method, f in rows:
        cells = ("infeasible | | | |" if f is None else
                 f"{f['top1']:.2%} | {f['output_nmse']:.3e} | {f['predicted_weighted']:.3e} | "
                 f"{f['predicted_unweighted']:.3f} | {f['predicted_weighted_stage3']:.3e}")
        print(f"| {reduction} | {comp} | {method} | {cells} |")
    done = [r for r in rows if r[3] is not None]
    print()
    for group, members in [("all runs", done)] + [(f"compensation {c}", [r for r in done if r[1] == c])
                                                 for c in COMPENSATIONS]:
        measured = [r[3]["output_nmse"] for r in members]
        rho = {label: spearmanr([r[3][key] for r in members], measured).statistic for label, key in PREDICTORS.items()}
        print(f"Spearman with the held-out output NMSE, {group} ({len(members)} runs): "
              + ", ".join(f"{label} {value:.3f}" for label, value in rho.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
