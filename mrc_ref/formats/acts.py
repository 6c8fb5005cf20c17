"""Activation statistics, ``acts.h5`` version 1: the validating reader and
the atomic writer (docs/formats.md, "Activation statistics")."""

from contextlib import contextmanager

import h5py
import numpy as np

from ..errors import MrcError, UnsupportedVersion, describe
from ..stats import check_declared
from .paths import atomic_path, check_input

__all__ = ["ACTS_FORMAT", "ACTS_VERSION", "write_activations", "open_activations", "read_layer_stats",
           "read_proxy_tokens"]

ACTS_FORMAT = "mrc_ref.activations"
ACTS_VERSION = 1


def write_activations(path, layers, proxy_tokens=None, attrs=None, inputs=()):
    """Write statistics in the ``acts.h5`` version 1 format, atomically.

    Parameters
    ----------
    path : str
    layers : dict of str -> dict
        Per linear layer name: ``gram`` (n, n), ``sum`` (n,), ``rows`` (int)
        and optionally ``gram_normalized`` (n, n). Host arrays.
    proxy_tokens : ndarray, optional
        ``(images, tokens, d)`` block-0 inputs, stored as float32 ``proxy/tokens``.
    attrs : dict, optional
        Extra root attributes (provenance).
    """
    with atomic_path(path, inputs) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = ACTS_FORMAT
            f.attrs["version"] = ACTS_VERSION
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            group = f.create_group("layers")
            for name, st in layers.items():
                g = group.create_group(name)
                g.create_dataset("gram", data=np.asarray(st["gram"]))
                g.create_dataset("sum", data=np.asarray(st["sum"]))
                g.attrs["rows"] = int(st["rows"])
                if st.get("gram_normalized") is not None:
                    g.create_dataset("gram_normalized", data=np.asarray(st["gram_normalized"]))
            if proxy_tokens is not None:
                f.create_group("proxy").create_dataset(
                    "tokens", data=np.asarray(proxy_tokens, dtype=np.float32)
                )


def _h5_object(root, name, path):
    """``root[name]`` (``name`` may hold ``/``), or ``None`` when absent.

    Every link on the way is checked: an external link (to another file) is
    refused with a message naming its target; soft links stay inside the
    file and are followed (a dangling one reads as absent). A dataset whose
    data lives in other files (external storage, virtual dataset) is refused
    the same way.
    """
    obj, where = root, root.name.rstrip("/")
    for part in [p for p in name.split("/") if p]:
        where = f"{where}/{part}"
        try:
            link = obj.get(part, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise MrcError(f"'{where}' is an external link to {link.filename}:{link.path}; "
                               "links to other files are not followed", file=path)
            obj = obj.get(part) if link is not None else None
        except MrcError:
            raise
        except Exception as exc:  # a link HDF5 cannot resolve, a corrupt object
            raise MrcError(f"cannot open '{where}' ({exc})", file=path) from None
        if obj is None:
            return None
        if not isinstance(obj, (h5py.Group, h5py.Dataset)):
            raise MrcError(f"'{where}' is neither a group nor a dataset", file=path)
    if isinstance(obj, h5py.Dataset):
        sources = []
        if obj.external:
            sources = [entry[0] for entry in obj.external]
        elif obj.is_virtual:
            sources = [src.file_name for src in obj.virtual_sources()]
        if sources:
            raise MrcError(f"dataset '{where}' keeps its data in other files ({', '.join(map(str, sources))}); "
                           "such datasets are not read", file=path)
    return obj


def _dataset_meta(ds, what):
    """Declared ``(shape, dtype)`` of an HDF5 dataset, read without its data;
    for an HDF5 type NumPy cannot represent, ``dtype`` is a description of
    it, which :func:`mrc_ref.stats.check_declared` refuses."""
    if not isinstance(ds, h5py.Dataset):
        raise MrcError(f"{what} is not a dataset")
    try:
        dtype = ds.dtype
    except Exception:
        dtype = None
    return ds.shape, (dtype if dtype is not None else "an HDF5 type with no NumPy equivalent")


def _check_written(ds, what):
    """Refuse a dataset that declares more data than it stores (chunks never
    written, or contiguous storage never allocated): such data would be read
    as fill values."""
    shape = ds.shape or ()
    if int(np.prod(shape, dtype=object)) == 0:
        return
    if ds.chunks is not None:
        expected = int(np.prod([-(-s // c) for s, c in zip(shape, ds.chunks)], dtype=object))
        stored = ds.id.get_num_chunks()
        if stored < expected:
            raise MrcError(f"{what} declares shape {tuple(shape)} but stores only {stored} of its {expected} "
                           "chunks (the rest was never written)")
    elif ds.id.get_storage_size() == 0:
        raise MrcError(f"{what} declares shape {tuple(shape)} but stores no data")


def _read_checked(ds, what, expected, origin="the layer's weight"):
    """Read dataset ``ds`` after checking its declared dtype and shape
    (:func:`mrc_ref.stats.check_declared`) and that its data was written."""
    shape, dtype = _dataset_meta(ds, what)
    check_declared(what, shape, dtype, expected, origin)
    _check_written(ds, what)
    return ds[()]


@contextmanager
def open_activations(path):
    """Open ``acts.h5`` for reading after checking its format and version.

    Yields the open ``h5py.File``; datasets are read lazily (streamed).
    """
    path = check_input(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise MrcError(f"not a readable HDF5 file ({exc})", file=path) from None
    try:
        try:
            fmt, version = f.attrs.get("format"), f.attrs.get("version")
        except Exception as exc:  # an attribute of a type h5py cannot convert
            raise MrcError(f"cannot read the root attributes ({exc})", file=path) from None
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", errors="replace")
        if not isinstance(fmt, str) or fmt != ACTS_FORMAT:
            raise MrcError(f"format attribute is {describe(fmt)}, expected {ACTS_FORMAT!r}", file=path)
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) \
                or version != ACTS_VERSION:
            raise UnsupportedVersion(f"unsupported version {describe(version)}, expected {ACTS_VERSION}", file=path)
        for group, needed in (("layers", True), ("proxy", False)):
            obj = _h5_object(f, group, path)
            if (needed or obj is not None) and not isinstance(obj, h5py.Group):
                raise MrcError(f"no '{group}' group", file=path)
        yield f
    finally:
        f.close()


def read_layer_stats(f, name, path=None, n=None):
    """Read one layer's raw statistics from an open ``acts.h5``.

    Before any data is read, each dataset's declared dtype must be float32
    or float64 and, when the layer's input size ``n`` is given, its shape
    ``(n, n)`` or ``(n,)``; so memory is bounded by the model, whatever the
    file declares.

    Returns a dict with host arrays ``gram``, ``sum``, ``rows`` and
    ``gram_normalized`` (``None`` when absent). Values are not validated
    here; see :func:`mrc_ref.stats.validate`.
    """
    path = path or f.filename
    group = _h5_object(f, "layers/" + name, path) if name.strip("/") else None
    if group is None:
        raise MrcError("missing from the activations file", file=path, layer=name)
    try:
        if not isinstance(group, h5py.Group):
            raise MrcError("is not a group of the activations file")
        datasets = {key: _h5_object(group, key, path) for key in ("gram", "sum", "gram_normalized")}
        if datasets["gram"] is None or datasets["sum"] is None or "rows" not in group.attrs:
            raise MrcError("needs datasets 'gram', 'sum' and attribute 'rows'")
        matrix = (n, n) if n is not None else (None, None)
        out = {
            "gram": _read_checked(datasets["gram"], "gram", matrix),
            "sum": _read_checked(datasets["sum"], "sum", (n,)),
            "gram_normalized": None,
        }
        if datasets["gram_normalized"] is not None:
            out["gram_normalized"] = _read_checked(datasets["gram_normalized"], "gram_normalized", matrix)
        try:
            rows = group.attrs["rows"]
        except Exception as exc:
            raise MrcError(f"cannot read attribute 'rows' ({exc})") from None
        # an integer scalar becomes an int; anything else is left for stats.validate to refuse
        out["rows"] = int(rows) if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool) else rows
        return out
    except MrcError as err:
        raise err.at(file=path, layer=name) from None
    except Exception as exc:  # truncated or corrupt datasets
        raise MrcError(f"cannot read statistics ({exc})", file=path, layer=name) from None


def read_proxy_tokens(f, tokens_shape=None, path=None, *, lazy=False):
    """Return ``proxy/tokens`` of an open ``acts.h5`` as float32, or ``None``.

    Before the data is read, its declared dtype must be float32 or float64,
    its data written, and its shape ``(images, tokens, d)`` with
    ``images > 0`` and, when ``tokens_shape`` (``pos_embed.shape[1:]`` of the
    model) is given, ``(tokens, d)`` equal to it. After reading, every value
    must be finite.

    With ``lazy=True`` the checked ``h5py.Dataset`` itself is returned,
    unread (valid while ``f`` is open): a reader that slices it a batch of
    images at a time keeps memory bounded, and checks the values it reads.
    """
    path = path or f.filename
    tokens = _h5_object(f, "proxy/tokens", path)
    if tokens is None:
        return None
    expected = (None, *tuple(int(s) for s in tokens_shape)) if tokens_shape is not None else (None, None, None)
    try:
        shape, dtype = _dataset_meta(tokens, "proxy/tokens")
        check_declared("proxy/tokens", shape, dtype, expected, "pos_embed")
        if shape[0] == 0:
            raise MrcError("proxy/tokens holds no images")
        _check_written(tokens, "proxy/tokens")
        if lazy:
            return tokens
        data = np.asarray(tokens[()], dtype=np.float32)
    except MrcError as err:
        raise err.at(file=path) from None
    except Exception as exc:
        raise MrcError(f"cannot read proxy/tokens ({exc})", file=path) from None
    if not np.isfinite(data).all():
        raise MrcError("proxy/tokens contains NaN or Inf", file=path)
    return data
