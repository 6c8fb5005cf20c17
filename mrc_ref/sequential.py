"""Sequential Stage 3 (METHOD.md, Stage 3, ``sequential``): compensate each
layer, in forward order, for the error of the layers before it.

For layer ``l``, ``X`` are its inputs in the original model and ``X̃`` its
inputs in the model whose earlier layers are already compressed and
compensated, both computed with the ViT forward pass from the proxy tokens
(block-0 inputs). The residual is then trained on the Grams
``C = XᵀX``, ``K = X̃ᵀX``, ``C̃ = X̃ᵀX̃`` by :func:`mrc_ref.compensate.compensate`.
"""

from . import compensate, vit
from .backend import get_dtype
from .errors import MrcError


def _stage(name):
    """Where layer ``name`` runs: its block index, or ``None`` for the head."""
    index = vit.block_index(name)
    if index is not None or name in vit.HEAD_LINEARS:
        return index
    raise MrcError("sequential compensation handles the block linears and the head only", layer=name)


def _inputs(params, stage, h, name, num_heads, xp):
    """Token rows (rows, n) entering layer ``name`` when ``h`` enters ``stage``."""
    seen = {}

    def hook(layer, x):
        if layer == name:
            seen["x"] = x

    if stage is None:
        vit.head(params, h, xp, hook=hook)
    else:
        vit.block(params, stage, h, num_heads, xp, hook=hook)
    x = seen["x"]
    return x.reshape(-1, x.shape[-1])


def compensate_sequential(original, factors, tokens, config, *, num_heads, xp, progress=None):
    """Run the sequential Stage 3 over the factored layers.

    Parameters
    ----------
    original : dict of str -> xp array
        The original model, prepared (:func:`mrc_ref.vit.prepare`).
    factors : dict of str -> (index, W, A, B)
        The Stage-1 factors of each factored layer (``index`` seeds ``Q``).
    tokens : xp array (images, tokens, d)
        Proxy tokens: block-0 inputs of the original model.
    config : mrc_ref.pipeline.Config
        ``residual_rank``, ``steps``, ``lr``, ``seed``, ``dtype``.
    num_heads : int
    progress : callable, optional
        ``progress(iterable, desc) -> iterable``.

    Returns
    -------
    dict of str -> (P, Q, info)
        ``info`` holds ``loss_stage1`` (the loss with ``P = 0``, including the
        error arriving from upstream) and ``loss_stage3`` (the best loss).
    """
    progress = progress or (lambda it, desc: it)
    dtype = get_dtype(config.dtype)
    q = config.residual_rank
    stages = {name: _stage(name) for name in factors}
    order = [name for name in vit.linear_names(original) if name in stages]  # forward order
    compressed = dict(original)
    h_orig = h_comp = xp.asarray(tokens, dtype=dtype)
    done = {}
    current = 0
    for name in progress(order, "stage 3 (sequential compensation)"):
        stage = stages[name]
        target = vit.depth(original) if stage is None else stage
        while current < target:  # advance both token streams to this layer's block
            h_orig = vit.block(original, current, h_orig, num_heads, xp)
            h_comp = vit.block(compressed, current, h_comp, num_heads, xp)
            current += 1
        X = _inputs(original, stage, h_orig, name, num_heads, xp)
        Xt = _inputs(compressed, stage, h_comp, name, num_heads, xp)
        index, W, A, B = factors[name]
        P0, Q0 = compensate.init_residual(W.shape[0], W.shape[1], q, config.seed, index, xp, dtype)
        P, Q, history = compensate.compensate(W, A, B, P0, Q0, X.T @ X, K=Xt.T @ X, Ct=Xt.T @ Xt,
                                              steps=config.steps, lr=config.lr, xp=xp)
        done[name] = (P, Q, {"loss_stage1": float(history[0]), "loss_stage3": float(history.min())})
        del compressed[name + ".weight"]
        compressed.update({name + ".lowrank_a": A, name + ".lowrank_b": B,
                           name + ".residual_p": P, name + ".residual_q": Q})
    return done


def make_sequential(tensors, metadata, tokens, *, progress=None, num_heads=None, source=None):
    """Bind the model and proxy tokens into the ``sequential`` callable that
    :func:`mrc_ref.pipeline.run` expects (``source``: the tokens' file, for
    error messages)."""
    heads = vit.resolve_num_heads(tensors, num_heads, metadata)

    def run(factors, config, xp):
        original = vit.prepare(tensors, xp, get_dtype(config.dtype))
        if tuple(tokens.shape[1:]) != tuple(original["pos_embed"].shape[1:]):
            raise MrcError(f"proxy/tokens have shape {tuple(tokens.shape)}, expected (images, "
                           f"{', '.join(str(s) for s in original['pos_embed'].shape[1:])}) from pos_embed",
                           file=source)
        return compensate_sequential(original, factors, tokens, config,
                                     num_heads=heads, xp=xp, progress=progress)

    return run
