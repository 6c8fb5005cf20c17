"""Certify a compressed model file, whichever implementation produced it,
against the original weights and their activation statistics: read every
layout (mrc_ref's factors, PEFT ``lora_A``/``lora_B`` pairs, dense merged
weights), certify each selected layer's Stage-1 optimality
(:mod:`mrc_ref.certificates`), check the parameter budget and report the
allocation's gap to the exact Stage-2 optimum. The command line is
``python -m mrc_ref.verify`` (docs/cli.md).
"""

__all__ = ["DEFAULT_RTOL", "DEFAULT_ATOL", "read_layer", "certify_layer", "allocation_totals", "verify_files",
           "table"]


import json
import os
import re

import numpy as np

from .. import allocate, certificates, formats, layout, pipeline, stats, svd
from ..errors import ConfigError, MrcError

#: Default allowed relative excess of a layer's Stage-1 NMSE over the optimum
#: at its rank: float32 implementations of the optimum land well inside it;
#: methods that are not the optimum (plain weight SVD) miss by factors.
DEFAULT_RTOL = 1e-3
#: Default absolute slack on the NMSE: rounding of factors stored in float32
#: adds ~1e-14; 1e-8 leaves room for ill-conditioned statistics.
DEFAULT_ATOL = 1e-8
#: Key prefix that PEFT adds to every tensor of its state dict.
PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<name>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# ----------------------------------------------------------------- reading the layouts
def _strip_peft(tensors, path):
    """The tensors with PEFT's ``base_model.model.`` prefix removed, and
    each short name's name as stored (for messages)."""
    out, stored = {}, {}
    for key, value in tensors.items():
        short = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if short in out:
            raise MrcError(f"tensor {short!r} is stored both with and without the prefix {PEFT_PREFIX!r}", file=path)
        out[short], stored[short] = value, key
    return out, stored


def _lora_pairs(tensors, path):
    """``{layer: {"A": key, "B": key}}`` of the PEFT pairs, one adapter per layer."""
    pairs = {}
    for key in tensors:
        match = _LORA.match(key)
        if not match:
            continue
        entry = pairs.setdefault(match["name"], {})
        which = match["which"]
        if which in entry:
            raise MrcError(f"several lora_{which} tensors ({entry[which]}, {key}); verify one adapter at a time",
                           file=path, layer=match["name"])
        entry[which] = key
    return pairs


def _tensor(tensors, key, shape, path, layer, stored=None):
    """``tensors[key]`` as float64 after checking it is 2-D, floating point,
    finite and of ``shape`` (``None`` entries match anything); messages name
    the tensor as ``stored`` maps it."""
    a = tensors[key]
    key = (stored or {}).get(key, key)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise MrcError(f"{key} is not a 2-D floating-point tensor (shape {a.shape}, dtype {a.dtype})",
                       file=path, layer=layer)
    if any(e is not None and s != e for s, e in zip(a.shape, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise MrcError(f"{key} has shape {tuple(a.shape)}, expected {want}", file=path, layer=layer)
    a64 = a.astype(np.float64)
    if not np.isfinite(a64).all():
        raise MrcError(f"{key} contains NaN or Inf", file=path, layer=layer)
    return a64


def read_layer(tensors, lora, name, m, n, path, scaling=1.0, stored=None):
    """One layer of the compressed model, in whichever layout it is stored.

    Returns
    -------
    dict
        ``layout`` (``"factored"``, ``"lora"``, ``"dense"``); the principal
        pair ``A`` (m, r), ``B`` (r, n) (``None`` for dense); ``P`` (m, q),
        ``Q`` (q, n) (zero-width without residual); ``base`` (m, n) or
        ``None``; ``weight`` (dense only), its stored ``dtype``; ``stored``,
        the element count of the tensors read. ``stored`` maps tensor names
        to the names in the file, for messages.
    """
    def get(key, shape):
        return _tensor(tensors, key, shape, path, name, stored)

    has = {s: f"{name}.{s}" in tensors for s in ("weight", "base_layer.weight")}
    factored = any(layout.factor_key(name, s) in tensors for s in layout.FACTOR_SUFFIXES)
    if factored and name in lora:
        raise MrcError("stored both as lowrank/residual factors and as a lora_A/lora_B pair", file=path, layer=name)
    if factored:
        try:
            layout.layer_form(tensors, name, dense_keys=("weight", "base_layer.weight"))
        except MrcError as err:
            raise err.at(file=path) from None
        A = get(f"{name}.lowrank_a", (m, None))
        B = get(f"{name}.lowrank_b", (A.shape[1], n))
        P = Q = None
        if f"{name}.residual_p" in tensors:
            P = get(f"{name}.residual_p", (m, None))
            Q = get(f"{name}.residual_q", (P.shape[1], n))
        P = np.zeros((m, 0)) if P is None else P
        Q = np.zeros((0, n)) if Q is None else Q
        return {"layout": "factored", "A": A, "B": B, "P": P, "Q": Q, "base": None,
                "stored": A.size + B.size + P.size + Q.size}
    if name in lora:
        pair = lora[name]
        if set(pair) != {"A", "B"}:
            raise MrcError(f"has lora_{next(iter(pair))} without lora_{'B' if 'A' in pair else 'A'}",
                           file=path, layer=name)
        if has["weight"] and has["base_layer.weight"]:
            raise MrcError("has both weight and base_layer.weight", file=path, layer=name)
        lora_a = get(pair["A"], (None, n))
        lora_b = get(pair["B"], (m, lora_a.shape[0]))
        base_key = next((f"{name}.{s}" for s in ("base_layer.weight", "weight") if has[s]), None)
        base = None if base_key is None else get(base_key, (m, n))
        return {"layout": "lora", "A": scaling * lora_b, "B": lora_a, "P": np.zeros((m, 0)), "Q": np.zeros((0, n)),
                "base": base, "stored": lora_a.size + lora_b.size + (0 if base is None else base.size)}
    if has["weight"]:
        return {"layout": "dense", "A": None, "B": None, "weight": get(f"{name}.weight", (m, n)),
                "dtype": tensors[f"{name}.weight"].dtype, "base": None, "stored": m * n}
    raise MrcError("not found in the compressed file (expected <name>.lowrank_a/lowrank_b, a PEFT pair "
                   "<name>.lora_A.weight/lora_B.weight, or a dense <name>.weight)", file=path, layer=name)


# ----------------------------------------------------------------- certificates
def certify_layer(name, W, C, layer, rtol, atol, rank_rtol=None):
    """Figures and verdict of one layer (see docs/cli.md, ``verify``).

    The principal pair is certified with :func:`mrc_ref.certificates.certify_stage1`:
    ``A B`` against ``W`` (mrc_ref layout, or a PEFT pair alone); ``s B A``
    against the base's error ``W − W_base`` (a PEFT pair on a base weight, the
    EoRA problem); for a dense weight ``W̃`` of numerical rank ``ρ``, its first
    ``ρ`` singular triplets against ``W``. The whole layer's NMSE may not fall
    below the optimum at rank ``r + q`` (that would mean a rank larger than
    counted, or statistics of another model).
    """
    m, n = W.shape
    curve = certificates.optimal_nmse_curve(W, C)
    k = len(curve) - 1
    entry = {"name": name, "layout": layer["layout"], "shape": [m, n], "rank": None, "residual_rank": 0,
             "stored_params": int(layer["stored"]), "params": int(layer["stored"]), "nmse": 0.0, "nmse_layer": 0.0,
             "nmse_optimal": 0.0, "nmse_optimal_r_plus_q": 0.0, "excess": 1.0, "eigen_gap": None,
             "passed": True, "failures": []}
    fail = entry["failures"].append
    if layer["layout"] == "dense":
        W_tilde = layer["weight"]
        if np.array_equal(W_tilde, W):
            entry["layout"] = "dense (unchanged)"
            return entry, curve
        s = np.linalg.svd(W_tilde, compute_uv=False)
        tol = (max(m, n) * np.finfo(layer["dtype"]).eps if rank_rtol is None else rank_rtol) * (s[0] if s.size else 0)
        rho = int(np.sum(s > tol))
        entry["rank"] = rho
        entry["params"] = min(m * n, rho * (m + n))
        entry["nmse_layer"] = svd.nmse(W, W_tilde, C, np)
        if rho == min(m, n):
            entry["nmse"] = entry["nmse_layer"]
            entry["excess"] = 1.0 if entry["nmse"] <= certificates.EXCESS_FLOOR else float("inf")
            if entry["nmse"] > atol:
                fail(f"layer {name}: dense weight of full numerical rank {rho} differs from the original "
                     f"(NMSE {entry['nmse']:.4g} > atol {atol:g}): not a low-rank approximation")
            entry["passed"] = not entry["failures"]
            return entry, curve
        U, s, Vt = np.linalg.svd(W_tilde, full_matrices=False)
        A, B, target, q = U[:, :rho] * s[:rho], Vt[:rho], W, 0
    else:
        A, B, q = layer["A"], layer["B"], layer["P"].shape[1]
        target = W if layer["base"] is None else W - layer["base"]
        W_tilde = A @ B + layer["P"] @ layer["Q"] + (0 if layer["base"] is None else layer["base"])
        entry["rank"], entry["residual_rank"] = int(A.shape[1]), int(q)
        entry["nmse_layer"] = svd.nmse(W, W_tilde, C, np)
    if layer["base"] is not None and not np.sum((target @ C) * target) > 0:
        entry["nmse"] = entry["nmse_layer"]
        if entry["nmse"] > atol:
            fail(f"layer {name}: the base weight equals the original, yet the pair changes the outputs "
                 f"(NMSE {entry['nmse']:.4g} > atol {atol:g})")
        entry["passed"] = not entry["failures"]
        return entry, curve
    cert = certificates.certify_stage1(target, C, A, B)
    r = entry["rank"]
    entry.update(nmse=cert["nmse"], nmse_optimal=cert["nmse_optimal"], excess=cert["excess"],
                 eigen_gap=cert["eigen_gap"], nmse_optimal_r_plus_q=float(curve[min(r + q, k)]))
    allowed = cert["nmse_optimal"] * (1 + rtol) + atol
    what = ("NMSE of the pair s·lora_B lora_A against the base's error W − W_base" if layer["base"] is not None
            else "Stage-1 NMSE")
    if not cert["nmse"] <= allowed:
        fail(f"layer {name}: {what} at rank {r} is {cert['nmse']:.6g}, above the optimum {cert['nmse_optimal']:.6g} "
             f"by a factor {cert['excess']:.6g} (excess {cert['excess'] - 1:.3g}; allowed ≤ "
             f"{allowed:.6g}: optimum · (1 + rtol {rtol:g}) + atol {atol:g})")
    floor = entry["nmse_optimal_r_plus_q"] * (1 - rtol) - atol
    if layer["base"] is None and entry["nmse_layer"] < floor:
        fail(f"layer {name}: NMSE of the whole layer {entry['nmse_layer']:.6g} is below the optimum "
             f"{entry['nmse_optimal_r_plus_q']:.6g} at rank r + q = {r + q}, which no rank-{r + q} matrix can "
             "beat: the layer's rank is larger than counted (see --rank-rtol), or ACTS are not this model's statistics")
    entry["passed"] = not entry["failures"]
    return entry, curve


def allocation_totals(entries, curves, p_total, fixed, budget):
    """Totals: parameters against the budget, and the allocation's gap to the
    exact Stage-2 optimum at the same budget (the model's own size when no
    budget is given). The gap is computed when every layer is a pure low-rank
    (or dense) layer with one residual rank ``q`` shared by the factored ones."""
    params_after = fixed + sum(e["params"] for e in entries)
    totals = {"params_before": p_total, "params_after": params_after, "budget": budget,
              "within_budget": None if budget is None else params_after <= budget,
              "sum_nmse": float(sum(e["nmse"] for e in entries)),
              "objective": None, "optimum": None, "lower_bound": None, "exact": None, "allocation_gap": None,
              "gap_budget": None, "gap_note": None}
    qs = {e["residual_rank"] for e in entries if e["rank"] is not None and e["layout"] != "dense"}
    if any(e["layout"] == "lora" and e.get("on_base") for e in entries):
        totals["gap_note"] = "not computed: a PEFT pair on a base weight is not a Stage-2 choice"
        return totals
    if len(qs) > 1:
        totals["gap_note"] = f"not computed: the factored layers have different residual ranks {sorted(qs)}"
        return totals
    q = qs.pop() if qs else 0
    shapes = [tuple(e["shape"]) for e in entries]
    ranks = [e["rank"] for e in entries]
    gap_budget = budget if budget is not None else params_after
    totals["gap_budget"] = gap_budget
    totals["objective"] = allocate.objective(curves, ranks)
    try:
        best, bound, exact = allocate.optimal(curves, shapes, q, fixed, gap_budget)
    except MrcError as err:
        totals["gap_note"] = f"not computed: {err}"
        return totals
    totals.update(optimum=allocate.objective(curves, best), lower_bound=float(bound), exact=bool(exact),
                  allocation_gap=allocate.relative_gap(totals["objective"], float(bound)))
    return totals


# ----------------------------------------------------------------- the command
def _own_config(metadata):
    """The ``config`` of a file mrc_ref wrote, else ``{}``."""
    if metadata.get("format") != formats.COMPRESSED_FORMAT:
        return {}
    try:
        config = json.loads(metadata.get("config", "{}"))
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def verify_files(compressed, weights, acts, *, reduction=None, budget=None, layers=None, statistic=None,
                 rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, rank_rtol=None, lora_scaling=1.0, max_gap=None,
                 report_path=None):
    """Read the three inputs, certify every selected layer, check the budget.

    Returns the report (dict; ``passed`` and ``failures`` hold the verdict).

    Raises
    ------
    MrcError
        Bad input (exit code 2 on the command line).
    """
    for field, value in (("rtol", rtol), ("atol", atol), ("max_gap", max_gap), ("rank_rtol", rank_rtol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ConfigError(field, f"must be a finite number ≥ 0, got {value}")
    if not np.isfinite(lora_scaling):
        raise ConfigError("lora_scaling", f"must be finite, got {lora_scaling}")
    if reduction is not None and not 0 < reduction < 1:
        raise ConfigError("reduction", f"must be in (0, 1), got {reduction}")
    if budget is not None and budget < 0:
        raise ConfigError("budget", f"must be ≥ 0, got {budget}")
    inputs = (compressed, weights, acts)
    if report_path:
        formats.check_outputs((report_path,), inputs)
    stored, metadata = formats.read_safetensors(compressed)
    original, _ = formats.read_safetensors(weights)
    own = _own_config(metadata)
    patterns = tuple(p.strip() for p in layers.split(",") if p.strip()) if layers else \
        tuple(own.get("layers") or pipeline.DEFAULT_LAYERS)
    statistic = statistic or own.get("statistic") or "gram"
    if statistic not in stats.STATISTICS:
        raise MrcError(f"the compressed file's statistic {statistic!r} is unknown; pass --statistic", file=compressed)
    try:
        names = pipeline.select_layers(original, patterns)
    except MrcError as err:
        raise err.at(file=weights) from None
    tensors, stored_names = _strip_peft(stored, compressed)
    lora = _lora_pairs(tensors, compressed)
    stray = sorted((set(layout.factored_layers(tensors)) | set(lora)) - set(names))
    if stray:
        raise MrcError(f"stored in low-rank form but not selected by --layers {','.join(patterns)} "
                       "(select it, so that its parameters are counted)", file=compressed, layer=stray[0])
    p_total = pipeline.count_params(original)
    fixed = p_total - sum(int(np.prod(original[n + ".weight"].shape)) for n in names)
    if budget is None and reduction is None and own.get("rank") is None and own.get("reduction") is not None:
        reduction = own["reduction"]
        source = "the compressed file's reduction"
    else:
        source = "--budget" if budget is not None else "--reduction" if reduction is not None else None
    if reduction is not None:
        budget = allocate.parameter_budget(p_total, reduction)
    entries, curves = [], []
    with formats.open_activations(acts) as f:
        for name in names:
            W = np.asarray(original[name + ".weight"], dtype=np.float64)
            m, n = W.shape
            if not np.isfinite(W).all():
                raise MrcError("weight contains NaN or Inf", file=weights, layer=name)
            layer = read_layer(tensors, lora, name, m, n, compressed, lora_scaling, stored_names)
            try:
                raw = formats.read_layer_stats(f, name, acts, n=n)
                C = stats.metric(statistic, stats.validate(raw, n, np), n, np)
                entry, curve = certify_layer(name, W, C, layer, rtol, atol, rank_rtol)
            except MrcError as err:
                raise MrcError(err.message, file=acts, layer=name) from None
            entry["on_base"] = layer["base"] is not None
            entries.append(entry)
            curves.append(curve)
    totals = allocation_totals(entries, curves, p_total, fixed, budget)
    totals["budget_source"] = source
    failures = [msg for e in entries for msg in e["failures"]]
    if budget is not None and not totals["within_budget"]:
        failures.append(f"total parameters {totals['params_after']} exceed the budget {budget} "
                        f"(from {source}; {p_total} parameters before) by {totals['params_after'] - budget}")
    gap = totals["allocation_gap"]
    if max_gap is not None and (gap is None or gap > max_gap):
        failures.append(f"allocation gap {'not computed' if gap is None else f'{gap:.4g}'} is not within "
                        f"--max-gap {max_gap:g} (Σ NMSE {totals['objective']} against the optimum "
                        f"{totals['optimum']} at {totals['gap_budget']} parameters)")
    report = {
        "inputs": {"compressed": os.path.basename(compressed), "weights": os.path.basename(weights),
                   "acts": os.path.basename(acts)},
        "options": {"layers": list(patterns), "statistic": statistic, "rtol": rtol, "atol": atol,
                    "rank_rtol": rank_rtol, "lora_scaling": lora_scaling, "max_gap": max_gap},
        "layers": entries, "totals": totals, "passed": not failures, "failures": failures,
    }
    if report_path:
        formats.write_json(report_path, report, inputs=inputs)
    return report


def _fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def table(report):
    """The per-layer table and the totals, as text."""
    rows = [("layer", "layout", "shape", "rank", "q", "stored", "counted", "NMSE (A B)", "NMSE layer", "opt @ r",
             "opt @ r+q", "excess", "ok")]
    for e in report["layers"]:
        rows.append((e["name"], e["layout"], "{}x{}".format(*e["shape"]), _fmt(e["rank"], "d"), str(e["residual_rank"]),
                     str(e["stored_params"]), str(e["params"]), _fmt(e["nmse"]), _fmt(e["nmse_layer"]), _fmt(e["nmse_optimal"]),
                     _fmt(e["nmse_optimal_r_plus_q"]), _fmt(e["excess"], ".6g"), "yes" if e["passed"] else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    t = report["totals"]
    budget = "no budget given" if t["budget"] is None else \
        f"budget {t['budget']} ({t['budget_source']}): {'within' if t['within_budget'] else 'OVER'}"
    lines.append(f"parameters {t['params_before']} -> {t['params_after']}; {budget}")
    if t["allocation_gap"] is not None or t["optimum"] is not None:
        lines.append(f"Σ NMSE {t['sum_nmse']:.6g}; at these ranks {t['objective']:.6g}; exact optimum "
                     f"{t['optimum']:.6g} at {t['gap_budget']} parameters; allocation gap "
                     f"{_fmt(t['allocation_gap'], '.2%')}")
    else:
        lines.append(f"Σ NMSE {t['sum_nmse']:.6g}; allocation gap {t['gap_note']}")
    return "\n".join(lines)
