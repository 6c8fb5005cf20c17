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
from .quantize import SCALE_SUFFIX, dequantize_tensors, quantized_keys
from .stats import check_declared
from .vit import dense_weight

ACTS_FORMAT = "mrc_ref.activations"
ACTS_VERSION = 1
COMPRESSED_FORMAT = "mrc_ref.compressed"
COMPRESSED_VERSION = "1"
#: Version of a compressed file holding int8 tensors (``compress --quantize int8``):
#: version 1 plus int8 matrices with per-row scales, which a version-1 reader would misread.
COMPRESSED_INT8_VERSION = "2"
COMPRESSED_VERSIONS = (COMPRESSED_VERSION, COMPRESSED_INT8_VERSION)
FACTOR_SUFFIXES = ("lowrank_a", "lowrank_b", "residual_p", "residual_q")


# ----------------------------------------------------------------- atomic output
def _resolved(path):
    """``path`` with every symbolic link resolved, also for a file that does
    not exist yet (its existing parent directories are resolved)."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _same_file(a, b):
    """Whether ``a`` and ``b`` name the same file: same resolved path (through
    links and ``..``, existing or not), or the same inode (hard links)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path, inputs=(), outputs=()):
    """Raise :class:`MrcError` unless ``path`` can be written: its directory
    exists, it is not a directory, it is none of ``inputs`` and none of the
    other ``outputs`` of the same run. Two paths are the same file when they
    resolve to the same path (any spelling, symbolic links in the file or in
    its directories, files that do not exist yet) or share an inode (hard
    links). Called before any work, and again when writing."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise MrcError("output directory does not exist", file=path)
    if os.path.isdir(path):
        raise MrcError("output is a directory", file=path)
    for src in inputs:
        if src is not None and _same_file(path, src):
            raise MrcError(f"output would overwrite an input file ({os.fspath(src)})", file=path)
    for other in outputs:
        if other is not None and _same_file(path, other):
            raise MrcError(f"output would overwrite another output of the same run ({os.fspath(other)})", file=path)


def check_outputs(outputs, inputs=()):
    """:func:`check_output` on every path of ``outputs`` (``None`` entries
    skipped) against the ``inputs`` and against each other."""
    outputs = [o for o in outputs if o is not None]
    for i, path in enumerate(outputs):
        check_output(path, inputs, outputs[:i])


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
#: safetensors dtype -> little-endian NumPy dtype, read and written as is.
SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?",
}
#: Read by widening to float32 (exact): NumPy has no bfloat16.
WIDENED_DTYPES = {"BF16": "<u2"}
#: The largest header accepted (the safetensors package's own limit).
MAX_HEADER_BYTES = 100_000_000


def bf16_to_float32(bits):
    """Widen bfloat16 values, given as their ``uint16`` bit patterns, to
    float32: a bfloat16 is the upper half of a float32, so the widening is
    exact (``bits << 16`` viewed as float32; NaN, ±Inf, ±0 and subnormals
    included)."""
    return (np.asarray(bits, dtype=np.uint16).astype("<u4") << 16).view("<f4")


def _describe(value):
    """A short one-line description of a JSON or attribute value for messages."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _safetensors_layout(header, data_bytes):
    """Check a parsed safetensors header against the size of the data section.

    Returns ``(metadata, entries)`` with ``entries`` a list of
    ``(name, code, shape, start, end)`` sorted by ``start``. Raises
    ``ValueError`` with the reason.
    """
    if not isinstance(header, dict):
        raise ValueError(f"header is not a JSON object (got {_describe(header)})")
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not an object of strings")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object (got {_describe(info)})")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in SAFETENSORS_DTYPES and code not in WIDENED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {_describe(code)}, which is not supported "
                             f"(supported: {', '.join([*SAFETENSORS_DTYPES, *WIDENED_DTYPES])})")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: shape is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: data_offsets is not a pair [begin, end] with 0 <= begin <= end")
        itemsize = np.dtype(SAFETENSORS_DTYPES.get(code) or WIDENED_DTYPES[code]).itemsize
        need = int(np.prod(shape, dtype=object)) * itemsize
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                             f"its shape {tuple(shape)} and dtype {code} need {need}")
        entries.append((name, code, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    end = 0
    for name, _, _, start, stop in entries:
        if start != end:
            raise ValueError(f"tensor {name!r}: data begins at byte {start}, expected {end} "
                             "(tensors overlap or leave a gap)")
        end = stop
    if data_bytes > end:
        raise ValueError(f"{data_bytes - end} bytes follow the {end} bytes of tensor data the header declares")
    if data_bytes < end:
        raise ValueError(f"file is truncated: the header declares {end} bytes of tensor data, "
                         f"the file holds {data_bytes}")
    return metadata, entries


def read_safetensors(path):
    """Read every tensor and the ``__metadata__`` of a safetensors file.

    The header is checked against the file's size before any tensor data is
    read (offsets contiguous from 0, each tensor's byte count equal to its
    shape times its dtype, no trailing bytes, not truncated), so a bad file
    is refused without reading its data.

    Returns
    -------
    tensors : dict of str -> numpy.ndarray
        In file order, dtypes as stored; ``BF16`` tensors widened to float32
        (exact, :func:`bf16_to_float32`).
    metadata : dict of str -> str
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                if size < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (hlen,) = struct.unpack("<Q", fh.read(8))
                if hlen > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {hlen} is over the limit of {MAX_HEADER_BYTES} bytes")
                if 8 + hlen > size:
                    raise ValueError("header runs past the end of the file (truncated?)")
                try:
                    header = json.loads(fh.read(hlen).decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ValueError(f"header is not valid JSON: {exc}") from None
                metadata, entries = _safetensors_layout(header, size - 8 - hlen)
            except ValueError as exc:
                raise MrcError(f"not a readable safetensors file ({exc})", file=path) from None
            data = bytearray(size - 8 - hlen)
            if fh.readinto(data) != len(data):
                raise MrcError("not a readable safetensors file (file changed while read)", file=path)
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    tensors = {}
    for name, code, shape, start, stop in entries:
        dtype = np.dtype(SAFETENSORS_DTYPES.get(code) or WIDENED_DTYPES[code])
        array = np.frombuffer(data, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=start)
        if code == "BF16":
            array = bf16_to_float32(array)
        elif not array.flags.aligned:
            array = array.copy()
        tensors[name] = array.reshape(shape)
    return tensors, dict(metadata)


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
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise MrcError("no such file", file=path) from None
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
            raise MrcError(f"format attribute is {_describe(fmt)}, expected {ACTS_FORMAT!r}", file=path)
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) \
                or version != ACTS_VERSION:
            raise MrcError(f"unsupported version {_describe(version)}, expected {ACTS_VERSION}", file=path)
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


# ----------------------------------------------------------------- compressed layout
def compressed_metadata(report, input_metadata=None):
    """Header metadata of a compressed file: the input's own metadata (e.g.
    ``num_heads``), then ``format``, ``version``, and JSON strings ``config``
    (the full configuration) and ``ranks`` (``{layer: rank or null}``) and
    ``residual_ranks``; with ``report["quantization"]`` (``compress --quantize``)
    also ``quantization`` (JSON: ``scheme``, ``tensors``) and version
    :data:`COMPRESSED_INT8_VERSION`."""
    meta = dict(input_metadata or {})
    meta.update({
        "format": COMPRESSED_FORMAT,
        "version": COMPRESSED_VERSION,
        "config": json.dumps(report["config"], sort_keys=True),
        "ranks": json.dumps({e["name"]: e["rank"] for e in report["layers"]}),
        "residual_ranks": json.dumps({e["name"]: e["residual_rank"] for e in report["layers"]}),
    })
    if report.get("quantization"):
        q = report["quantization"]
        meta["version"] = COMPRESSED_INT8_VERSION
        meta["quantization"] = json.dumps({"scheme": q["scheme"], "tensors": q["tensors"]})
    return meta


def factored_layers(tensors):
    """Names of the layers stored as ``<name>.lowrank_a`` / ``<name>.lowrank_b``."""
    return [k[: -len(".lowrank_a")] for k in tensors if k.endswith(".lowrank_a")]


def densify(tensors, dtype=None):
    """Rebuild dense weights: ``<name>.weight = A B + P Q`` for every factored layer.

    The product is formed in float64 and cast to ``dtype`` (default: the
    stored dtype of ``lowrank_a``). Int8 tensors with a ``.scale``
    (:mod:`mrc_ref.quantize`) are dequantized first, ``q · s`` exactly in
    float64, and their scales dropped; the default dtype of what they give
    is the scale's (float32). Other tensors are passed through unchanged.

    Parameters
    ----------
    tensors : dict of str -> ndarray
        A compressed model (host arrays).

    Returns
    -------
    dict of str -> ndarray
        The dense model in the input layout.
    """
    int8 = {k: tensors[k + SCALE_SUFFIX].dtype for k in quantized_keys(tensors)}  # dequantized to the scale's dtype
    tensors = dequantize_tensors(tensors, np, np.float64)  # q · s, exact in float64
    out = {}
    factored = set(factored_layers(tensors))
    parts = {f"{n}.{s}": n for n in factored for s in FACTOR_SUFFIXES}
    for key, value in tensors.items():
        if key not in parts:
            out[key] = value.astype(dtype or int8[key]) if key in int8 else value
            continue
        name = parts[key]
        if key != name + ".lowrank_a":
            continue
        factors = {k: tensors[k].astype(np.float64) for k in (f"{name}.{s}" for s in FACTOR_SUFFIXES) if k in tensors}
        out[name + ".weight"] = dense_weight(factors, name, np).astype(dtype or int8.get(key, value.dtype))
    return out


def read_compressed(path):
    """Read a compressed file; check ``format``/``version``.

    Returns
    -------
    tensors : dict of str -> ndarray
    metadata : dict
        With ``config``, ``ranks`` and ``residual_ranks`` parsed from JSON (and
        ``quantization`` in version 2, which must have it; int8 tensors with
        scales are refused in version 1, whose readers would misread them).
    """
    tensors, meta = read_safetensors(path)
    if meta.get("format") != COMPRESSED_FORMAT:
        raise MrcError(f"format is {meta.get('format')!r}, expected {COMPRESSED_FORMAT!r}", file=path)
    if meta.get("version") not in COMPRESSED_VERSIONS:
        raise MrcError(f"unsupported version {meta.get('version')!r}, expected one of "
                       f"{', '.join(repr(v) for v in COMPRESSED_VERSIONS)}", file=path)
    int8 = meta["version"] == COMPRESSED_INT8_VERSION
    try:
        for key in ("config", "ranks", "residual_ranks", *(("quantization",) if int8 else ())):
            meta[key] = json.loads(meta[key])
    except (KeyError, ValueError) as exc:
        raise MrcError(f"bad metadata ({exc})", file=path) from None
    if not int8 and quantized_keys(tensors):
        raise MrcError(f"version {COMPRESSED_VERSION} holds int8 tensors with scales; int8 files are version "
                       f"{COMPRESSED_INT8_VERSION}", file=path)
    return tensors, meta


def json_text(obj, path=None):
    """``obj`` as indented, strictly valid JSON text: a NaN or an infinity
    (which JSON cannot represent) is an :class:`MrcError`, not a bare ``NaN``."""
    try:
        return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise MrcError(f"cannot write JSON: {exc}", file=path) from None


def write_json(path, obj, inputs=()):
    """Write ``obj`` as indented JSON, atomically (see :func:`json_text`)."""
    text = json_text(obj, path)
    with atomic_path(path, inputs) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


# ----------------------------------------------------------------- sensitivity weights
SENSITIVITY_FORMAT = "mrc_ref.sensitivity"
SENSITIVITY_VERSION = 1


def _unique_keys(pairs):
    """``object_pairs_hook`` refusing an object that repeats a key (which
    ``json`` would otherwise resolve silently to the last value)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"an object has the key {key!r} twice")
        out[key] = value
    return out


def _check_sensitivity(doc, path):
    """Check a parsed sensitivity document (docs/formats.md); return
    ``{"metric": str, "layers": {name: {"weight": float, "points": [(nmse, error), …]}}}``."""
    from .sensitivity import check_weight

    if not isinstance(doc, dict):
        raise MrcError(f"is not a JSON object (got {_describe(doc)})", file=path)
    fmt, version, metric, layers = (doc.get(k) for k in ("format", "version", "metric", "layers"))
    if fmt != SENSITIVITY_FORMAT:
        raise MrcError(f"format is {_describe(fmt)}, expected {SENSITIVITY_FORMAT!r}", file=path)
    if isinstance(version, bool) or not isinstance(version, int) or version != SENSITIVITY_VERSION:
        raise MrcError(f"unsupported version {_describe(version)}, expected {SENSITIVITY_VERSION}", file=path)
    if not isinstance(metric, str):
        raise MrcError(f"metric must be a string naming the end-to-end error, got {_describe(metric)}", file=path)
    if not isinstance(layers, dict) or not layers:
        raise MrcError(f"layers must be a non-empty object {{name: {{weight, points}}}}, got {_describe(layers)}",
                       file=path)
    out = {}
    for name, entry in layers.items():
        if not name:
            raise MrcError("a layer name is empty", file=path)
        if not isinstance(entry, dict):
            raise MrcError(f"entry is not an object (got {_describe(entry)})", file=path, layer=name)
        if "weight" not in entry:
            raise MrcError("has no weight", file=path, layer=name)
        problem = check_weight(entry["weight"])
        if problem:
            raise MrcError(problem, file=path, layer=name)
        points = entry.get("points", [])
        if not isinstance(points, list):
            raise MrcError(f"points must be a list of [nmse, error] pairs, got {_describe(points)}",
                           file=path, layer=name)
        for i, point in enumerate(points):
            if (not isinstance(point, list) or len(point) != 2
                    or any(check_weight(v) for v in point)):  # each a finite number ≥ 0
                raise MrcError(f"point {i} must be a pair [nmse, error] of finite numbers ≥ 0, "
                               f"got {_describe(point)}", file=path, layer=name)
        out[name] = {"weight": float(entry["weight"]), "points": [(float(x), float(y)) for x, y in points]}
    return {"metric": metric, "layers": out}


def read_sensitivity(path):
    """Read and check a sensitivity file (``mrc_ref.sensitivity``, version 1;
    docs/formats.md). Unknown keys are ignored.

    Returns
    -------
    dict
        ``metric`` (str) and ``layers``: ``{name: {"weight": float, "points":
        [(nmse, error), …]}}`` (points ``[]`` when the file gives none).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    if len(blob) > MAX_HEADER_BYTES:
        raise MrcError(f"larger than {MAX_HEADER_BYTES} bytes: not a sensitivity file", file=path)
    try:
        doc = json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_keys)  # NaN/Infinity: refused below
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MrcError(f"not a valid JSON file ({exc})", file=path) from None
    return _check_sensitivity(doc, path)


def write_sensitivity(path, metric, layers, attrs=None, inputs=()):
    """Write a sensitivity file atomically, checked as :func:`read_sensitivity`
    checks it. ``layers``: ``{name: {"weight": w, "points": [[nmse, error], …], …}}``
    (extra per-layer keys are kept); ``attrs``: extra root keys (provenance)."""
    doc = {"format": SENSITIVITY_FORMAT, "version": SENSITIVITY_VERSION, "metric": metric, **(attrs or {}),
           "layers": layers}
    _check_sensitivity(doc, path)
    write_json(path, doc, inputs)


# ----------------------------------------------------------------- scratch space
@contextmanager
def scratch_space(directory=None):
    """Yield ``scratch(shape, dtype) -> array``: zero-filled arrays backed by
    temporary ``.npy`` files (``numpy.lib.format.open_memmap``), all removed
    when the block exits. Memory stays that of the pages in use, whatever the
    size (the sequential Stage 3 keeps its two token streams here)."""
    with tempfile.TemporaryDirectory(prefix="mrc_ref-", dir=directory) as root:
        count = iter(range(1 << 62))

        def scratch(shape, dtype):
            path = os.path.join(root, f"{next(count)}.npy")
            return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

        yield scratch
