"""Compressed models, versions 1 and 2 (int8): the header metadata and the
validating reader (docs/formats.md, "Compressed model")."""

import json

import numpy as np

from .. import layout, pipeline, quantize
from ..errors import ConfigError, MrcError, UnsupportedVersion, describe
from .tensors import read_safetensors

__all__ = ["COMPRESSED_FORMAT", "COMPRESSED_VERSION", "COMPRESSED_INT8_VERSION", "COMPRESSED_VERSIONS",
           "compressed_metadata", "check_compressed", "read_compressed", "read_model", "read_original", "densify"]

COMPRESSED_FORMAT = "mrc_ref.compressed"
COMPRESSED_VERSION = "1"
#: Version of a compressed file holding int8 tensors (``compress --quantize int8``):
#: version 1 plus int8 matrices with per-row scales, which a version-1 reader would misread.
COMPRESSED_INT8_VERSION = "2"
COMPRESSED_VERSIONS = (COMPRESSED_VERSION, COMPRESSED_INT8_VERSION)


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


def densify(tensors, dtype=None):
    """:func:`mrc_ref.layout.densify` of a model as read from a file: int8
    tensors with a ``.scale`` (:mod:`mrc_ref.quantize`) are dequantized first,
    ``q · s`` exactly in float64, and their scales dropped; what they give is
    cast to ``dtype``, by default the scale's (float32). Every other tensor
    keeps its stored dtype unless ``dtype`` is given for the products.

    Parameters
    ----------
    tensors : dict of str -> ndarray
        A dense or compressed model (host arrays), float or int8.
    dtype : dtype, optional

    Returns
    -------
    dict of str -> ndarray
        The dense model in the input layout.
    """
    int8 = {k: tensors[k + quantize.SCALE_SUFFIX].dtype for k in quantize.quantized_keys(tensors)}
    if not int8:
        return layout.densify(tensors, dtype)
    dense = layout.densify(quantize.dequantize_tensors(tensors, np, np.float64), dtype or np.float64)
    if dtype is not None:
        return {k: v.astype(dtype) if k in int8 else v for k, v in dense.items()}
    # the default dtype of a product is its lowrank_a's as stored (the scale's when int8)
    targets = dict(int8)
    targets.update({f"{n}.weight": int8.get(f"{n}.lowrank_a", tensors[f"{n}.lowrank_a"].dtype)
                    for n in layout.factored_layers(tensors)})
    return {k: v.astype(targets[k]) if k in targets else v for k, v in dense.items()}


def _parse(meta, key, kind, path):
    """The JSON string ``meta[key]`` parsed, checked to be a ``kind``."""
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise MrcError(f"metadata has no {key!r}", file=path) from None
    except (TypeError, ValueError) as exc:
        raise MrcError(f"metadata {key!r} is not valid JSON ({exc})", file=path) from None
    if not isinstance(value, kind):
        raise MrcError(f"metadata {key!r} is not a JSON {kind.__name__} (got {describe(value)})", file=path)
    return value


def _check_ranks(tensors, meta, path):
    """``ranks`` maps layers to a non-negative integer or null, and
    ``residual_ranks`` to a non-negative integer; each factored layer's
    entries equal the column counts of its ``lowrank_a`` and ``residual_p``
    (docs/formats.md), so that what the file says is what it holds."""
    for key, allow_null in (("ranks", True), ("residual_ranks", False)):
        for name, value in meta[key].items():
            if value is None and allow_null:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MrcError(f"metadata {key!r} entry must be a non-negative integer"
                               f"{' or null' if allow_null else ''}, got {describe(value)}", file=path, layer=name)
    for name in layout.factored_layers(tensors):
        if layout.factor_key(name, "lowrank_a") not in tensors:
            continue  # an incomplete pair: refused by the layer's reader (mrc_ref.layout.layer_form)
        held = {"ranks": int(tensors[layout.factor_key(name, "lowrank_a")].shape[-1]),
                "residual_ranks": int(tensors[layout.factor_key(name, "residual_p")].shape[-1])
                if layout.factor_key(name, "residual_p") in tensors else 0}
        for key, count in held.items():
            if name in meta[key] and meta[key][name] != count:
                raise MrcError(f"metadata {key!r} says {describe(meta[key][name])}, but the stored factors have "
                               f"{count} columns", file=path, layer=name)


def _check_format(meta, path):
    """Refuse a ``format`` label in mrc_ref's namespace that is not exactly
    one this release reads (``mrc_ref.compressed2``, ``MRC_REF.compressed``,
    ``mrc_ref.activations`` on a model...): an unknown format is an error, not
    a plain model. Other labels (``pt``, a framework's own) are not ours."""
    fmt = meta.get("format")
    if isinstance(fmt, str) and fmt != COMPRESSED_FORMAT and fmt.strip().lower().startswith("mrc_ref"):
        raise UnsupportedVersion(f"unknown format {describe(fmt)}; this release reads {COMPRESSED_FORMAT!r} "
                                 f"versions {', '.join(COMPRESSED_VERSIONS)}", file=path)


def check_compressed(tensors, meta, path=None):
    """Check a compressed file's metadata and int8 tensors; return the
    metadata with ``config``, ``ranks``, ``residual_ranks`` (and, in version
    2, ``quantization``) parsed from JSON.

    The version must be one this release reads (``"1"``, ``"2"``); version 1
    holds no int8 tensor; version 2's ``quantization`` names its scheme and
    exactly the int8 tensors of the file; every int8 tensor has a valid scale
    (:func:`mrc_ref.quantize.check_quantized`); the stored configuration is
    checked like options given on a command line
    (:func:`mrc_ref.pipeline.config_from_json`); ``ranks`` and
    ``residual_ranks`` hold non-negative integers (``ranks`` also null),
    equal to the stored factors' column counts."""
    meta = dict(meta)
    if meta.get("format") != COMPRESSED_FORMAT:
        raise MrcError(f"format is {describe(meta.get('format'))}, expected {COMPRESSED_FORMAT!r}", file=path)
    if meta.get("version") not in COMPRESSED_VERSIONS:
        raise UnsupportedVersion(f"unsupported version {describe(meta.get('version'))}, expected one of "
                                 f"{', '.join(repr(v) for v in COMPRESSED_VERSIONS)}", file=path)
    int8 = meta["version"] == COMPRESSED_INT8_VERSION
    meta["config"] = _parse(meta, "config", dict, path)
    meta["ranks"] = _parse(meta, "ranks", dict, path)
    meta["residual_ranks"] = _parse(meta, "residual_ranks", dict, path)
    _check_ranks(tensors, meta, path)
    try:
        pipeline.config_from_json(meta["config"])
        quantize.check_quantized(tensors)
    except MrcError as err:
        raise MrcError(f"stored {err.message}" if isinstance(err, ConfigError) else err.message, file=path,
                       layer=err.layer) from None
    stored = sorted(quantize.quantized_keys(tensors))
    if not int8:
        if stored:
            raise MrcError(f"version {COMPRESSED_VERSION} holds int8 tensors with scales; int8 files are version "
                           f"{COMPRESSED_INT8_VERSION}", file=path)
        return meta
    q = meta["quantization"] = _parse(meta, "quantization", dict, path)
    if q.get("scheme") != quantize.SCHEME:
        raise MrcError(f"quantization scheme {describe(q.get('scheme'))} is unknown; expected "
                       f"{quantize.SCHEME!r}", file=path)
    listed = q.get("tensors")
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise MrcError(f"quantization tensors must be a list of names, got {describe(listed)}", file=path)
    if sorted(listed) != stored:
        missing = sorted(set(listed) - set(stored)) or sorted(set(stored) - set(listed))
        raise MrcError(f"quantization lists {len(listed)} int8 tensors, the file holds {len(stored)} with scales "
                       f"(first difference: {missing[0]})", file=path)
    return meta


def read_compressed(path):
    """Read a compressed file (:func:`check_compressed`).

    Returns
    -------
    tensors : dict of str -> ndarray
    metadata : dict
        With ``config``, ``ranks`` and ``residual_ranks`` parsed from JSON (and
        ``quantization`` in version 2).
    """
    tensors, meta = read_safetensors(path)
    return tensors, check_compressed(tensors, meta, path)


def read_model(path):
    """Read any model file mrc_ref runs: the one reader of model files.

    A file whose metadata says ``format: mrc_ref.compressed`` is checked as
    one (:func:`check_compressed`: a version this release does not know is
    refused, its metadata parsed); a ``format`` in mrc_ref's namespace that
    is not exactly that is refused; any other safetensors file is read as
    stored, its int8 tensors, if any, checked (:func:`mrc_ref.quantize.check_quantized`).

    Returns
    -------
    tensors : dict of str -> ndarray
    metadata : dict
    """
    tensors, meta = read_safetensors(path)
    matrices = tuple(f".{s}" for s in quantize.MATRIX_SUFFIXES)
    for key, value in tensors.items():
        if key.endswith(matrices) and not (np.issubdtype(value.dtype, np.floating)
                                           or np.dtype(value.dtype) == np.int8):
            layer, _, what = key.rpartition(".")
            raise MrcError(f"{what} has dtype {value.dtype}: a layer's matrices are floating point (or int8 with "
                           "a scale)", file=path, layer=layer)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            layer, _, what = key.rpartition(".")
            raise MrcError(f"{what or key} contains NaN or Inf", file=path, layer=layer or None)
    _check_format(meta, path)
    if meta.get("format") == COMPRESSED_FORMAT:
        return tensors, check_compressed(tensors, meta, path)
    try:
        quantize.check_quantized(tensors)
    except MrcError as err:
        raise err.at(file=path) from None
    return tensors, meta


def read_original(path):
    """Read an original (dense) model, the input of ``compress``, ``verify``
    and the report: :func:`read_model`, refusing a compressed or int8 file
    with a message that says so (rather than finding no layer to compress)."""
    tensors, meta = read_model(path)
    if meta.get("format") == COMPRESSED_FORMAT or quantize.quantized_keys(tensors) or layout.factored_layers(tensors):
        kind = (f"a compressed model ({COMPRESSED_FORMAT} version {meta['version']})"
                if meta.get("format") == COMPRESSED_FORMAT else "a model with factored or int8 layers")
        raise MrcError(f"is {kind}; give the original dense weights", file=path)
    return tensors, meta
