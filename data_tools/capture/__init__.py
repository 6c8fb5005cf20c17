"""Capture per-layer input statistics of a ViT over an image folder.

Usage::

    python -m data_tools.capture weights.safetensors IMAGES -o acts.h5 \\
        [--max-images M] [--shard K/N] [--proxy-images P] [--batch-size B] \\
        [--num-heads H] [--device cpu|cuda] [--dtype float64|float32] \\
        [--store-dtype float64|float32] [--quiet]

For every linear layer ``l`` of the transformer blocks, with ``X`` all its
input token rows (over all images) and ``X_i`` (T, n) those of image ``i``:

* ``gram = X^T X`` (n, n), ``sum = X^T 1`` (n,), ``rows`` = number of rows;
* ``gram_normalized = (1/N) sum_i X_i^T X_i / ||X_i W^T||_F^2`` with ``W``
  the layer's weight (``A B + P Q`` for a compressed layer).

Also the block-0 input tokens of the first ``P`` images (``proxy/tokens``).
Memory is fixed: a few (n, n) float64 accumulators per layer plus one batch.

``--shard K/N`` (K is 0-based, ``0 <= K < N``) captures only the K-th of N
contiguous, near-equal slices of the sorted image list; ``python -m
data_tools.merge`` adds the N parts into the statistics of the whole list
(docs/scale.md).
"""

import hashlib
import json
import os
import re

import numpy as np

from mrc_ref import vit
from mrc_ref.backend import get_xp, to_device, to_host
from mrc_ref.errors import MrcError
from mrc_ref.formats import read_model, write_activations
from mrc_ref.images import (DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, check_image_outputs, list_images,
                            load_image, model_input_size)
from mrc_ref.progress import counter

DEFAULT_PROXY_IMAGES = 32
DEFAULT_BATCH_SIZE = 32
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def block_linear_names(params):
    """The block linear layers of :func:`mrc_ref.vit.linear_names` (no heads)."""
    return [name for name in vit.linear_names(params) if name not in vit.HEAD_LINEARS]


# ----------------------------------------------------------------- accumulation
def _new_accumulator(n, xp):
    return {
        "gram": xp.zeros((n, n), dtype=xp.float64),
        "sum": xp.zeros((n,), dtype=xp.float64),
        "rows": 0,
        "gram_normalized": xp.zeros((n, n), dtype=xp.float64),
    }


def accumulate(acc, params, name, x, xp, y=None):
    """Add one batch of layer inputs to the accumulator ``acc`` (in place).

    Parameters
    ----------
    acc : dict
        ``gram`` (n, n), ``sum`` (n,), ``rows`` (int), ``gram_normalized``
        (n, n, the unnormalised sum over images), float64 xp arrays.
    params : mapping of str -> xp array
        Prepared parameters (for the layer weight), in the dtype of ``x``.
    name : str
    x : xp array, shape (B, T, n), float64 or float32
        The inputs of layer ``name`` for B images.
    y : xp array, shape (B, T, m), optional
        ``X W^T`` without the bias when the caller has it (the forward
        pass's output minus the bias); computed here otherwise.

    Notes
    -----
    ``gram += X^T X``; ``sum += X^T 1``; ``rows += B T``;
    ``gram_normalized += sum_i X_i^T X_i / s_i`` with
    ``s_i = ||X_i W^T||_F^2``, computed as one product of the rows of each
    image scaled by ``s_i^{-1/2}``. ``X_i W^T`` is applied through the
    factors (no bias) for a compressed layer. Each batch's products are
    formed in ``x``'s dtype and added into the float64 accumulators (NumPy
    forms ``X^T X`` with BLAS ``syrk``, one triangle, then mirrors it).
    """
    b, t, n = x.shape
    flat = xp.reshape(x, (b * t, n))
    acc["gram"] += flat.T @ flat
    acc["sum"] += xp.sum(flat, axis=0, dtype=xp.float64)
    acc["rows"] += b * t
    if y is None:
        y = vit.linear(params, name, x, xp, bias=False)
    energy = xp.sum(xp.reshape(y * y, (b, -1)), axis=1, dtype=xp.float64)  # (B,) = ||X_i W^T||_F^2
    if not bool(to_host(xp.all(energy > 0))):  # also catches NaN
        raise MrcError("an image gives a zero or non-finite layer output; gram_normalized is undefined", layer=name)
    scaled = xp.reshape(x * xp.asarray(1.0 / xp.sqrt(energy), dtype=x.dtype)[:, None, None], (b * t, n))
    acc["gram_normalized"] += scaled.T @ scaled


def capture_statistics(params, batches, *, num_heads, proxy_images, xp, progress=None, dtype=np.float64):
    """Stream image batches through the model and accumulate layer statistics.

    Parameters
    ----------
    params : mapping of str -> array
        timm-layout parameters (host or prepared; prepared here in ``dtype``).
    batches : iterable
        Image batches (B, C, H, W), or tuples whose first item is one (as
        yielded by ``mrc_ref.images.iter_batches``).
    num_heads : int
    proxy_images : int
        Keep the block-0 inputs of the first ``proxy_images`` images.
    xp : module
    progress : callable, optional
        Called with the number of images of each finished batch.
    dtype : dtype, optional
        Compute dtype of the forward pass and of each batch's products
        (float64 by default; float32 is faster and agrees to about 1e-5
        of the largest entry). Accumulation across batches is float64 always.

    Returns
    -------
    layers : dict of str -> dict
        Per block linear layer, host arrays: ``gram`` (n, n) float64,
        ``sum`` (n,) float64, ``rows`` int, ``gram_normalized`` (n, n) float64.
    proxy_tokens : ndarray of float32, shape (K, T, D)
        ``K = min(proxy_images, N)``.

    Raises
    ------
    MrcError
        No images, or a model/image error from the forward pass.
    """
    params = vit.prepare(params, xp, dtype)
    names = block_linear_names(params)
    wanted = set(names)
    acc = {}
    proxy, kept, images = [], 0, 0

    pending = {}

    def hook(name, x):  # the layer's input: kept until its output arrives
        if name in wanted:
            pending[name] = x

    def out_hook(name, y):  # the layer's output x W^T + b: no second product for ||X_i W^T||
        x = pending.pop(name, None)
        if x is not None:
            if name not in acc:
                acc[name] = _new_accumulator(x.shape[-1], xp)
            bias = params.get(f"{name}.bias")
            accumulate(acc[name], params, name, x, xp, y=y if bias is None else y - bias)

    for item in batches:
        batch = item[0] if isinstance(item, tuple) else item
        x = to_device(xp, batch, dtype)
        if x.ndim != 4 or x.shape[0] == 0:
            raise MrcError(f"image batch has shape {tuple(x.shape)}, expected (B, C, H, W) with B > 0")
        h = vit.embed(params, x, xp)
        if kept < proxy_images:
            take = min(proxy_images - kept, h.shape[0])
            proxy.append(to_host(h[:take]).astype(np.float32))
            kept += take
        vit.blocks(params, h, num_heads, xp, hook=hook, out_hook=out_hook)
        images += x.shape[0]
        if progress is not None:
            progress(x.shape[0])
    if images == 0:
        raise MrcError("no images to capture statistics from")
    layers = {}
    for name in names:
        st = acc[name]
        layers[name] = {
            "gram": to_host(st["gram"]),
            "sum": to_host(st["sum"]),
            "rows": int(st["rows"]),
            "gram_normalized": to_host(st["gram_normalized"] / images),
        }
    proxy_tokens = np.concatenate(proxy, axis=0) if proxy else None
    return layers, proxy_tokens


# ----------------------------------------------------------------- shards and provenance
def parse_shard(text):
    """``"K/N"`` -> ``(K, N)``: shard ``K`` (0-based) of ``N``.

    Raises
    ------
    MrcError
        Not two integers ``K/N`` with ``N >= 1`` and ``0 <= K < N``.
    """
    m = _SHARD.match(str(text).strip())
    if not m:
        raise MrcError(f"--shard must be K/N with integers 0 <= K < N (K is 0-based), got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or k >= n:
        raise MrcError(f"--shard K/N needs N >= 1 and 0 <= K < N (K is 0-based: 0/{max(n, 1)} is the first), "
                       f"got {text!r}")
    return k, n


def shard_bounds(index, count, total):
    """``(start, stop)`` of shard ``index`` of ``count`` over ``total`` items:
    ``start = floor(index total / count)``, ``stop = floor((index + 1) total / count)``.

    The shards are contiguous, disjoint, cover ``0 .. total-1`` in order, and
    their sizes differ by at most one.
    """
    return index * total // count, (index + 1) * total // count


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    return digest.hexdigest()


def image_list_sha256(paths, folder):
    """Hex SHA-256 of the image list: the paths relative to ``folder``, with
    ``/`` separators, joined by newlines (UTF-8). Independent of where the
    folder is mounted."""
    rel = [os.path.relpath(p, folder).replace(os.sep, "/") for p in paths]
    return hashlib.sha256("\n".join(rel).encode("utf-8", "surrogateescape")).hexdigest()


def preprocess_description(size):
    """The evaluation transform as a JSON string (``preprocess`` attribute);
    two captures used the same preprocessing iff these strings are equal."""
    return json.dumps({"transform": "deit_eval", "size": int(size), "crop_pct": DEFAULT_CROP_PCT,
                       "interpolation": "bicubic", "mean": list(IMAGENET_MEAN),
                       "std": list(IMAGENET_STD)}, sort_keys=True)


def _load_batches(paths, batch_size, size):
    for start in range(0, len(paths), batch_size):
        yield np.stack([load_image(p, size=size) for p in paths[start : start + batch_size]])


def capture_part(weights, images_folder, *, shard=(0, 1), max_images=None, proxy_images=DEFAULT_PROXY_IMAGES,
                 batch_size=DEFAULT_BATCH_SIZE, num_heads=None, device="cpu", dtype="float64", progress=None):
    """Capture the statistics of one shard of an image folder, in memory.

    The image list is :func:`mrc_ref.images.list_images` order, cut to its
    first ``max_images``; shard ``K`` of ``N`` is its slice
    :func:`shard_bounds` ``(K, N, M)``. ``shard=(0, 1)`` is the whole list.

    Parameters
    ----------
    weights : str
        timm-layout .safetensors.
    images_folder : str
    shard : (int, int)
        ``(K, N)``, 0-based ``K``.
    max_images, proxy_images, batch_size, num_heads, device, dtype, progress
        As for :func:`run` and :func:`capture_statistics`.

    Returns
    -------
    layers : dict
        As :func:`capture_statistics` returns (float64, host).
    proxy : ndarray of float32 (P, T, D), or None
        Block-0 inputs of the shard's first ``proxy_images`` images.
    attrs : dict
        The root attributes of the part (docs/formats.md): ``weights_file``,
        ``weights_sha256``, ``preprocess``, ``image_list_sha256``,
        ``images_total`` (M), ``shard_index``, ``shard_count``,
        ``num_images`` (of this shard), ``proxy_images``, ``num_heads``,
        ``batch_size``, ``dtype``.

    Raises
    ------
    MrcError
        Bad weights, folder, image or an empty shard (naming the file).
    """
    index, count = shard
    xp = get_xp(device)
    tensors, metadata = read_model(weights)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        size = model_input_size(tensors)
    except MrcError as err:
        raise err.at(file=weights) from None
    paths = list_images(images_folder)[0]
    if max_images is not None:
        paths = paths[: int(max_images)]
    start, stop = shard_bounds(index, count, len(paths))
    if start == stop:
        raise MrcError(f"shard {index}/{count} of {len(paths)} images is empty; use at most {len(paths)} shards",
                       file=images_folder)
    try:
        layers, proxy = capture_statistics(tensors, _load_batches(paths[start:stop], int(batch_size), size),
                                           num_heads=heads, proxy_images=proxy_images, xp=xp, progress=progress,
                                           dtype=np.dtype(dtype))
    except MrcError as err:
        if err.file is None and err.layer is not None:  # a problem of the weights
            raise err.at(file=weights) from None
        raise
    attrs = {
        "weights_file": os.path.basename(os.fspath(weights)),
        "weights_sha256": file_sha256(weights),
        "preprocess": preprocess_description(size),
        "image_list_sha256": image_list_sha256(paths, images_folder),
        "images_total": len(paths),
        "shard_index": index,
        "shard_count": count,
        "num_images": stop - start,
        "proxy_images": int(proxy_images),
        "num_heads": heads,
        "batch_size": int(batch_size),
        "dtype": str(np.dtype(dtype)),
    }
    return layers, proxy, attrs


def store(layers, store_dtype):
    """Copies of the statistics with ``gram``, ``sum``, ``gram_normalized`` cast to ``store_dtype``."""
    return {name: {k: (v.astype(store_dtype) if k in ("gram", "sum", "gram_normalized") and v is not None else v)
                   for k, v in st.items()} for name, st in layers.items()}


def check_capture_output(output, weights, images_folder):
    """Refuse, before any work, an ``acts.h5`` output that is the weights or
    any image of the folder (by any path), or lies inside the image folder:
    :func:`mrc_ref.images.check_image_outputs`, the check of every writer
    that reads images. Returns the folder's image paths."""
    return check_image_outputs((output,), (weights,), images_folder)


def run(weights, images_folder, output, *, max_images=None, shard=(0, 1), proxy_images=DEFAULT_PROXY_IMAGES,
        batch_size=DEFAULT_BATCH_SIZE, num_heads=None, device="cpu", quiet=False, dtype="float64",
        store_dtype="float64"):
    """The command line's work: read, capture, write. Returns the image count.

    Statistics are accumulated in float64 and stored as ``store_dtype``
    (float32 halves the file; the format allows both)."""
    get_xp(device)  # --device cuda without a GPU fails before anything is read
    paths = check_capture_output(output, weights, images_folder)
    total = len(paths)
    total = total if max_images is None else min(total, max_images)
    start, stop = shard_bounds(shard[0], shard[1], total)
    with counter(stop - start, "capture", quiet, unit="img") as bar:
        layers, proxy, attrs = capture_part(weights, images_folder, shard=shard, max_images=max_images,
                                            proxy_images=proxy_images, batch_size=batch_size, num_heads=num_heads,
                                            device=device, dtype=dtype, progress=bar.update)
    write_activations(output, store(layers, store_dtype), proxy_tokens=proxy, attrs=attrs, inputs=(weights,))
    return attrs["num_images"]
