"""JSON documents: strict JSON text, the atomic writer, and the sensitivity
file ``mrc_ref.sensitivity`` version 1 (docs/formats.md)."""

import json
import os

from ..errors import MrcError, UnsupportedVersion, describe
from ..sensitivity import check_weight, check_weights
from .paths import atomic_path, check_input
from .tensors import MAX_HEADER_BYTES

__all__ = ["json_text", "write_json", "read_json", "SENSITIVITY_FORMAT", "SENSITIVITY_VERSION",
           "read_sensitivity", "write_sensitivity"]


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
    if not isinstance(doc, dict):
        raise MrcError(f"is not a JSON object (got {describe(doc)})", file=path)
    fmt, version, metric, layers = (doc.get(k) for k in ("format", "version", "metric", "layers"))
    if fmt != SENSITIVITY_FORMAT:
        raise MrcError(f"format is {describe(fmt)}, expected {SENSITIVITY_FORMAT!r}", file=path)
    if isinstance(version, bool) or not isinstance(version, int) or version != SENSITIVITY_VERSION:
        raise UnsupportedVersion(f"unsupported version {describe(version)}, expected {SENSITIVITY_VERSION}", file=path)
    if not isinstance(metric, str):
        raise MrcError(f"metric must be a string naming the end-to-end error, got {describe(metric)}", file=path)
    if not isinstance(layers, dict) or not layers:
        raise MrcError(f"layers must be a non-empty object {{name: {{weight, points}}}}, got {describe(layers)}",
                       file=path)
    out = {}
    for name, entry in layers.items():
        if not name:
            raise MrcError("a layer name is empty", file=path)
        if not isinstance(entry, dict):
            raise MrcError(f"entry is not an object (got {describe(entry)})", file=path, layer=name)
        if "weight" not in entry:
            raise MrcError("has no weight", file=path, layer=name)
        problem = check_weight(entry["weight"])
        if problem:
            raise MrcError(problem, file=path, layer=name)
        points = entry.get("points", [])
        if not isinstance(points, list):
            raise MrcError(f"points must be a list of [nmse, error] pairs, got {describe(points)}",
                           file=path, layer=name)
        for i, point in enumerate(points):
            if (not isinstance(point, list) or len(point) != 2
                    or any(check_weight(v) for v in point)):  # each a finite number ≥ 0
                raise MrcError(f"point {i} must be a pair [nmse, error] of finite numbers ≥ 0, "
                               f"got {describe(point)}", file=path, layer=name)
        out[name] = {"weight": float(entry["weight"]), "points": [(float(x), float(y)) for x, y in points]}
    try:
        check_weights({name: entry["weight"] for name, entry in out.items()})
    except MrcError as err:
        raise err.at(file=path) from None
    return {"metric": metric, "layers": out}


def read_json(path, what="JSON file"):
    """Parse a JSON file strictly: at most :data:`MAX_HEADER_BYTES` bytes,
    UTF-8, no repeated key in an object; ``NaN``/``Infinity`` are parsed as
    floats (the caller's checks refuse them). Raises :class:`MrcError`
    naming the file."""
    path = check_input(path)
    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    if len(blob) > MAX_HEADER_BYTES:
        raise MrcError(f"larger than {MAX_HEADER_BYTES} bytes: not a {what}", file=path)
    try:
        return json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MrcError(f"not a valid JSON file ({exc})", file=path) from None


def read_sensitivity(path):
    """Read and check a sensitivity file (``mrc_ref.sensitivity``, version 1;
    docs/formats.md). Unknown keys are ignored.

    Returns
    -------
    dict
        ``metric`` (str) and ``layers``: ``{name: {"weight": float, "points":
        [(nmse, error), …]}}`` (points ``[]`` when the file gives none).
    """
    return _check_sensitivity(read_json(path, "sensitivity file"), os.fspath(path))


def write_sensitivity(path, metric, layers, attrs=None, inputs=()):
    """Write a sensitivity file atomically, checked as :func:`read_sensitivity`
    checks it. ``layers``: ``{name: {"weight": w, "points": [[nmse, error], …], …}}``
    (extra per-layer keys are kept); ``attrs``: extra root keys (provenance)."""
    doc = {"format": SENSITIVITY_FORMAT, "version": SENSITIVITY_VERSION, "metric": metric, **(attrs or {}),
           "layers": layers}
    _check_sensitivity(doc, path)
    write_json(path, doc, inputs)
