"""Safetensors files: the validating reader and the atomic writer (docs/formats.md,
"Weights: any safetensors file")."""

import json
import os
import struct

import numpy as np

from ..errors import MrcError, describe
from .paths import atomic_path, check_input

__all__ = ["SAFETENSORS_DTYPES", "WIDENED_DTYPES", "MAX_HEADER_BYTES", "bf16_to_float32", "read_safetensors",
           "safetensors_bytes", "write_safetensors"]

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


def _safetensors_layout(header, data_bytes):
    """Check a parsed safetensors header against the size of the data section.

    Returns ``(metadata, entries)`` with ``entries`` a list of
    ``(name, code, shape, start, end)`` sorted by ``start``. Raises
    ``ValueError`` with the reason.
    """
    if not isinstance(header, dict):
        raise ValueError(f"header is not a JSON object (got {describe(header)})")
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
            raise ValueError(f"tensor {name!r}: entry is not an object (got {describe(info)})")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in SAFETENSORS_DTYPES and code not in WIDENED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {describe(code)}, which is not supported "
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
    path = check_input(path)
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


def safetensors_bytes(tensors, metadata=None):
    """The bytes of a safetensors file of ``tensors`` (host arrays) with
    string ``metadata`` (keys sorted, so the same inputs give the same bytes)."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}  # keeps 0-d
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    return _sorted_metadata(save(tensors, metadata=meta))


def write_safetensors(path, tensors, metadata=None, inputs=()):
    """Write ``tensors`` (host arrays) with string ``metadata`` atomically."""
    blob = safetensors_bytes(tensors, metadata)
    with atomic_path(path, inputs) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
