"""Image folders and the DeiT evaluation transform, in NumPy and Pillow.

The transform reproduces timm's evaluation pipeline for DeiT
(``Resize(floor(size / crop_pct), bicubic)``, ``CenterCrop(size)``,
``ToTensor()``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``) without torch,
so that a model evaluated here sees the same pixels as in timm.

Also importable as ``data_tools.images`` (the same module object).
"""

import math
import os
import warnings

import numpy as np

from mrc_ref.errors import MrcError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_SIZE", "DEFAULT_CROP_PCT", "IMAGE_EXTENSIONS",
           "MAX_PIXELS", "MAX_IMAGE_BYTES", "transform_bytes", "list_images", "check_image_outputs", "iter_batches",
           "load_image", "eval_transform", "resize_shorter", "model_input_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_CROP_PCT = 0.875
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

#: The largest image accepted, in pixels: 64 megapixels, so a 50-megapixel
#: camera photo passes (decoded to RGB, an image this size takes 0.2 GB).
#: Larger images are refused from their header, before they are decoded.
MAX_PIXELS = 64_000_000

#: The most memory the transform of one image may take, in bytes: the
#: decoded image as Pillow stores it (1 byte a pixel for greyscale and
#: palette images, 2 for 16-bit greyscale, 4 for colour, with or without
#: alpha), any full-size conversion, and the resize's buffers
#: (:func:`transform_bytes`). A 50-megapixel colour photo (0.2 GB decoded)
#: passes; images over it are refused from their header, before decoding.
MAX_IMAGE_BYTES = 220_000_000

#: Bytes a pixel of each Pillow mode takes once decoded (others: 4).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _identity(path):
    """``(device, inode)`` of what ``path`` names (links followed), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _images_under(directory, seen_dirs):
    """Image files below ``directory`` in torchvision ``ImageFolder`` order
    (``sorted(os.walk(...))``, then sorted file names), as ``(path,
    identity)`` pairs.

    Links are followed, but no directory is entered twice (by device and
    inode; ``seen_dirs`` holds those never to enter, updated) and no file is
    listed twice, so a link to ``.`` neither loops nor counts a file again;
    only regular files are images (a FIFO named ``x.png`` would block a
    reader forever)."""
    walked = []
    for root, dirs, files in os.walk(directory, followlinks=True):  # pruned as it goes: never sorted() first
        identity = _identity(root)
        if identity in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(identity)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        walked.append((root, files))
    found, seen_files = [], set()
    for root, files in sorted(walked):
        for f in sorted(files):
            path = os.path.join(root, f)
            if not (_is_image_name(f) and os.path.isfile(path)):
                continue
            identity = _identity(path)
            if identity not in seen_files:
                seen_files.add(identity)
                found.append((path, identity))
    return found


def list_images(folder):
    """List the images of a folder, with class labels when it has class sub-folders.

    Two layouts are accepted:

    * one sub-folder per class (``folder/<class>/...``): classes are the
      sorted sub-folder names, numbered ``0 .. C-1``; the images of each
      class are found recursively, in ``torchvision.datasets.ImageFolder``
      order;
    * a flat folder of image files: ``labels`` and ``class_names`` are None.

    Files whose name does not end in one of :data:`IMAGE_EXTENSIONS`
    (case-insensitive), hidden entries (``.name``) and anything but regular
    files are ignored. Links are followed, but each directory and each file
    is visited once per class (by device and inode), and a link back to
    ``folder`` itself is not entered. A class's images are the regular image
    files reached under its folder: one file reached from two classes (a
    symbolic or hard link from one class folder into another) has no single
    label, and is an error naming both paths.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    paths : list of str
        Length N, sorted by class then by path.
    labels : ndarray of int64, shape (N,), or None
    class_names : list of str, length C, or None

    Raises
    ------
    MrcError
        The folder is missing, holds no image, mixes loose images with class
        sub-folders, a class sub-folder holds no image, or one file is
        reached from two classes.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MrcError("image folder does not exist or is not a folder", file=folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise MrcError(f"cannot list image folder: {exc.strerror or exc}", file=folder) from None
    class_names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and _is_image_name(e.name)]  # regular files (links followed)

    if not class_names:
        if not loose:
            raise MrcError("no images found (extensions: " + " ".join(IMAGE_EXTENSIONS) + ")", file=folder)
        return loose, None, None
    if loose:
        raise MrcError(
            f"image folder mixes {len(loose)} loose image file(s) with class sub-folders; "
            "use one layout or the other",
            file=folder,
        )
    paths, labels, owner = [], [], {}
    for index, name in enumerate(class_names):
        found = _images_under(os.path.join(folder, name), {_identity(folder)})
        if not found:
            raise MrcError(f"class folder {name!r} holds no images", file=os.path.join(folder, name))
        for path, identity in found:
            if identity in owner:
                other, first = owner[identity]
                raise MrcError(f"is the same file as {first}: reached from classes {other!r} and {name!r} "
                               "(a link between class folders), it has no single label", file=path)
            owner[identity] = (name, path)
            paths.append(path)
            labels.append(index)
    return paths, np.asarray(labels, dtype=np.int64), class_names


def check_image_outputs(outputs, inputs, folder, directory=None):
    """The output check of every command that reads an image folder
    (``capture``, ``distributed``, ``sensitivity --images``, ``evaluate
    --save-logits``, ``report``), before any work.

    Each path of ``outputs`` (``None`` skipped) passes
    :func:`mrc_ref.formats.check_outputs` against ``inputs`` *and every
    image* of ``folder`` (so a symbolic or hard link to an image is refused),
    and must not lie inside ``folder`` at all, whatever its name (a file
    written there would be read as an image, or break the next walk).
    ``directory``, a pair ``(folder, file names)``, is an output folder
    checked the same way (:func:`mrc_ref.formats.check_output_dir`).

    Returns
    -------
    list of str
        The image paths (:func:`list_images`).
    """
    from mrc_ref import formats

    paths = list_images(folder)[0]
    everything = (*inputs, *paths)
    if directory is not None:
        formats.check_output_dir(directory[0], directory[1], everything, folders=(folder,))
    formats.check_outputs(outputs, everything, folders=(folder,))
    return paths


def _sixteen_to_l(img):
    """A 16-bit greyscale (``I;16*``) image scaled to 8 bits, ``round(v / 257)``
    (computed exactly in integers as ``(2v + 257) // 514``: ``v / 257`` is
    never a half), a band of rows at a time: no full-size wide copy."""
    from PIL import Image

    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    step = max(1, (1 << 20) // max(width, 1))  # about 1 M pixels a band
    for top in range(0, height, step):
        band = np.asarray(img.crop((0, top, width, min(top + step, height)))).astype(np.uint32)
        out[top : top + band.shape[0]] = (2 * band + 257) // 514
    return Image.fromarray(out, mode="L")


def _to_resizable(img):
    """``img`` in a mode whose bicubic resize, band by band, is that of its
    RGB conversion: ``RGB`` and ``L`` as they are (resizing greyscale first,
    then converting, gives the same pixels with a third of the memory),
    16-bit greyscale scaled to ``L``, anything else converted to ``RGB``."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_l(img)
    return _to_rgb(img)


def _to_rgb(img):
    """Convert a Pillow image of any common mode to mode ``RGB``.

    16-bit greyscale (``I;16*``) is scaled to 8 bits (``round(v / 257)``)
    rather than clipped; everything else goes through ``Image.convert``
    (as torchvision's loader does: alpha is dropped, not composited).
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_to_l(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise MrcError(f"unsupported image mode {img.mode!r} ({exc})",
                       file=getattr(img, "filename", None) or None) from None


def transform_bytes(mode, width, height, size=DEFAULT_SIZE, crop_pct=DEFAULT_CROP_PCT):
    """An upper bound of the memory :func:`load_image` takes for one image, in bytes.

    ``decoded + converted + resize + crop`` with ``decoded = W H b`` (``b``
    from the mode: 1 for ``L``/``P``/``1``, 2 for 16-bit, else 4);
    ``converted`` the full-size copy made before resizing (none for ``RGB``
    and ``L``; ``W H`` for 16-bit, scaled to ``L``; ``4 W H`` for other
    modes, converted to ``RGB``; 16-bit also 16 MiB for the bands of rows
    being scaled); ``resize = (W' H + W' H') c + 8 (W' k_x + H' k_y)`` for a
    resize to ``W' × H'`` (Pillow's horizontal pass, then the vertical one;
    ``c`` = 1 in ``L``, 4 in ``RGB``; its float64 bicubic coefficients,
    ``k = 2 ⌈2 max(old / new, 1)⌉ + 1`` taps an output pixel), plus
    ``4 W' H'`` when the greyscale result is converted; and ``64 size²`` for
    the crop and its float32 arrays.

    Parameters
    ----------
    mode : str
        Pillow mode of the file.
    width, height : int
    size, crop_pct
        As in :func:`eval_transform`.

    Returns
    -------
    int

    Raises
    ------
    MrcError
        The resized image would be over :data:`MAX_PIXELS`.
    """
    width, height = int(width), int(height)
    pixels = width * height
    decoded = pixels * _BYTES_PER_PIXEL.get(mode, 4)
    if mode in ("RGB", "L"):
        converted, band = 0, (1 if mode == "L" else 4)
    elif mode in _SIXTEEN_BIT_MODES:
        converted, band = pixels + 16 * (1 << 20), 1  # the L copy, and the bands of rows being scaled
    else:
        converted, band = 4 * pixels, 4
    new_w, new_h = _resized(width, height, int(math.floor(int(size) / crop_pct)))
    resize = 0
    if (new_w, new_h) != (width, height):
        taps = [2 * math.ceil(2 * max(old / new, 1.0)) + 1 for old, new in ((width, new_w), (height, new_h))]
        resize = (new_w * height + new_w * new_h) * band + 8 * (new_w * taps[0] + new_h * taps[1])
    if band == 1:
        resize += 4 * new_w * new_h
    return decoded + converted + resize + 64 * int(size) ** 2


def _center_crop_box(width, height, size):
    """``(left, top, right, bottom)`` of the torchvision/timm centre crop."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def _resized(width, height, shorter):
    """The size ``resize_shorter`` gives, refused over :data:`MAX_PIXELS` (an
    extreme aspect ratio: the resized image, not the file, is too large)."""
    if width <= height:
        new_w, new_h = shorter, int(shorter * height / width)
    else:
        new_w, new_h = int(shorter * width / height), shorter
    if new_w * new_h > MAX_PIXELS:
        raise MrcError(f"image is {width}×{height}: resizing its shorter side to {shorter} gives {new_w}×{new_h} = "
                       f"{new_w * new_h / 1e6:.1f} megapixels, over the limit of {MAX_PIXELS / 1e6:g} megapixels")
    return new_w, new_h


def resize_shorter(img, shorter):
    """Resize a Pillow image so that its shorter side is ``shorter`` (bicubic).

    The longer side becomes ``int(shorter * long / short)``, as in
    ``torchvision.transforms.Resize(int)``; an image already of that size is
    returned unchanged.

    Parameters
    ----------
    img : PIL.Image.Image
    shorter : int

    Returns
    -------
    PIL.Image.Image

    Raises
    ------
    MrcError
        The resized image would be over :data:`MAX_PIXELS` (an extreme
        aspect ratio), checked before it is allocated.
    """
    from PIL import Image

    width, height = img.size
    new_w, new_h = _resized(width, height, shorter)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def eval_transform(img, *, size=DEFAULT_SIZE, crop_pct=DEFAULT_CROP_PCT, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The DeiT/timm evaluation transform of one image.

    Steps: convert to RGB; resize the shorter side to
    ``floor(size / crop_pct)`` with bicubic interpolation; centre-crop
    ``size x size`` (offset ``round((side - size) / 2)``); scale to [0, 1]
    (``/ 255``); normalise per channel ``(x - mean) / std``. Arithmetic is in
    float32, as in torchvision. A greyscale image (``L``, or 16-bit scaled to
    ``L``) is resized and cropped before it is converted to RGB: Pillow
    resizes each band alike, so the pixels are the same, and the full-size
    RGB copy is never made.

    Parameters
    ----------
    img : PIL.Image.Image or ndarray
        A Pillow image of any common mode, or a uint8 array (H, W) or
        (H, W, 3|4) handed to ``PIL.Image.fromarray``.
    size : int
        Side of the square output (224 for DeiT).
    crop_pct : float
        Fraction of the resized shorter side kept by the centre crop, in (0, 1].
    mean, std : sequence of 3 floats
        Per-channel normalisation (ImageNet by default).

    Returns
    -------
    ndarray of float32, shape (3, size, size)

    Raises
    ------
    MrcError
        A mode Pillow cannot convert to RGB, or bad ``size``/``crop_pct``.
    """
    from PIL import Image

    size = int(size)
    if size < 1:
        raise MrcError(f"image size must be a positive integer, got {size}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise MrcError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img = _to_resizable(img)  # greyscale is resized before it becomes RGB: the same pixels, less memory
    img = resize_shorter(img, int(math.floor(size / crop_pct)))
    img = img.crop(_center_crop_box(img.size[0], img.size[1], size))
    img = _to_rgb(img)
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = x.transpose(2, 0, 1)
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def load_image(path, **transform_kw):
    """Read one image file and apply :func:`eval_transform`.

    Parameters
    ----------
    path : str or os.PathLike
    **transform_kw
        Passed to :func:`eval_transform` (``size``, ``crop_pct``, ``mean``, ``std``).

    Returns
    -------
    ndarray of float32, shape (3, size, size)

    Raises
    ------
    MrcError
        Naming the file: missing, unreadable, not an image, truncated, of
        an unsupported mode, not a regular file, over :data:`MAX_PIXELS`
        (checked from the header, before decoding, and for the resized image
        before it is allocated), or needing more than :data:`MAX_IMAGE_BYTES`
        (:func:`transform_bytes`, from the header, before decoding).

    Notes
    -----
    Pillow's warnings (decompression bomb, palette transparency, corrupt
    EXIF...) are not shown: an image is either read or refused with one
    line.
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):  # a FIFO or a device would block the reader
        raise MrcError("not a regular file", file=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = Image.open(path)
            except Image.DecompressionBombError:  # over twice Pillow's own limit, far over ours
                raise MrcError(f"image has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, "
                               f"over the limit of {MAX_PIXELS / 1e6:g} megapixels") from None
            with img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise MrcError(f"image is {width}×{height} = {width * height / 1e6:.1f} megapixels, "
                                   f"over the limit of {MAX_PIXELS / 1e6:g} megapixels")
                size = int(transform_kw.get("size", DEFAULT_SIZE))
                crop_pct = transform_kw.get("crop_pct", DEFAULT_CROP_PCT)
                need = transform_bytes(img.mode, width, height, size, crop_pct)  # refuses a huge resize too
                if need > MAX_IMAGE_BYTES:
                    raise MrcError(f"image is {width}×{height} in mode {img.mode}: decoding and resizing it "
                                   f"would take about {need / 1e6:.0f} MB, over the limit of "
                                   f"{MAX_IMAGE_BYTES / 1e6:g} MB per image")
                img.load()  # decoded only once its memory is known to fit
                return eval_transform(img, **transform_kw)
    except MrcError as err:
        raise err.at(file=path) from None
    except OSError as exc:
        reason = exc.strerror if getattr(exc, "strerror", None) else str(exc)
        raise MrcError(f"cannot read image: {reason}", file=path) from None
    except Exception as exc:  # Pillow raises SyntaxError, ValueError, DecompressionBombError...
        raise MrcError(f"cannot read image: {type(exc).__name__}: {exc}", file=path) from None


def iter_batches(folder, batch_size, *, size, crop_pct=DEFAULT_CROP_PCT, limit=None):
    """Stream an image folder as transformed batches.

    The folder is listed (and checked) when this function is called; images
    are read lazily, one batch at a time.

    Parameters
    ----------
    folder : str or os.PathLike
        See :func:`list_images` for the layouts.
    batch_size : int
        Images per batch (the last one may be smaller).
    size : int
        Model input side (see :func:`model_input_size`).
    crop_pct : float
    limit : int, optional
        Use only the first ``limit`` images in :func:`list_images` order.

    Returns
    -------
    iterator of (images, labels, paths)
        ``images`` float32 (B, 3, size, size); ``labels`` int64 (B,) or None
        for a flat folder; ``paths`` list of B str.

    Raises
    ------
    MrcError
        From :func:`list_images` at once; from :func:`load_image` while iterating.
    """
    if int(batch_size) < 1:
        raise MrcError(f"batch size must be a positive integer, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise MrcError(f"limit must be a positive integer, got {limit}")
    paths, labels, _ = list_images(folder)
    if limit is not None:
        paths = paths[: int(limit)]
        labels = None if labels is None else labels[: int(limit)]
    return _batches(paths, labels, int(batch_size), int(size), crop_pct)


def _batches(paths, labels, batch_size, size, crop_pct):
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = np.empty((len(chunk), 3, size, size), dtype=np.float32)
        for i, path in enumerate(chunk):
            images[i] = load_image(path, size=size, crop_pct=crop_pct)
        yield images, (None if labels is None else labels[start : start + batch_size].copy()), list(chunk)


def model_input_size(params):
    """Input image side of a timm ViT/DeiT from its weights.

    The token count ``T`` of ``pos_embed`` (1, T, D) is ``prefix + g * g``
    with ``prefix = 1 + ('dist_token' in params)``; with the patch side
    ``p`` of ``patch_embed.proj.weight`` (D, C, p, p) the input side is
    ``g * p``.

    Parameters
    ----------
    params : mapping of str -> ndarray

    Returns
    -------
    int

    Raises
    ------
    MrcError
        A tensor is missing or has an unexpected shape, or the patch tokens
        do not form a square grid.
    """
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if key not in params:
            raise MrcError(f"missing tensor {key!r}; cannot infer the input image size")
    pos_shape = tuple(np.shape(params["pos_embed"]))
    w_shape = tuple(np.shape(params["patch_embed.proj.weight"]))
    if len(pos_shape) != 3 or pos_shape[0] != 1:
        raise MrcError(f"pos_embed has shape {pos_shape}, expected (1, tokens, dim)")
    if len(w_shape) != 4 or w_shape[2] != w_shape[3]:
        raise MrcError(f"patch_embed.proj.weight has shape {w_shape}, expected (dim, channels, p, p)")
    prefix = 1 + ("dist_token" in params)
    patches = pos_shape[1] - prefix
    grid = math.isqrt(patches) if patches > 0 else 0
    if patches <= 0 or grid * grid != patches:
        raise MrcError(
            f"pos_embed has {pos_shape[1]} tokens; minus {prefix} prefix token(s) that is {patches}, "
            "not a square grid of patches"
        )
    return grid * w_shape[2]
