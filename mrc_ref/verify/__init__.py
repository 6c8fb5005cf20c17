"""Certify a compressed model, whichever implementation produced it, against
the original weights and their activation statistics: read every layout
(mrc_ref's factors, int8 included; PEFT ``lora_A``/``lora_B`` pairs, as a
state dict or a ``save_pretrained`` directory; dense merged weights),
certify each selected layer's Stage-1 optimality
(:mod:`mrc_ref.certificates`), count what the file stores against the
parameter budget and report the allocation's gap to the exact Stage-2
optimum. The command line is ``python -m mrc_ref.verify`` (docs/cli.md).
"""

import math
import os
import re

import numpy as np

from .. import allocate, certificates, formats, layout, pipeline, quantize, stats, svd
from ..errors import ConfigError, MrcError, describe

__all__ = ["DEFAULT_RTOL", "DEFAULT_ATOL", "PEFT_PREFIX", "read_adapter", "pair_scaling", "read_layer",
           "certify_layer", "allocation_totals", "verify_files", "table"]

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

#: ``adapter_config.json`` keys that verify implements: the scaling of each pair.
PEFT_IMPLEMENTED = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")
#: Keys that do not change what a saved LoRA adapter computes at inference
#: (training, initialization, targeting and provenance). Any other key set to
#: something other than null, false, empty or PEFT's default is refused.
PEFT_INERT = ("auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
              "init_lora_weights", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
              "layers_pattern", "peft_version", "megatron_core", "loftq_config", "eva_config", "corda_config",
              "lora_ga_config", "qalora_group_size", "ensure_weight_tying")
_PEFT_DEFAULTS = {"bias": "none"}


# ----------------------------------------------------------------- reading the layouts
def _number(value, what, path, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and not value > 0):
        raise MrcError(f"{what} must be a {'positive ' if positive else ''}finite number, got {describe(value)}",
                       file=path)
    return value


def read_adapter(directory):
    """Read a PEFT ``save_pretrained`` directory: ``adapter_model.safetensors``
    and ``adapter_config.json``.

    Returns
    -------
    tensors : dict of str -> ndarray
    config : dict
        ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
        ``use_rslora`` (checked), for :func:`pair_scaling`.

    Raises
    ------
    MrcError
        A missing file, a config that is not LoRA, or one that sets a
        feature verify does not implement (DoRA, ``fan_in_fan_out``, trained
        biases, extra trainable modules, …), named in one line.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, "adapter_config.json")
    doc = formats.read_json(path, "PEFT adapter config")
    if not isinstance(doc, dict):
        raise MrcError(f"is not a JSON object (got {describe(doc)})", file=path)
    if doc.get("peft_type") != "LORA":
        raise MrcError(f"peft_type is {describe(doc.get('peft_type'))}; verify reads LoRA adapters ('LORA')",
                       file=path)
    for key, value in doc.items():
        if key in PEFT_IMPLEMENTED or key in PEFT_INERT:
            continue
        if value in (None, False, {}, [], "") or _PEFT_DEFAULTS.get(key, object()) == value:
            continue
        raise MrcError(f"sets {key} = {describe(value)}, which verify does not implement (it reads plain LoRA: "
                       "W = W_base + scaling · lora_B lora_A)", file=path)
    config = {"r": doc.get("r", 8), "lora_alpha": doc.get("lora_alpha", 8),
              "rank_pattern": doc.get("rank_pattern") or {}, "alpha_pattern": doc.get("alpha_pattern") or {},
              "use_rslora": doc.get("use_rslora", False)}
    if isinstance(config["r"], bool) or not isinstance(config["r"], int) or config["r"] < 1:
        raise MrcError(f"r must be a positive integer, got {describe(config['r'])}", file=path)
    _number(config["lora_alpha"], "lora_alpha", path)
    if not isinstance(config["use_rslora"], bool):
        raise MrcError(f"use_rslora must be true or false, got {describe(config['use_rslora'])}", file=path)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config[key]
        if not isinstance(pattern, dict):
            raise MrcError(f"{key} must be an object, got {describe(pattern)}", file=path)
        for k, v in pattern.items():
            if key == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise MrcError(f"rank_pattern[{k!r}] must be a positive integer, got {describe(v)}", file=path)
            _number(v, f"{key}[{k!r}]", path)
            try:
                re.compile(k)
            except re.error as exc:
                raise MrcError(f"{key} key {k!r} is not a regular expression ({exc})", file=path) from None
    tensors, _ = formats.read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    return tensors, config


def _pattern(patterns, name):
    """PEFT's ``get_pattern_key``: the first key ``k`` of ``patterns`` with
    ``re.match(rf"(.*\\.)?({k})$", name)``, else None."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def pair_scaling(config, name, rank, path=None):
    """The scaling ``s`` of the PEFT pair of layer ``name``: ``W = s · B A``
    with ``s = alpha / r`` (``alpha / √r`` with ``use_rslora``), ``r`` and
    ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` when a key matches the
    layer (as PEFT matches them), else ``r`` and ``lora_alpha``. The stored
    rank must be that ``r``."""
    key = _pattern(config["rank_pattern"], name)
    r = config["rank_pattern"][key] if key is not None else config["r"]
    if r != rank:
        raise MrcError(f"stores a pair of rank {rank}, but adapter_config.json gives r = {r}", file=path, layer=name)
    key = _pattern(config["alpha_pattern"], name)
    alpha = config["alpha_pattern"][key] if key is not None else config["lora_alpha"]
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


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
    """``{layer: {"A": key, "B": key}}`` of the PEFT pairs. All pairs must
    belong to one adapter (the same name after ``lora_A.``, or none), and
    each factor must have its partner under that adapter."""
    pairs, adapters = {}, {}
    for key in tensors:
        match = _LORA.match(key)
        if not match:
            continue
        adapters.setdefault(match["adapter"] or "(unnamed)", key)
        entry = pairs.setdefault(match["name"], {})
        which = match["which"]
        if which in entry:
            raise MrcError(f"several lora_{which} tensors ({entry[which]}, {key}); verify one adapter at a time",
                           file=path, layer=match["name"])
        entry[which] = key
    if len(adapters) > 1:
        raise MrcError(f"holds pairs of several adapters ({', '.join(sorted(adapters))}); verify one adapter at a "
                       "time", file=path)
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair))
            raise MrcError(f"has lora_{have} without lora_{'B' if have == 'A' else 'A'}", file=path, layer=name)
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


def _check_rank(rank, m, n, what, path, name):
    if rank > min(m, n):
        raise MrcError(f"{what} has rank {rank}, more than min(m, n) = {min(m, n)} of the {m}×{n} layer: not a "
                       "low-rank factorization", file=path, layer=name)


def read_layer(tensors, lora, name, m, n, path, scaling=1.0, stored=None, half_steps=None):
    """One layer of the compressed model, in whichever layout it is stored.

    ``scaling`` is the PEFT pairs' ``s`` (a number, or a callable
    ``scaling(name, rank)``). The rank of each pair (principal, residual,
    PEFT), and ``r + q`` of a factored layer, may not exceed ``min(m, n)``.
    ``half_steps`` maps the keys of tensors stored int8 to half their rows'
    quantization steps (``scale / 2``).

    Returns
    -------
    dict
        ``layout`` (``"factored"``, ``"lora"``, ``"dense"``); the principal
        pair ``A`` (m, r), ``B`` (r, n) (``None`` for dense); ``P`` (m, q),
        ``Q`` (q, n) (zero-width without residual); ``base`` (m, n) or
        ``None``; ``weight`` (dense only), its stored ``dtype``; ``stored``,
        the element count of the tensors read; ``half`` the half steps of
        ``A, B, P, Q`` (or ``W`` for dense), ``None`` for those stored exactly.
        ``stored`` maps tensor names to the names in the file, for messages.
    """
    half_steps = half_steps or {}

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
        _check_rank(A.shape[1], m, n, "lowrank_a/lowrank_b", path, name)
        P, Q = np.zeros((m, 0)), np.zeros((0, n))
        if f"{name}.residual_p" in tensors:
            P = get(f"{name}.residual_p", (m, None))
            Q = get(f"{name}.residual_q", (P.shape[1], n))
            _check_rank(P.shape[1], m, n, "residual_p/residual_q", path, name)
            if A.shape[1] + P.shape[1] > min(m, n):  # what compress refuses (mrc_ref.allocate): never its output
                raise MrcError(f"rank {A.shape[1]} plus residual rank {P.shape[1]} is {A.shape[1] + P.shape[1]}, "
                               f"more than min(m, n) = {min(m, n)} of the {m}×{n} layer: not a low-rank "
                               "factorization", file=path, layer=name)
        return {"layout": "factored", "A": A, "B": B, "P": P, "Q": Q, "base": None,
                "stored": A.size + B.size + P.size + Q.size,
                "half": [half_steps.get(layout.factor_key(name, s)) for s in layout.FACTOR_SUFFIXES]}
    if name in lora:
        pair = lora[name]
        if has["weight"] and has["base_layer.weight"]:
            raise MrcError("has both weight and base_layer.weight", file=path, layer=name)
        lora_a = get(pair["A"], (None, n))
        lora_b = get(pair["B"], (m, lora_a.shape[0]))
        rank = lora_a.shape[0]
        _check_rank(rank, m, n, "the lora_A/lora_B pair", path, name)
        s = scaling(name, rank) if callable(scaling) else scaling
        base_key = next((f"{name}.{k}" for k in ("base_layer.weight", "weight") if has[k]), None)
        base = None if base_key is None else get(base_key, (m, n))
        return {"layout": "lora", "A": s * lora_b, "B": lora_a, "P": np.zeros((m, 0)), "Q": np.zeros((0, n)),
                "base": base, "scaling": s, "stored": lora_a.size + lora_b.size + (0 if base is None else base.size)}
    if has["weight"]:
        return {"layout": "dense", "A": None, "B": None, "weight": get(f"{name}.weight", (m, n)),
                "dtype": tensors[f"{name}.weight"].dtype, "base": None, "stored": m * n,
                "half": [half_steps.get(f"{name}.weight")]}
    raise MrcError("not found in the compressed file (expected <name>.lowrank_a/lowrank_b, a PEFT pair "
                   "<name>.lora_A.weight/lora_B.weight, or a dense <name>.weight)", file=path, layer=name)


# ----------------------------------------------------------------- certificates
def certify_layer(name, W, C, layer, rtol, atol, rank_rtol=None):
    """Figures and verdict of one layer (see docs/cli.md, ``verify``).

    The principal pair is certified with :func:`mrc_ref.certificates.certify_stage1`,
    whose one eigendecomposition of the output Gram also gives the optimal
    curve of the allocation gap: ``A B`` against ``W`` (mrc_ref layout, or a
    PEFT pair alone); ``s B A`` against the base's error ``W − W_base`` (a
    PEFT pair on a base weight, the EoRA problem); for a dense weight ``W̃``
    of numerical rank ``ρ``, its first ``ρ`` singular triplets against ``W``.
    The whole layer's NMSE may not fall below the optimum at rank ``r + q``
    (that would mean a rank larger than counted, or statistics of another
    model). The parameters counted are those the file stores for the layer.

    Returns
    -------
    entry : dict
        The layer's figures, verdict and counts.
    curve : ndarray (k + 1,)
        The optimal NMSE of ``W`` at every rank.
    """
    m, n = W.shape
    entry = {"name": name, "layout": layer["layout"], "shape": [m, n], "rank": None, "residual_rank": 0,
             "stored_params": int(layer["stored"]), "params": int(layer["stored"]), "counted_as": None,
             "nmse": 0.0, "nmse_layer": 0.0, "nmse_optimal": 0.0, "nmse_optimal_r_plus_q": 0.0, "excess": 1.0,
             "eigen_gap": None, "passed": True, "failures": []}
    fail = entry["failures"].append
    target, base = W, layer["base"]
    if layer["layout"] == "dense":
        W_tilde, (half,) = layer["weight"], layer["half"]
        entry["counted_as"] = "dense, m n as stored"
        if np.array_equal(W_tilde, W):
            entry["layout"] = "dense (unchanged)"
            return entry, certificates.optimal_nmse_curve(W, C)
        if half is not None:  # int8: unchanged but for rounding to the stored grid, entry by entry
            entry["layout"] = "dense (int8)"
            entry["nmse_layer"] = svd.nmse(W, W_tilde, C, np)
            worst = float(np.max(np.abs(W - W_tilde) - half[:, None] * (1 + 1e-6)))
            if worst > 0:
                fail(f"layer {name}: int8 dense weight is not the rounding of the original (an entry is {worst:.3g} "
                     "beyond half a quantization step)")
            entry["passed"] = not entry["failures"]
            return entry, certificates.optimal_nmse_curve(W, C)
        U, s, Vt = np.linalg.svd(W_tilde, full_matrices=False)
        tol = (max(m, n) * np.finfo(layer["dtype"]).eps if rank_rtol is None else rank_rtol) * (s[0] if s.size else 0)
        rho = int(np.sum(s > tol))
        entry["rank"], entry["numerical_rank_params"] = rho, rho * (m + n)
        if rho == min(m, n):
            entry["nmse_layer"] = entry["nmse"] = svd.nmse(W, W_tilde, C, np)
            entry["excess"] = 1.0 if entry["nmse"] <= certificates.EXCESS_FLOOR else float("inf")
            if entry["nmse"] > atol:
                fail(f"layer {name}: dense weight of full numerical rank {rho} differs from the original "
                     f"(NMSE {entry['nmse']:.4g} > atol {atol:g}): not a low-rank approximation")
            entry["passed"] = not entry["failures"]
            return entry, certificates.optimal_nmse_curve(W, C)
        A, B, q = U[:, :rho] * s[:rho], Vt[:rho], 0
        entry["nmse_layer"] = svd.nmse(W, W_tilde, C, np)
    else:
        A, B, q = layer["A"], layer["B"], layer["P"].shape[1]
        if base is not None:
            target = W - base
        entry["rank"], entry["residual_rank"] = int(A.shape[1]), int(q)
        if base is not None:
            entry["nmse_layer"] = svd.nmse(W, A @ B + base, C, np)
        entry["counted_as"] = {"factored": "factors (r + q)(m + n) as stored",
                               "lora": "PEFT pair r (m + n)" + (" plus the base m n" if base is not None else "")
                                       + " as stored"}[layer["layout"]]
    if base is not None and not np.sum((target @ C) * target) > 0:
        entry["nmse"] = entry["nmse_layer"]
        if entry["nmse"] > atol:
            fail(f"layer {name}: the base weight equals the original, yet the pair changes the outputs "
                 f"(NMSE {entry['nmse']:.4g} > atol {atol:g})")
        entry["passed"] = not entry["failures"]
        return entry, certificates.optimal_nmse_curve(W, C)
    whole = layer["layout"] != "dense" and base is None  # the layer is A B + P Q: its NMSE comes with the certificate
    cert = certificates.certify_stage1(target, C, A, B, residual=(layer["P"], layer["Q"]) if whole else None)
    if whole:
        entry["nmse_layer"] = cert["nmse_layer"]
    curve = cert["nmse_optimal_curve"] if base is None else certificates.optimal_nmse_curve(W, C)
    k, r = len(curve) - 1, entry["rank"]
    entry.update(nmse=cert["nmse"], nmse_optimal=cert["nmse_optimal"], excess=cert["excess"],
                 eigen_gap=cert["eigen_gap"], nmse_optimal_r_plus_q=float(curve[min(r + q, k)]))
    allowed = cert["nmse_optimal"] * (1 + rtol) + atol
    slack = 0.0  # int8 factors: the optimum's, up to what their rounding can change (certificates.rounding_bound)
    half = layer.get("half") or [None] * 4
    if layer["layout"] == "factored" and any(h is not None for h in half):
        norm = certificates.metric_norm_sq(target, C) ** 0.5
        principal = certificates.rounding_bound(A, B, half[0], half[1], C) / norm
        slack = principal + (certificates.rounding_bound(layer["P"], layer["Q"], half[2], half[3], C) / norm
                             if q else 0.0)
        entry["int8_rounding_bound"] = slack
        allowed = (allowed ** 0.5 + principal) ** 2
    what = ("NMSE of the pair s·lora_B lora_A against the base's error W − W_base" if base is not None
            else "Stage-1 NMSE")
    if not cert["nmse"] <= allowed:
        fail(f"layer {name}: {what} at rank {r} is {cert['nmse']:.6g}, above the optimum {cert['nmse_optimal']:.6g} "
             f"by a factor {cert['excess']:.6g} (excess {cert['excess'] - 1:.3g}; allowed ≤ "
             f"{allowed:.6g}: optimum · (1 + rtol {rtol:g}) + atol {atol:g}"
             + (f", widened by the int8 rounding bound {slack:.3g}" if slack else "") + ")")
    floor = max(max(entry["nmse_optimal_r_plus_q"] * (1 - rtol) - atol, 0.0) ** 0.5 - slack, 0.0) ** 2
    if base is None and entry["nmse_layer"] < floor:
        fail(f"layer {name}: NMSE of the whole layer {entry['nmse_layer']:.6g} is below the optimum "
             f"{entry['nmse_optimal_r_plus_q']:.6g} at rank r + q = {r + q}, which no rank-{r + q} matrix can "
             "beat: the layer's rank is larger than counted (see --rank-rtol), or ACTS are not this model's statistics")
    entry["passed"] = not entry["failures"]
    return entry, curve


def allocation_totals(entries, curves, p_total, fixed, budget):
    """Totals: parameters against the budget, and the allocation's gap to the
    exact Stage-2 optimum at the same budget (the model's own size when no
    budget is given). The gap is computed when every layer is a Stage-2
    choice: factored (or a PEFT pair alone) with one residual rank ``q``
    shared by the factored layers, or unchanged."""
    params_after = fixed + sum(e["params"] for e in entries)
    totals = {"params_before": p_total, "params_after": params_after, "fixed_params": fixed, "budget": budget,
              "within_budget": None if budget is None else params_after <= budget,
              "over_budget_by": None if budget is None else max(params_after - budget, 0),
              "sum_nmse": float(sum(e["nmse"] for e in entries)),
              "objective": None, "optimum": None, "lower_bound": None, "exact": None, "allocation_gap": None,
              "gap_budget": None, "gap_note": None}
    if any(e["layout"] == "lora" and e.get("on_base") for e in entries):
        totals["gap_note"] = "not computed: a PEFT pair on a base weight is not a Stage-2 choice"
        return totals
    changed = [e["name"] for e in entries if e["layout"] == "dense"]
    if changed:
        totals["gap_note"] = f"not computed: {changed[0]} is stored dense but changed, not a Stage-2 choice"
        return totals
    qs = {e["residual_rank"] for e in entries if e["rank"] is not None}
    if len(qs) > 1:
        totals["gap_note"] = f"not computed: the factored layers have different residual ranks {sorted(qs)}"
        return totals
    if totals["over_budget_by"]:
        totals["gap_note"] = f"not meaningful: the model is over the budget by {totals['over_budget_by']} parameters"
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
def _read_compressed_model(path, lora_scaling):
    """``(tensors, metadata, scaling, adapter, half steps)``: a PEFT directory,
    or any model file (:func:`mrc_ref.formats.read_model`), int8 dequantized
    (the half quantization steps of each int8 key kept)."""
    if os.path.isdir(path):
        if lora_scaling is not None:
            raise ConfigError("lora_scaling", "applies to a bare state dict; a PEFT directory's "
                              "adapter_config.json gives each pair's scaling")
        tensors, config = read_adapter(path)
        return tensors, {}, lambda name, rank: pair_scaling(config, name, rank, path), True, {}
    tensors, metadata = formats.read_model(path)
    half = {k: tensors[k + quantize.SCALE_SUFFIX].astype(np.float64) / 2 for k in quantize.quantized_keys(tensors)}
    tensors = quantize.dequantize_tensors(tensors, np, np.float64)  # version 2: certified as it decodes
    return tensors, metadata, 1.0 if lora_scaling is None else lora_scaling, False, half


def verify_files(compressed, weights, acts, *, reduction=None, budget=None, layers=None, statistic=None,
                 rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, rank_rtol=None, lora_scaling=None, max_gap=None,
                 report_path=None):
    """Read the three inputs, certify every selected layer, check the budget.

    ``compressed`` is a model file or a PEFT ``save_pretrained`` directory;
    ``lora_scaling`` the ``s`` of the pairs of a bare PEFT state dict
    (default 1). Returns the report (dict; ``passed`` and ``failures`` hold
    the verdict).

    Raises
    ------
    MrcError
        Bad input (exit code 2 on the command line).
    """
    for field, value in (("rtol", rtol), ("atol", atol), ("max_gap", max_gap), ("rank_rtol", rank_rtol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ConfigError(field, f"must be a finite number ≥ 0, got {value}")
    if lora_scaling is not None and not (np.isfinite(lora_scaling) and lora_scaling > 0):
        raise ConfigError("lora_scaling", f"must be a positive finite number, got {lora_scaling}")
    if reduction is not None and not 0 < reduction < 1:
        raise ConfigError("reduction", f"must be in (0, 1), got {reduction}")
    if budget is not None and budget < 0:
        raise ConfigError("budget", f"must be ≥ 0, got {budget}")
    if statistic is not None and statistic not in stats.STATISTICS:
        raise ConfigError("statistic", f"must be one of {', '.join(stats.STATISTICS)}, got {statistic!r}")
    compressed = os.fspath(compressed)
    inputs = (compressed, weights, acts)
    if report_path:
        formats.check_outputs((report_path,), inputs)
    stored, metadata, scaling, adapter, half_steps = _read_compressed_model(compressed, lora_scaling)
    original, _ = formats.read_original(weights)
    own = metadata.get("config", {}) if metadata.get("format") == formats.COMPRESSED_FORMAT else {}
    patterns = tuple(p.strip() for p in layers.split(",") if p.strip()) if layers else \
        tuple(own.get("layers") or pipeline.DEFAULT_LAYERS)
    statistic = statistic or own.get("statistic") or "gram"
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
    selected_keys = {f"{n}.{s}" for n in names for s in ("weight", "base_layer.weight", *layout.FACTOR_SUFFIXES)}
    selected_keys |= {key for pair in lora.values() for key in pair.values()}
    fixed_in_file = sum(int(np.prod(v.shape)) for k, v in tensors.items() if k not in selected_keys)
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
            layer = read_layer(tensors, lora, name, m, n, compressed, scaling, stored_names, half_steps)
            try:
                raw = formats.read_layer_stats(f, name, acts, n=n)
                C = stats.metric(statistic, stats.validate(raw, n, np, statistic=statistic), n, np)
                entry, curve = certify_layer(name, W, C, layer, rtol, atol, rank_rtol)
            except MrcError as err:
                raise MrcError(err.message, file=acts, layer=name) from None
            entry["on_base"] = layer["base"] is not None
            if "scaling" in layer:
                entry["lora_scaling"] = layer["scaling"]
            entries.append(entry)
            curves.append(curve)
    totals = allocation_totals(entries, curves, p_total, fixed, budget)
    totals["budget_source"] = source
    totals["fixed_stored_in_file"] = fixed_in_file
    totals["fixed_note"] = (None if fixed_in_file >= fixed else
                            f"the file stores {fixed_in_file} of the {fixed} parameters outside the selected layers "
                            "(embeddings, norms, biases, head…); all are counted from the original weights")
    failures = [msg for e in entries for msg in e["failures"]]
    if budget is not None and not totals["within_budget"]:
        failures.append(f"total parameters {totals['params_after']} exceed the budget {budget} "
                        f"(from {source}; {p_total} parameters before) by {totals['over_budget_by']}")
    gap = totals["allocation_gap"]
    if max_gap is not None and (gap is None or gap > max_gap):
        against = totals["gap_note"] or (f"Σ NMSE {totals['objective']} against the optimum {totals['optimum']} "
                                         f"at {totals['gap_budget']} parameters")
        failures.append(f"allocation gap {'not computed' if gap is None else f'{gap:.4g}'} is not within "
                        f"--max-gap {max_gap:g} ({against})")
    report = {
        "inputs": {"compressed": os.path.basename(os.path.normpath(compressed)), "peft_directory": adapter,
                   "weights": os.path.basename(weights), "acts": os.path.basename(acts)},
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
    """The per-layer table and the totals, as text: what the file stores,
    what is counted and why, the certificate of each layer."""
    rows = [("layer", "layout", "shape", "rank", "q", "stored", "counted", "NMSE (A B)", "NMSE layer", "opt @ r",
             "opt @ r+q", "excess", "ok")]
    for e in report["layers"]:
        rows.append((e["name"], e["layout"], "{}x{}".format(*e["shape"]), _fmt(e["rank"], "d"), str(e["residual_rank"]),
                     str(e["stored_params"]), str(e["params"]), _fmt(e["nmse"]), _fmt(e["nmse_layer"]), _fmt(e["nmse_optimal"]),
                     _fmt(e["nmse_optimal_r_plus_q"]), _fmt(e["excess"], ".6g"), "yes" if e["passed"] else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    reasons = sorted({e["counted_as"] for e in report["layers"] if e["counted_as"]})
    t = report["totals"]
    lines.append(f"counted: each selected layer as the file stores it ({'; '.join(reasons)}); "
                 f"{t['fixed_params']} parameters outside them, from the original weights"
                 + (f" ({t['fixed_note']})" if t["fixed_note"] else ""))
    if t["budget"] is None:
        budget = "no budget given"
    elif t["within_budget"]:
        budget = f"budget {t['budget']} ({t['budget_source']}): within, {t['budget'] - t['params_after']} to spare"
    else:
        budget = f"budget {t['budget']} ({t['budget_source']}): OVER by {t['over_budget_by']} parameters"
    lines.append(f"parameters {t['params_before']} -> {t['params_after']}; {budget}")
    if t["allocation_gap"] is not None or t["optimum"] is not None:
        lines.append(f"Σ NMSE {t['sum_nmse']:.6g}; at these ranks {t['objective']:.6g}; exact optimum "
                     f"{t['optimum']:.6g} at {t['gap_budget']} parameters; allocation gap "
                     f"{_fmt(t['allocation_gap'], '.2%')}")
    else:
        lines.append(f"Σ NMSE {t['sum_nmse']:.6g}; allocation gap {t['gap_note']}")
    return "\n".join(lines)
