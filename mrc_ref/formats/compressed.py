"""Compressed models, versions 1 and 2 (int8): the header metadata and the
validating reader (docs/formats.md, "Compressed model")."""

import json

import numpy as np

from .. import layout, quantize
from ..errors import MrcError, UnsupportedVersion
from .tensors import read_safetensors

__all__ = ["COMPRESSED_FORMAT", "COMPRESSED_VERSION", "COMPRESSED_INT8_VERSION", "COMPRESSED_VERSIONS",
           "compressed_metadata", "read_compressed", "densify"]

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
        raise UnsupportedVersion(f"unsupported version {meta.get('version')!r}, expected one of "
                       f"{', '.join(repr(v) for v in COMPRESSED_VERSIONS)}", file=path)
    int8 = meta["version"] == COMPRESSED_INT8_VERSION
    try:
        for key in ("config", "ranks", "residual_ranks", *(("quantization",) if int8 else ())):
            meta[key] = json.loads(meta[key])
    except (KeyError, ValueError) as exc:
        raise MrcError(f"bad metadata ({exc})", file=path) from None
    if not int8 and quantize.quantized_keys(tensors):
        raise MrcError(f"version {COMPRESSED_VERSION} holds int8 tensors with scales; int8 files are version "
                       f"{COMPRESSED_INT8_VERSION}", file=path)
    return tensors, meta


