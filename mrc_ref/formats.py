"""File contracts: safetensors weights, ``acts.h5`` statistics, the
compressed layout, and the JSON report. The only module that reads or
writes files (see docs/formats.md)."""

import json
import os
import struct
import tempfile
from contextlib import contextmanager

import h5py
import numpy as np

from .errors import MrcError
from .vit import dense_weight

ACTS_FORMAT = "mrc_ref.activations"
ACTS_VERSION = 1
COMPRESSED_FORMAT = "mrc_ref.compressed"
COMPRESSED_VERSION = "1"
FACTOR_SUFFIXES = ("lowrank_a", "lowrank_b", "residual_p", "residual_q")


# ----------------------------------------------------------------- atomic output
def check_output(path, inputs=()):
    """Raise :class:`MrcError` unless ``path`` can be written: its directory
    exists, it is not a directory, and it is none of ``inputs`` (same file by
    any spelling or link). Called before any work, and again when writing."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise MrcError("output directory does not exist", file=path)
    if os.path.isdir(path):
        raise MrcError("output is a directory", file=path)
    for src in inputs:
        if src is not None and os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise MrcError("output would overwrite an input file", file=path)


@contextmanager
def atomic_path(path, inputs=()):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if
    the block succeeds, so a reader never sees a half-written file.

    Raises :class:`MrcError` when :func:`check_output` refuses ``path`` or the
    operating system refuses the write (permissions, full disk).
    """
    path = os.fspath(path)
    check_output(path, inputs)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise MrcError(f"cannot write: {exc.strerror or exc}", file=path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------- safetensors
def read_safetensors(path):
    """Read every tensor and the ``__metadata__`` of a safetensors file.

    Returns
    -------
    tensors : dict of str -> numpy.ndarray
        In file order, dtypes exactly as stored.
    metadata : dict of str -> str
    """
    from safetensors.numpy import load

    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    try:
        if len(blob) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", blob[:8])
        if 8 + hlen > len(blob):
            raise ValueError("header runs past the end of the file (truncated?)")
        header = json.loads(blob[8 : 8 + hlen])
        metadata = header.pop("__metadata__", None) or {}
        tensors = load(blob)
    except MrcError:
        raise
    except Exception as exc:
        raise MrcError(f"not a readable safetensors file ({exc})", file=path) from None
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return {k: tensors[k] for k in order}, dict(metadata)


def _sorted_metadata(blob):
    """Rewrite the header with its metadata keys sorted: ``safetensors`` writes
    them in a per-process random order, which would make outputs differ."""
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen])
    if "__metadata__" not in header:
        return blob
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + hlen :]


def write_safetensors(path, tensors, metadata=None, inputs=()):
    """Write ``tensors`` (host arrays) with string ``metadata`` atomically."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}  # keeps 0-d
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    blob = _sorted_metadata(save(tensors, metadata=meta))
    with atomic_path(path, inputs) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)


# ----------------------------------------------------------------- acts.h5
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


@contextmanager
def open_activations(path):
    """Open ``acts.h5`` for reading after checking its format and version.

    Yields the open ``h5py.File``; datasets are read lazily (streamed).
    """
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise MrcError("no such file", file=path) from None
    except OSError as exc:
        raise MrcError(f"not a readable HDF5 file ({exc})", file=path) from None
    try:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != ACTS_FORMAT:
            raise MrcError(f"format attribute is {fmt!r}, expected {ACTS_FORMAT!r}", file=path)
        version = f.attrs.get("version")
        version = getattr(version, "item", lambda: version)()
        if not isinstance(version, (int, np.integer)) or version != ACTS_VERSION:
            raise MrcError(f"unsupported version {version!r}, expected {ACTS_VERSION}", file=path)
        for group, needed in (("layers", True), ("proxy", False)):
            if (needed or group in f) and not isinstance(f.get(group), h5py.Group):
                raise MrcError(f"no '{group}' group", file=path)
        yield f
    finally:
        f.close()


def read_layer_stats(f, name, path=None):
    """Read one layer's raw statistics from an open ``acts.h5``.

    Returns a dict with host arrays ``gram``, ``sum``, ``rows`` and
    ``gram_normalized`` (``None`` when absent). Values are not validated
    here; see :func:`mrc_ref.stats.validate`.
    """
    path = path or f.filename
    group = f["layers"].get(name)
    if group is None:
        raise MrcError("missing from the activations file", file=path, layer=name)
    try:
        if "gram" not in group or "sum" not in group or "rows" not in group.attrs:
            raise MrcError("needs datasets 'gram', 'sum' and attribute 'rows'", file=path, layer=name)
        return {
            "gram": group["gram"][()],
            "sum": group["sum"][()],
            "rows": int(group.attrs["rows"]),
            "gram_normalized": group["gram_normalized"][()] if "gram_normalized" in group else None,
        }
    except MrcError:
        raise
    except Exception as exc:  # truncated or corrupt datasets
        raise MrcError(f"cannot read statistics ({exc})", file=path, layer=name) from None


def read_proxy_tokens(f):
    """Return ``proxy/tokens`` of an open ``acts.h5`` as float32, or ``None``."""
    if "proxy" in f and isinstance(f["proxy"].get("tokens"), h5py.Dataset):
        try:
            return np.asarray(f["proxy"]["tokens"][()], dtype=np.float32)
        except Exception as exc:
            raise MrcError(f"cannot read proxy/tokens ({exc})", file=f.filename) from None
    return None


# ----------------------------------------------------------------- compressed layout
def compressed_metadata(report, input_metadata=None):
    """Header metadata of a compressed file: the input's own metadata (e.g.
    ``num_heads``), then ``format``, ``version``, and JSON strings ``config``
    (the full configuration) and ``ranks`` (``{layer: rank or null}``) and
    ``residual_ranks``."""
    meta = dict(input_metadata or {})
    meta.update({
        "format": COMPRESSED_FORMAT,
        "version": COMPRESSED_VERSION,
        "config": json.dumps(report["config"], sort_keys=True),
        "ranks": json.dumps({e["name"]: e["rank"] for e in report["layers"]}),
        "residual_ranks": json.dumps({e["name"]: e["residual_rank"] for e in report["layers"]}),
    })
    return meta


def factored_layers(tensors):
    """Names of the layers stored as ``<name>.lowrank_a`` / ``<name>.lowrank_b``."""
    return [k[: -len(".lowrank_a")] for k in tensors if k.endswith(".lowrank_a")]


def densify(tensors, dtype=None):
    """Rebuild dense weights: ``<name>.weight = A B + P Q`` for every factored layer.

    The product is formed in float64 and cast to ``dtype`` (default: the
    stored dtype of ``lowrank_a``). Other tensors are passed through unchanged.

    Parameters
    ----------
    tensors : dict of str -> ndarray
        A compressed model (host arrays).

    Returns
    -------
    dict of str -> ndarray
        The dense model in the input layout.
    """
    out = {}
    factored = set(factored_layers(tensors))
    parts = {f"{n}.{s}": n for n in factored for s in FACTOR_SUFFIXES}
    for key, value in tensors.items():
        if key not in parts:
            out[key] = value
            continue
        name = parts[key]
        if key != name + ".lowrank_a":
            continue
        factors = {k: tensors[k].astype(np.float64) for k in (f"{name}.{s}" for s in FACTOR_SUFFIXES) if k in tensors}
        out[name + ".weight"] = dense_weight(factors, name, np).astype(dtype or value.dtype)
    return out


def read_compressed(path):
    """Read a compressed file; check ``format``/``version``.

    Returns
    -------
    tensors : dict of str -> ndarray
    metadata : dict
        With ``config``, ``ranks`` and ``residual_ranks`` parsed from JSON.
    """
    tensors, meta = read_safetensors(path)
    if meta.get("format") != COMPRESSED_FORMAT:
        raise MrcError(f"format is {meta.get('format')!r}, expected {COMPRESSED_FORMAT!r}", file=path)
    if meta.get("version") != COMPRESSED_VERSION:
        raise MrcError(f"unsupported version {meta.get('version')!r}, expected {COMPRESSED_VERSION!r}", file=path)
    try:
        for key in ("config", "ranks", "residual_ranks"):
            meta[key] = json.loads(meta[key])
    except (KeyError, ValueError) as exc:
        raise MrcError(f"bad metadata ({exc})", file=path) from None
    return tensors, meta


def write_json(path, obj, inputs=()):
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with atomic_path(path, inputs) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
