"""Accuracy of the embedded example under each method and reduction.

``python -m data_tools.example_table [--reductions 0.3 0.5 0.6]`` prints one
JSON line per (reduction, method) and a Markdown table: the original model,
plain weight SVD (``--statistic weight``), activation-aware SVD with uniform
ranks, greedy mixed-rank, greedy-hull (with and without the local search),
and greedy with compensation, on the 497 held-out test digits. Without
compensation the residual rank is 0 (``none``), so every method spends the
same budget on its principal factors.
"""

import argparse
import contextlib
import io
import json
import os
import tempfile

from mrc_ref import compress, metrics
from mrc_ref.evaluate import model_logits

from . import example_data

METHODS = {
    "weight SVD (uniform)": ["--statistic", "weight", "--allocation", "uniform", "--compensation", "none"],
    "activation-aware, uniform": ["--allocation", "uniform", "--compensation", "none"],
    "activation-aware, greedy": ["--allocation", "greedy", "--compensation", "none"],
    "activation-aware, greedy-hull": ["--allocation", "greedy-hull", "--compensation", "none"],
    "activation-aware, greedy-hull + local search": ["--allocation", "greedy-hull", "--local-search",
                                                     "--compensation", "none"],
    "greedy + compensation (sequential)": ["--allocation", "greedy", "--compensation", "sequential"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_tools.example_table", description=__doc__.splitlines()[0])
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    args = parser.parse_args(argv)
    reference, labels = model_logits(example_data.WEIGHTS, example_data.TEST_IMAGES)
    rows = [("original", None, metrics.topk_accuracy(reference, labels), 1.0, 0.0)]
    print(json.dumps({"reduction": 0.0, "method": "original", "top1": rows[0][2]}))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "c.safetensors")
        for reduction in args.reductions:
            for method, flags in METHODS.items():
                with contextlib.redirect_stdout(io.StringIO()):
                    code = compress.main([example_data.WEIGHTS, example_data.ACTS, "-o", out, "--quiet",
                                          "--reduction", str(reduction), *flags])
                if code:  # an infeasible budget for this method (its message is on stderr)
                    rows.append((method, reduction, None, None, None))
                    print(json.dumps({"method": method, "reduction": reduction, "infeasible": True}), flush=True)
                    continue
                logits, _ = model_logits(out, example_data.TEST_IMAGES)
                row = (method, reduction, metrics.topk_accuracy(logits, labels), metrics.agreement(logits, reference),
                       metrics.output_nmse(logits, reference))
                rows.append(row)
                print(json.dumps(dict(zip(("method", "reduction", "top1", "top1_agreement", "output_nmse"), row))),
                      flush=True)
    print("\n| reduction | method | top-1 | agreement | output NMSE |\n|---|---|---|---|---|")
    for method, reduction, top1, agree, err in rows:
        figures = "infeasible | | " if top1 is None else f"{top1:.2%} | {agree:.2%} | {err:.2e}"
        print(f"| {'—' if reduction is None else reduction} | {method} | {figures} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
