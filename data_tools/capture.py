"""Capture per-layer input statistics of a ViT over an image folder.

Usage::

    python -m data_tools.capture weights.safetensors IMAGES -o acts.h5 \\
        [--images N] [--proxy-images K] [--batch-size B] [--num-heads H] \\
        [--device cpu|cuda] [--quiet]

For every linear layer ``l`` of the transformer blocks, with ``X`` all its
input token rows (over all images) and ``X_i`` (T, n) those of image ``i``:

* ``gram = X^T X`` (n, n), ``sum = X^T 1`` (n,), ``rows`` = number of rows;
* ``gram_normalized = (1/N) sum_i X_i^T X_i / ||X_i W^T||_F^2`` with ``W``
  the layer's weight (``A B + P Q`` for a compressed layer).

Also the block-0 input tokens of the first ``K`` images (``proxy/tokens``).
Memory is fixed: a few (n, n) float64 accumulators per layer plus one batch.
"""

import argparse
import os
import sys

import numpy as np

from mrc_ref import vit
from mrc_ref.backend import DEVICES, get_xp, to_device, to_host
from mrc_ref.errors import MrcError
from mrc_ref.formats import check_output, read_safetensors, write_activations

DEFAULT_PROXY_IMAGES = 32
DEFAULT_BATCH_SIZE = 32


def block_linear_names(params):
    """The block linear layers of :func:`mrc_ref.vit.linear_names` (no heads)."""
    return [name for name in vit.linear_names(params) if name not in vit.HEAD_LINEARS]


def _new_accumulator(n, xp):
    return {
        "gram": xp.zeros((n, n), dtype=xp.float64),
        "sum": xp.zeros((n,), dtype=xp.float64),
        "rows": 0,
        "gram_normalized": xp.zeros((n, n), dtype=xp.float64),
    }


def accumulate(acc, params, name, x, xp):
    """Add one batch of layer inputs to the accumulator ``acc`` (in place).

    Parameters
    ----------
    acc : dict
        ``gram`` (n, n), ``sum`` (n,), ``rows`` (int), ``gram_normalized``
        (n, n, the unnormalised sum over images), float64 xp arrays.
    params : mapping of str -> xp array
        Prepared parameters (for the layer weight).
    name : str
    x : xp array, shape (B, T, n)
        The inputs of layer ``name`` for B images.

    Notes
    -----
    ``gram += X^T X``; ``sum += X^T 1``; ``rows += B T``;
    ``gram_normalized += sum_i X_i^T X_i / s_i`` with
    ``s_i = ||X_i W^T||_F^2``, computed as one matmul of the rows of each
    image scaled by ``s_i^{-1/2}``. ``X_i W^T`` is applied through the
    factors (no bias) for a compressed layer.
    """
    x = xp.asarray(x, dtype=xp.float64)
    b, t, n = x.shape
    flat = xp.reshape(x, (b * t, n))
    acc["gram"] += flat.T @ flat
    acc["sum"] += xp.sum(flat, axis=0)
    acc["rows"] += b * t
    y = vit.linear(params, name, x, xp, bias=False)
    y = xp.asarray(y, dtype=xp.float64)
    energy = xp.sum(xp.reshape(y * y, (b, -1)), axis=1)  # (B,) = ||X_i W^T||_F^2
    if not bool(to_host(xp.all(energy > 0))):  # also catches NaN
        raise MrcError("an image gives a zero or non-finite layer output; gram_normalized is undefined", layer=name)
    scaled = xp.reshape(x * (1.0 / xp.sqrt(energy))[:, None, None], (b * t, n))
    acc["gram_normalized"] += scaled.T @ scaled


def capture_statistics(params, batches, *, num_heads, proxy_images, xp, progress=None):
    """Stream image batches through the model and accumulate layer statistics.

    Parameters
    ----------
    params : mapping of str -> array
        timm-layout parameters (host or prepared; prepared here in float64).
    batches : iterable
        Image batches (B, C, H, W), or tuples whose first item is one (as
        yielded by ``data_tools.images.iter_batches``).
    num_heads : int
    proxy_images : int
        Keep the block-0 inputs of the first ``proxy_images`` images.
    xp : module
    progress : callable, optional
        Called with the number of images of each finished batch.

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
    params = vit.prepare(params, xp, np.float64)
    names = block_linear_names(params)
    wanted = set(names)
    acc = {}
    proxy, kept, images = [], 0, 0

    def hook(name, x):
        if name in wanted:
            if name not in acc:
                acc[name] = _new_accumulator(x.shape[-1], xp)
            accumulate(acc[name], params, name, x, xp)

    for item in batches:
        batch = item[0] if isinstance(item, tuple) else item
        x = to_device(xp, batch, np.float64)
        if x.ndim != 4 or x.shape[0] == 0:
            raise MrcError(f"image batch has shape {tuple(x.shape)}, expected (B, C, H, W) with B > 0")
        h = vit.embed(params, x, xp)
        if kept < proxy_images:
            take = min(proxy_images - kept, h.shape[0])
            proxy.append(to_host(h[:take]).astype(np.float32))
            kept += take
        vit.blocks(params, h, num_heads, xp, hook=hook)
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


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def run(weights, images_folder, output, *, images=None, proxy_images=DEFAULT_PROXY_IMAGES,
        batch_size=DEFAULT_BATCH_SIZE, num_heads=None, device="cpu", quiet=False, store_dtype="float64"):
    """The command line's work: read, capture, write. Returns the image count.

    Statistics are accumulated in float64 and stored as ``store_dtype``
    (float32 halves the file; the format allows both)."""
    from tqdm import tqdm

    from data_tools.images import iter_batches, list_images, model_input_size

    check_output(output, (weights,))  # fail before the work, not after it
    xp = get_xp(device)
    tensors, metadata = read_safetensors(weights)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        size = model_input_size(tensors)
    except MrcError as err:
        raise err.at(file=weights) from None
    batches = iter_batches(images_folder, batch_size, size=size, limit=images)
    total = len(list_images(images_folder)[0])
    total = total if images is None else min(total, images)
    counted = [0]

    def counting(it):
        for item in it:
            counted[0] += len(item[0])
            yield item

    with tqdm(total=total, unit="img", file=sys.stderr, disable=True if quiet else None, desc="capture") as bar:
        try:
            layers, proxy = capture_statistics(
                tensors, counting(batches), num_heads=heads, proxy_images=proxy_images, xp=xp, progress=bar.update
            )
        except MrcError as err:
            if err.file is None and err.layer is not None:  # a problem of the weights
                raise err.at(file=weights) from None
            raise
    attrs = {
        "weights_file": os.path.basename(os.fspath(weights)),
        "num_images": counted[0],
        "batch_size": int(batch_size),
        "num_heads": heads,
    }
    for st in layers.values():
        for key in ("gram", "sum", "gram_normalized"):
            st[key] = st[key].astype(store_dtype)
    write_activations(output, layers, proxy_tokens=proxy, attrs=attrs, inputs=(weights,))
    return counted[0]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.capture",
        description="Capture per-layer input statistics (acts.h5) of a timm-layout ViT over an image folder.",
    )
    parser.add_argument("weights", help="timm-layout .safetensors (dense or compressed)")
    parser.add_argument("images_folder", metavar="IMAGES", help="image folder (flat, or one sub-folder per class)")
    parser.add_argument("-o", "--output", required=True, help="output acts.h5")
    parser.add_argument("--images", type=_positive, default=None, help="use the first N images (default: all)")
    parser.add_argument("--proxy-images", type=_non_negative, default=DEFAULT_PROXY_IMAGES,
                        help=f"store block-0 tokens of the first K images (default {DEFAULT_PROXY_IMAGES})")
    parser.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--num-heads", type=int, default=None, help="default: weights metadata, else D // 64")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--store-dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the stored statistics (accumulation is float64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        n = run(args.weights, args.images_folder, args.output, images=args.images, proxy_images=args.proxy_images,
                batch_size=args.batch_size, num_heads=args.num_heads, device=args.device, quiet=args.quiet,
                store_dtype=args.store_dtype)
    except MrcError as err:
        print(f"python -m data_tools.capture: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.output} ({n} images)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
