"""Shared fixtures: one small synthetic model for the whole session, fresh
copies of it to edit, an independent safetensors header reader, and a runner
for the ``python -m mrc_ref.compress`` command line.

The session files are never edited: a test that needs a bad input copies them
into its own ``tmp_path`` first (``model_copy``).
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from data_tools import synthetic

#: Benchmarks are scripts (run by hand, they may need torch); --doctest-modules must not import them.
collect_ignore_glob = ["benchmarks/*"]

#: A wall-clock cap for one command-line run (the synthetic model takes < 1 s).
CLI_TIMEOUT = 120


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """``(weights, acts)``: the default synthetic ViT (2 blocks, dim 64, 8
    selected linears) and its statistics, written once per session."""
    return synthetic.write_example(str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture
def model_copy(synthetic_model, tmp_path):
    """Fresh copies ``(weights, acts)`` of the synthetic files in ``tmp_path``."""
    out = []
    for src in synthetic_model:
        dst = tmp_path / os.path.basename(src)
        shutil.copyfile(src, dst)
        out.append(str(dst))
    return tuple(out)


# ------------------------------------------------------------------ independent readers
def _read_header(path):
    """The parsed JSON header of a safetensors file and the offset of its data
    section, read by hand (independent of mrc_ref and of the safetensors
    package)."""
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(hlen))
    return header, 8 + hlen


def _raw_tensors(path):
    """``{name: (dtype string, shape tuple, raw bytes)}`` exactly as stored."""
    header, start = _read_header(path)
    with open(path, "rb") as fh:
        blob = fh.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), blob[start + a : start + b])
    return out


def _stored_params(path):
    """Every tensor's element count as stored, summed."""
    header, _ = _read_header(path)
    return sum(int(np.prod(info["shape"], dtype=np.int64)) for k, info in header.items() if k != "__metadata__")


def _snapshot(directory):
    """``{file name: (sha256, size, mtime_ns)}`` of every entry of a directory
    (hidden ones included, so stray temporary files show up)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        st = os.stat(path)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        else:
            digest = "<dir>"
        out[name] = (digest, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def read_header():
    return _read_header


@pytest.fixture(scope="session")
def raw_tensors():
    return _raw_tensors


@pytest.fixture(scope="session")
def stored_params():
    return _stored_params


@pytest.fixture(scope="session")
def snapshot():
    return _snapshot


# ------------------------------------------------------------------ the command line
def _run_cli(*args, cwd=None):
    """Run ``python -m mrc_ref.compress ARGS`` in a subprocess; returns the
    ``CompletedProcess`` with text ``stdout``/``stderr``.

    BLAS runs single-threaded unless the caller's environment says otherwise:
    the matrices are tiny, and threads spinning on a loaded two-core machine
    make a 0.5 s run take ten times as long."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return subprocess.run(
        [sys.executable, "-m", "mrc_ref.compress", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=CLI_TIMEOUT, env=env,
    )


@pytest.fixture(scope="session")
def run_cli():
    return _run_cli
