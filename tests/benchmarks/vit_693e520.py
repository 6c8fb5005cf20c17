"""The forward pass of mrc_ref.vit as of commit 693e520 (at commit 693e520), kept
verbatim (imports made absolute) so that tests/benchmarks/bench_forward.py can
time today's engine against it in the same run. Not used by the library."""

"""Forward pass of timm's ``VisionTransformer`` / DeiT over a state dict.

The parameters are a flat mapping in timm's state-dict layout::

    patch_embed.proj.weight (D, C, p, p), patch_embed.proj.bias (D,)
    cls_token (1, 1, D), [dist_token (1, 1, D)], pos_embed (1, T, D)
    blocks.<i>.norm1.{weight,bias}       (D,)
    blocks.<i>.attn.qkv.{weight,bias}    (3D, D), (3D,)
    blocks.<i>.attn.proj.{weight,bias}   (D, D), (D,)
    blocks.<i>.norm2.{weight,bias}       (D,)
    blocks.<i>.mlp.fc1.{weight,bias}     (F, D), (F,)
    blocks.<i>.mlp.fc2.{weight,bias}     (D, F), (D,)
    norm.{weight,bias} (D,), head.{weight,bias} (K, D), [head_dist.{weight,bias}]

Any linear layer may instead be stored *compressed*: ``<name>.lowrank_a``
(m, r) and ``<name>.lowrank_b`` (r, n), optionally ``<name>.residual_p``
(m, q) and ``<name>.residual_q`` (q, n), and ``<name>.bias`` (m,); its
weight ``W = A B + P Q`` is applied factor by factor, never formed.
Any of these matrices may be stored int8 with a per-row ``<key>.scale``
(:mod:`mrc_ref.quantize`); :func:`prepare` dequantizes them.

Every function takes the array module ``xp`` explicitly; the parameters
must already live in ``xp`` (see :func:`prepare`), except in
:func:`forward`, which prepares them itself. Math is in float64 by default.
"""

import math
import re

import numpy as np

from mrc_ref import layout, quantize
from mrc_ref.backend import array_module, to_device
from mrc_ref.errors import ConfigError, MrcError

__all__ = ["LN_EPS", "HEAD_SIZE", "BLOCK_LINEARS", "HEAD_LINEARS", "forward", "prepare", "embed_dim",
           "resolve_num_heads", "block_index", "depth", "has_linear", "linear_names", "linear",
           "erf_function", "gelu", "layer_norm", "softmax", "patchify", "embed", "attention", "mlp", "block",
           "blocks", "head"]

LN_EPS = 1e-6
HEAD_SIZE = 64
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
HEAD_LINEARS = ("head", "head_dist")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


# ----------------------------------------------------------------- parameters
def prepare(params, xp, dtype=np.float64):
    """Convert every parameter to an ``xp`` array of ``dtype``.

    Arrays that already are ``xp`` arrays of ``dtype`` are kept as they are
    (no copy), so a prepared dict can be passed again at no cost. An int8
    ``<key>`` with a ``<key>.scale`` becomes ``q · s`` in ``dtype``
    (:func:`mrc_ref.quantize.dequantize_tensors`; the scales are dropped).

    Parameters
    ----------
    params : mapping of str -> array
        Host (NumPy) or ``xp`` arrays of any float dtype.
    xp : module
        NumPy or CuPy.
    dtype : dtype, optional
        Compute dtype, float64 by default.

    Returns
    -------
    dict of str -> xp array
    """
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    params = quantize.dequantize_tensors(params, xp, dtype)  # int8 + scale -> q · s, on load
    out = {}
    for key, value in params.items():
        if array_module(value) is xp and getattr(value, "dtype", None) == dtype:
            out[key] = value
        else:
            out[key] = to_device(xp, value, dtype)
    return out


def _shape(params, key):
    return tuple(params[key].shape)


def embed_dim(params):
    """Model width ``D`` from the token or patch-embedding shapes."""
    for key, axis in (("cls_token", -1), ("pos_embed", -1), ("patch_embed.proj.weight", 0)):
        if key in params:
            return int(_shape(params, key)[axis])
    raise MrcError("no cls_token, pos_embed or patch_embed.proj.weight; not a ViT state dict")


def resolve_num_heads(params, num_heads=None, metadata=None):
    """Number of attention heads.

    Taken from ``num_heads`` if given, else from ``metadata["num_heads"]``
    (a string, as stored in safetensors metadata), else ``D // 64`` (head
    size 64).

    Parameters
    ----------
    params : mapping of str -> array
    num_heads : int, optional
    metadata : mapping of str -> str, optional

    Returns
    -------
    int
        ``h >= 1`` with ``D % h == 0``.

    Raises
    ------
    MrcError
        A non-integer or non-positive value, or one that does not divide ``D``.
    """
    dim = embed_dim(params)
    if num_heads is not None:
        origin, value = "num_heads", num_heads
    elif metadata is not None and metadata.get("num_heads") not in (None, ""):
        origin, value = "metadata num_heads", metadata["num_heads"]
    else:
        if dim < HEAD_SIZE or dim % HEAD_SIZE:
            raise ConfigError("num_heads", f"cannot be inferred for width {dim} (not a multiple of head size "
                                           f"{HEAD_SIZE}): give it")
        return dim // HEAD_SIZE
    error = (lambda problem: ConfigError("num_heads", problem)) if num_heads is not None else \
        (lambda problem: MrcError(f"{origin} {problem}"))
    try:
        heads = int(str(value).strip()) if not isinstance(value, (int, np.integer)) else int(value)
    except ValueError:
        raise error(f"must be an integer, got {value!r}") from None
    if heads < 1:
        raise error(f"must be positive, got {heads}")
    if dim % heads:
        raise error(f"= {heads} does not divide the model width {dim}")
    return heads


def block_index(name):
    """The block ``i`` of a key or layer name ``blocks.<i>.…``, else ``None``."""
    m = _BLOCK_KEY.match(name)
    return int(m.group(1)) if m else None


def depth(params):
    """Number of transformer blocks (``blocks.<i>.*`` with i = 0 .. depth-1).

    Raises
    ------
    MrcError
        When the block indices are not contiguous from 0.
    """
    found = {block_index(key) for key in params} - {None}
    n = len(found)
    if found != set(range(n)):
        missing = min(set(range(max(found) + 1)) - found)
        raise MrcError("block indices are not contiguous", layer=f"blocks.{missing}")
    return n


def has_linear(params, name):
    """Whether linear layer ``name`` is present, dense or compressed."""
    return layout.has_layer(params, name)


def linear_names(params):
    """Names of the linear layers in forward order.

    ``blocks.<i>.attn.qkv``, ``blocks.<i>.attn.proj``, ``blocks.<i>.mlp.fc1``,
    ``blocks.<i>.mlp.fc2`` for every block, then ``head`` and ``head_dist``
    when present (dense or compressed). ``patch_embed.proj`` is a
    convolution and not listed.

    Returns
    -------
    list of str
    """
    names = [f"blocks.{i}.{leaf}" for i in range(depth(params)) for leaf in BLOCK_LINEARS]
    names.extend(name for name in HEAD_LINEARS if has_linear(params, name))
    return names


# ----------------------------------------------------------------- primitives
def linear(params, name, x, xp, *, bias=True):
    """Apply linear layer ``name`` to ``x`` (any leading shape).

    Dense: ``y = x W^T + b``. Compressed: ``y = (x B^T) A^T + (x Q^T) P^T + b``,
    i.e. ``W = A B + P Q`` applied without forming ``W``.

    Parameters
    ----------
    params : mapping of str -> xp array
        Prepared parameters (see :func:`prepare`).
    name : str
        Layer name, e.g. ``"blocks.0.attn.qkv"``.
    x : xp array, shape (..., n)
    xp : module
    bias : bool, optional
        Add ``<name>.bias`` when present (default True); False gives
        ``x W^T`` alone.

    Returns
    -------
    xp array, shape (..., m)

    Raises
    ------
    MrcError
        The layer is missing, half-compressed, or its shapes do not chain.
    """
    if x.ndim > 2:  # one 2-D product (one BLAS call), not one per leading index
        lead = tuple(x.shape[:-1])
        y = linear(params, name, xp.reshape(x, (math.prod(lead), x.shape[-1])), xp, bias=bias)
        return xp.reshape(y, lead + (y.shape[-1],))
    n = x.shape[-1]
    if layout.layer_form(params, name) == "dense":
        w = params[f"{name}.weight"]
        if w.ndim != 2 or w.shape[1] != n:
            raise MrcError(f"weight has shape {tuple(w.shape)}, input has {n} features", layer=name)
        y = x @ w.T
    else:
        a, b, p, q = layout.factors(params, name, n=n)
        y = (x @ b.T) @ a.T
        if p is not None:
            y = y + (x @ q.T) @ p.T
    if bias and f"{name}.bias" in params:
        b = params[f"{name}.bias"]
        if tuple(b.shape) != (y.shape[-1],):
            raise MrcError(f"bias has shape {tuple(b.shape)}, expected ({y.shape[-1]},)", layer=name)
        y = y + b
    return y


def erf_function(xp):
    """The error function for array module ``xp``: ``xp.erf`` when the module
    has one (e.g. the strict test double, tests/strict_xp.py), else
    ``cupyx.scipy.special.erf`` for CuPy and ``scipy.special.erf`` for NumPy."""
    erf = getattr(xp, "erf", None)
    if erf is not None:
        return erf
    if xp.__name__.split(".")[0] == "cupy":
        from cupyx.scipy.special import erf
    else:
        from scipy.special import erf
    return erf


def gelu(x, xp):
    """Exact GELU: ``0.5 x (1 + erf(x / sqrt(2)))``."""
    erf = erf_function(xp)
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def layer_norm(params, name, x, xp, eps=LN_EPS):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * w + b``
    with the biased variance, ``w = <name>.weight``, ``b = <name>.bias``."""
    mu = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc / xp.sqrt(var + eps)
    try:
        return y * params[f"{name}.weight"] + params[f"{name}.bias"]
    except KeyError:
        raise MrcError("missing LayerNorm weight or bias", layer=name) from None


def softmax(s, xp):
    """Softmax over the last axis, ``exp(s - max s) / sum exp(s - max s)``."""
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def _call(hook, name, x):
    if hook is not None:
        hook(name, x)


# ----------------------------------------------------------------- the network
def patchify(images, patch, xp):
    """Split images into flattened non-overlapping patches.

    Parameters
    ----------
    images : xp array, shape (N, C, H, W)
    patch : int
        Patch side ``p``; ``H`` and ``W`` must be multiples of it.

    Returns
    -------
    xp array, shape (N, (H/p)(W/p), C p p)
        Patches in row-major grid order, each flattened in (c, i, j) order
        (the order of a conv weight (D, C, p, p) flattened to (D, C p p)).
    """
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise MrcError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = xp.reshape(images, (n, c, gh, patch, gw, patch))
    x = xp.transpose(x, (0, 2, 4, 1, 3, 5))
    return xp.reshape(x, (n, gh * gw, c * patch * patch))


def embed(params, images, xp):
    """Block-0 input tokens.

    ``h = concat(cls, [dist,] X_p W_pe^T + b_pe) + pos_embed`` where ``X_p``
    are the flattened patches: the convolution with stride = kernel = p
    written as a matmul.

    Parameters
    ----------
    params : mapping of str -> xp array
        Prepared parameters.
    images : xp array, shape (N, C, H, W)
    xp : module

    Returns
    -------
    xp array, shape (N, T, D)
        ``T = 1 [+ 1] + (H/p)(W/p)``.
    """
    key = "patch_embed.proj.weight"
    if key not in params:
        raise MrcError("missing", layer="patch_embed.proj")
    w = params[key]
    d, c, p, p2 = w.shape
    if images.ndim != 4 or images.shape[1] != c:
        raise MrcError(f"images have shape {tuple(images.shape)}, expected (N, {c}, H, W)")
    if p != p2:
        raise MrcError(f"non-square patch {p}x{p2}", layer="patch_embed.proj")
    x = patchify(images, p, xp) @ xp.reshape(w, (d, c * p * p)).T
    if "patch_embed.proj.bias" in params:
        x = x + params["patch_embed.proj.bias"]
    n = x.shape[0]
    prefix = []
    for name in ("cls_token", "dist_token"):
        if name in params:
            prefix.append(xp.broadcast_to(params[name], (n, 1, d)))
    if "cls_token" not in params:
        raise MrcError("missing", layer="cls_token")
    h = xp.concatenate(prefix + [x], axis=1)
    pos = params.get("pos_embed")
    if pos is None:
        raise MrcError("missing", layer="pos_embed")
    if tuple(pos.shape) != (1, h.shape[1], d):
        raise MrcError(
            f"pos_embed has shape {tuple(pos.shape)} but images of size "
            f"{images.shape[2]}x{images.shape[3]} give {h.shape[1]} tokens of width {d}",
            layer="pos_embed",
        )
    return h + pos


def attention(params, name, x, num_heads, xp, hook=None, out_hook=None):
    """Multi-head self-attention of timm ``Attention``.

    ``[Q K V] = x W_qkv^T + b``, per head ``O = softmax(Q K^T / sqrt(d_h)) V``,
    heads concatenated, then ``O W_proj^T + b``.

    Parameters
    ----------
    name : str
        Prefix, e.g. ``"blocks.0.attn"``.
    x : xp array, shape (N, T, D)
        Normalised tokens.
    num_heads : int

    Returns
    -------
    xp array, shape (N, T, D)
    """
    n, t, _ = x.shape
    _call(hook, f"{name}.qkv", x)
    qkv = linear(params, f"{name}.qkv", x, xp)
    _call(out_hook, f"{name}.qkv", qkv)
    width = qkv.shape[-1]
    if width % 3 or (width // 3) % num_heads:
        raise MrcError(f"output width {width} is not 3 x a multiple of {num_heads} heads", layer=f"{name}.qkv")
    inner = width // 3
    hd = inner // num_heads
    qkv = xp.transpose(xp.reshape(qkv, (n, t, 3, num_heads, hd)), (2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = softmax((q @ xp.swapaxes(k, -1, -2)) * (hd**-0.5), xp)
    o = xp.reshape(xp.transpose(attn @ v, (0, 2, 1, 3)), (n, t, inner))
    _call(hook, f"{name}.proj", o)
    out = linear(params, f"{name}.proj", o, xp)
    _call(out_hook, f"{name}.proj", out)
    return out


def mlp(params, name, x, xp, hook=None, out_hook=None):
    """timm ``Mlp``: ``fc2(GELU(fc1(x)))``; ``name`` is e.g. ``"blocks.0.mlp"``."""
    _call(hook, f"{name}.fc1", x)
    z = linear(params, f"{name}.fc1", x, xp)
    _call(out_hook, f"{name}.fc1", z)
    u = gelu(z, xp)
    _call(hook, f"{name}.fc2", u)
    out = linear(params, f"{name}.fc2", u, xp)
    _call(out_hook, f"{name}.fc2", out)
    return out


def block(params, index, h, num_heads, xp, hook=None, out_hook=None):
    """One pre-norm transformer block.

    ``h = h + Attn(LN1(h))``; ``h = h + MLP(LN2(h))``.

    Parameters
    ----------
    params : mapping of str -> xp array
        Prepared parameters.
    index : int
    h : xp array, shape (N, T, D)
    num_heads : int
    xp : module
    hook : callable, optional
        ``hook(name, x)`` with the input ``x`` (N, T, n) of each linear
        layer, before it is applied. It must not modify ``x``.
    out_hook : callable, optional
        ``out_hook(name, y)`` with the output ``y = x W^T + b`` (N, T, m) of
        each linear layer, right after it is applied (so a capture need not
        compute ``x W^T`` again). It must not modify ``y``.

    Returns
    -------
    xp array, shape (N, T, D)
    """
    p = f"blocks.{index}"
    h = h + attention(params, f"{p}.attn", layer_norm(params, f"{p}.norm1", h, xp), num_heads, xp, hook, out_hook)
    return h + mlp(params, f"{p}.mlp", layer_norm(params, f"{p}.norm2", h, xp), xp, hook, out_hook)


def blocks(params, h, num_heads, xp, hook=None, start=0, stop=None, out_hook=None):
    """Blocks ``start .. stop-1`` (all remaining when ``stop`` is None)."""
    stop = depth(params) if stop is None else stop
    for index in range(start, stop):
        h = block(params, index, h, num_heads, xp, hook, out_hook)
    return h


def head(params, h, xp, hook=None):
    """Logits from the last tokens.

    ``z = LN(h)``; ``logits = head(z[:, 0])``, or for a distilled DeiT
    (``head_dist`` present) ``(head(z[:, 0]) + head_dist(z[:, 1])) / 2``.

    Parameters
    ----------
    h : xp array, shape (N, T, D)
    hook : callable, optional
        Called as ``hook("head", x)`` (and ``hook("head_dist", x)``) with x (N, D).

    Returns
    -------
    xp array, shape (N, K)
    """
    z = layer_norm(params, "norm", h[:, :2], xp)  # per token: only cls (and dist) are used
    if not has_linear(params, "head"):
        raise MrcError("missing: the model has no classifier head", layer="head")
    cls = z[:, 0]
    _call(hook, "head", cls)
    logits = linear(params, "head", cls, xp)
    if has_linear(params, "head_dist"):
        if "dist_token" not in params:
            raise MrcError("head_dist needs a dist_token", layer="head_dist")
        dist = z[:, 1]
        _call(hook, "head_dist", dist)
        logits = (logits + linear(params, "head_dist", dist, xp)) * 0.5
    return logits


def forward(params, images, *, num_heads=None, metadata=None, xp=None, hook=None, dtype=None):
    """Logits of a timm ViT / DeiT for a batch of images.

    ``logits = head(blocks(embed(images)))``.

    Parameters
    ----------
    params : mapping of str -> array
        timm-layout parameters, host or already prepared; converted once
        with :func:`prepare`.
    images : array, shape (N, C, H, W)
        Normalised images.
    num_heads : int, optional
        See :func:`resolve_num_heads`.
    metadata : mapping of str -> str, optional
        Safetensors metadata (for ``num_heads``).
    xp : module, optional
        Defaults to the array module of ``images``.
    hook : callable, optional
        ``hook(name, x)`` before each linear layer (see :func:`block`, :func:`head`).
    dtype : dtype, optional
        Compute dtype, float64 by default.

    Returns
    -------
    xp array, shape (N, K)
    """
    xp = array_module(images) if xp is None else xp
    dtype = np.float64 if dtype is None else dtype
    heads = resolve_num_heads(params, num_heads, metadata)
    params = prepare(params, xp, dtype)
    x = to_device(xp, images, dtype)
    h = blocks(params, embed(params, x, xp), heads, xp, hook)
    return head(params, h, xp, hook)
