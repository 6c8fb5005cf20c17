"""What the audit report measures: the grid of methods × reductions, the
figures' settings and the paper's reported claims (docs/report.md)."""

import math

__all__ = ["PROG", "REDUCTIONS", "AT", "METHODS", "CURVE_METHODS", "SENSITIVITY_METHODS", "RULES", "RANK_REDUCTIONS",
           "PAPER", "NONE", "COMPENSATED", "find_row"]

PROG = "python -m mrc_ref.report"
#: Reductions of the main grid (fractions of all stored parameters removed).
REDUCTIONS = (0.3, 0.5, 0.6, 0.7, 0.8)
#: The reduction of the allocation map, Fig. 3 and the per-layer certificates.
AT = 0.6
#: Config fields of the rows without and with Stage 3.
NONE = {"compensation": "none"}
COMPENSATED = {"compensation": "auto"}  # sequential when ACTS holds proxy tokens, else local
#: The main grid: method label -> the :class:`~mrc_ref.pipeline.Config` fields it sets.
METHODS = {
    "weight SVD": {"statistic": "weight", "allocation": "uniform", **NONE},
    "uniform": {"allocation": "uniform", **NONE},
    "threshold": {"allocation": "threshold", **NONE},
    "greedy": {"allocation": "greedy", **NONE},
    "optimal": {"allocation": "optimal", **NONE},
    "optimal + exact": {"allocation": "optimal", "solver": "exact", **COMPENSATED},
    "optimal + Adam": {"allocation": "optimal", "solver": "adam", **COMPENSATED},
}
#: Further rows for the accuracy–size curve: every rule with compensation.
CURVE_METHODS = {
    "uniform + exact": {"allocation": "uniform", "solver": "exact", **COMPENSATED},
    "threshold + exact": {"allocation": "threshold", "solver": "exact", **COMPENSATED},
    "greedy + exact": {"allocation": "greedy", "solver": "exact", **COMPENSATED},
}
#: Rows added with ``--sensitivity FILE``: the calibrated objective Σ w_l NMSE_l.
SENSITIVITY_METHODS = {
    "optimal, calibrated": {"allocation": "optimal", **NONE},
    "optimal, calibrated + exact": {"allocation": "optimal", "solver": "exact", **COMPENSATED},
}
#: The allocation rules compared in the allocation map and the accuracy–size curve.
RULES = ("uniform", "threshold", "greedy", "optimal")
#: Rank reductions of Fig. 2 (fraction of each matrix's full rank min(m, n) removed).
RANK_REDUCTIONS = (0.25, 0.5, 0.75, 0.875, 0.9375)
#: The paper's reported figures (docs/math.md, "What the paper reports").
PAPER = {
    "deit_b": "DeiT-B: −60 % parameters with < 1 % top-1 drop on ImageNet (81.8 → 81.1 % in a secondary summary)",
    "large_to_small": "large models compressed to the size of the next smaller variant beat that variant by up "
                      "to 1.8 % top-1",
    "int8": "the compressed model stays accurate under 8-bit post-training quantization",
}


def find_row(data, reduction, method):
    """The grid row of ``method`` at ``reduction``, or ``None``."""
    for r in data["grid"]:
        if math.isclose(r["reduction"], reduction) and r["method"] == method:
            return r
    return None
