"""``python -m data_tools.example_table [--reductions 0.3 0.5 0.6 0.7 0.8] [--damping-sweep]``

Accuracy of the embedded example under each method and reduction: prints
one JSON line per (reduction, method) and a Markdown table on the 497
held-out test digits: top-1, top-1 agreement with the original model, the
output NMSE of the logits against the original's, and the largest
``‖P Q‖ / ‖W‖`` of the run. Rows: plain weight SVD (uniform ranks), and
activation-aware SVD under the uniform, threshold, greedy and optimal
allocations, each without compensation (residual rank 0, so every method
spends the budget on its principal factors); then the optimal allocation
with sequential compensation (residual rank 8, counted in the budget) by the
exact solver at several dampings and by Adam.

``--damping-sweep`` replaces the rows by the exact solver at damping
0, 1e-4, 1e-3, 1e-2, 1e-1 and Adam (the evidence for the default damping).
"""

import json
import sys
import tempfile

from mrc_ref import cli, example, metrics, pipeline
from mrc_ref.backend import get_xp
from mrc_ref.report import orchestration

NONE = {"compensation": "none"}
SEQUENTIAL = {"allocation": "optimal", "compensation": "sequential"}


def exact(damp):
    return {**SEQUENTIAL, "solver": "exact", "damping": float(damp)}


#: Row label -> the :class:`mrc_ref.pipeline.Config` fields it sets (``compress`` flags of the same names).
METHODS = {
    "weight SVD, uniform": {"statistic": "weight", "allocation": "uniform", **NONE},
    "uniform": {"allocation": "uniform", **NONE},
    "threshold": {"allocation": "threshold", **NONE},
    "greedy": {"allocation": "greedy", **NONE},
    "optimal": {"allocation": "optimal", **NONE},
    **{f"optimal + exact, damping {d:g}": exact(d) for d in (0, 1e-3, 1e-2, 1e-1)},
    "optimal + adam": {**SEQUENTIAL, "solver": "adam", "damping": 0.0},
}
SWEEP = {
    **{f"optimal + exact, damping {d:g}": exact(d) for d in (0, 1e-4, 1e-3, 1e-2, 1e-1)},
    "optimal + adam (500 steps, undamped)": {**SEQUENTIAL, "solver": "adam", "damping": 0.0},
    "optimal, no compensation": {"allocation": "optimal", **NONE},
}


def run(reduction, fields, ev, stage1, tmp):
    """Compress the example with the options ``fields`` and measure it on the
    test digits with the report's own row function
    (:func:`mrc_ref.report.orchestration.measure`: ``compress_files``, then the forward
    pass of ``evaluate``); ``None`` when the budget is infeasible for that method."""
    config = pipeline.Config(**fields, reduction=reduction)
    row, _ = orchestration.measure(example.WEIGHTS, example.ACTS, config, ev, tmp, stage1=stage1[config.statistic])
    if "infeasible" in row:
        return None
    return {k: row[k] for k in ("top1", "top1_agreement", "output_nmse", "max_residual_norm")}


def build_parser():
    parser = cli.parser("python -m data_tools.example_table", __doc__)
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8],
                        help="fractions of the stored parameters removed (default: %(default)s)")
    parser.add_argument("--damping-sweep", action="store_true",
                        help="rows: the exact solver at damping 0, 1e-4, 1e-3, 1e-2, 1e-1 and Adam")
    return parser


def main(argv=None):
    return cli.run(build_parser(), _table, argv)


def _table(args):
    ev = orchestration.evaluation(example.WEIGHTS, example.TEST_IMAGES)
    reference, labels = ev["reference"], ev["labels"]
    stage1 = orchestration.stage1_results(example.WEIGHTS, example.ACTS, ev["tensors"], ("gram", "weight"),
                                  xp=get_xp("cpu"), common={})  # one Stage 1 per layer, shared by every row
    print(json.dumps({"reduction": 0.0, "method": "original", "top1": metrics.topk_accuracy(reference, labels)}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for reduction in args.reductions:
            for method, flags in (SWEEP if args.damping_sweep else METHODS).items():
                figures = run(reduction, flags, ev, stage1, tmp)
                rows.append((reduction, method, figures))
                print(json.dumps({"reduction": reduction, "method": method,
                                  **(figures or {"infeasible": True})}), flush=True)
    print(f"\noriginal: top-1 {metrics.topk_accuracy(reference, labels):.2%}\n")
    print("| reduction | method | top-1 | agreement | output NMSE | max ‖PQ‖/‖W‖ |\n|---|---|---|---|---|---|")
    for reduction, method, f in rows:
        cells = ("infeasible | | |" if f is None else
                 f"{f['top1']:.2%} | {f['top1_agreement']:.2%} | {f['output_nmse']:.2e} | {f['max_residual_norm']:.3g}")
        print(f"| {reduction} | {method} | {cells} |")


if __name__ == "__main__":
    sys.exit(main())
