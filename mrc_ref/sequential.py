"""Sequential Stage 3 (docs/math.md, Stage 3, ``sequential``): compensate each
layer, in forward order, for the error of the layers before it.

For layer ``l``, ``X`` are its inputs in the original model and ``X̃`` its
inputs in the model whose earlier layers are already compressed and
compensated, both computed with the ViT forward pass from the proxy tokens
(block-0 inputs), in batches of images. The residual is then solved on the
Grams ``C = XᵀX``, ``K = X̃ᵀX``, ``C̃ = X̃ᵀX̃`` by :func:`mrc_ref.compensate.solve`.

Block passes: the original model does not change, so each block's original
pass runs once, keeping the inputs ``X`` of all of its target layers (in
scratch arrays) and advancing the original stream. The compressed model
changes after every layer, so each target layer needs its own pass of the
compressed block; that pass stops (a private exception raised from the
capture hook) as soon as the layer's input ``X̃`` is seen, and a full pass
advances the compressed stream once the block's last layer is done.
"""

import numpy as np

from . import compensate, vit
from .backend import get_dtype, to_host
from .errors import MrcError

__all__ = ["BATCH_IMAGES", "compensate_sequential", "make_sequential"]


def _stage(name):
    """Where layer ``name`` runs: its block index, or ``None`` for the head."""
    index = vit.block_index(name)
    if index is not None or name in vit.HEAD_LINEARS:
        return index
    raise MrcError("sequential compensation handles the block linears and the head only", layer=name)


class _Seen(BaseException):
    """Raised by a capture hook to end a pass once the input it waits for is
    seen (a ``BaseException``, so no ``except Exception`` on the way catches it)."""


def _inputs(params, stage, h, name, num_heads, xp):
    """Token rows (rows, n) entering layer ``name`` when ``h`` enters ``stage``;
    the pass of the block (or head) stops there."""
    seen = {}

    def hook(layer, x):
        if layer == name:
            seen["x"] = x
            raise _Seen

    try:
        if stage is None:
            vit.head(params, h, xp, hook=hook)
        else:
            vit.block(params, stage, h, num_heads, xp, hook=hook)
    except _Seen:
        pass
    x = seen["x"]
    return x.reshape(-1, x.shape[-1])


#: Proxy images per batch of the forward pass **[choice]**: memory is that of
#: one batch's activations, whatever the number of proxy images.
BATCH_IMAGES = 64


def _batches(count, size):
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def compensate_sequential(original, factors, tokens, config, *, num_heads, xp, progress=None,
                          scratch=None, batch=BATCH_IMAGES, source=None):
    """Run the sequential Stage 3 over the factored layers.

    The two token streams (inputs of the current block in the original and in
    the compressed model) live in host arrays from ``scratch``, advanced one
    block at a time in batches of ``batch`` images (a block's original pass
    once, a stopped compressed pass per layer: see the module docstring); each layer's Grams
    ``C = XᵀX``, ``K = X̃ᵀX``, ``C̃ = X̃ᵀX̃`` are summed over the batches. With
    a disk-backed ``scratch`` the memory used is that of one batch.

    Parameters
    ----------
    original : dict of str -> xp array
        The original model, prepared (:func:`mrc_ref.vit.prepare`).
    factors : dict of str -> (index, W, A, B)
        The Stage-1 factors of each factored layer (``index`` seeds Adam's ``Q``).
    tokens : array-like (images, tokens, d)
        Proxy tokens: block-0 inputs of the original model (a host array or
        anything sliceable along the first axis into one).
    config : mrc_ref.pipeline.Config
        ``residual_rank``, ``solver``, ``damping``, ``steps``, ``lr``, ``seed``, ``dtype``.
    num_heads : int
    progress : callable, optional
        ``progress(iterable, desc) -> iterable``.
    scratch : callable, optional
        ``scratch(shape, dtype) -> writable host array`` for the two streams
        and the original inputs of the current block's layers (one array per
        layer of a block, reused by the next block); default ``numpy.empty``
        (in memory).
    batch : int
        Images per forward batch.
    source : str, optional
        The tokens' file, named in errors about them.

    Returns
    -------
    dict of str -> (P, Q, info)
        ``info`` from :func:`mrc_ref.compensate.losses`; its ``loss_stage1``
        is the loss with ``P Q = 0``, including the error arriving from upstream.
    """
    progress = progress or (lambda it, desc: it)
    scratch = scratch or np.empty
    dtype = get_dtype(config.dtype)
    stages = {name: _stage(name) for name in factors}
    order = [name for name in vit.linear_names(original) if name in stages]  # forward order
    compressed = dict(original)
    count = int(tokens.shape[0])
    if count < 1:
        raise MrcError("proxy/tokens holds no image", file=source)
    chunks = _batches(count, batch)
    streams = {"original": scratch(tuple(tokens.shape), dtype), "compressed": scratch(tuple(tokens.shape), dtype)}
    for sl in chunks:
        part = np.asarray(tokens[sl], dtype=dtype)
        if not np.isfinite(part).all():
            raise MrcError(f"proxy/tokens contains NaN or Inf (images {sl.start}–{sl.stop - 1})", file=source)
        streams["original"][sl] = streams["compressed"][sl] = part
    done = {}
    at = {"original": 0, "compressed": 0}  # the block whose input each stream holds
    buffers = {}  # (leaf, shape) -> scratch array of original inputs, reused from block to block
    captured = {}  # layer -> original inputs X of the layers of the block last captured

    def advance(key, model, stop, store=None):
        """Run stream ``key`` through blocks ``at[key] .. stop-1``; with
        ``store``, keep a host copy of each named layer's input, batch by
        batch, in ``store[layer]``."""
        for index in range(at[key], stop):
            h = streams[key]
            for sl in chunks:
                def hook(layer, x, sl=sl):
                    if layer in store:
                        store[layer][sl] = to_host(x)

                h[sl] = to_host(vit.block(model, index, xp.asarray(h[sl]), num_heads, xp,
                                          hook=None if store is None else hook))
        at[key] = max(at[key], stop)

    for name in progress(order, "stage 3 (sequential compensation)"):
        stage = stages[name]
        target = vit.depth(original) if stage is None else stage
        advance("compressed", compressed, target)  # full passes, earlier blocks all compensated
        if stage is not None and name not in captured:  # one original pass for all of this block's layers
            advance("original", original, stage)
            captured = {}
            for layer in (layer for layer in order if stages[layer] == stage):
                shape = (count, int(tokens.shape[1]), int(factors[layer][1].shape[1]))
                key = (layer.split(".", 2)[-1], shape)
                if key not in buffers:
                    buffers[key] = scratch(shape, dtype)
                captured[layer] = buffers[key]
            advance("original", original, stage + 1, store=captured)
        elif stage is None:
            advance("original", original, target)
        n = factors[name][1].shape[1]
        C, K, Ct = (xp.zeros((n, n), dtype=dtype) for _ in range(3))
        for sl in chunks:
            if stage is None:
                X = _inputs(original, stage, xp.asarray(streams["original"][sl]), name, num_heads, xp)
            else:
                X = xp.asarray(captured[name][sl]).reshape(-1, n)
            Xt = _inputs(compressed, stage, xp.asarray(streams["compressed"][sl]), name, num_heads, xp)
            C += X.T @ X
            K += Xt.T @ X
            Ct += Xt.T @ Xt
        index, W, A, B = factors[name]
        P, Q, info = compensate.solve(W, A, B, config.residual_rank, C, K=K, Ct=Ct, solver=config.solver,
                                      damp=config.damping, steps=config.steps, lr=config.lr, seed=config.seed,
                                      layer_index=index, xp=xp)
        done[name] = (P, Q, info)
        del compressed[name + ".weight"]
        compressed.update({name + ".lowrank_a": A, name + ".lowrank_b": B,
                           name + ".residual_p": P, name + ".residual_q": Q})
    return done


def make_sequential(tensors, metadata, tokens, *, progress=None, num_heads=None, source=None, scratch=None):
    """Bind the model and proxy tokens into the ``sequential`` callable that
    :func:`mrc_ref.pipeline.run` expects (``source``: the tokens' file, for
    error messages; ``scratch``: see :func:`compensate_sequential`)."""
    heads = vit.resolve_num_heads(tensors, num_heads, metadata)

    def run(factors, config, xp):
        original = vit.prepare(tensors, xp, get_dtype(config.dtype))
        if tuple(tokens.shape[1:]) != tuple(original["pos_embed"].shape[1:]):
            raise MrcError(f"proxy/tokens have shape {tuple(tokens.shape)}, expected (images, "
                           f"{', '.join(str(s) for s in original['pos_embed'].shape[1:])}) from pos_embed",
                           file=source)
        return compensate_sequential(original, factors, tokens, config, num_heads=heads, xp=xp,
                                     progress=progress, scratch=scratch, source=source)

    return run
