"""Evaluate a model file on an image folder: its logits, and the metrics
of :mod:`mrc_ref.metrics` against the labels and a reference model. The
command line is ``python -m mrc_ref.evaluate`` (docs/cli.md).
"""

import numpy as np

from .. import formats, layout, metrics, vit
from ..backend import get_dtype, get_xp, to_host
from ..errors import ConfigError, MrcError
from ..images import check_image_outputs, iter_batches, list_images, model_input_size
from ..progress import counter

__all__ = ["load_model", "model_logits", "tensor_logits", "evaluate_files"]


def _output_features(tensors, name):
    """Output features of linear layer ``name`` (its ``m``), dense or factored."""
    key = name + (".weight" if layout.layer_form(tensors, name) == "dense" else ".lowrank_a")
    return int(tensors[key].shape[0])


def load_model(weights, *, num_heads=None, device="cpu", dtype="float64"):
    """Read the model in ``weights`` and make it ready for the forward pass.

    Returns
    -------
    params : dict
        :func:`mrc_ref.vit.prepare`'d tensors on the device, in ``dtype``.
    heads : int
        Attention heads.
    size : int
        Input image side.
    classes : int
        Output features of the head.
    """
    xp = get_xp(device)  # an unusable device is refused before any file is read
    tensors, metadata = formats.read_model(weights)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        size = model_input_size(tensors)
        classes = _output_features(tensors, "head")
        params = vit.prepare(tensors, xp, get_dtype(dtype))
    except MrcError as err:
        raise err.at(file=weights) from None
    return params, heads, size, classes


def _folder_logits(model, weights, images, *, batch_size, limit, crop_pct, device, dtype, quiet):
    """Logits of a :func:`load_model` model over the folder ``images``."""
    params, heads, size, _ = model
    total = len(list_images(images)[0])
    with counter(total if limit is None else min(total, limit), f"evaluate {weights}", quiet, unit="img") as bar:
        def counted():
            for item in iter_batches(images, batch_size, size=size, crop_pct=crop_pct, limit=limit):
                yield item
                bar.update(len(item[0]))

        return tensor_logits(params, {}, counted(), num_heads=heads, device=device, dtype=dtype, source=weights)


def model_logits(weights, images, *, num_heads=None, batch_size=64, limit=None, crop_pct=0.875,
                 device="cpu", dtype="float64", quiet=True):
    """Logits of the model in ``weights`` over the image folder ``images``.

    Reads the file (:func:`load_model`) and streams the folder through
    :func:`tensor_logits`.

    Returns
    -------
    logits : ndarray (N, K) float64
    labels : ndarray (N,) or None
    """
    model = load_model(weights, num_heads=num_heads, device=device, dtype=dtype)
    return _folder_logits(model, weights, images, batch_size=batch_size, limit=limit, crop_pct=crop_pct,
                          device=device, dtype=dtype, quiet=quiet)


def tensor_logits(tensors, metadata, batches, *, num_heads=None, device="cpu", dtype="float64", source=None):
    """Logits of the model ``tensors`` over image batches: the forward pass of
    :func:`model_logits`, for a model and images already in memory.

    Parameters
    ----------
    tensors : dict of str -> array
        A dense, compressed or int8 model (host arrays, or already prepared
        by :func:`mrc_ref.vit.prepare` in ``dtype``).
    metadata : dict
        The file's metadata (``num_heads``).
    batches : iterable of (images, labels, ...)
        ``images`` float32 (B, 3, s, s) as :func:`mrc_ref.images.iter_batches`
        yields them; ``labels`` (B,) or None.
    source : str, optional
        The model's file, named in errors.

    Returns
    -------
    logits : ndarray (N, K) float64
    labels : ndarray (N,) or None
    """
    xp = get_xp(device)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        params = vit.prepare(tensors, xp, get_dtype(dtype))
    except MrcError as err:
        raise err.at(file=source) from None
    logits, labels = [], []
    for batch, batch_labels, *_ in batches:
        try:
            with np.errstate(all="ignore"):  # an overflow is reported below, as non-finite logits, not warned
                out = vit.forward(params, xp.asarray(batch), num_heads=heads, xp=xp, dtype=get_dtype(dtype))
        except MrcError as err:
            raise err.at(file=source) from None
        logits.append(to_host(out).astype(np.float64))
        if batch_labels is not None:
            labels.append(batch_labels)
    logits = np.concatenate(logits)
    if not np.isfinite(logits).all():  # e.g. a NaN in a tensor no other check reads
        raise MrcError("the forward pass gives NaN or Inf logits", file=source)
    return logits, (np.concatenate(labels) if labels else None)


def evaluate_files(weights, images, *, reference=None, save_logits=None, num_heads=None, batch_size=64, limit=None,
                   crop_pct=0.875, device="cpu", dtype="float64", quiet=True):
    """Evaluate the model in ``weights`` on the folder ``images``.

    Every option is checked, and ``save_logits`` against the inputs and the
    images, before any work. Returns the metrics of
    :func:`mrc_ref.metrics.summarize` (with ``reference``'s logits as the
    reference); ``save_logits`` receives the logits (and labels) as ``.npz``,
    atomically.
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError("images", f"must be positive, got {limit}")
    if not 0 < crop_pct <= 1:  # also refuses NaN
        raise ConfigError("crop_pct", f"must be in (0, 1], got {crop_pct}")
    if num_heads is not None and num_heads < 1:
        raise ConfigError("num_heads", f"must be positive, got {num_heads}")
    if save_logits:  # refuse before any work: not an input, not an image of IMAGES
        check_image_outputs((save_logits,), (weights, reference), images)
    load = dict(num_heads=num_heads, device=device, dtype=dtype)
    model = load_model(weights, **load)
    ref_model = None
    if reference:  # read and checked before any forward pass
        ref_model = load_model(reference, **load)
        if ref_model[3] != model[3]:
            raise MrcError(f"the reference has {ref_model[3]} classes, the model {model[3]}", file=reference)
    kw = dict(batch_size=batch_size, limit=limit, crop_pct=crop_pct, device=device, dtype=dtype, quiet=quiet)
    logits, labels = _folder_logits(model, weights, images, **kw)
    ref = None if ref_model is None else _folder_logits(ref_model, reference, images, **kw)[0]
    result = metrics.summarize(logits, labels, ref)
    if save_logits:
        arrays = {"logits": logits} | ({} if labels is None else {"labels": labels})
        with formats.atomic_path(save_logits, (weights, reference)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
    return result
