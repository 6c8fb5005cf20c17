"""The three stages in order for a set of layers (no file I/O).

``run`` takes the tensors of a model, a callable that returns one layer's raw
statistics, and a :class:`Config`; it returns the output tensors in the
compressed layout (docs/formats.md) and a JSON-ready report.
"""

import dataclasses
import fnmatch
import math
import numbers
import re

import numpy as np

from . import allocate, compensate, sensitivity, stats, svd, vit
from .backend import DEVICES, DTYPES, device_name, get_dtype, to_host
from .errors import ConfigError, MrcError, describe

__all__ = ["Config", "DEFAULT_LAYERS", "COMPENSATIONS", "MAX_LR", "run", "stage1", "check_config", "config_from_json",
           "select_layers", "count_params"]

#: The timm ViT block linears, in forward order within a block.
DEFAULT_LAYERS = tuple(f"blocks.*.{leaf}" for leaf in vit.BLOCK_LINEARS)
COMPENSATIONS = ("sequential", "local", "none")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every option of a compression run; recorded in the output's metadata.

    ``reduction`` is the fraction of the model's stored parameters removed
    (budget ``P* = ⌊(1 − reduction) P_total⌋``); ``rank``, when set, fixes every
    selected layer's rank and skips the budget. ``compensation`` ``"auto"``
    resolves to ``sequential`` when proxy tokens exist, else ``local``.
    ``sensitivity``, when set, maps layer names to the weights ``w_l ≥ 0`` of
    the Stage-2 objective ``Σ_l w_l NMSE_l(r_l)`` (:mod:`mrc_ref.sensitivity`;
    selected layers it does not name get the mean weight); ``None`` is
    ``w_l = 1``, the paper's objective.
    """

    layers: tuple = DEFAULT_LAYERS
    statistic: str = "gram"
    allocation: str = "optimal"
    reduction: float = 0.6
    rank: int | None = None
    rank_step: int = 1
    local_search: bool = False
    sensitivity: dict | None = None
    residual_rank: int = 8
    compensation: str = "auto"
    solver: str = "exact"
    damping: float = compensate.DEFAULT_DAMP
    steps: int = 500
    lr: float = 1e-2
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"

    def to_json(self):
        """The configuration as a JSON-ready dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


#: The largest ``lr`` accepted: Adam moves every entry of ``P`` and ``Q`` by
#: about ``lr`` per step, far beyond the scale of any weight above 1.
MAX_LR = 1.0


def _check_types(config):
    """Each field of ``config`` has its declared type: a choice is one of its
    names, a count an ``int`` (never a ``bool``), a real a finite number,
    ``layers`` a sequence of non-empty strings, ``local_search`` a ``bool``.
    The fields may come from a file (a stored configuration), not only from
    a command line."""
    choices = {"statistic": stats.STATISTICS, "allocation": allocate.ALLOCATIONS,
               "compensation": COMPENSATIONS + ("auto",), "solver": compensate.SOLVERS, "dtype": DTYPES,
               "device": DEVICES}
    for name, names in choices.items():
        value = getattr(config, name)
        if not isinstance(value, str) or value not in names:
            raise ConfigError(name, f"must be one of {', '.join(names)}, got {describe(value)}")
    for name in ("rank_step", "residual_rank", "steps", "seed", "rank"):
        value = getattr(config, name)
        if (value is not None or name != "rank") and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ConfigError(name, f"must be an integer, got {describe(value)}")
    for name in ("reduction", "damping", "lr"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(name, f"must be a number, got {describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")
    if not isinstance(config.local_search, bool):
        raise ConfigError("local_search", f"must be true or false, got {describe(config.local_search)}")
    layers = config.layers
    if isinstance(layers, str) or not isinstance(layers, (tuple, list)) \
            or not all(isinstance(p, str) and p for p in layers):
        raise ConfigError("layers", f"must be a list of non-empty glob patterns, got {describe(layers)}")


def check_config(config):
    """Raise :class:`~mrc_ref.errors.ConfigError`, naming the field, for an
    option of the wrong type or out of range.

    Every floating-point field of :class:`Config`, whatever it is, must be
    finite (no NaN or infinity reaches the math, the metadata or the report).
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise ConfigError(field.name, f"must be a finite number, got {value}")
    _check_types(config)
    if not 0 < config.reduction < 1:
        raise ConfigError("reduction", f"must be in (0, 1), got {config.reduction}")
    if config.rank is not None and config.rank < 1:
        raise ConfigError("rank", f"must be ≥ 1, got {config.rank}")
    if config.rank_step < 1:
        raise ConfigError("rank_step", f"must be ≥ 1, got {config.rank_step}")
    if config.residual_rank < 0:
        raise ConfigError("residual_rank", f"must be ≥ 0, got {config.residual_rank}")
    if not config.damping >= 0:
        raise ConfigError("damping", f"must be ≥ 0, got {config.damping}")
    if config.steps < 0:
        raise ConfigError("steps", f"must be ≥ 0, got {config.steps}")
    if config.seed < 0:
        raise ConfigError("seed", f"must be ≥ 0, got {config.seed}")
    if not 0 < config.lr <= MAX_LR:
        raise ConfigError("lr", f"must be positive and at most {MAX_LR:g}, got {config.lr}")
    if config.sensitivity is not None:
        sensitivity.check_weights(config.sensitivity)
    if not config.layers:
        raise ConfigError("layers", "selects no pattern")


def config_from_json(data):
    """The :class:`Config` of a JSON object (a stored configuration), checked
    like options of a command line (:func:`check_config`).

    Keys that ``Config`` does not know are refused unless they are null (an
    option added after the object was written keeps its default); ``layers``
    must be a list (a string is not split into characters).

    Raises
    ------
    ConfigError
        Naming the field.
    MrcError
        ``data`` is not an object, or sets unknown options.
    """
    if not isinstance(data, dict):
        raise MrcError(f"the configuration is not a JSON object (got {describe(data)})")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = [k for k, v in data.items() if k not in fields and v is not None]
    if unknown:
        raise MrcError(f"the configuration sets options this version of mrc_ref does not know: {', '.join(unknown)}")
    kwargs = {k: v for k, v in data.items() if k in fields}
    if "layers" in kwargs:
        if not isinstance(kwargs["layers"], list):
            raise ConfigError("layers", f"must be a list of glob patterns, got {describe(kwargs['layers'])}")
        kwargs["layers"] = tuple(kwargs["layers"])
    config = Config(**kwargs)
    check_config(config)
    return config


_VIT_ORDER = {leaf: i for i, leaf in enumerate(vit.BLOCK_LINEARS)}


def _order_key(name):
    """Forward order: numbers compare as numbers, and within a ViT block
    qkv < proj < fc1 < fc2."""
    key = []
    for part in re.split(r"(\d+)", name):
        if part.isdigit():
            key.append((0, int(part), ""))
        elif part:
            stripped = part.strip(".")
            key.append((1, _VIT_ORDER.get(stripped, len(_VIT_ORDER)), stripped))
    return key


def select_layers(tensors, patterns):
    """Names ``<name>`` of 2-D floating-point ``<name>.weight`` tensors
    matching any glob pattern, in forward order."""
    names = [k[: -len(".weight")] for k, v in tensors.items()
             if k.endswith(".weight") and v.ndim == 2 and np.issubdtype(v.dtype, np.floating)]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError("layers", f"{','.join(patterns)} matches no 2-D '<name>.weight' tensor")
    return sorted(chosen, key=_order_key)


def count_params(tensors):
    """Stored parameters: the element count of every tensor, as stored."""
    return int(sum(int(np.prod(v.shape)) for v in tensors.values()))


def _layer_metric(name, W, raw, config, xp, dtype, psd=True):
    """The validated metric ``C`` of layer ``name`` for the configured statistic
    (only the matrix it uses is tested positive semi-definite, and not when
    ``psd`` is false: Stage 3 re-reads what Stage 1 has tested)."""
    try:
        checked = stats.validate(raw, W.shape[1], xp, dtype, statistic=config.statistic, psd=psd)
        return stats.metric(config.statistic, checked, W.shape[1], xp)
    except MrcError as err:
        raise err.at(layer=name) from None


def stage1(tensors, load_stats, config, *, xp, progress=None, files=(None, None), full=False):
    """Stage 1 of every selected layer, once, for reuse by several :func:`run` calls.

    The decomposition ``W C Wᵀ = U Σ² Uᵀ`` (:func:`mrc_ref.svd.output_basis`)
    depends on the weight, the statistic and the dtype only, not on the
    allocation, the reduction or the compensation; :func:`run` given this
    result (``stage1=``) skips its own Stage 1 and gives the same numbers.

    Parameters
    ----------
    tensors, load_stats, config, xp, progress, files :
        As :func:`run`; ``config.layers``, ``statistic``, ``dtype`` and
        ``rank`` are used.
    full : bool
        Keep every column of ``U`` (any later ``--rank`` fits), not only
        those up to the break-even rank ``⌊m n / (m + n)⌋``.

    Returns
    -------
    dict
        ``statistic``, ``dtype`` (of the config) and ``layers``:
        ``{name: (U, nmse)}`` with ``U`` (m, keep) in ``xp`` and ``nmse``
        (k + 1,) the host curve of :func:`mrc_ref.svd.nmse_curve`.
    """
    check_config(config)
    try:
        names = select_layers(tensors, config.layers)
        return {"statistic": config.statistic, "dtype": config.dtype,
                "layers": _stage1(tensors, load_stats, names, config, xp, progress or (lambda it, desc: it),
                                  files, full)}
    except MrcError as err:
        raise err.at(file=files[0]) from None


def _stage1(tensors, load_stats, names, config, xp, progress, files, full):
    """``{name: (U, nmse curve)}`` of :func:`stage1`."""
    dtype = get_dtype(config.dtype)
    layers = {}
    for name in progress(names, "stage 1 (activation-aware SVD)"):
        W = xp.asarray(tensors[name + ".weight"], dtype=dtype)
        if not bool(xp.isfinite(W).all()):
            raise MrcError("weight contains NaN or Inf", file=files[0], layer=name)
        if not (W.size and float(xp.abs(W).max()) > 0):
            raise MrcError(f"weight of shape {tuple(W.shape)} is all zero or empty", file=files[0], layer=name)
        try:  # W is valid here, so what fails below is the statistic's (or W C Wᵀ's) fault
            C = _layer_metric(name, W, load_stats(name), config, xp, dtype)
            U, s2 = svd.output_basis(W, C, xp)
        except MrcError as err:
            raise err.at(file=files[1], layer=name) from None
        keep = U.shape[1] if full else max(allocate.break_even_rank(*W.shape, 0), config.rank or 0)
        layers[name] = (U[:, :keep], to_host(svd.nmse_curve(s2, xp)))
    return layers


def _cached_stage1(cache, names, shapes, config):
    """The bases and curves of ``names`` from a :func:`stage1` result, checked
    against ``config`` (a mismatch is a programming error: ``ValueError``)."""
    if (cache["statistic"], cache["dtype"]) != (config.statistic, config.dtype):
        raise ValueError(f"stage1 computed for statistic {cache['statistic']!r}, dtype {cache['dtype']!r}; "
                         f"the config asks for {config.statistic!r}, {config.dtype!r}")
    bases, curves = {}, []
    for name, (m, n) in zip(names, shapes):
        if name not in cache["layers"]:
            raise ValueError(f"stage1 has no layer {name!r}")
        U, curve = cache["layers"][name]
        if U.shape[1] < max(allocate.break_even_rank(m, n, 0), config.rank or 0):
            raise ValueError(f"stage1 keeps {U.shape[1]} columns of {name!r}; compute it with full=True")
        bases[name] = U
        curves.append(curve)
    return bases, curves


def run(tensors, load_stats, config, *, xp, progress=None, sequential=None, files=(None, None), stage1=None):
    """Compress the selected layers of ``tensors``.

    Parameters
    ----------
    tensors : dict of str -> ndarray
        The model as stored (host arrays; not modified).
    load_stats : callable
        ``load_stats(name) -> dict`` of raw statistics (``gram``, ``sum``,
        ``rows``, ``gram_normalized``), see :func:`mrc_ref.stats.validate`.
    config : Config
    xp : module
        Array module for the math.
    progress : callable, optional
        ``progress(iterable, desc) -> iterable`` (e.g. a tqdm wrapper).
    sequential : callable, optional
        ``sequential(factors, config, xp) -> dict name -> (P, Q, info)``
        running the sequential Stage 3, with ``factors[name] = (index, W, A, B)``;
        required when the compensation is ``sequential``.
    files : (str, str) or (str, str, str), optional
        Names of the weights, statistics and (optional) sensitivity sources,
        used in error messages only.
    stage1 : dict, optional
        The result of :func:`stage1` for the same tensors, statistic and
        dtype (any superset of the selected layers): Stage 1 is then not
        recomputed, and the results are the same.

    Returns
    -------
    out : dict of str -> ndarray
        Every input tensor, with each compressed ``<name>.weight`` replaced by
        ``lowrank_a``, ``lowrank_b`` and, when ``q > 0``, ``residual_p``,
        ``residual_q`` (in the weight's stored dtype).
    report : dict
        JSON-ready: configuration, per-layer figures and totals.
    """
    check_config(config)
    try:
        return _run(tensors, load_stats, config, xp, progress, sequential, files, stage1)
    except MrcError as err:  # each statistics error names its file where raised; the rest concerns the model
        raise err.at(file=files[0]) from None


def _run(tensors, load_stats, config, xp, progress, sequential, files, cache=None):
    progress = progress or (lambda it, desc: it)
    dtype = get_dtype(config.dtype)
    compensation = config.compensation
    if compensation == "auto":
        compensation = "sequential" if sequential is not None else "local"
    if compensation == "sequential" and sequential is None:
        raise ConfigError("compensation", "sequential needs proxy tokens ('proxy/tokens' in the activations file)",
                          file=files[1])
    q = 0 if compensation == "none" else config.residual_rank
    names = select_layers(tensors, config.layers)
    shapes = [tuple(int(s) for s in tensors[n + ".weight"].shape) for n in names]
    p_total = count_params(tensors)
    fixed = p_total - sum(m * n for m, n in shapes)
    if config.sensitivity is None:  # the paper's objective
        weights, default, defaulted = [1.0] * len(names), None, []
    else:
        try:
            weights, default, defaulted = sensitivity.layer_weights(names, config.sensitivity,
                                                                    select_layers(tensors, ("*",)))
        except MrcError as err:
            raise err.at(file=files[2] if len(files) > 2 else None) from None

    # Stage 1: spectrum of every layer (basis kept up to the break-even rank), or a stage1() result.
    if cache is None:
        stage = _stage1(tensors, load_stats, names, config, xp, progress, files, full=False)
        bases, curves = {n: stage[n][0] for n in names}, [stage[n][1] for n in names]
    else:
        bases, curves = _cached_stage1(cache, names, shapes, config)

    # Stage 2: ranks, and the exact optimum (or a proven bound) to measure them against,
    # all on the curves w_l NMSE_l of the (weighted) objective.
    scaled = allocate.weighted(curves, weights)
    if config.rank is not None:
        ranks = allocate.fixed_rank(shapes, q, config.rank)
        budget = bound = None
        exact = False
    else:
        budget = allocate.parameter_budget(p_total, config.reduction)
        best, bound, exact = allocate.optimal(scaled, shapes, q, fixed, budget)
        if config.allocation == "optimal":
            ranks = best
        else:
            ranks = allocate.allocate(config.allocation, scaled, shapes, q, fixed, budget, config.rank_step)
        if config.local_search:
            ranks = allocate.local_search(scaled, shapes, q, fixed, budget, ranks)
    value = allocate.objective(scaled, ranks)

    # Factors, then Stage 3.
    out = dict(tensors)
    layers, factors = [], {}
    for index, (name, (m, n), rank) in enumerate(zip(names, shapes, ranks)):
        entry = {"name": name, "shape": [m, n], "statistic": config.statistic,
                 "rank": rank, "residual_rank": 0, "weight": weights[index], "params_before": m * n,
                 "params_after": allocate.layer_params(m, n, rank, q),
                 "nmse_stage1": 0.0, "loss_stage1": 0.0, "nmse_stage3": 0.0, "loss_stage3": 0.0,
                 "residual_norm": 0.0}
        layers.append(entry)
        if rank is None:
            continue
        W = xp.asarray(tensors[name + ".weight"], dtype=dtype)
        A, B = svd.factors(W, bases[name], rank)
        factors[name] = (index, W, A, B)
        for key in ("nmse_stage1", "loss_stage1", "nmse_stage3", "loss_stage3"):
            entry[key] = float(curves[index][rank])
    bases.clear()

    residuals = {}
    if q > 0 and factors:
        if compensation == "sequential":
            try:
                residuals = sequential(factors, config, xp)
            except MrcError as err:  # the forward pass's problems concern the model
                raise err.at(file=files[0]) from None
        else:
            for name in progress(list(factors), f"stage 3 ({compensation} compensation)"):
                index, W, A, B = factors[name]
                # Stage 1 (here, or the stage1() result) has tested this statistic positive
                # semi-definite: only the cheap checks run again on the re-read
                C = _layer_metric(name, W, load_stats(name), config, xp, dtype, psd=False)
                residuals[name] = compensate.solve(W, A, B, q, C, solver=config.solver, damp=config.damping,
                                                   steps=config.steps, lr=config.lr, seed=config.seed,
                                                   layer_index=index, xp=xp)

    for name, (index, W, A, B) in factors.items():
        stored = tensors[name + ".weight"].dtype
        del out[name + ".weight"]
        out[name + ".lowrank_a"] = to_host(A).astype(stored)
        out[name + ".lowrank_b"] = to_host(B).astype(stored)
        entry = layers[index]
        if name in residuals:
            P, Q, info = residuals[name]
            out[name + ".residual_p"] = to_host(P).astype(stored)
            out[name + ".residual_q"] = to_host(Q).astype(stored)
            entry["residual_rank"] = q
            entry.update(info)

    p_after = count_params(out)
    report = {
        "config": {**config.to_json(), "compensation": compensation, "residual_rank": q,
                   "device": device_name(xp)},  # the device that ran, whatever config.device said
        "layers": layers,
        "allocation": {
            "rule": "fixed rank" if config.rank is not None else config.allocation,
            "objective": value,
            "nmse_sum": allocate.objective(curves, ranks),
            "weights": "uniform" if config.sensitivity is None else "sensitivity",
            "default_weight": default,
            "defaulted_layers": defaulted,
            "lower_bound": bound,
            "bound": None if bound is None else ("exact optimum" if exact else "LP relaxation"),
            "relative_gap": None if bound is None else allocate.relative_gap(value, bound),
        },
        "totals": {
            "params_before": p_total,
            "params_after": p_after,
            "budget": budget,
            "reduction_target": None if config.rank is not None else config.reduction,
            "reduction_achieved": 1 - p_after / p_total,
            "selected_params_before": sum(e["params_before"] for e in layers),
            "selected_params_after": sum(e["params_after"] for e in layers),
            "layers_selected": len(layers),
            "layers_factored": len(factors),
        },
    }
    return out, report
