"""Add capture shards into the statistics of the whole image list, exactly.

Usage::

    python -m data_tools.merge part-0.h5 part-1.h5 ... -o acts.h5 [--store-dtype float64|float32] [--quiet]

The parts are ``acts.h5`` files written by ``python -m data_tools.capture
... --shard K/N`` for ``K = 0 .. N-1`` (docs/scale.md). Per layer, with
``n_k`` the image count of part ``k``:

* ``gram = sum_k gram_k``, ``sum = sum_k sum_k``, ``rows = sum_k rows_k``;
* ``gram_normalized = (sum_k n_k gram_normalized_k) / sum_k n_k`` (each part
  stores a mean over its own images);
* ``proxy/tokens``: the parts' tokens in shard order, cut at the parts'
  ``proxy_images`` cap: the same tokens as one capture of the whole list.

Everything is added in float64. The parts must belong together: same weights
(``weights_sha256``), preprocessing, image list, head count, proxy cap and
layers, every shard ``0 .. N-1`` exactly once; otherwise the merge refuses,
naming the file. The same functions reduce the in-memory parts of
``data_tools.distributed``.
"""

import functools

import h5py
import numpy as np

from mrc_ref import stats
from mrc_ref.errors import MrcError, describe
from mrc_ref.formats import check_output, open_activations, read_layer_stats, read_proxy_tokens, write_activations

from ..capture import store

#: Root attributes that every part of one capture carries with equal values,
#: and how a difference is described.
MATCHING = {
    "weights_sha256": "weights (sha256 of the weights file)",
    "preprocess": "preprocessing (image transform and size)",
    "image_list_sha256": "image list (sha256 of the sorted relative paths)",
    "images_total": "number of images in the list",
    "shard_count": "number of shards",
    "num_heads": "number of attention heads",
    "proxy_images": "proxy image cap (--proxy-images)",
}
#: Root attributes a part must have (besides ``format`` and ``version``).
REQUIRED = ("shard_index", "shard_count", "num_images") + tuple(k for k in MATCHING if k != "shard_count")


def _plain(value):
    """An HDF5 attribute value as a plain Python value (str, int, float); a
    size-1 array is its one element, a larger array stays an array (for
    :func:`_integer` to refuse)."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return value
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return getattr(value, "item", lambda: value)()


#: Attributes that are counts: integers (never booleans, floats, strings or
#: arrays of more than one element).
COUNTS = ("shard_index", "shard_count", "num_images", "images_total", "num_heads", "proxy_images")
#: Attributes that are strings.
TEXTS = ("weights_sha256", "preprocess", "image_list_sha256")
#: Provenance attributes that are positive counts when present.
OPTIONAL_COUNTS = ("batch_size",)


def _integer(value, what, source, layer=None):
    """``value`` (an attribute read from ``source``) as a non-negative int,
    or :class:`MrcError` naming the file, the layer and the attribute."""
    value = _plain(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise MrcError(f"attribute {what!r} must be an integer, got {describe(value)}", file=source, layer=layer)
    if value < 0:
        raise MrcError(f"attribute {what!r} must be ≥ 0, got {value}", file=source, layer=layer)
    return int(value)


def _text(value, what, source):
    value = _plain(value)
    if not isinstance(value, str):
        raise MrcError(f"attribute {what!r} must be a string, got {describe(value)}", file=source)
    return value


def _shard_size(index, count, total):
    return (index + 1) * total // count - index * total // count


def make_part(layers, proxy, attrs, source, layout=None, proxy_needed=True):
    """An in-memory part: the float64 sums of one or more shards.

    Parameters
    ----------
    layers : dict of str -> dict
        Per layer ``gram`` (n, n), ``sum`` (n,), ``rows`` (int) and
        ``gram_normalized`` (n, n, the mean over the part's images) or None.
        May hold only some layers (or none) when ``layout`` is given.
    proxy : ndarray (P, T, D) or None
        The block-0 tokens of the part's first ``P`` images.
    attrs : dict
        The part's root attributes (:data:`REQUIRED` at least).
    source : str
        Where it comes from (a file name), for error messages.
    layout : dict of str -> (int, bool), optional
        Every layer's ``(n, has gram_normalized)``; derived from ``layers``
        when not given.
    proxy_needed : bool
        False: ``proxy`` is not given and the part holds no tokens.

    Returns
    -------
    dict
        ``attrs`` (the :data:`MATCHING` values), ``weights_file``,
        ``shards`` ``{K: n_K}``, ``sources`` ``{K: source}``, ``layout``,
        ``layers`` with float64 ``gram``, ``sum``, ``rows`` and
        ``gram_normalized`` as the *sum* ``n_K C_norm,K`` (or None), and
        ``proxy`` ``{K: tokens}`` holding only the tokens that a capture of
        the whole list keeps: those of global image index below the cap.

    Raises
    ------
    MrcError
        A missing attribute, an image count that is not shard K's, or
        inconsistent layer shapes (naming ``source``).
    """
    missing = [key for key in REQUIRED if key not in attrs]
    if missing:
        raise MrcError(f"no shard information (attribute {missing[0]!r} missing): not a part written by "
                       "python -m data_tools.capture of this version; capture it again (with --shard K/N)",
                       file=source)
    values = {key: _plain(attrs[key]) for key in REQUIRED}
    for key in COUNTS:
        values[key] = _integer(values[key], key, source)
    for key in TEXTS:
        values[key] = _text(values[key], key, source)
    for key in OPTIONAL_COUNTS:
        if key in attrs and _integer(attrs[key], key, source) < 1:
            raise MrcError(f"attribute {key!r} must be ≥ 1, got 0", file=source)
    index, count, total, images = (values[k] for k in ("shard_index", "shard_count", "images_total", "num_images"))
    if not (count >= 1 and 0 <= index < count):
        raise MrcError(f"bad shard {index}/{count}", file=source)
    if total < 1:
        raise MrcError("the capture holds no image (images_total is 0)", file=source)
    if images < 1:
        raise MrcError(f"the part holds no image (num_images is 0; shard {index}/{count})", file=source)
    if images != _shard_size(index, count, total):
        raise MrcError(f"holds {images} images, but shard {index}/{count} of {total} images holds "
                       f"{_shard_size(index, count, total)}", file=source)
    if layout is None:
        layout = {name: (np.shape(st["gram"])[-1], st.get("gram_normalized") is not None)
                  for name, st in layers.items()}
    out_layers = {}
    for name, st in layers.items():
        n, has_normalized = layout[name]
        gram = np.asarray(st["gram"], dtype=np.float64)
        total_sum = np.asarray(st["sum"], dtype=np.float64)
        normalized = st.get("gram_normalized")
        if gram.shape != (n, n) or total_sum.shape != (n,) or (normalized is not None) != has_normalized or (
                normalized is not None and np.shape(normalized) != (n, n)):
            raise MrcError(f"statistics of inconsistent shapes: gram {gram.shape}, sum {total_sum.shape}, "
                           f"gram_normalized {None if normalized is None else np.shape(normalized)}",
                           file=source, layer=name)
        rows = _integer(st["rows"], "rows", source, layer=name)
        try:  # the checks of every reader of statistics: finite, symmetric, PSD, rows ≥ 1 (mrc_ref.stats)
            stats.validate({"gram": gram, "sum": total_sum, "rows": rows, "gram_normalized": normalized}, n, np)
        except MrcError as err:
            raise err.at(file=source, layer=name) from None
        if normalized is not None:
            normalized = np.asarray(normalized, dtype=np.float64) * images
        out_layers[name] = {"gram": gram, "sum": total_sum, "rows": int(rows), "gram_normalized": normalized}
    keep = min(max(int(values["proxy_images"]) - index * total // count, 0), images)
    tokens = None
    if keep and proxy_needed:
        if proxy is None or len(proxy) < keep:
            raise MrcError(f"holds {0 if proxy is None else len(proxy)} proxy images, expected at least {keep}",
                           file=source)
        tokens = np.asarray(proxy[:keep], dtype=np.float32)
        if tokens.ndim != 3:
            raise MrcError(f"proxy/tokens has shape {tokens.shape}, expected (images, tokens, width)", file=source)
    return {
        "attrs": {key: values[key] for key in MATCHING},
        "weights_file": _text(attrs.get("weights_file", ""), "weights_file", source),
        "shards": {index: images},
        "sources": {index: str(source)},
        "layout": dict(layout),
        "layers": out_layers,
        "proxy": {index: tokens} if tokens is not None else {},
        "proxy_shape": None if tokens is None else tuple(tokens.shape[1:]),
    }


def read_part(path, names=None, proxy=True):
    """Read one part file into :func:`make_part`'s form (float64).

    Parameters
    ----------
    path : str
    names : iterable of str, optional
        Read the statistics of these layers only (default all); the layout
        of every layer is always read.
    proxy : bool
        Read the proxy tokens (default True).

    Raises
    ------
    MrcError
        Unreadable, wrong format or version, no shard information, or bad
        statistics (naming the file).
    """
    with open_activations(path) as f:
        attrs = dict(f.attrs)
        layout = {}
        for name, group in f["layers"].items():
            gram = group.get("gram") if isinstance(group, h5py.Group) else None
            if not isinstance(gram, h5py.Dataset) or len(gram.shape) != 2:
                raise MrcError("no 'gram' matrix", file=path, layer=name)
            layout[name] = (int(gram.shape[1]), "gram_normalized" in group)
        wanted = layout if names is None else names
        layers = {name: read_layer_stats(f, name, path) for name in wanted}
        tokens = read_proxy_tokens(f) if proxy else None
    return make_part(layers, tokens, attrs, path, layout=layout, proxy_needed=proxy)


def _describe(layout, names):
    return ", ".join(f"{name} (n={layout[name][0]}{'' if layout[name][1] else ', no gram_normalized'})"
                     for name in names) or "none"


def check_together(a, b):
    """Raise :class:`MrcError` naming ``b``'s file unless parts ``a`` and ``b``
    can be added: equal :data:`MATCHING` attributes, the same layers (names,
    sizes, ``gram_normalized`` present or not) and no shard in both."""
    where = b["sources"][min(b["sources"])]
    first = a["sources"][min(a["sources"])]
    for key, what in MATCHING.items():
        if a["attrs"][key] != b["attrs"][key]:
            raise MrcError(f"does not belong with {first}: different {what}: {b['attrs'][key]!r} here, "
                           f"{a['attrs'][key]!r} there", file=where)
    la, lb = a["layout"], b["layout"]
    if la != lb:
        here = [n for n in lb if la.get(n) != lb[n]]
        there = [n for n in la if lb.get(n) != la[n]]
        raise MrcError(f"does not belong with {first}: different layers: here {_describe(lb, here)}, "
                       f"there {_describe(la, there)}", file=where)
    if None not in (a["proxy_shape"], b["proxy_shape"]) and a["proxy_shape"] != b["proxy_shape"]:
        raise MrcError(f"does not belong with {first}: proxy tokens of shape (*, {', '.join(map(str, b['proxy_shape']))}) "
                       f"here, (*, {', '.join(map(str, a['proxy_shape']))}) there", file=where)
    both = sorted(set(a["shards"]) & set(b["shards"]))
    if both:
        k, count = both[0], a["attrs"]["shard_count"]
        if a["sources"][k] == b["sources"][k]:
            raise MrcError(f"given twice (shard {k}/{count})", file=b["sources"][k])
        raise MrcError(f"shard {k}/{count} overlaps {a['sources'][k]}, which holds the same shard",
                       file=b["sources"][k])


def add_layer(sa, sb):
    """The exact sum of one layer's statistics from two parts, in float64:
    ``gram_a + gram_b``, ``sum_a + sum_b``, ``rows_a + rows_b`` and the
    ``gram_normalized`` sums ``n_a C_a + n_b C_b`` (None stays None)."""
    normalized = None if sa["gram_normalized"] is None else sa["gram_normalized"] + sb["gram_normalized"]
    return {"gram": sa["gram"] + sb["gram"], "sum": sa["sum"] + sb["sum"], "rows": sa["rows"] + sb["rows"],
            "gram_normalized": normalized}


def combine(a, b):
    """The exact sum of two parts (a new part; ``a`` and ``b`` are not modified).

    :func:`check_together`, then :func:`add_layer` for the layers both hold,
    and the union of the shard maps and proxy tokens. ``combine(a, b)``
    equals ``combine(b, a)``; any tree of ``combine`` over the same parts
    agrees with any other to float64 round-off.

    Raises
    ------
    MrcError
        From :func:`check_together`.
    """
    check_together(a, b)
    return {
        "attrs": dict(a["attrs"]),
        "weights_file": a["weights_file"] if min(a["shards"]) < min(b["shards"]) else b["weights_file"],
        "shards": {**a["shards"], **b["shards"]},
        "sources": {**a["sources"], **b["sources"]},
        "layout": dict(a["layout"]),
        "layers": {name: add_layer(a["layers"][name], b["layers"][name])
                   for name in a["layers"] if name in b["layers"]},
        "proxy": {**a["proxy"], **b["proxy"]},
        "proxy_shape": a["proxy_shape"] or b["proxy_shape"],
    }


def finish_layer(st, images):
    """``acts.h5`` statistics from summed ones: ``gram_normalized`` divided by
    the image count ``sum_k n_k`` (the mean over all images)."""
    normalized = st["gram_normalized"]
    return dict(st, gram_normalized=None if normalized is None else normalized / images)


def finish(part):
    """Statistics of a complete set of shards, as ``acts.h5`` contents.

    Returns
    -------
    layers : dict
        :func:`finish_layer` of each layer the part holds; float64.
    proxy : ndarray of float32 (P, T, D) or None
        Tokens in shard order (at most the cap).
    attrs : dict
        The matching attributes, ``weights_file``, ``num_images``,
        ``shard_index`` 0 and ``shard_count`` 1 (the result is one whole
        capture) and ``merged_shards`` N.

    Raises
    ------
    MrcError
        A shard is missing (naming the first part's file).
    """
    count = int(part["attrs"]["shard_count"])
    first = part["sources"][min(part["sources"])]
    if len(part["shards"]) < count:  # the first few missing, found without listing all N (N may be huge)
        missing = [k for k in range(min(count, len(part["shards"]) + 3)) if k not in part["shards"]][:3]
        more = count - len(part["shards"]) - len(missing)
        have = ", ".join(f"{k}/{count}" for k in sorted(part["shards"]))
        raise MrcError(f"incomplete: shard(s) {', '.join(f'{k}/{count}' for k in missing)}"
                       f"{f' and {more} more' if more else ''} missing (given {have})", file=first)
    images = sum(part["shards"].values())
    layers = {name: finish_layer(st, images) for name, st in part["layers"].items()}
    tokens = [part["proxy"][k] for k in sorted(part["proxy"])]
    proxy = np.concatenate(tokens, axis=0) if tokens else None
    attrs = dict(part["attrs"], weights_file=part["weights_file"], num_images=images, shard_index=0,
                 shard_count=1, merged_shards=count)
    return layers, proxy, attrs


def merge_files(paths, output, *, store_dtype="float64"):
    """Merge part files into ``output`` (atomic; the inputs are only read).

    First every part's attributes, layout and proxy tokens are read and
    checked (:func:`combine` of parts without layer data); then the layers
    are added one at a time (:func:`add_layer`), so memory holds two
    layers' statistics, not whole parts.

    Returns
    -------
    dict
        The root attributes written.

    Raises
    ------
    MrcError
        From :func:`read_part`, :func:`combine` and :func:`finish`, or an
        output that cannot be written.
    """
    if not paths:
        raise MrcError("no parts to merge")
    check_output(output, paths)
    headers = [read_part(path, names=()) for path in paths]
    total = functools.reduce(combine, headers)
    _, proxy, attrs = finish(total)
    order = [path for _, path in sorted((min(h["shards"]), path) for h, path in zip(headers, paths))]
    layers = {}
    for name in total["layout"]:
        st = None
        for path in order:
            one = read_part(path, names=(name,), proxy=False)["layers"][name]
            st = one if st is None else add_layer(st, one)
        layers[name] = store({name: finish_layer(st, attrs["num_images"])}, store_dtype)[name]
    write_activations(output, layers, proxy_tokens=proxy, attrs=attrs, inputs=paths)
    return attrs
