"""Measure the end-to-end sensitivity of each selected layer of a timm-layout
ViT and write it as a ``mrc_ref.sensitivity`` file (docs/formats.md) for
``python -m mrc_ref.compress --sensitivity``. See docs/sensitivity.md; the
command line is ``python -m data_tools.sensitivity``.

For each layer ``l`` alone, the weight is replaced by its Stage-1 factors
``A B = U_r U_rᵀ W`` (the statistic's metric, :mod:`mrc_ref.svd`) at a few
ranks ``r_i`` whose NMSE spans about 0.02–0.15, the proxy images are run
through the rest of the model, and the end-to-end error is the logits NMSE
against the original model,

    e2e_l(r) = ‖Z̃_l(r) − Z‖²_F / ‖Z‖²_F,   Z (N, K): logits of the N proxy images.

The weight ``w_l`` is the least-squares slope through the origin of
``e2e_l(r_i)`` against ``NMSE_l(r_i)`` (:func:`mrc_ref.sensitivity.fit`).
"""

import os
import time

import numpy as np

from mrc_ref import formats, pipeline, stats, svd, vit
from mrc_ref.backend import get_dtype, get_xp, to_host
from mrc_ref.errors import MrcError
from mrc_ref.images import check_image_outputs, iter_batches, list_images, model_input_size
from mrc_ref.progress import progress_bar
from mrc_ref.sensitivity import fit

PROG = "python -m data_tools.sensitivity"
#: The NMSE range the measured ranks are spread over **[choice]**: the errors
#: a compressed layer typically ends at (0.6 reduction of DeiT-B-like spectra).
NMSE_RANGE = (0.02, 0.15)
POINTS = 3
BATCH_IMAGES = 64


# ----------------------------------------------------------------- pure parts
def choose_ranks(curve, points=POINTS, nmse_range=NMSE_RANGE):
    """Ranks whose NMSE spreads over ``nmse_range``.

    Targets ``t_j`` are ``points`` values spaced geometrically from ``lo`` to
    ``hi``; each takes the rank ``1 ≤ r < k`` with ``NMSE(r) > 0`` nearest to
    it in ``|log NMSE(r) − log t_j|``. Duplicates are replaced by the unused
    ranks nearest (in log) to the interval ``[lo, hi]``, so when even rank 1
    is below ``lo`` the result is the smallest ranks ``1, 2, …``.

    Parameters
    ----------
    curve : array (k + 1,)
        ``NMSE(r)`` for ``r = 0 … k`` (:func:`mrc_ref.svd.nmse_curve`).
    points : int
    nmse_range : (float, float)
        ``0 < lo ≤ hi < 1``.

    Returns
    -------
    list of int
        At most ``points`` distinct ranks, ascending; empty when no rank
        ``1 ≤ r < k`` has a positive NMSE.
    """
    lo, hi = nmse_range
    curve = np.asarray(curve, dtype=np.float64)
    ranks = [r for r in range(1, len(curve) - 1) if curve[r] > 0]
    if not ranks:
        return []
    logs = np.log(curve[ranks])
    chosen = []
    for t in np.geomspace(lo, hi, points):
        r = ranks[int(np.argmin(np.abs(logs - np.log(t))))]
        if r not in chosen:
            chosen.append(r)
    outside = np.maximum(np.log(lo) - logs, 0) + np.maximum(logs - np.log(hi), 0)
    for i in np.argsort(outside, kind="stable"):
        if len(chosen) >= points:
            break
        if ranks[i] not in chosen:
            chosen.append(ranks[i])
    return sorted(chosen)


def start_block(name, depth):
    """The block whose input a truncation of ``name`` starts from: its own
    block for a block linear, ``depth`` (after the last block) for the head."""
    index = vit.block_index(name)
    if index is not None:
        return index
    if name in vit.HEAD_LINEARS:
        return depth
    raise MrcError("sensitivity is measured for the block linears and the head only", layer=name)


def block_passes(starts, depth, points):
    """Block forward passes per proxy image: the reference run (``depth``),
    advancing the stream (``depth``), and ``depth − b_l`` per measured point
    of each layer ``l`` starting at block ``b_l``. The cost model of the
    timings in docs/sensitivity.md (a head pass is negligible)."""
    return 2 * depth + points * sum(depth - b for b in starts)


def _batches(count, size):
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def _sq(a, xp):
    return float(to_host(xp.sum(a * a)))


def measure(params, tokens, trials, *, num_heads, xp, dtype=np.float64, batch=BATCH_IMAGES, scratch=None,
            progress=None, count=None, source=None):
    """End-to-end logits NMSE of each single-layer truncation.

    The block inputs of the original model are advanced one block at a time
    in a host array from ``scratch`` (memory: one batch of activations when
    ``scratch`` is disk-backed); a truncation of a layer of block ``b`` runs
    blocks ``b … depth−1`` and the head from that block's input.

    Parameters
    ----------
    params : dict of str -> xp array
        The original model, prepared (:func:`mrc_ref.vit.prepare`).
    tokens : array-like (N, T, D)
        Block-0 inputs (sliceable along the first axis, e.g. the unread
        ``proxy/tokens`` dataset: only one batch is read at a time).
    trials : dict of str -> list of (A, B)
        Per layer, the factors to put in its place, one truncation each.
    num_heads : int
    xp : module
    batch : int
        Images per forward pass.
    scratch : callable, optional
        ``scratch(shape, dtype) -> host array`` (default ``numpy.empty``).
    progress : callable, optional
        ``progress(iterable, desc) -> iterable``.
    count : int, optional
        Use the first ``count`` images (default: all).
    source : str, optional
        The tokens' file, named in errors about them.

    Returns
    -------
    dict of str -> list of float
        ``‖Z̃ − Z‖²_F / ‖Z‖²_F`` per trial, in the order given.
    """
    progress = progress or (lambda it, desc: it)
    scratch = scratch or np.empty
    depth = vit.depth(params)
    starts = {name: start_block(name, depth) for name in trials}
    count = int(tokens.shape[0]) if count is None else min(int(count), int(tokens.shape[0]))
    chunks = _batches(count, batch)
    stream = scratch((count, *tokens.shape[1:]), dtype)
    reference = []
    for sl in chunks:
        part = np.asarray(tokens[sl], dtype=dtype)
        if not np.isfinite(part).all():
            raise MrcError(f"the tokens contain NaN or Inf (images {sl.start}–{sl.stop - 1})", file=source)
        stream[sl] = part
        reference.append(vit.head(params, vit.blocks(params, xp.asarray(part), num_heads, xp), xp))
    energy = sum(_sq(z, xp) for z in reference)
    if not energy > 0:
        raise MrcError("the model's logits are all zero on these images: no end-to-end error can be measured")
    errors = {name: [0.0] * len(trials[name]) for name in trials}
    forward = vit.linear_names(params)
    order = sorted(trials, key=lambda n: (starts[n], forward.index(n)))
    with_factors = {}
    for name in order:
        variants = []
        for A, B in trials[name]:
            p = dict(params)
            del p[name + ".weight"]
            p.update({name + ".lowrank_a": A, name + ".lowrank_b": B})
            variants.append(p)
        with_factors[name] = variants
    current = 0
    for name in progress(order, "end-to-end error per truncation"):
        for index in range(current, starts[name]):  # advance the stream to this layer's block
            for sl in chunks:
                stream[sl] = to_host(vit.block(params, index, xp.asarray(stream[sl]), num_heads, xp))
        current = max(current, starts[name])
        for sl, ref in zip(chunks, reference):
            h = xp.asarray(stream[sl])
            for i, p in enumerate(with_factors[name]):
                z = vit.head(p, vit.blocks(p, h, num_heads, xp, start=current), xp)
                errors[name][i] += _sq(z - ref, xp)
        with_factors[name] = None
    return {name: [e / energy for e in errs] for name, errs in errors.items()}


def layer_sensitivity(tensors, load_stats, tokens, *, num_heads, names, statistic="gram", points=POINTS,
                      nmse_range=NMSE_RANGE, xp=np, dtype=np.float64, batch=BATCH_IMAGES, scratch=None,
                      progress=None, files=(None, None), count=None, source=None):
    """Stage 1 of each layer, its truncations, and the fitted weights.

    Parameters
    ----------
    tensors : dict of str -> host array
        A timm-layout ViT.
    load_stats : callable
        ``load_stats(name) -> dict`` of raw statistics (as for
        :func:`mrc_ref.pipeline.run`).
    tokens : array-like (N, T, D)
        Block-0 inputs of the proxy images.
    names : sequence of str
        The layers to measure.
    statistic, points, nmse_range, xp, dtype, batch, scratch, progress, count
        The Stage-1 metric; the trials per layer (:func:`choose_ranks`); the
        backend; see :func:`measure`.
    files : (str, str), optional
        The weights and statistics sources, named in errors: a statistic's
        problem names the second, the forward pass's the first.
    source : str, optional
        The tokens' file, named in errors about their values.

    Returns
    -------
    layers : dict of str -> dict
        ``weight``, ``points`` ``[[nmse, error], …]``, ``ranks``,
        ``residual`` (:func:`mrc_ref.sensitivity.fit`) per measured layer.
    unmeasured : list of str
        Layers with no rank ``1 ≤ r < k`` of positive NMSE (nothing to fit);
        they get the default weight when compressing.
    """
    progress = progress or (lambda it, desc: it)
    trials, curves, chosen, unmeasured = {}, {}, {}, []
    for name in progress(list(names), "stage 1 (activation-aware SVD)"):
        W = xp.asarray(tensors[name + ".weight"], dtype=dtype)
        try:
            checked = stats.validate(load_stats(name), W.shape[1], xp, dtype, statistic=statistic)
            C = stats.metric(statistic, checked, W.shape[1], xp)
            U, s2 = svd.output_basis(W, C, xp)
        except MrcError as err:
            raise err.at(file=files[1], layer=name) from None
        curve = to_host(svd.nmse_curve(s2, xp))
        ranks = choose_ranks(curve, points, nmse_range)
        if not ranks:
            unmeasured.append(name)
            continue
        curves[name], chosen[name] = curve, ranks
        trials[name] = [svd.factors(W, U, r) for r in ranks]
    params = vit.prepare(tensors, xp, dtype)
    try:
        errors = measure(params, tokens, trials, num_heads=num_heads, xp=xp, dtype=dtype, batch=batch,
                         scratch=scratch, progress=progress, count=count, source=source)
    except MrcError as err:
        raise err.at(file=files[0]) from None
    layers = {}
    for name in names:
        if name in trials:
            pts = [[float(curves[name][r]), max(e, 0.0)] for r, e in zip(chosen[name], errors[name])]
            weight, residual = fit(pts)
            layers[name] = {"weight": weight, "points": pts, "ranks": chosen[name], "residual": residual}
    return layers, unmeasured


# ----------------------------------------------------------------- files
def image_tokens(tensors, folder, *, num_heads, xp, dtype, batch, limit, scratch):
    """Block-0 inputs of the images of ``folder`` (the DeiT eval transform at
    the model's input size), in a host array from ``scratch``."""

    params = vit.prepare(tensors, xp, dtype)
    count = len(list_images(folder)[0])
    count = count if limit is None else min(count, limit)
    tokens = None
    done = 0
    for images, _, _ in iter_batches(folder, batch, size=model_input_size(tensors), limit=limit):
        h = to_host(vit.embed(params, xp.asarray(images, dtype=dtype), xp))
        if tokens is None:
            tokens = scratch((count, *h.shape[1:]), np.float32)
        tokens[done : done + len(h)] = h
        done += len(h)
    return tokens


def run(weights, acts, output, *, images=None, max_images=None, layers=pipeline.DEFAULT_LAYERS,
        statistic="gram", points=POINTS, nmse_range=NMSE_RANGE, batch=BATCH_IMAGES, num_heads=None,
        device="cpu", dtype="float64", quiet=True):
    """Measure the sensitivity of the layers of ``weights`` and write ``output``.

    Returns ``(document layers, seconds)``.
    """
    if points < 1:
        raise MrcError(f"--points must be ≥ 1, got {points}")
    lo, hi = nmse_range
    if not 0 < lo <= hi < 1:
        raise MrcError(f"--nmse-range must satisfy 0 < LO ≤ HI < 1, got {lo} {hi}")
    if batch < 1 or (max_images is not None and max_images < 1):
        raise MrcError("--batch-size and --max-images must be positive")
    if statistic not in stats.STATISTICS:
        raise MrcError(f"unknown statistic {statistic!r}; expected one of {', '.join(stats.STATISTICS)}")
    if images is not None:  # not an input, not an image, not inside the image folder, by any path
        check_image_outputs((output,), (weights, acts), images)
    else:
        formats.check_outputs((output,), (weights, acts))
    xp = get_xp(device)
    dt = get_dtype(dtype)
    progress = None
    if not quiet:
    
        progress = progress_bar(False)
    start = time.perf_counter()
    tensors, metadata = formats.read_original(weights)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        names = pipeline.select_layers(tensors, tuple(layers))
        for name in names:
            start_block(name, vit.depth(tensors))
        pos = tensors.get("pos_embed")
        if getattr(pos, "ndim", 0) != 3:
            raise MrcError("no pos_embed (1, T, D): not a timm-layout ViT")
    except MrcError as err:
        raise err.at(file=weights) from None
    with formats.open_activations(acts) as f, formats.scratch_space() as scratch:
        if images is not None:
            tokens = image_tokens(tensors, images, num_heads=heads, xp=xp, dtype=dt, batch=batch,
                                  limit=max_images, scratch=scratch)
            source, origin = f"images of {os.path.basename(os.path.normpath(images))}", weights
        else:
            tokens = formats.read_proxy_tokens(f, pos.shape[1:], acts, lazy=True)  # read a batch at a time
            if tokens is None:
                raise MrcError("has no proxy/tokens; give --images DIR", file=acts)
            source, origin = "proxy/tokens of " + os.path.basename(acts), acts

        def load_stats(name):
            return formats.read_layer_stats(f, name, acts, n=int(tensors[name + ".weight"].shape[1]))

        measured, unmeasured = layer_sensitivity(
            tensors, load_stats, tokens, num_heads=heads, names=names, statistic=statistic, points=points,
            nmse_range=nmse_range, xp=xp, dtype=dt, batch=batch, scratch=scratch, progress=progress,
            files=(weights, acts), count=max_images, source=origin)
        count = int(tokens.shape[0]) if max_images is None else min(max_images, int(tokens.shape[0]))
    seconds = time.perf_counter() - start
    metric = (f"logits NMSE ‖Z̃ − Z‖²_F / ‖Z‖²_F over {count} {source}, one layer at a time replaced by its "
              f"Stage-1 factors (statistic {statistic})")
    attrs = {"source": PROG, "weights_file": os.path.basename(weights), "statistic": statistic, "images": count,
             "nmse_range": [lo, hi], "dtype": dtype, "unmeasured": unmeasured}
    if not measured:
        raise MrcError("no selected layer could be measured (every NMSE curve is 0 from rank 1)", file=weights)
    formats.write_sensitivity(output, metric, measured, attrs, inputs=(weights, acts))
    return measured, seconds
