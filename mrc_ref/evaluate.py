"""``python -m mrc_ref.evaluate weights.safetensors IMAGES [--reference ORIGINAL]``

Evaluate a dense or compressed ViT on an image folder: top-1/top-5 accuracy
when the folder has class sub-folders, and agreement with a reference model
(top-1 agreement, mean KL, output NMSE) when ``--reference`` is given.
"""

import argparse
import json
import sys

import numpy as np

from . import formats, metrics, vit
from .backend import DEVICES, DTYPES, get_dtype, get_xp, to_host
from .errors import MrcError


def model_logits(weights, images, *, num_heads=None, batch_size=64, limit=None, crop_pct=0.875,
                 device="cpu", dtype="float64", quiet=True):
    """Logits of the model in ``weights`` over the image folder ``images``.

    Reads the file and streams the folder through :func:`tensor_logits`.

    Returns
    -------
    logits : ndarray (N, K) float64
    labels : ndarray (N,) or None
    """
    from tqdm import tqdm

    from .images import iter_batches, list_images, model_input_size

    xp = get_xp(device)
    tensors, metadata = formats.read_safetensors(weights)
    try:
        heads = vit.resolve_num_heads(tensors, num_heads, metadata)
        params = vit.prepare(tensors, xp, get_dtype(dtype))
        size = model_input_size(tensors)
    except MrcError as err:
        raise err.at(file=weights) from None
    total = len(list_images(images)[0])
    with tqdm(total=total if limit is None else min(total, limit), unit="img", file=sys.stderr,
              disable=True if quiet else None, desc=f"evaluate {weights}", leave=False) as bar:
        def counted():
            for item in iter_batches(images, batch_size, size=size, crop_pct=crop_pct, limit=limit):
                yield item
                bar.update(len(item[0]))

        return tensor_logits(params, metadata, counted(), num_heads=heads, device=device, dtype=dtype,
                             source=weights)


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


def build_parser():
    description = " ".join(__doc__.split("\n\n")[1].replace("``", "").split())  # the docstring's 2nd paragraph
    p = argparse.ArgumentParser(prog="python -m mrc_ref.evaluate", description=description)
    p.add_argument("weights", help="model weights, dense or compressed (safetensors)")
    p.add_argument("images", metavar="IMAGES", help="image folder (class sub-folders, or flat)")
    p.add_argument("--reference", help="original model to compare the outputs with")
    p.add_argument("--images", dest="limit", type=int, metavar="N", help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--crop-pct", type=float, default=0.875,
                   help="centre-crop fraction of the DeiT eval transform, in (0, 1] (default: %(default)s)")
    p.add_argument("--num-heads", type=int,
                   help="attention heads (default: the weights' num_heads metadata, else width / 64)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="NumPy or CuPy (default: %(default)s)")
    p.add_argument("--dtype", default="float64", choices=list(DTYPES),
                   help="dtype of the forward pass (default: %(default)s)")
    p.add_argument("--save-logits", help="write the logits (and labels) to this .npz")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise MrcError("--batch-size and --images must be positive")
        if not 0 < args.crop_pct <= 1:  # also refuses NaN
            raise MrcError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        if args.num_heads is not None and args.num_heads < 1:
            raise MrcError(f"--num-heads must be positive, got {args.num_heads}")
        if args.save_logits:  # refuse before any work: not an input, not an image of IMAGES
            from .images import list_images

            formats.check_output(args.save_logits, (args.weights, args.reference, *list_images(args.images)[0]))
        kw = dict(num_heads=args.num_heads, batch_size=args.batch_size, limit=args.limit, crop_pct=args.crop_pct,
                  device=args.device, dtype=args.dtype, quiet=args.quiet)
        logits, labels = model_logits(args.weights, args.images, **kw)
        reference = None
        if args.reference:
            reference, _ = model_logits(args.reference, args.images, **kw)
            if reference.shape != logits.shape:
                raise MrcError(f"the reference has {reference.shape[1]} classes, the model {logits.shape[1]}",
                               file=args.reference)
        result = metrics.summarize(logits, labels, reference)
        if args.save_logits:
            arrays = {"logits": logits} | ({} if labels is None else {"labels": labels})
            with formats.atomic_path(args.save_logits, (args.weights, args.reference)) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
    except MrcError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, allow_nan=False))  # strict JSON: the logits are finite, so are the metrics
    else:
        for key, value in result.items():
            print(f"{key:>15}: {value:.4f}" if isinstance(value, float) else f"{key:>15}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
