"""The compressed layer: its key names and the factored-layer rule (docs/formats.md).

A linear layer ``<name>`` of weight ``W`` (m, n) is stored either dense,
``<name>.weight``, or factored, ``W = A B + P Q``:

``<name>.lowrank_a``   A (m, r)   principal low-rank term
``<name>.lowrank_b``   B (r, n)
``<name>.residual_p``  P (m, q)   residual, both or neither
``<name>.residual_q``  Q (q, n)

with the bias ``<name>.bias`` (m,) unchanged. This module is the one place
that knows those names and the rule: ``lowrank_a`` and ``lowrank_b``
together, ``residual_p`` and ``residual_q`` together or not at all, never
factors beside a dense weight, and shapes that chain. Pure functions over
arrays of the module ``xp``; no files.
"""

import numpy as np

from .errors import MrcError

__all__ = ["FACTOR_SUFFIXES", "PRINCIPAL", "RESIDUAL", "factor_key", "has_layer", "factored_layers", "layer_form",
           "check_factor_shapes", "factors", "dense_weight", "densify"]

#: The suffixes of a factored layer's tensors, in the order ``A, B, P, Q``.
FACTOR_SUFFIXES = ("lowrank_a", "lowrank_b", "residual_p", "residual_q")
#: The principal pair ``A, B`` and the residual pair ``P, Q``.
PRINCIPAL, RESIDUAL = FACTOR_SUFFIXES[:2], FACTOR_SUFFIXES[2:]


def factor_key(name, suffix):
    """The key ``<name>.<suffix>`` of one factor of layer ``name``."""
    return f"{name}.{suffix}"


def has_layer(keys, name):
    """Whether linear layer ``name`` has any tensor among ``keys``, dense or factored."""
    return factor_key(name, "weight") in keys or any(factor_key(name, s) in keys for s in FACTOR_SUFFIXES)


def factored_layers(keys):
    """Names of the layers with any factor among ``keys`` (a mapping or an
    iterable of tensor names), in order of first appearance."""
    suffixes = tuple(f".{s}" for s in FACTOR_SUFFIXES)
    found = (k[: k.rindex(".")] for k in keys if k.endswith(suffixes))
    return list(dict.fromkeys(found))


def layer_form(keys, name, dense_keys=("weight",)):
    """How layer ``name`` is stored among ``keys``: ``"dense"`` or ``"factored"``.

    The factored-layer rule: ``lowrank_a`` and ``lowrank_b`` both, then
    ``residual_p`` and ``residual_q`` both or neither, and no dense weight
    (any of ``<name>.<dense_keys>``) beside factors.

    Parameters
    ----------
    keys : mapping or set of str
        The model's tensor names.
    name : str
        The layer.
    dense_keys : tuple of str
        Suffixes of a dense weight (``"weight"``; a reader of other layouts
        may add e.g. ``"base_layer.weight"``).

    Returns
    -------
    {"dense", "factored"}

    Raises
    ------
    MrcError
        The layer breaks the rule, or is missing altogether (naming the layer).

    Examples
    --------
    >>> layer_form({"l.lowrank_a", "l.lowrank_b"}, "l")
    'factored'
    >>> layer_form({"l.lowrank_a", "l.lowrank_b", "l.residual_p"}, "l")
    Traceback (most recent call last):
    ...
    mrc_ref.errors.MrcError: layer l: needs both residual_p and residual_q, or neither
    """
    has = {s: factor_key(name, s) in keys for s in FACTOR_SUFFIXES}
    dense = any(factor_key(name, s) in keys for s in dense_keys)
    if not any(has.values()):
        if dense:
            return "dense"
        raise MrcError("missing: no weight and no lowrank_a/lowrank_b", layer=name)
    if not (has["lowrank_a"] and has["lowrank_b"]):
        raise MrcError("needs both lowrank_a and lowrank_b", layer=name)
    if has["residual_p"] != has["residual_q"]:
        raise MrcError("needs both residual_p and residual_q, or neither", layer=name)
    if dense:
        raise MrcError("stored both as factors and as a dense weight", layer=name)
    return "factored"


def _shape(a):
    return tuple(a.shape) if hasattr(a, "shape") else tuple(a)


def check_factor_shapes(name, a, b, p=None, q=None, n=None):
    """Check that the factors' shapes chain: ``A (m, r)``, ``B (r, n)``,
    ``P (m, q)``, ``Q (q, n)``, all 2-D, and ``n`` input features when given.
    ``a`` … ``q`` are arrays or shape tuples. Raises :class:`MrcError`."""
    a, b = _shape(a), _shape(b)
    cols = b[1] if len(b) == 2 else None
    if len(a) != 2 or len(b) != 2 or a[1] != b[0] or (n is not None and cols != n):
        features = "" if n is None else f" for {n} input features"
        raise MrcError(f"factors lowrank_a {a} and lowrank_b {b} do not chain{features}", layer=name)
    if p is None:
        return
    p, q = _shape(p), _shape(q)
    if len(p) != 2 or len(q) != 2 or p[1] != q[0] or q[1] != cols or p[0] != a[0]:
        raise MrcError(f"residual_p {p} and residual_q {q} do not match lowrank_a {a} and {cols} input features",
                       layer=name)


def factors(params, name, n=None):
    """``(A, B, P, Q)`` of a factored layer (``P``, ``Q`` ``None`` without a
    residual), after :func:`layer_form` and :func:`check_factor_shapes`
    (with ``n`` input features when given)."""
    if layer_form(params, name) != "factored":
        raise MrcError("is stored dense, not factored", layer=name)
    a, b = (params[factor_key(name, s)] for s in PRINCIPAL)
    p, q = (params.get(factor_key(name, s)) for s in RESIDUAL)
    check_factor_shapes(name, a, b, p, q, n=n)
    return a, b, p, q


def dense_weight(params, name, xp):
    """The (m, n) weight of linear layer ``name``: ``W``, or ``W = A B + P Q``.

    For statistics, :func:`densify` and tests; the forward pass never
    densifies.
    """
    if layer_form(params, name) == "dense":
        return params[factor_key(name, "weight")]
    a, b, p, q = factors(params, name)
    w = a @ b
    return w if p is None else w + p @ q


def densify(tensors, dtype=None):
    """Rebuild dense weights: ``<name>.weight = A B + P Q`` for every factored layer.

    The product is formed in float64 and cast to ``dtype`` (default: the
    stored dtype of ``lowrank_a``). Other tensors are passed through
    unchanged. Int8 models are dequantized first
    (:func:`mrc_ref.quantize.dequantize_tensors`; :func:`mrc_ref.formats.densify`
    does both).

    Parameters
    ----------
    tensors : dict of str -> ndarray
        A compressed model (host arrays, floating point factors).
    dtype : dtype, optional

    Returns
    -------
    dict of str -> ndarray
        The dense model in the input layout.

    Raises
    ------
    MrcError
        A factor that is not floating point (int8 codes not dequantized).

    Examples
    --------
    >>> A, B = np.ones((3, 1)), np.arange(4.0)[None, :]
    >>> bool(densify({"l.lowrank_a": A, "l.lowrank_b": B})["l.weight"].sum() == 3 * B.sum())
    True
    """
    factored = factored_layers(tensors)
    for name in factored:
        layer_form(tensors, name)
    parts = {factor_key(n, s): n for n in factored for s in FACTOR_SUFFIXES}
    out = {}
    for key, value in tensors.items():
        if key not in parts:
            out[key] = value
            continue
        if not np.issubdtype(value.dtype, np.floating):
            raise MrcError(f"{key} has dtype {value.dtype}: dequantize int8 tensors first", layer=parts[key])
        name = parts[key]
        if key != factor_key(name, "lowrank_a"):
            continue
        own = {k: tensors[k].astype(np.float64) for k in (factor_key(name, s) for s in FACTOR_SUFFIXES)
               if k in tensors}
        out[factor_key(name, "weight")] = dense_weight(own, name, np).astype(dtype or value.dtype)
    return out
