"""Versioned reference cases, shipped as package data (docs/testing.md).

Each case is a directory ``mrc_ref/cases/<version>/<id>/`` holding

``weights.safetensors``  the model (any safetensors file, docs/formats.md)
``acts.h5``              its statistics (``acts.h5`` version 1)
``config.json``          the options (the fields of ``mrc_ref.pipeline.Config``)
``expected.json``        the expected values, gauge-invariant only
``expected.safetensors`` the arrays ``expected.json`` refers to as ``{"$array": key}``
``MANIFEST.json``        SHA-256 of every other file, schema version, the
                         versions that generated it, and a tolerance (with its
                         reason) for every quantity of ``expected.json``

Released versions are immutable: a change of any expected value is a new
version directory and a line in CHANGELOG.md. This module finds and reads
cases; :mod:`mrc_ref.cases.reference` computes expected values;
:mod:`mrc_ref.cases.generate` writes cases (``python -m mrc_ref.cases``).
"""

import hashlib
import math
import os
import re

import numpy as np

from .. import formats, pipeline, stats
from ..formats import read_json
from ..errors import MrcError, UnsupportedVersion
from ..pipeline import config_from_json

__all__ = ["ROOT", "SCHEMA_VERSION", "SCHEMA_VERSIONS", "CASE_FILES", "MANIFEST", "versions", "resolve_version",
           "case_ids", "case_dir", "case_bytes", "sha256", "read_manifest", "check_files", "config_from_json", "resolve",
           "read_inputs", "Probes", "normalize", "read_case"]

ROOT = os.path.dirname(os.path.abspath(__file__))
#: Version of the case layout (files, manifest and ``expected.json`` schema)
#: that :mod:`mrc_ref.cases.generate` writes. Schema 2 (case version v2 on)
#: names the eigen-gap at a probe rank ``eigen_gap``; schema 1 (v1) called it
#: ``relative_gap``.
SCHEMA_VERSION = 2
#: The schemas this release reads.
SCHEMA_VERSIONS = (1, 2)
#: Tolerance kinds and metrics a manifest may state (docs/testing.md, "Tolerances").
TOLERANCE_KINDS = ("exact", "scalar", "array", "product")
METRICS = ("C", "identity")
#: The files of a case, every one hashed in its manifest.
CASE_FILES = ("weights.safetensors", "acts.h5", "config.json", "expected.json", "expected.safetensors")
MANIFEST = "MANIFEST.json"
_VERSION = re.compile(r"^v(\d+)$")


def versions(root=ROOT):
    """Version directories (``"v1"``, ``"v2"``, …) present under ``root``, oldest first."""
    found = [d for d in os.listdir(root) if _VERSION.match(d) and os.path.isdir(os.path.join(root, d))]
    return sorted(found, key=lambda d: int(_VERSION.match(d).group(1)))


def resolve_version(version=None, root=ROOT):
    """``"v1"`` from ``"v1"``, ``1`` or ``None`` (the latest version)."""
    if version is None:
        found = versions(root)
        if not found:
            raise MrcError("no reference cases installed", file=root)
        return found[-1]
    version = f"v{version}" if isinstance(version, int) or str(version).isdigit() else str(version)
    if version not in versions(root):
        raise MrcError(f"unknown case version {version!r}; installed: {', '.join(versions(root)) or 'none'}")
    return version


def case_ids(version=None, root=ROOT):
    """Ids of the cases of ``version``, sorted."""
    base = os.path.join(root, resolve_version(version, root))
    return sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, MANIFEST)))


def case_dir(case_id, version=None, root=ROOT):
    """Directory of a case given as ``"id"``, ``"v1/id"`` or a directory path."""
    case_id = os.fspath(case_id)
    if os.path.lexists(os.path.join(case_id, MANIFEST)):  # a directory (its manifest checked when read)
        return os.path.abspath(case_id)
    if os.path.isdir(case_id) and not re.fullmatch(r"(v\d+/)?[^/]+", case_id):
        raise MrcError(f"no {MANIFEST}: not a case directory", file=case_id)
    if "/" in case_id and version is None:
        version, case_id = case_id.split("/", 1)
    version = resolve_version(version, root)
    path = os.path.join(root, version, case_id)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise MrcError(f"unknown case {case_id!r} in {version}; cases: {', '.join(case_ids(version, root))}")
    return path


def case_bytes(directory):
    """Total size in bytes of the files of a case directory."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def sha256(path):
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_kind(value):
    """The JSON name of a parsed value's type (``array``, ``null``, …)."""
    for kind, types in (("null", type(None)), ("boolean", bool), ("number", (int, float)), ("string", str),
                        ("array", list), ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _short(value):
    """``repr(value)``, cut to 60 characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _manifest_problem(manifest):
    """The first structural problem of a parsed manifest, or ``None``."""
    def text(v):
        return isinstance(v, str)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    if not isinstance(manifest, dict):
        return f"not a case manifest: a JSON {_json_kind(manifest)}, expected an object"
    schema = manifest.get("schema_version")
    if type(schema) is not int or schema not in SCHEMA_VERSIONS:
        return UnsupportedVersion(f"schema_version {_short(schema)}: this release reads "
                                  f"{', '.join(map(str, SCHEMA_VERSIONS))} (a newer mrc_ref may read it)")
    for key in ("id", "version", "description", "difficulty"):
        if not text(manifest.get(key)):
            return f"{key}: expected a string, got {_short(manifest.get(key))}"
    if not _VERSION.match(manifest["version"]):
        return f"version: expected 'v<number>', got {_short(manifest['version'])}"
    for key in ("tags", "notes"):
        value = manifest.get(key, [] if key == "notes" else None)
        if not isinstance(value, list) or not all(text(v) for v in value):
            return f"{key}: expected a list of strings, got {_short(value)}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"files: expected an object of file name -> {{sha256, bytes}}, got {_json_kind(files)}"
    for name, info in files.items():
        if not isinstance(info, dict):
            return f"files.{name}: expected an object with sha256 and bytes, got {_short(info)}"
        size, digest = info.get("bytes"), info.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"files.{name}.bytes: expected a non-negative integer, got {_short(size)}"
        if not text(digest) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return f"files.{name}.sha256: expected 64 lowercase hex digits, got {_short(digest)}"
        if os.path.basename(name) != name or name in (MANIFEST, ".", ".."):
            return f"files: {_short(name)} is not a file name of the case directory"
    tolerances = manifest.get("tolerances")
    if not isinstance(tolerances, dict):
        return f"tolerances: expected an object of quantity -> tolerance, got {_json_kind(tolerances)}"
    for quantity, tol in tolerances.items():
        if not isinstance(tol, dict):
            return f"tolerances.{quantity}: expected an object, got {_short(tol)}"
        if tol.get("kind") not in TOLERANCE_KINDS:
            return (f"tolerances.{quantity}.kind: expected one of {', '.join(TOLERANCE_KINDS)}, "
                    f"got {_short(tol.get('kind'))}")
        for key in ("rtol", "atol"):
            if key in tol and not number(tol[key]):
                return f"tolerances.{quantity}.{key}: expected a finite number ≥ 0, got {_short(tol[key])}"
        if tol["kind"] == "product" and tol.get("metric", "identity") not in METRICS:
            return (f"tolerances.{quantity}.metric: expected one of {', '.join(METRICS)}, "
                    f"got {_short(tol.get('metric'))}")
        if not text(tol.get("reason")):
            return f"tolerances.{quantity}.reason: expected a string, got {_short(tol.get('reason'))}"
    return None


def read_manifest(directory):
    """The parsed ``MANIFEST.json`` of a case directory, after checking its
    structure (types of every field this module reads).

    Raises
    ------
    MrcError
        Naming the manifest file: not a JSON object, a schema this release
        does not read, or a field of the wrong type (a ``files`` entry
        without ``bytes`` or ``sha256``, a tolerance of an unknown kind, …).
    """
    path = os.path.join(directory, MANIFEST)
    manifest = read_json(path, "case manifest")
    problem = _manifest_problem(manifest)
    if isinstance(problem, MrcError):
        raise problem.at(file=path)
    if problem:
        raise MrcError(problem, file=path)
    return manifest


def check_files(directory, manifest=None):
    """Problems with a case's files: one listed in the manifest that is
    missing or whose SHA-256 or size differs, a case file the manifest does
    not list, or any file in the directory that is not a case file. Empty
    when the case is intact."""
    manifest = manifest or read_manifest(directory)
    listed = manifest.get("files", {})
    problems = []
    for name in CASE_FILES:
        if name not in listed:
            problems.append(f"{name}: not in the manifest")
    for name, info in listed.items():
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            problems.append(f"{name}: missing")
            continue
        try:
            formats.check_input(path)  # a FIFO, a directory, a link loop: named as such, never opened
        except MrcError as err:
            problems.append(f"{name}: {err.message}")
            continue
        if os.path.getsize(path) != info["bytes"] or sha256(path) != info["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the manifest (the file was changed)")
    extra = sorted(set(os.listdir(directory)) - set(listed) - {MANIFEST})
    problems += [f"{name}: not a file of the case" for name in extra]
    return problems


def resolve(doc, arrays):
    """``doc`` with every ``{"$array": key}`` replaced by ``arrays[key]`` and
    every product ``{"left": …, "right": …}`` by the tuple ``(left, right)``."""
    if isinstance(doc, dict):
        if set(doc) == {"$array"}:
            return arrays[doc["$array"]]
        out = {k: resolve(v, arrays) for k, v in doc.items()}
        if set(out) == {"left", "right"}:
            return out["left"], out["right"]
        return out
    if isinstance(doc, list):
        return [resolve(v, arrays) for v in doc]
    return doc


def read_inputs(directory):
    """The inputs of a case: ``(tensors, metadata, raw_stats, tokens, config)``,
    ``raw_stats`` for every layer the configuration selects, as stored.
    Every error names the file it concerns."""
    path = os.path.join(directory, "config.json")
    try:
        config = config_from_json(read_json(path))
    except MrcError as err:
        raise err.at(file=path) from None
    weights = os.path.join(directory, "weights.safetensors")
    tensors, metadata = formats.read_safetensors(weights)
    try:
        names = pipeline.select_layers(tensors, config.layers)
    except MrcError as err:
        raise err.at(file=path) from None
    acts = os.path.join(directory, "acts.h5")
    with formats.open_activations(acts) as f:
        raw = {name: formats.read_layer_stats(f, name, acts, n=int(tensors[name + ".weight"].shape[1]))
               for name in names}
        tokens = formats.read_proxy_tokens(f, path=acts)
    return tensors, metadata, raw, tokens, config


class Probes(dict):
    """The Stage-1 probes of a layer, keyed by rank as an ``int``
    (``stage1[5]``). A rank written as a string (``stage1["5"]``, the key of
    the JSON file) is looked up as the ``int``, for code written against
    earlier releases."""

    def __missing__(self, key):
        if isinstance(key, str) and key.isdigit():
            return self[int(key)]
        raise KeyError(key)

    def __contains__(self, key):
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        return dict.__contains__(self, key)


def normalize(doc, path=None):
    """An ``expected.json`` document (parsed, schema 1 or 2) in the form the
    Python API gives: the Stage-1 probes of every layer keyed by ``int`` rank
    (:class:`Probes`; JSON keys are strings), the eigen-gap at each probe as
    ``eigen_gap`` (schema 1 wrote ``relative_gap``, kept beside it). Returns
    a new document; ``doc`` is not modified.

    Raises
    ------
    MrcError
        Naming ``path``: a document without the layers and allocation
        sections, or a probe rank that is not a non-negative integer.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), dict) \
            or not isinstance(doc.get("allocation"), dict):
        raise MrcError("not an expected-values document: no 'layers' or 'allocation' object", file=path)
    layers = {}
    for name, layer in doc["layers"].items():
        if not isinstance(layer, dict) or not isinstance(layer.get("stage1", {}), dict):
            raise MrcError(f"layers.{name}: expected an object with a 'stage1' object", file=path)
        probes = Probes()
        for rank, item in layer.get("stage1", {}).items():
            key = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
            if key is None and isinstance(rank, str) and rank.isdigit():
                key = int(rank)
            if key is None or key < 0 or not isinstance(item, dict):
                raise MrcError(f"layers.{name}.stage1.{rank}: expected a probe rank (a non-negative integer) "
                               "with an object", file=path)
            item = dict(item)
            if "eigen_gap" not in item and "relative_gap" in item:
                item["eigen_gap"] = item["relative_gap"]
            probes[key] = item
        layers[name] = dict(layer, stage1=probes)
    return dict(doc, layers=layers)


def read_case(directory):
    """A case, loaded after :func:`check_files` (see :func:`mrc_ref.testing.load_case`)."""
    directory = os.path.abspath(os.fspath(directory))
    manifest = read_manifest(directory)
    problems = check_files(directory, manifest)
    if problems:
        raise MrcError("; ".join(problems), file=directory)
    tensors, metadata, raw, tokens, config = read_inputs(directory)
    arrays, _ = formats.read_safetensors(os.path.join(directory, "expected.safetensors"))
    path = os.path.join(directory, "expected.json")
    try:
        expected = normalize(resolve(read_json(path), arrays), path)
    except KeyError as exc:
        raise MrcError(f"refers to array {exc} that expected.safetensors does not hold", file=path) from None
    layers = {}
    for name, exp in expected["layers"].items():
        if name not in raw:
            raise MrcError(f"expects values for layer {name!r}, which config.json does not select", file=path)
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        n = W.shape[1]
        C = stats.metric(config.statistic, stats.validate(raw[name], n, np, statistic=config.statistic), n, np)
        layers[name] = {"W": W, "C": C, "shape": W.shape, "stats": raw[name], "expected": exp}
    alloc = expected["allocation"]
    try:
        budget, fixed, q = alloc["budget"], alloc["fixed"], alloc["residual_rank"]
    except KeyError as exc:
        raise MrcError(f"allocation has no {exc}", file=path) from None
    return {
        "id": manifest["id"], "version": manifest["version"], "path": directory,
        "description": manifest["description"], "tags": list(manifest["tags"]),
        "difficulty": manifest["difficulty"], "notes": list(manifest.get("notes", [])),
        "manifest": manifest, "tolerances": manifest["tolerances"],
        "config": config.to_json(), "expected": expected, "tensors": tensors, "metadata": metadata,
        "layers": layers, "budget": budget, "fixed": fixed,
        "residual_rank": q, "damp": config.damping, "tokens": tokens,
    }
