"""The expected values of a reference case, computed by mrc_ref from the
case's stored inputs (compared by :mod:`mrc_ref.cases.compare`).

``expected_values`` returns a JSON-ready document (the schema of
``expected.json``, docs/testing.md) and the arrays it refers to. Only
gauge-invariant values are kept: spectra, NMSE curves and values, ranks,
parameter counts, objectives, losses, products (stored as a factor pair
whose product is the expected matrix), logits.
"""

import numpy as np

from .. import allocate, certificates, pipeline, stats, svd, vit
from ..sequential import make_sequential
from . import config_from_json, normalize, resolve
from .compare import LOSS_KEYS, compare

__all__ = ["GAP_MIN", "expected_values", "logits_from_tokens", "probes_of", "reproduce"]

#: A Stage-1 product at rank ``r`` is stored only when the relative eigen-gap
#: ``(σ_r² − σ_{r+1}²) / σ_1²`` is at least this: round-off of relative size
#: ``ε`` moves the optimal subspace by about ``ε / gap``, so below it the
#: product is decided by round-off (or is not unique at all, at a tie).
GAP_MIN = 1e-6

#: Those that depend on which tied direction ``A B`` keeps when the Stage-1
#: cut is at a tie.
STAGE3_KEYS = ("nmse_stage3", "loss_stage3", "residual_norm")


def _ref(arrays, key, value):
    arrays[key] = np.ascontiguousarray(value)
    return {"$array": key}


def _product(arrays, key, left, right):
    return {"left": _ref(arrays, key + ".left", left), "right": _ref(arrays, key + ".right", right)}


def logits_from_tokens(tensors, tokens, num_heads):
    """Logits of a (dense or compressed) timm ViT whose block-0 inputs are
    ``tokens`` (images, tokens, d), in float64."""
    params = vit.prepare(tensors, np)
    h = vit.blocks(params, np.asarray(tokens, dtype=np.float64), num_heads, np)
    return vit.head(params, h, np)


def expected_values(tensors, metadata, raw_stats, config, *, probes=None, tokens=None):
    """Run mrc_ref on a case's inputs and collect its expected values.

    Parameters
    ----------
    tensors, metadata :
        The weights as stored.
    raw_stats : dict of layer -> dict
        Raw statistics of each selected layer (``gram``, ``sum``, ``rows``).
    config : mrc_ref.pipeline.Config
    probes : dict of layer -> iterable of int, optional
        Ranks at which to record the Stage-1 NMSE and product, besides the
        layer's own rank.
    tokens : array (images, tokens, d), optional
        Proxy tokens: the sequential Stage 3 runs on them when the
        compensation asks for it, and the logits of the original and the
        compressed model on them are recorded.

    Returns
    -------
    doc : dict
        The ``expected.json`` document.
    arrays : dict of str -> ndarray
        The arrays ``doc`` refers to.
    """
    probes = probes or {}
    sequential = None
    if tokens is not None and config.compensation in ("auto", "sequential"):
        sequential = make_sequential(tensors, metadata, tokens)
    out, report = pipeline.run(tensors, lambda name: raw_stats[name], config, xp=np, sequential=sequential)
    q = report["config"]["residual_rank"]
    local = report["config"]["compensation"] == "local"
    arrays, layers, names, shapes, curves = {}, {}, [], [], []
    for entry in report["layers"]:
        name, (m, n) = entry["name"], entry["shape"]
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        C = stats.metric(config.statistic, stats.validate(raw_stats[name], n, np, statistic=config.statistic), n, np)
        U, s2 = svd.output_basis(W, C, np)
        curve = svd.nmse_curve(s2, np)
        names.append(name)
        shapes.append((m, n))
        curves.append(curve)
        stage1 = {}
        for r in sorted(set(int(r) for r in probes.get(name, ())) | ({entry["rank"]} - {None})):
            gap = certificates.eigen_gap(s2, r)
            item = {"nmse": float(curve[r]), "eigen_gap": gap}
            if gap >= GAP_MIN:
                item["product"] = _product(arrays, f"{name}.stage1.{r}", *svd.factors(W, U, r))
            else:
                item["product"] = None
                item["product_omitted"] = (
                    f"relative eigen-gap {gap:.3g} < {GAP_MIN:g} at rank {r}: the optimal subspace is not "
                    "unique (or is decided by round-off), so no product is expected; the NMSE is")
            stage1[str(r)] = item
        compressed = {"rank": entry["rank"], "residual_rank": entry["residual_rank"]}
        compressed.update({key: entry[key] for key in LOSS_KEYS})
        compressed["residual_product"] = None
        omitted = {}
        if entry["residual_rank"]:
            P, Q = out[name + ".residual_p"], out[name + ".residual_q"]
            tie = certificates.eigen_gap(s2, entry["rank"]) < GAP_MIN
            if tie:
                reason = (f"the Stage-1 cut at rank {entry['rank']} is at a (near) tie: these depend on which "
                          "tied direction A B keeps; certify a residual against your own A B with "
                          "mrc_ref.testing.assert_residual_optimal instead")
                for key in STAGE3_KEYS + ("residual_product",):
                    compressed.pop(key, None)
                    omitted[key] = reason
            else:
                gap = None
                if local:
                    A, B = svd.factors(W, U, entry["rank"])
                    gap = certificates.certify_residual(W, A, B, P, Q, C, damp=config.damping)["eigen_gap"]
                if gap is not None and gap < GAP_MIN:
                    compressed.pop("residual_product")
                    omitted["residual_product"] = (f"relative eigen-gap {gap:.3g} < {GAP_MIN:g} of the residual "
                                                   f"problem at rank {entry['residual_rank']}")
                else:
                    compressed["residual_product"] = _product(arrays, f"{name}.residual", P, Q)
        if omitted:
            compressed["omitted"] = omitted
        layers[name] = {"shape": [m, n], "spectrum": [float(v) for v in s2],
                        "nmse_curve": [float(v) for v in curve], "stage1": stage1, "compressed": compressed}

    p_total = pipeline.count_params(tensors)
    fixed = p_total - sum(m * n for m, n in shapes)
    budget = allocate.parameter_budget(p_total, config.reduction)
    best, bound, exact = allocate.optimal(curves, shapes, q, fixed, budget)
    rules = {}
    for rule in allocate.ALLOCATIONS:
        ranks = allocate.allocate(rule, curves, shapes, q, fixed, budget, config.rank_step)
        rules[rule] = {"ranks": dict(zip(names, ranks)), "objective": allocate.objective(curves, ranks),
                       "params": allocate.total_params(shapes, ranks, q, fixed)}
    doc = {
        "layers": layers,
        "allocation": {"p_total": p_total, "fixed": fixed, "budget": budget, "residual_rank": q,
                       "optimum": allocate.objective(curves, best), "lower_bound": float(bound),
                       "exact": bool(exact), "rules": rules},
        "totals": {"params_before": report["totals"]["params_before"],
                   "params_after": report["totals"]["params_after"]},
    }
    if tokens is not None:
        heads = vit.resolve_num_heads(tensors, None, metadata)
        doc["logits"] = {"images": int(tokens.shape[0]),
                         "original": _ref(arrays, "logits.original", logits_from_tokens(tensors, tokens, heads)),
                         "compressed": _ref(arrays, "logits.compressed", logits_from_tokens(out, tokens, heads))}
    return doc, arrays


def probes_of(doc):
    """The Stage-1 ranks recorded in an expected document, per layer."""
    return {name: [int(r) for r in layer["stage1"]] for name, layer in doc["layers"].items()}


def reproduce(case):
    """Recompute a loaded case's expected values with the current code and
    compare them (:func:`compare`); returns the failure messages."""
    raw = {name: layer["stats"] for name, layer in case["layers"].items()}
    doc, arrays = expected_values(case["tensors"], case["metadata"], raw, config_from_json(case["config"]),
                                  probes=probes_of(case["expected"]), tokens=case["tokens"])
    return compare(normalize(resolve(doc, arrays)), case["expected"], case)
