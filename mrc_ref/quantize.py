"""int8 post-training quantization of factors and dense weights (docs/math.md,
"int8 post-training quantization"). Pure functions over ``xp`` arrays; no file I/O.

Symmetric, per output channel, min–max scale **[choice]**: a 2-D tensor
``w`` (rows × cols) is stored as int8 ``q`` and one float32 scale per row
(output channel)

    s_i = max_j |w_ij| / 127,     q_ij = clip(round(w_ij / s_i), −127, 127),
    ŵ_ij = q_ij · s_i,            |w_ij − ŵ_ij| ≤ s_i / 2   (every element).

``round`` is round-half-to-even (``rint``); ``s_i`` is rounded to float32
*before* ``q`` is computed, so the bound holds for the stored scale. The
code −128 is never used (the grid is symmetric). A row of zeros gets
``s_i = 0`` and ``q_i = 0`` **[choice]** (it dequantizes to exact zeros). A
non-zero row so small that ``max|w|/127`` underflows float32 gets the
smallest positive float32 scale.

The factors of a compressed layer are quantized each as its own linear map,
per output channel: ``A`` (m × r) and ``P`` (m × q) per row of the layer's
output; ``B`` (r × n) and ``Q`` (q × n) per row of the rank-``r`` (``q``)
intermediate. Dense weights ``W`` (m × n) per row. **[choice]** Quantized
are the linear layers, dense or factored: every 2-D ``<name>.weight`` and
every factor (in a timm ViT the four block linears of each block and the
head); the patch embedding (a 4-D convolution), biases, norms, tokens and
positions stay as stored.

Layout (docs/formats.md, "int8 tensors"): ``<key>`` int8 and
``<key>.scale`` float32 ``(rows,)``, for ``<key>`` any of
``<name>.weight``, ``<name>.lowrank_a``, ``<name>.lowrank_b``,
``<name>.residual_p``, ``<name>.residual_q``.
"""

import numpy as np

from .errors import MrcError
from .layout import FACTOR_SUFFIXES

__all__ = ["SCHEME", "QMAX", "SCALE_SUFFIX", "MATRIX_SUFFIXES", "quantize", "dequantize", "quantize_tensors",
           "dequantize_tensors", "check_quantized", "quantized_keys", "quantizable_keys", "linear_layers", "storage_bytes"]

#: Name of the scheme, recorded in a quantized file's metadata.
SCHEME = "int8-symmetric-per-channel"
#: Largest code: the grid is ``−127 … 127``.
QMAX = 127
#: Suffix of the per-row scale of an int8 tensor ``<key>``.
SCALE_SUFFIX = ".scale"
#: The tensors of a linear layer ``<name>`` that are quantized when present.
MATRIX_SUFFIXES = ("weight",) + FACTOR_SUFFIXES


def quantize(w, xp):
    """Symmetric per-row int8 quantization with min–max scales.

    Parameters
    ----------
    w : array (rows, cols), floating point, finite
    xp : module

    Returns
    -------
    q : array (rows, cols) int8
        ``clip(rint(w_ij / s_i), −127, 127)``; 0 where ``s_i = 0``.
    scale : array (rows,) float32
        ``s_i = max_j |w_ij| / 127`` rounded to float32 (0 for a zero row;
        the smallest positive float32 where that underflows a non-zero row).

    Raises
    ------
    MrcError
        ``w`` is not 2-D or not finite.
    """
    if w.ndim != 2:
        raise MrcError(f"int8 quantization is per output channel of a 2-D tensor; got shape {tuple(w.shape)}")
    w = xp.asarray(w, dtype=xp.float64)
    if not bool(xp.isfinite(w).all()):
        raise MrcError("cannot quantize a tensor with NaN or Inf")
    amax = xp.max(xp.abs(w), axis=1) if w.shape[1] else xp.zeros(w.shape[0], dtype=xp.float64)
    scale = (amax / QMAX).astype(xp.float32)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    scale = xp.where(scale == 0, xp.where(amax > 0, tiny, 0.0), scale).astype(xp.float32)
    s = scale.astype(xp.float64)[:, None]
    safe = xp.where(s > 0, s, 1.0)
    q = xp.where(s > 0, xp.clip(xp.rint(w / safe), -QMAX, QMAX), 0.0)
    return q.astype(xp.int8), scale


def dequantize(q, scale, xp, dtype=np.float64):
    """``ŵ_ij = q_ij · s_i`` in ``dtype`` (exact in float64: an 8-bit integer
    times a float32 fits in the 53-bit significand).

    Parameters
    ----------
    q : array (rows, cols) int8
    scale : array (rows,)
    xp : module
    dtype : dtype

    Returns
    -------
    array (rows, cols) of ``dtype``
    """
    return xp.asarray(q).astype(dtype) * xp.asarray(scale).astype(dtype)[:, None]


def linear_layers(tensors):
    """Names ``<name>`` of every 2-D floating-point ``<name>.weight`` and of
    every factored layer (``<name>.lowrank_a``), in file order: the linear
    layers (in a timm ViT the four block linears and the head; the patch
    embedding is a 4-D convolution and norms are 1-D)."""
    names = []
    for key, value in tensors.items():
        for suffix in (".weight", ".lowrank_a"):
            if key.endswith(suffix) and value.ndim == 2 and np.issubdtype(value.dtype, np.floating):
                names.append(key[: -len(suffix)])
    return list(dict.fromkeys(names))


def quantizable_keys(tensors, layers):
    """The keys ``<name>.<suffix>`` of :data:`MATRIX_SUFFIXES` present as 2-D
    floating-point tensors, for every layer name in ``layers``."""
    keys = []
    for name in layers:
        for suffix in MATRIX_SUFFIXES:
            value = tensors.get(f"{name}.{suffix}")
            if value is not None and value.ndim == 2 and np.issubdtype(value.dtype, np.floating):
                keys.append(f"{name}.{suffix}")
    return keys


def quantize_tensors(tensors, layers=None, *, xp=np):
    """Quantize the weights or factors of linear layers (a model's tensors).

    Parameters
    ----------
    tensors : dict of str -> array
        A dense or compressed model.
    layers : sequence of str, optional
        Layer names; default :func:`linear_layers`.
    xp : module

    Returns
    -------
    dict of str -> array
        The same tensors, each quantized ``<key>`` replaced by its int8
        codes and ``<key>.scale`` added (:func:`quantize`); the others
        unchanged (same objects).

    Raises
    ------
    MrcError
        A quantized tensor is not finite, or ``<key>.scale`` already exists.
    """
    if layers is None:
        layers = linear_layers(tensors)
    out = dict(tensors)
    for key in quantizable_keys(tensors, layers):
        if key + SCALE_SUFFIX in tensors:
            raise MrcError(f"{key}{SCALE_SUFFIX} already exists; the model is already quantized")
        try:
            out[key], out[key + SCALE_SUFFIX] = quantize(xp.asarray(tensors[key]), xp)
        except MrcError as err:
            raise MrcError(f"{key}: {err.message}") from None
    return out


def quantized_keys(tensors):
    """Keys ``<key>`` stored as int8 with a ``<key>.scale`` beside them."""
    return [k[: -len(SCALE_SUFFIX)] for k in tensors
            if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in tensors
            and np.dtype(tensors[k[: -len(SCALE_SUFFIX)]].dtype) == np.int8]


def check_quantized(tensors, xp=np):
    """Check every int8 tensor of a model and its scale.

    An int8 ``<key>`` must be 2-D with a ``<key>.scale`` beside it (bare codes
    are not weights), the scale a finite, non-negative float vector of one
    entry per row, and a zero scale only on a row of zero codes (a zero
    scale on non-zero codes would silently zero the row). A ``<key>.scale``
    beside a ``<key>`` that is not int8 is refused too: no reader would use
    it (a stray scale, or a tensor whose codes were stored in another dtype).

    Raises
    ------
    MrcError
        Naming the tensor.
    """
    for key, scale in tensors.items():
        base = key[: -len(SCALE_SUFFIX)] if key.endswith(SCALE_SUFFIX) else None
        if base and base in tensors and np.dtype(tensors[base].dtype) != np.int8:
            raise MrcError(f"{key} is the scale of {base}, which is not int8 (dtype {tensors[base].dtype}): "
                           "a scale belongs to int8 codes only")
    for key, q in tensors.items():
        if np.dtype(q.dtype) != np.int8:
            continue
        scale = tensors.get(key + SCALE_SUFFIX)
        if scale is None:
            raise MrcError(f"int8 tensor {key} has no {key}{SCALE_SUFFIX}: its codes are not weights")
        if q.ndim != 2:
            raise MrcError(f"int8 tensor {key} has shape {tuple(q.shape)}, expected 2-D (rows, cols)")
        if tuple(scale.shape) != (q.shape[0],) or not np.issubdtype(scale.dtype, np.floating):
            raise MrcError(f"{key}{SCALE_SUFFIX} has shape {tuple(scale.shape)} and dtype {scale.dtype}, "
                           f"expected float ({q.shape[0]},): one scale per row of {key}")
        s = xp.asarray(scale).astype(xp.float64)
        if not bool(xp.all(xp.isfinite(s) & (s >= 0))):
            raise MrcError(f"{key}{SCALE_SUFFIX} holds a negative or non-finite scale")
        dead = (s == 0) & xp.any(xp.asarray(q) != 0, axis=1)
        if bool(xp.any(dead)):
            raise MrcError(f"{key}{SCALE_SUFFIX} is 0 on row {int(xp.argmax(dead))}, whose int8 codes are not all 0")


def dequantize_tensors(tensors, xp=np, dtype=np.float64):
    """Replace every int8 ``<key>`` that has a ``<key>.scale`` by ``q · s``
    (:func:`dequantize`, in ``dtype``) and drop the scales; every other tensor
    is passed through unchanged (same object). A model without int8 tensors
    comes back as is.

    Parameters
    ----------
    tensors : dict of str -> array
    xp : module
    dtype : dtype

    Returns
    -------
    dict of str -> array

    Raises
    ------
    MrcError
        :func:`check_quantized` refuses the model.
    """
    check_quantized(tensors, xp)
    keys = quantized_keys(tensors)
    if not keys:
        return tensors
    out = dict(tensors)
    for key in keys:
        out[key] = dequantize(tensors[key], tensors[key + SCALE_SUFFIX], xp, dtype)
        del out[key + SCALE_SUFFIX]
    return out


def storage_bytes(tensors):
    """Bytes of the tensors' data as stored (element count × item size)."""
    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in tensors.values()))
