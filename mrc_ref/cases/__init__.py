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
import os
import re

import numpy as np

from .. import formats, pipeline, stats
from ..formats import read_json
from ..pipeline import config_from_json
from ..errors import MrcError

__all__ = ["ROOT", "SCHEMA_VERSION", "CASE_FILES", "MANIFEST", "versions", "resolve_version", "case_ids",
           "case_dir", "case_bytes", "sha256", "read_manifest", "check_files", "config_from_json", "resolve",
           "read_inputs", "read_case"]

ROOT = os.path.dirname(os.path.abspath(__file__))
#: Version of the case layout (files, manifest and ``expected.json`` schema).
SCHEMA_VERSION = 1
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
    if os.path.isfile(os.path.join(case_id, MANIFEST)):
        return os.path.abspath(case_id)
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


def read_manifest(directory):
    """The parsed ``MANIFEST.json`` of a case directory."""
    manifest = read_json(os.path.join(directory, MANIFEST))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise MrcError(f"schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}",
                       file=os.path.join(directory, MANIFEST))
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
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif os.path.getsize(path) != info["bytes"] or sha256(path) != info["sha256"]:
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
    ``raw_stats`` for every layer the configuration selects, as stored."""
    config = config_from_json(read_json(os.path.join(directory, "config.json")))
    tensors, metadata = formats.read_safetensors(os.path.join(directory, "weights.safetensors"))
    names = pipeline.select_layers(tensors, config.layers)
    acts = os.path.join(directory, "acts.h5")
    with formats.open_activations(acts) as f:
        raw = {name: formats.read_layer_stats(f, name, acts, n=int(tensors[name + ".weight"].shape[1]))
               for name in names}
        tokens = formats.read_proxy_tokens(f, path=acts)
    return tensors, metadata, raw, tokens, config


def read_case(directory):
    """A case, loaded after :func:`check_files` (see :func:`mrc_ref.testing.load_case`)."""
    directory = os.path.abspath(os.fspath(directory))
    manifest = read_manifest(directory)
    problems = check_files(directory, manifest)
    if problems:
        raise MrcError("; ".join(problems), file=directory)
    tensors, metadata, raw, tokens, config = read_inputs(directory)
    arrays, _ = formats.read_safetensors(os.path.join(directory, "expected.safetensors"))
    expected = resolve(read_json(os.path.join(directory, "expected.json")), arrays)
    layers = {}
    for name, exp in expected["layers"].items():
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        n = W.shape[1]
        C = stats.metric(config.statistic, stats.validate(raw[name], n, np), n, np)
        layers[name] = {"W": W, "C": C, "shape": W.shape, "stats": raw[name], "expected": exp}
    alloc = expected["allocation"]
    return {
        "id": manifest["id"], "version": manifest["version"], "path": directory,
        "description": manifest["description"], "tags": list(manifest["tags"]),
        "difficulty": manifest["difficulty"], "notes": list(manifest.get("notes", [])),
        "manifest": manifest, "tolerances": manifest["tolerances"],
        "config": config.to_json(), "expected": expected, "tensors": tensors, "metadata": metadata,
        "layers": layers, "budget": alloc["budget"], "fixed": alloc["fixed"],
        "residual_rank": alloc["residual_rank"], "damp": config.damping, "tokens": tokens,
    }
