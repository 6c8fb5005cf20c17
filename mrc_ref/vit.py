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
weight ``W = A B + P Q`` is never formed: :func:`prepare` lays the factors
out as views of one pair ``L = [A P]``, ``R = [B; Q]`` and :func:`linear`
applies ``(x Rᵀ) Lᵀ`` (factor by factor when they are not such views).
Any of these matrices may be stored int8 with a per-row ``<key>.scale``
(:mod:`mrc_ref.quantize`); :func:`prepare` dequantizes them.

Every function takes the array module ``xp`` explicitly; the parameters
must already live in ``xp`` (see :func:`prepare`), except in
:func:`forward`, which prepares them itself. Math is in float64 by default.

On NumPy, :func:`block` runs on the forward engine (:class:`Engine`, the
last section of this module: threads over the token rows with BLAS at one
thread, in-place chunked elementwise steps), the one place where threads and
chunks live; on CuPy, and with ``engine="plain"``, on the plain route
(:func:`layer_norm`, :func:`attention`, :func:`mlp`). Both give the same
numbers to round-off (docs/performance.md, "The forward pass").
"""

import math
import os
import re

import numpy as np

from . import layout, quantize, threads as _threads
from .backend import array_module, to_device
from .errors import ConfigError, MrcError

__all__ = ["LN_EPS", "HEAD_SIZE", "BLOCK_LINEARS", "HEAD_LINEARS", "forward", "prepare", "embed_dim",
           "resolve_num_heads", "block_index", "depth", "has_linear", "linear_names", "linear",
           "erf_function", "gelu", "layer_norm", "softmax", "patchify", "embed", "attention", "mlp", "block",
           "blocks", "head", "Engine", "PLAIN", "stacked_factors"]

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

    A factored layer with a residual, ``W = A B + P Q`` with ``A`` (m, r),
    ``B`` (r, n), ``P`` (m, q), ``Q`` (q, n), is laid out for the forward
    pass as one rank-``(r + q)`` pair (NumPy and CuPy; the stored format is
    unchanged)::

        L = [A P]  (m, r + q),    R = [B; Q]  (r + q, n),    L R = A B + P Q

    and the four entries of the returned dict are *views* into ``L`` and
    ``R`` (``A = L[:, :r]``, ``P = L[:, r:]``, ``B = R[:r]``, ``Q = R[r:]``),
    so :func:`linear` applies the layer as two products, ``(x Rᵀ) Lᵀ``,
    instead of four (:func:`stacked_factors`). A layer whose factors are
    already such views is kept as it is; one that breaks the factored-layer
    rule is left alone (:func:`linear` reports it).

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
    if _stackable(xp):
        for name in layout.factored_layers(out):
            _stack_layer(out, name, xp)
    return out


# ----------------------------------------------------------------- stacked factors
def _stackable(xp):
    """Whether views of ``xp`` arrays can be recognised (NumPy, CuPy)."""
    return xp is np or xp.__name__.split(".")[0] == "cupy"


def _address(a):
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy
    return ptr if ptr is not None else a.__array_interface__["data"][0]


def _stack_layer(params, name, xp):
    """Replace the four factors of layer ``name`` in ``params`` by views of
    ``L = [A P]`` and ``R = [B; Q]`` (in place on the dict; see :func:`prepare`)."""
    try:
        a, b, p, q = layout.factors(params, name)
    except MrcError:
        return  # reported by linear, with the layer's name
    if p is None or stacked_factors(a, b, p, q) is not None:
        return
    if not (a.dtype == b.dtype == p.dtype == q.dtype):
        return
    left = xp.concatenate([a, p], axis=1)
    right = xp.concatenate([b, q], axis=0)
    r = a.shape[1]
    params[layout.factor_key(name, "lowrank_a")] = left[:, :r]
    params[layout.factor_key(name, "residual_p")] = left[:, r:]
    params[layout.factor_key(name, "lowrank_b")] = right[:r]
    params[layout.factor_key(name, "residual_q")] = right[r:]


def stacked_factors(a, b, p, q):
    """The stacked pair ``(L, R)`` behind the factors of one layer, or ``None``.

    ``L = [A P]`` (m, r + q) and ``R = [B; Q]`` (r + q, n) with ``L R = A B +
    P Q``, found when (and only when) ``A``, ``P`` are the views
    ``L[:, :r]``, ``L[:, r:]`` and ``B``, ``Q`` the views ``R[:r]``, ``R[r:]``
    of two arrays, as :func:`prepare` lays them out. Any other factors (a key
    replaced by a new array, a copy, an array module without views) give
    ``None``, and the layer is applied factor by factor. Writing into the
    views writes into ``L`` and ``R``, so the pair can never go stale.

    Parameters
    ----------
    a, b, p, q : arrays or None
        ``A`` (m, r), ``B`` (r, n), ``P`` (m, q), ``Q`` (q, n).

    Returns
    -------
    tuple of (L, R), or None
    """
    if p is None or q is None:
        return None
    left, right = getattr(a, "base", None), getattr(b, "base", None)
    if left is None or right is None or getattr(p, "base", None) is not left or getattr(q, "base", None) is not right:
        return None
    try:
        m, r = a.shape
        k = r + p.shape[1]
        n = b.shape[1]
        if (left.ndim != 2 or right.ndim != 2 or tuple(left.shape) != (m, k) or tuple(right.shape) != (k, n)
                or tuple(b.shape) != (r, n) or tuple(q.shape) != (k - r, n) or tuple(p.shape) != (m, k - r)):
            return None
        if not (a.strides == p.strides == left.strides and b.strides == q.strides == right.strides):
            return None
        base_l, base_r = _address(left), _address(right)
        if (_address(a) != base_l or _address(p) != base_l + r * left.strides[1]
                or _address(b) != base_r or _address(q) != base_r + r * right.strides[0]):
            return None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return left, right


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
    i.e. ``W = A B + P Q`` applied without forming ``W``; when the factors
    are views of a stacked pair (:func:`prepare`, :func:`stacked_factors`),
    as the two products ``y = (x R^T) L^T + b`` with ``L = [A P]``,
    ``R = [B; Q]`` (the same sum, one rank-``(r + q)`` pair).

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
    _, mats = _operands(params, name, x.shape[-1])
    y = x @ mats[0] if len(mats) == 1 else (x @ mats[0]) @ mats[1]
    if len(mats) == 4:
        y = y + (x @ mats[2]) @ mats[3]
    if bias and f"{name}.bias" in params:
        b = params[f"{name}.bias"]
        if tuple(b.shape) != (y.shape[-1],):
            raise MrcError(f"bias has shape {tuple(b.shape)}, expected ({y.shape[-1]},)", layer=name)
        y = y + b
    return y


def _operands(params, name, n):
    """``(m, mats)`` of linear layer ``name`` for ``n`` input features: the
    right operands of ``y = x Wᵀ`` in the order applied, ``(Wᵀ,)``,
    ``(Rᵀ, Lᵀ)`` (a stacked pair, :func:`stacked_factors`), ``(Bᵀ, Aᵀ)`` or
    ``(Bᵀ, Aᵀ, Qᵀ, Pᵀ)`` (``y = (x Bᵀ) Aᵀ + (x Qᵀ) Pᵀ``).

    Raises
    ------
    MrcError
        The layer is missing, half-compressed, or its shapes do not chain.
    """
    if layout.layer_form(params, name) == "dense":
        w = params[f"{name}.weight"]
        if w.ndim != 2 or w.shape[1] != n:
            raise MrcError(f"weight has shape {tuple(w.shape)}, input has {n} features", layer=name)
        return w.shape[0], (w.T,)
    a, b, p, q = layout.factors(params, name, n=n)
    pair = stacked_factors(a, b, p, q)
    if pair is not None:
        return a.shape[0], (pair[1].T, pair[0].T)
    return a.shape[0], (b.T, a.T) + (() if p is None else (q.T, p.T))


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


def block(params, index, h, num_heads, xp, hook=None, out_hook=None, engine=None):
    """One pre-norm transformer block.

    ``h = h + Attn(LN1(h))``; ``h = h + MLP(LN2(h))``.

    On NumPy the block runs on the forward engine (threads over the batch,
    in-place chunked elementwise steps; see :class:`Engine`), which gives the
    numbers of the plain route (the functions :func:`layer_norm`,
    :func:`attention`, :func:`mlp`, run on CuPy and with ``engine="plain"``)
    up to round-off: identical bits where ``d_h^{-1/2}`` is a power of two
    (head size 64, 16, 4) and BLAS products of two or more rows do not
    depend on the number of rows (OpenBLAS; tests/test_vit.py measures it).

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
        layer, before it is applied. It must not modify ``x``. It is called
        from the calling thread, with the whole batch.
    out_hook : callable, optional
        ``out_hook(name, y)`` with the output ``y = x W^T + b`` (N, T, m) of
        each linear layer, right after it is applied (so a capture need not
        compute ``x W^T`` again). It must not modify ``y``. Arrays given to
        either hook are never written afterwards.
    engine : Engine or "plain", optional
        Settings of the NumPy engine (default: :class:`Engine` ``()``, from
        the environment); ``"plain"`` runs the plain route. Ignored (plain
        route) on any array module but NumPy.

    Returns
    -------
    xp array, shape (N, T, D)
    """
    if engine is not None and not isinstance(engine, Engine) and not (isinstance(engine, str) and engine == PLAIN):
        raise ConfigError("engine", f'must be an Engine or "plain", got {engine!r}')
    if xp is np and not isinstance(engine, str):
        out = _engine_block(params, index, h, num_heads, hook, out_hook, engine or Engine())
        if out is not None:
            return out
    p = f"blocks.{index}"
    h = h + attention(params, f"{p}.attn", layer_norm(params, f"{p}.norm1", h, xp), num_heads, xp, hook, out_hook)
    return h + mlp(params, f"{p}.mlp", layer_norm(params, f"{p}.norm2", h, xp), xp, hook, out_hook)


def blocks(params, h, num_heads, xp, hook=None, start=0, stop=None, out_hook=None, engine=None):
    """Blocks ``start .. stop-1`` (all remaining when ``stop`` is None);
    ``hook``, ``out_hook``, ``engine``: see :func:`block`."""
    stop = depth(params) if stop is None else stop
    for index in range(start, stop):
        h = block(params, index, h, num_heads, xp, hook, out_hook, engine)
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


def forward(params, images, *, num_heads=None, metadata=None, xp=None, hook=None, dtype=None, engine=None):
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
    engine : Engine or "plain", optional
        How the blocks run on NumPy (see :func:`block`, :class:`Engine`).

    Returns
    -------
    xp array, shape (N, K)
    """
    xp = array_module(images) if xp is None else xp
    dtype = np.float64 if dtype is None else dtype
    heads = resolve_num_heads(params, num_heads, metadata)
    params = prepare(params, xp, dtype)
    x = to_device(xp, images, dtype)
    h = blocks(params, embed(params, x, xp), heads, xp, hook, engine=engine)
    return head(params, h, xp, hook)


# ----------------------------------------------------------------- the NumPy forward engine
#: ``engine="plain"``: run the blocks on the plain route (as on CuPy).
PLAIN = "plain"
#: Environment variables read by :class:`Engine` when an argument is not given.
ENV_THREADS, ENV_CHUNK = "MRC_THREADS", "MRC_CHUNK"
#: Elements per chunk of the in-place elementwise steps **[choice]**: 2^16
#: (256 KiB in float32, 512 KiB in float64), a few such temporaries stay in
#: a core's L2 cache.
DEFAULT_CHUNK = 1 << 16
#: Fewest block-input elements ``N T D`` for which the batch is split across
#: threads **[choice]**: below it (the embedded example's width-64 model) a
#: thread hand-off costs more than it saves.
MIN_WORK = 1 << 18
#: Fewest token rows per thread **[choice]**: OpenBLAS takes other kernels for
#: products of a few rows (their rows then differ in the last bits from the
#: same rows in a larger product); 64 rows keep the parts on the large kernels.
MIN_ROWS = 64


def _positive(name, value, minimum=1):
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if out < minimum or isinstance(value, bool) or (isinstance(value, float) and value != out):
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    return out


class Engine:
    """Settings of the NumPy forward engine of :func:`block`.

    On NumPy each block runs as a few *steps* over the token rows (LayerNorm
    with the qkv product; the attention core; the projection, residual,
    LayerNorm 2, fc1, GELU, fc2 and residual), each step on ``threads``
    Python threads that take contiguous parts of the ``N T`` rows (the
    attention core: of the ``N h`` (image, head) pairs) and write into
    slices of whole-batch buffers. While the threads run, every BLAS of
    the process runs at one thread (:func:`mrc_ref.threads.parallel`), so
    the two levels of threads never compete; the
    small attention products run at one BLAS thread always. Hooks are called
    between steps, from the calling thread, with whole-batch arrays, which
    are never written afterwards. Within a part, LayerNorm, the bias adds,
    GELU (``x/2 (1 + erf(x/√2))``, SciPy's erf) and softmax work in place on
    chunks of ``chunk`` elements, and ``q`` is scaled by ``d_h^{-1/2}``
    before ``q kᵀ``.

    Parameters
    ----------
    threads : int, optional
        Python threads (>= 1). Default: ``$MRC_THREADS``, else the BLAS
        thread count of the process (so ``OPENBLAS_NUM_THREADS=1`` or a
        ``threadpoolctl`` limit of 1 also gives one thread); never more than
        one per ``min_rows`` rows. Where BLAS threads cannot be set (a BLAS
        threadpoolctl does not know), one thread, since two levels of
        threads oversubscribe the cores (measured: 2x slower products, 10x
        slower attention).
    chunk : int, optional
        Elements per chunk of the elementwise steps (>= 1). Default:
        ``$MRC_CHUNK``, else :data:`DEFAULT_CHUNK`.
    min_work : int, optional
        Fewest ``N T D`` elements for which the rows are split (>= 0);
        default :data:`MIN_WORK`.
    min_rows : int, optional
        Fewest token rows per thread (>= 2: one row would be a matrix-vector
        product); default :data:`MIN_ROWS`.

    Notes
    -----
    The numbers do not depend on ``threads`` or ``chunk``: every step is
    row-wise (or per (image, head)), so a part's rows go through the same
    operations as in one piece, and BLAS (OpenBLAS) gives the same bits for
    a row of a product whatever the number of rows (two or more) or of
    threads. tests/test_vit.py checks this bit for bit.
    """

    __slots__ = ("threads", "chunk", "min_work", "min_rows")

    def __init__(self, threads=None, chunk=None, min_work=None, min_rows=None):
        self.threads = None if threads is None else _positive("threads", threads)
        self.chunk = None if chunk is None else _positive("chunk", chunk)
        self.min_work = MIN_WORK if min_work is None else _positive("min_work", min_work, 0)
        self.min_rows = MIN_ROWS if min_rows is None else _positive("min_rows", min_rows, 2)

    def __repr__(self):
        return (f"Engine(threads={self.threads}, chunk={self.chunk}, min_work={self.min_work}, "
                f"min_rows={self.min_rows})")

    def resolved_threads(self):
        """The thread count: the argument, ``$MRC_THREADS``, or the BLAS threads."""
        if self.threads is not None:
            return self.threads
        env = os.environ.get(ENV_THREADS, "").strip()
        if env:
            return _positive(ENV_THREADS, env)
        return _threads.blas_threads()

    def resolved_chunk(self):
        """The chunk size: the argument, ``$MRC_CHUNK``, or :data:`DEFAULT_CHUNK`."""
        if self.chunk is not None:
            return self.chunk
        env = os.environ.get(ENV_CHUNK, "").strip()
        return _positive(ENV_CHUNK, env) if env else DEFAULT_CHUNK


def _is(a, dtype):
    return isinstance(a, np.ndarray) and a.dtype == dtype


def _engine_linear(params, name, n, dtype):
    """``(m, mats, bias)`` of a linear layer for the engine (``mats`` as
    :func:`_operands` gives them), or ``None`` when anything is unusual (the
    plain route then runs and reports it)."""
    try:
        m, mats = _operands(params, name, n)
    except MrcError:
        return None
    bias = params.get(f"{name}.bias")
    if not all(_is(x, dtype) for x in mats) or (bias is not None and (not _is(bias, dtype) or bias.shape != (m,))):
        return None
    return m, mats, bias


def _apply_rows(layer, x, out):
    """``out = x Wᵀ + b`` for a part's rows x (rows, n), written into ``out``
    (rows, m): the products of :func:`linear`, in the same order."""
    _, mats, bias = layer
    if len(mats) == 1:
        np.matmul(x, mats[0], out=out)
    else:
        np.matmul(x @ mats[0], mats[1], out=out)
        if len(mats) == 4:
            out += (x @ mats[2]) @ mats[3]
    if bias is not None:
        out += bias


def _norm_params(params, name, d, dtype):
    w, b = params.get(f"{name}.weight"), params.get(f"{name}.bias")
    if not (_is(w, dtype) and _is(b, dtype)) or w.shape != (d,) or b.shape != (d,):
        return None
    return w, b


def _layer_norm_rows(x, w, b, out, chunk, eps=LN_EPS):
    """:func:`layer_norm` of rows ``x`` (rows, d) into ``out``, chunk by chunk,
    in place on ``out``: the same operations in the same order."""
    step = max(1, chunk // x.shape[1])
    for i in range(0, x.shape[0], step):
        xc, oc = x[i : i + step], out[i : i + step]
        np.subtract(xc, np.mean(xc, axis=-1, keepdims=True), out=oc)
        var = np.mean(oc * oc, axis=-1, keepdims=True)
        var += eps
        np.sqrt(var, out=var)
        oc /= var
        oc *= w
        oc += b


def _gelu_rows(z, out, chunk, erf):
    """:func:`gelu` of rows ``z`` into ``out`` (``out`` may be ``z``), chunk by
    chunk: ``t = erf(z / √2) + 1``, ``out = (z / 2) t``, as ``0.5 z (1 + erf(z / √2))``."""
    step = max(1, chunk // z.shape[1])
    for i in range(0, z.shape[0], step):
        zc, oc = z[i : i + step], out[i : i + step]
        t = np.multiply(zc, 1.0 / math.sqrt(2.0))
        erf(t, out=t)
        t += 1.0
        np.multiply(zc, 0.5, out=oc)
        oc *= t


def _softmax_rows(s, chunk):
    """:func:`softmax` over the last axis of ``s`` (rows, T), in place."""
    step = max(1, chunk // s.shape[1])
    for i in range(0, s.shape[0], step):
        c = s[i : i + step]
        c -= np.max(c, axis=-1, keepdims=True)
        np.exp(c, out=c)
        c /= np.sum(c, axis=-1, keepdims=True)


def _attention_pairs(qkv, out, heads, chunk, lo, hi):
    """The attention core for (image, head) pairs ``lo .. hi-1`` (flat index
    ``image * heads + head``): ``O = softmax((Q d_h^{-1/2}) Kᵀ) V`` written
    into ``out`` (N, T, inner), one image's heads at a time."""
    n, t, width = qkv.shape
    hd = width // 3 // heads
    scale = hd**-0.5
    q5 = qkv.reshape(n, t, 3, heads, hd)
    o4 = out.reshape(n, t, heads, hd)
    flat = lo
    while flat < hi:
        image, first = divmod(flat, heads)
        last = min(heads, first + hi - flat)
        q = q5[image, :, 0, first:last].transpose(1, 0, 2)  # (hh, T, hd)
        k = q5[image, :, 1, first:last].transpose(1, 2, 0)  # (hh, hd, T)
        v = q5[image, :, 2, first:last].transpose(1, 0, 2)
        s = np.matmul(np.multiply(q, scale), k)  # (hh, T, T)
        _softmax_rows(s.reshape(-1, t), chunk)
        np.matmul(s, v, out=o4[image, :, first:last].transpose(1, 0, 2))
        flat += last - first


def _engine_block(params, index, h, num_heads, hook, out_hook, engine):
    """:func:`block` on the engine; ``None`` when the inputs are not the
    engine's (the plain route then runs, and raises where it should)."""
    if not isinstance(h, np.ndarray) or h.ndim != 3 or h.dtype not in (np.float32, np.float64) or 0 in h.shape:
        return None
    n_img, t, d = h.shape
    dtype = h.dtype
    p = f"blocks.{index}"
    norm1, norm2 = _norm_params(params, f"{p}.norm1", d, dtype), _norm_params(params, f"{p}.norm2", d, dtype)
    qkv_layer = _engine_linear(params, f"{p}.attn.qkv", d, dtype)
    if norm1 is None or norm2 is None or qkv_layer is None:
        return None
    width = qkv_layer[0]
    if width % 3 or (width // 3) % num_heads:
        return None
    inner = width // 3
    proj = _engine_linear(params, f"{p}.attn.proj", inner, dtype)
    fc1 = _engine_linear(params, f"{p}.mlp.fc1", d, dtype)
    fc2 = None if fc1 is None else _engine_linear(params, f"{p}.mlp.fc2", fc1[0], dtype)
    if proj is None or fc2 is None or proj[0] != d or fc2[0] != d:
        return None

    rows = n_img * t
    threads = engine.resolved_threads() if n_img * t * d >= engine.min_work else 1
    threads = max(1, min(threads, rows // engine.min_rows, n_img * num_heads))
    if threads > 1 and not _threads.blas_controlled():
        threads = 1
    chunk = engine.resolved_chunk()
    erf = erf_function(np)
    parts = {"rows": [slice(a, b) for a, b in _threads.split(rows, threads)], "heads": _threads.split(n_img * num_heads, threads)}

    x = h.reshape(rows, d)
    a1 = np.empty((rows, d), dtype)
    qkv = np.empty((rows, width), dtype)
    o = np.empty((rows, inner), dtype)
    y = np.empty((rows, d), dtype)
    h1 = np.empty((rows, d), dtype)
    a2 = a1 if hook is None else np.empty((rows, d), dtype)
    z = np.empty((rows, fc1[0]), dtype)
    g = z if out_hook is None else np.empty_like(z)
    y2 = y if out_hook is None else np.empty((rows, d), dtype)

    def call(fn, name, arr):
        return None if fn is None else (lambda: fn(name, arr.reshape(n_img, t, arr.shape[1])))

    def attend(part):
        _attention_pairs(qkv.reshape(n_img, t, width), o.reshape(n_img, t, inner), num_heads, chunk, *part)

    def residual_norm(s):
        np.add(x[s], y[s], out=h1[s])
        _layer_norm_rows(h1[s], *norm2, a2[s], chunk)

    def add_mlp(s):
        h1[s] += y2[s]

    steps = [
        ("rows", lambda s: _layer_norm_rows(x[s], *norm1, a1[s], chunk), call(hook, f"{p}.attn.qkv", a1)),
        ("rows", lambda s: _apply_rows(qkv_layer, a1[s], qkv[s]), call(out_hook, f"{p}.attn.qkv", qkv)),
        ("heads", attend, call(hook, f"{p}.attn.proj", o)),
        ("rows", lambda s: _apply_rows(proj, o[s], y[s]), call(out_hook, f"{p}.attn.proj", y)),
        ("rows", residual_norm, call(hook, f"{p}.mlp.fc1", a2)),
        ("rows", lambda s: _apply_rows(fc1, a2[s], z[s]), call(out_hook, f"{p}.mlp.fc1", z)),
        ("rows", lambda s: _gelu_rows(z[s], g[s], chunk, erf), call(hook, f"{p}.mlp.fc2", g)),
        ("rows", lambda s: _apply_rows(fc2, g[s], y2[s]), call(out_hook, f"{p}.mlp.fc2", y2)),
        ("rows", add_mlp, None),
    ]
    group, kind = [], None

    def flush():
        if group:
            fns = tuple(group)
            _threads.parallel(lambda part: [fn(part) for fn in fns], parts[kind], kind == "heads")
            group.clear()

    for step_kind, fn, after in steps:
        if step_kind != kind:
            flush()
            kind = step_kind
        group.append(fn)
        if after is not None:
            flush()
            after()
    flush()
    return h1.reshape(n_img, t, d)
