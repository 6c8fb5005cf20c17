"""The audit report's measurements: every configuration compressed with
:func:`mrc_ref.compress.compress_files` and evaluated with
:func:`mrc_ref.evaluate.tensor_logits` (the code paths of the commands
themselves), the figures' data and the per-layer certificates
(:func:`audit`), and the whole report written to a folder
(:func:`report_files`). See docs/report.md.
"""

import contextlib
import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from .. import certificates as certs, formats, metrics, pipeline, quantize, stats, vit
from .. import sensitivity as sens
from ..backend import get_dtype, get_xp, to_host
from ..compress import compress_files
from ..errors import ConfigError, InfeasibleBudget, MrcError
from ..evaluate import tensor_logits
from ..images import iter_batches, list_images, model_input_size
from ..progress import counter
from .grid import AT, CURVE_METHODS, METHODS, NONE, PROG, RANK_REDUCTIONS, REDUCTIONS, SENSITIVITY_METHODS
from .render import check_output_dir, document, write_report
from .verdicts import verdicts

__all__ = ["audit", "report_files", "evaluation", "measure", "int8_scores", "method_config",
           "compress_flags", "stage1_results", "projected_energy", "energy_figure", "proj_errors",
           "layer_certificates", "layer_type_points"]

#: Image batches kept in memory when they fit in this many bytes (else re-read from disk for every run).
CACHE_BYTES = 2 * 1024**3


# ----------------------------------------------------------------- measuring one configuration
def evaluation(weights, images, *, batch_size=64, limit=None, device="cpu", dtype="float64",
               cache_bytes=CACHE_BYTES):
    """The images and the original model's logits, for :func:`measure`.

    Images are transformed once (``mrc_ref.images``, the ``evaluate``
    transform) and kept in memory when they fit in ``cache_bytes``.

    Returns
    -------
    dict
        ``batches`` (callable returning an iterator of batches as
        :func:`mrc_ref.images.iter_batches`), ``reference`` logits (N, K)
        float64, ``labels`` (N,) or None, ``images`` N, ``device``,
        ``dtype``, ``metadata`` and ``tensors`` of the original model.
    """
    tensors, metadata = formats.read_original(weights)
    try:
        size = model_input_size(tensors)
    except MrcError as err:
        raise err.at(file=weights) from None
    count = len(list_images(images)[0])
    count = count if limit is None else min(count, int(limit))
    if count * 3 * size * size * 4 <= cache_bytes:
        cached = list(iter_batches(images, batch_size, size=size, limit=limit))
        batches = lambda: iter(cached)  # noqa: E731
    else:
        batches = lambda: iter_batches(images, batch_size, size=size, limit=limit)  # noqa: E731
    reference, labels = tensor_logits(tensors, metadata, batches(), device=device, dtype=dtype,
                                               source=weights)
    return {"batches": batches, "reference": reference, "labels": labels, "images": count, "device": device,
            "dtype": dtype, "metadata": metadata, "tensors": tensors}


def _scores(logits, ev):
    """top-1 (None without labels), agreement and output NMSE against the original."""
    return {"top1": None if ev["labels"] is None else metrics.topk_accuracy(logits, ev["labels"]),
            "top1_agreement": metrics.agreement(logits, ev["reference"]),
            "output_nmse": metrics.output_nmse(logits, ev["reference"])}


def int8_scores(tensors, metadata, logits, ev, *, source=None):
    """The model ``tensors`` quantized as ``compress --quantize int8`` stores it
    (:func:`mrc_ref.quantize.quantize_tensors`), evaluated as ``evaluate``
    reads it (dequantized on load): top-1, agreement and output NMSE against
    the original, ``agreement_with_float`` against the unquantized
    ``logits``, and the stored ``bytes``."""
    quantized = quantize.quantize_tensors(tensors)
    q_logits, _ = tensor_logits(quantized, metadata, ev["batches"](), device=ev["device"],
                                         dtype=ev["dtype"], source=source)
    return {**_scores(q_logits, ev), "agreement_with_float": metrics.agreement(q_logits, logits),
            "nmse_vs_float": metrics.output_nmse(q_logits, logits),
            "bytes_float": quantize.storage_bytes(tensors), "bytes": quantize.storage_bytes(quantized)}


def measure(weights, acts, config, ev, workdir, *, stage1=None, sensitivity=None, int8=False, keep=False):
    """Compress with ``config`` exactly as ``python -m mrc_ref.compress`` does
    (:func:`mrc_ref.compress.compress_files`, file written to ``workdir``),
    read the file back and evaluate it as ``python -m mrc_ref.evaluate``
    does (:func:`mrc_ref.evaluate.tensor_logits`).

    Parameters
    ----------
    weights, acts : str
        The inputs of ``compress``.
    config : mrc_ref.pipeline.Config
    ev : dict
        From :func:`evaluation`.
    workdir : str
        A scratch directory.
    stage1 : dict, optional
        :func:`mrc_ref.pipeline.stage1` of the same inputs, statistic and
        dtype: reused, not recomputed (the numbers are the same).
    sensitivity : str, optional
        A sensitivity file (``compress --sensitivity``).
    int8 : bool
        Also measure the model quantized (:func:`int8_scores`).
    keep : bool
        Also return the compressed tensors.

    Returns
    -------
    row : dict
        ``infeasible`` (the message) when the budget cannot be met; else
        ``top1``, ``top1_agreement``, ``output_nmse``, ``params`` (stored
        parameters), ``reduction_achieved``, ``max_residual_norm``,
        ``compensation`` (resolved), ``ranks`` ``{layer: rank or None}``,
        ``layers`` (the report's per-layer figures), ``allocation`` (the
        Stage-2 certificate), ``seconds``, and ``int8`` when asked.
    tensors : dict or None
        With ``keep``.
    """
    start = time.perf_counter()
    out = os.path.join(workdir, "run.compressed.safetensors")
    try:
        rep = compress_files(weights, acts, out, config, quiet=True, sensitivity=sensitivity,
                                      stage1=stage1)
    except InfeasibleBudget as err:
        return {"infeasible": err.message, "seconds": time.perf_counter() - start}, None
    tensors, metadata = formats.read_model(out)
    logits, _ = tensor_logits(tensors, metadata, ev["batches"](), device=ev["device"], dtype=ev["dtype"],
                                       source=out)
    layers = [{k: e[k] for k in ("name", "rank", "residual_rank", "params_after", "nmse_stage1", "nmse_stage3",
                                 "loss_stage1", "loss_stage3", "residual_norm")} for e in rep["layers"]]
    row = {**_scores(logits, ev), "params": rep["totals"]["params_after"],
           "reduction_achieved": rep["totals"]["reduction_achieved"],
           "max_residual_norm": max(e["residual_norm"] for e in rep["layers"]),
           "compensation": rep["config"]["compensation"], "residual_rank": rep["config"]["residual_rank"],
           "ranks": {e["name"]: e["rank"] for e in rep["layers"]}, "layers": layers,
           "allocation": rep["allocation"]}
    if int8:
        row["int8"] = int8_scores(tensors, metadata, logits, ev, source=out)
    row["seconds"] = time.perf_counter() - start
    return row, (tensors if keep else None)


def method_config(overrides, reduction=None, **common):
    """The Config of a method: defaults, then ``common`` (device, dtype), the
    method's fields and the reduction."""
    fields = {**common, **overrides}
    if reduction is not None:
        fields["reduction"] = reduction
    return pipeline.Config(**fields)


def compress_flags(config):
    """The ``python -m mrc_ref.compress`` options giving ``config`` (those
    that differ from the defaults)."""
    default = pipeline.Config()
    flags = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "sensitivity" or value == getattr(default, field.name):
            continue
        flags.append(f"--{field.name.replace('_', '-')} "
                     + (",".join(value) if isinstance(value, tuple) else str(value)))
    return " ".join(flags)


# ----------------------------------------------------------------- the measurements of the report
def _load_stats(f, acts, tensors):
    return lambda name: formats.read_layer_stats(f, name, acts, n=int(tensors[name + ".weight"].shape[1]))


def stage1_results(weights, acts, tensors, statistics, *, xp, common):
    """One :func:`mrc_ref.pipeline.stage1` per statistic (every column of ``U``
    kept), shared by every run of the report."""
    with formats.open_activations(acts) as f:
        return {s: pipeline.stage1(tensors, _load_stats(f, acts, tensors), pipeline.Config(statistic=s, **common),
                                   xp=xp, files=(weights, acts), full=True) for s in statistics}


def projected_energy(W, C, U, xp):
    """Output energy kept by the projection ``Π_r = U_r U_rᵀ`` of ``W``, at every rank:

        E(r) = 1 − NMSE(Π_r W) = Σ_{i≤r} u_iᵀ G u_i / tr G,   G = W C Wᵀ,

    since ``tr((I − Π) G (I − Π)) = tr G − tr(Π G)``. With ``U`` the plain SVD
    basis of ``W`` this is what weight SVD keeps of the *output* energy; with
    the activation-aware basis it is ``1 − svd.nmse_curve``.

    Parameters
    ----------
    W : array (m, n), C : array (n, n), U : array (m, k) orthonormal columns

    Returns
    -------
    ndarray (k + 1,) float64, ``E(0) = 0``
    """
    G = W @ C @ W.T
    d = xp.sum((G @ U) * U, axis=0)
    return np.concatenate([[0.0], np.cumsum(to_host(d))]) / float(xp.sum((W @ C) * W))  # tr G


def energy_figure(weights, acts, tensors, caches, block, *, xp, dtype):
    """Fig. 1 data: for each block linear of ``blocks.<block>``, the energy kept
    against rank by activation-aware SVD (``1 − NMSE``, the ``gram`` Stage 1),
    by plain weight SVD in its own measure (``1 − ‖W − W_r‖²/‖W‖²``) and by
    plain weight SVD measured on the outputs (:func:`projected_energy`)."""
    out = {}
    with formats.open_activations(acts) as f:
        for leaf in vit.BLOCK_LINEARS:
            name = f"blocks.{block}.{leaf}"
            if name not in caches["gram"]["layers"]:
                continue
            W = xp.asarray(tensors[name + ".weight"], dtype=dtype)
            n = W.shape[1]
            checked = stats.validate(_load_stats(f, acts, tensors)(name), n, xp, dtype, statistic="gram")
            C = stats.metric("gram", checked, n, xp)
            U_w, weight_curve = caches["weight"]["layers"][name]
            out[name] = {"shape": list(W.shape),
                         "activation_aware": (1 - caches["gram"]["layers"][name][1]).tolist(),
                         "weight_svd": (1 - weight_curve).tolist(),
                         "weight_svd_on_outputs": projected_energy(W, C, U_w, xp).tolist()}
    return out


def proj_errors(original, models, metadata, ev, *, xp, dtype):
    """Fig. 3 data: at the output of every ``blocks.<i>.attn.proj``, the
    normalized error of each model in ``models`` on the evaluation images,

        e_i = ‖X_i Wᵀ − X̃_i W̃ᵀ‖²_F / ‖X_i Wᵀ‖²_F,

    ``X_i`` the layer's inputs in the original model, ``X̃_i`` in the
    compressed one (all upstream error included), bias left out (it cancels).

    Returns
    -------
    dict label -> list of e_i, one per block
    """
    dtype = get_dtype(dtype)
    heads = vit.resolve_num_heads(original, None, metadata)
    params = {"original": vit.prepare(original, xp, dtype)}
    params.update({label: vit.prepare(t, xp, dtype) for label, t in models.items()})
    names = [f"blocks.{i}.attn.proj" for i in range(vit.depth(original))]
    num = {label: np.zeros(len(names)) for label in models}
    den = np.zeros(len(names))

    def outputs(p, batch):
        seen = {}
        vit.forward(p, batch, num_heads=heads, xp=xp, dtype=dtype,
                    hook=lambda name, x: seen.__setitem__(name, x) if name.endswith(".attn.proj") else None)
        return [vit.linear(p, name, seen[name], xp, bias=False) for name in names]

    for batch, *_ in ev["batches"]():
        batch = xp.asarray(batch)
        ref = outputs(params["original"], batch)
        den += [float(xp.sum(y * y)) for y in ref]
        for label in models:
            num[label] += [float(xp.sum((y - z) ** 2)) for y, z in zip(ref, outputs(params[label], batch))]
    return {label: (num[label] / den).tolist() for label in models}


def layer_certificates(weights, acts, tensors, compressed, *, xp, dtype, layers=pipeline.DEFAULT_LAYERS):
    """Per-layer Stage-1 certificates of a compressed model without residual
    (:func:`mrc_ref.certificates.certify_stage1` on the stored factors ``A, B``
    against the ``gram`` metric): achieved and optimal NMSE at the stored
    rank, their ratio and the largest principal angle to the optimal
    subspace. Dense layers are listed with rank None."""
    rows = []
    with formats.open_activations(acts) as f:
        for name in pipeline.select_layers(tensors, layers):
            if name + ".lowrank_a" not in compressed:
                rows.append({"name": name, "rank": None})
                continue
            W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
            n = W.shape[1]
            C = to_host(stats.metric("gram", stats.validate(_load_stats(f, acts, tensors)(name), n, np, np.float64,
                                                         statistic="gram"),
                                     n, np))
            cert = certs.certify_stage1(W, C, compressed[name + ".lowrank_a"].astype(np.float64),
                                          compressed[name + ".lowrank_b"].astype(np.float64))
            rows.append({"name": name, "rank": cert["rank"], "nmse": cert["nmse"],
                         "nmse_optimal": cert["nmse_optimal"], "excess": cert["excess"],
                         "max_angle": cert["max_angle"]})
    return rows


def layer_type_points(tensors, leaf):
    """Fig. 2 ranks of a layer type: ``(rank reduction, rank)`` with
    ``rank = max(1, round((1 − ρ) k))``, ``k`` the smallest ``min(m, n)`` of
    the type's layers; duplicates dropped."""
    names = [n for n in pipeline.select_layers(tensors, ("*",)) if n.endswith("." + leaf) and n.startswith("blocks.")]
    k = min(min(tensors[n + ".weight"].shape) for n in names)
    points = {}
    for rho in RANK_REDUCTIONS:
        rank = max(1, int(round((1 - rho) * k)))
        points.setdefault(rank, 1 - rank / k)
    return [(rho, rank) for rank, rho in sorted(points.items(), reverse=True)]


def audit(weights, acts, images, *, reductions=REDUCTIONS, at=AT, block=0, limit=None, batch_size=64,
          device="cpu", dtype="float64", sensitivity=None, adam=True, progress=None, timings=None,
          layers=pipeline.DEFAULT_LAYERS):
    """Every measurement of the report, as a JSON-ready dict (no file written
    but scratch files of ``compress`` in a temporary directory).

    ``timings`` (a dict) receives the seconds of each part.
    """
    timings = {} if timings is None else timings
    progress = progress or (lambda total: contextlib.nullcontext(None))
    clock = time.perf_counter()

    def lap(key):
        nonlocal clock
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - clock
        clock = now

    xp = get_xp(device)
    common = {"device": device, "dtype": dtype, "layers": tuple(layers)}
    ev = evaluation(weights, images, batch_size=batch_size, limit=limit, device=device, dtype=dtype)
    if ev["labels"] is None:
        raise MrcError("the report needs labelled images (one sub-folder per class) to measure top-1", file=images)
    tensors = ev["tensors"]
    if block >= vit.depth(tensors):
        raise MrcError(f"--block {block}: the model has {vit.depth(tensors)} blocks", file=weights)
    data = {"inputs": {"weights": os.path.basename(weights), "acts": os.path.basename(acts),
                       "images": os.path.basename(os.path.normpath(images)), "image_count": ev["images"],
                       "params": pipeline.count_params(tensors), "depth": vit.depth(tensors),
                       "sensitivity": None if sensitivity is None else os.path.basename(sensitivity)},
            "settings": {"reductions": list(reductions), "at": at, "block": block, "device": device, "dtype": dtype,
                         "batch_size": batch_size, "adam": adam},
            "original": {"top1": metrics.topk_accuracy(ev["reference"], ev["labels"])},
            "layer_shapes": {n: list(tensors[n + ".weight"].shape)
                             for n in pipeline.select_layers(tensors, layers)}}
    data["original"]["int8"] = int8_scores(tensors, ev["metadata"], ev["reference"], ev, source=weights)
    data["original"]["bytes"] = quantize.storage_bytes(tensors)
    lap("load, original model and its int8")

    caches = stage1_results(weights, acts, tensors, ("gram", "weight"), xp=xp, common=common)
    lap("stage 1 (once per layer and statistic)")

    methods = dict(METHODS)
    if not adam:
        methods.pop("optimal + Adam")
    methods.update(CURVE_METHODS)
    if sensitivity is not None:
        methods.update(SENSITIVITY_METHODS)
    type_points = {leaf: layer_type_points(tensors, leaf) for leaf in vit.BLOCK_LINEARS}
    total = len(reductions) * len(methods) + sum(len(p) for p in type_points.values())
    grid, kept, per_method = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="mrc_report.") as work, progress(total) as bar:
        for reduction in reductions:
            for label, overrides in methods.items():
                config = method_config(overrides, reduction, **common)
                keep = math.isclose(reduction, at) and label in ("optimal", "optimal + exact", "optimal + Adam")
                row, t = measure(weights, acts, config, ev, work, stage1=caches[config.statistic],
                                 sensitivity=sensitivity if label in SENSITIVITY_METHODS else None,
                                 int8=True, keep=keep)
                if t is not None:
                    kept[label] = t
                flags = compress_flags(config) + (f" --sensitivity {os.path.basename(sensitivity)}"
                                                  if label in SENSITIVITY_METHODS else "")
                grid.append({"reduction": reduction, "method": label, "flags": flags.strip(), **row})
                per_method[label] = per_method.get(label, 0.0) + row["seconds"]
                if bar is not None:
                    bar.set_postfix_str(f"{reduction} {label}")
                    bar.update(1)
        lap("main grid")
        types = {}
        for leaf, points in type_points.items():
            types[leaf] = []
            for rho, rank in points:
                config = method_config({"layers": (f"blocks.*.{leaf}",), "rank": rank, **NONE}, None, **common)
                row, _ = measure(weights, acts, config, ev, work, stage1=caches["gram"])
                types[leaf].append({"rank_reduction": rho, "rank": rank, "flags": compress_flags(config),
                                    **{k: row[k] for k in ("top1", "top1_agreement", "output_nmse", "params")}})
                if bar is not None:
                    bar.set_postfix_str(f"{leaf} rank {rank}")
                    bar.update(1)
        lap("Fig. 2 (each layer type alone)")
    data["grid"] = grid
    data["method_seconds"] = per_method
    data["layer_types"] = types

    data["energy"] = energy_figure(weights, acts, tensors, caches, block, xp=xp, dtype=get_dtype(dtype))
    lap("Fig. 1 (energy)")
    if kept:
        data["proj_error"] = proj_errors(tensors, kept, ev["metadata"], ev, xp=xp, dtype=dtype)
    lap("Fig. 3 (attn.proj error)")
    data["certificates"] = (layer_certificates(weights, acts, tensors, kept["optimal"], xp=xp, dtype=dtype,
                                               layers=layers)
                            if "optimal" in kept else [])
    if sensitivity is not None:
        document = formats.read_sensitivity(sensitivity)
        data["sensitivity"] = {"metric": document["metric"],
                               "weights": {k: v["weight"] for k, v in document["layers"].items()}}
    lap("certificates")
    data["verdicts"] = verdicts(data)
    return data




# ----------------------------------------------------------------- the whole report
def _check_extra():
    """Refuse, before any work, to run without the report extra."""
    import importlib.util

    for name in ("matplotlib",):
        if importlib.util.find_spec(name) is None:
            raise MrcError(f"{name} is not installed; install the report extra: pip install 'mrc_ref[report]' "
                           "(from a checkout: pip install -e '.[report]')")


def report_files(weights, acts, images, output, *, reductions=REDUCTIONS, at=AT, block=0, limit=None,
                 batch_size=64, device="cpu", sensitivity=None, adam=True, blas_threads=None, quiet=True,
                 layers=pipeline.DEFAULT_LAYERS,
                 command=PROG):
    """Measure (:func:`audit`), draw, render and write the report into the
    folder ``output``; every input and option is checked before any work.

    ``reductions`` get ``at`` added; ``blas_threads`` limits the BLAS threads
    during the runs (threadpoolctl); ``command`` is recorded in the report.
    Returns ``(written file names, timings)``.
    """
    _check_extra()
    from threadpoolctl import threadpool_limits

    from .figures import figures

    reductions = sorted({float(r) for r in [*reductions, at]})
    for r in reductions:
        if not 0 < r < 1:
            raise ConfigError("reductions", f"and at must be in (0, 1), got {r}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError("images", f"must be positive, got {limit}")
    if block < 0:
        raise ConfigError("block", f"must be ≥ 0, got {block}")
    if blas_threads is not None and blas_threads < 1:
        raise ConfigError("blas_threads", f"must be ≥ 1, got {blas_threads}")
    inputs = (weights, acts, sensitivity)
    for path in inputs:
        if path is not None:
            formats.check_input(path)
    check_output_dir(output, inputs, images)
    tensors, _ = formats.read_original(weights)  # a compressed model, or no layer to select: refused now
    try:
        names = pipeline.select_layers(tensors, tuple(layers))
    except MrcError as err:
        raise err.at(file=weights) from None
    if sensitivity:  # a bad file, or one naming a layer the model lacks, is refused before any work
        weights_of = {k: v["weight"] for k, v in formats.read_sensitivity(sensitivity)["layers"].items()}
        try:
            sens.layer_weights(names, weights_of, pipeline.select_layers(tensors, ("*",)))
        except MrcError as err:
            raise err.at(file=sensitivity) from None
    timings = {}
    limits = threadpool_limits(limits=blas_threads, user_api="blas") if blas_threads else contextlib.nullcontext()
    with limits:
        data = audit(weights, acts, images, reductions=reductions, at=at, block=block, limit=limit,
                     batch_size=batch_size, device=device, sensitivity=sensitivity, adam=adam, layers=layers,
                     progress=lambda total: counter(total, "report", quiet, unit="run"), timings=timings)
    data["command"] = command
    start = time.perf_counter()
    figs = figures(data)
    timings["figures and files"] = time.perf_counter() - start
    data["timings"] = timings
    written = write_report(output, data, figs, document(data, figs, timings), inputs)
    timings["figures and files"] = time.perf_counter() - start
    return written, timings
