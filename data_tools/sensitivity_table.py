"""``python -m data_tools.sensitivity_table [--reductions 0.6 0.7 0.8]``

Calibrated mixed-rank allocation on the embedded example: measures the per-layer sensitivity weights of the example from its proxy
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

import json
import os
import sys
import tempfile

from scipy.stats import spearmanr

from mrc_ref import cli, example, formats, metrics, pipeline
from mrc_ref.compress import compress_files
from mrc_ref.errors import InfeasibleBudget
from mrc_ref.evaluate import model_logits

from . import sensitivity

#: Allocation label -> (Config fields, whether the sensitivity file is used).
ALLOCATIONS = {"uniform": ({"allocation": "uniform"}, False), "optimal": ({"allocation": "optimal"}, False),
               "optimal + sensitivity": ({"allocation": "optimal"}, True)}
COMPENSATIONS = {"none": {"compensation": "none"},
                 "sequential exact, q=8": {"compensation": "sequential", "residual_rank": 8},
                 "sequential exact, q=4": {"compensation": "sequential", "residual_rank": 4}}
PREDICTORS = {"Σ w·NMSE": "predicted_weighted", "Σ NMSE": "predicted_unweighted",
              "Σ w·NMSE after stage 3": "predicted_weighted_stage3"}


def run(config, sens, weights, reference, labels, tmp):
    """Compress the example with ``config`` (and the sensitivity file
    ``sens``, or None); return the held-out figures and both predictors, or
    ``None`` when the budget is infeasible."""
    out = os.path.join(tmp, "c.safetensors")
    try:
        rep = compress_files(example.WEIGHTS, example.ACTS, out, config, sensitivity=sens)
    except InfeasibleBudget:
        return None
    logits, _ = model_logits(out, example.TEST_IMAGES)
    layers = rep["layers"]
    return {"top1": metrics.topk_accuracy(logits, labels), "output_nmse": metrics.output_nmse(logits, reference),
            "predicted_weighted": sum(weights[e["name"]] * e["nmse_stage1"] for e in layers),
            "predicted_unweighted": sum(e["nmse_stage1"] for e in layers),
            "predicted_weighted_stage3": sum(weights[e["name"]] * e["nmse_stage3"] for e in layers),
            "layers_factored": rep["totals"]["layers_factored"]}


def build_parser():
    parser = cli.parser("python -m data_tools.sensitivity_table", __doc__)
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.6, 0.7, 0.8],
                        help="fractions of the stored parameters removed (default: %(default)s)")
    return parser


def main(argv=None):
    return cli.run(build_parser(), _table, argv)


def _table(args):
    reference, labels = model_logits(example.WEIGHTS, example.TEST_IMAGES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sens = os.path.join(tmp, "sensitivity.json")
        _, seconds = sensitivity.run(example.WEIGHTS, example.ACTS, sens)
        weights = {k: v["weight"] for k, v in formats.read_sensitivity(sens)["layers"].items()}
        print(json.dumps({"sensitivity_seconds": seconds, "weights": weights}), flush=True)
        for reduction in args.reductions:
            for comp, cfields in COMPENSATIONS.items():
                for method, (afields, calibrated) in ALLOCATIONS.items():
                    config = pipeline.Config(**afields, **cfields, reduction=reduction)
                    figures = run(config, sens if calibrated else None, weights, reference, labels, tmp)
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


if __name__ == "__main__":
    sys.exit(main())
