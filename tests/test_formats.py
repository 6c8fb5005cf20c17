"""The file contracts of docs/formats.md: safetensors in and out, ``acts.h5``
version 1, the compressed layout and its metadata, atomic writes.

Every check of a written file reads it independently (by hand, or with h5py /
the safetensors package directly), not only through ``mrc_ref.formats``.
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from data_tools import synthetic
from mrc_ref import formats, layout, pipeline
from mrc_ref.compress import compress_files
from mrc_ref.errors import MrcError

# Tensors added to the synthetic model that no compression may touch: odd
# dtypes prove the pass-through is byte-exact and dtype-preserving.
EXTRAS = {
    "extra.half": (np.arange(15, dtype=np.float64).reshape(3, 5) / 7 - 1).astype(np.float16),
    "extra.index": np.array([3, -1, 2**40, 0, 7, -(2**62), 11], dtype=np.int64),
    "extra.mask": np.array([[True, False], [False, True]]),
}
RUN_CONFIG = pipeline.Config(reduction=0.3, steps=20, compensation="local")


def _make_odd(t):
    t = dict(t)
    t.update(EXTRAS)
    t["head.weight"] = t["head.weight"].astype(np.float16)  # a 2-D weight outside the selection
    t["norm.weight"] = t["norm.weight"].astype(np.float64)
    return t


@pytest.fixture(scope="module")
def odd_model(synthetic_model, tmp_path_factory):
    """The synthetic model plus float16 / int64 / bool / float64 tensors,
    written with the safetensors package (not mrc_ref), with its acts.h5."""
    d = tmp_path_factory.mktemp("odd")
    tensors = _make_odd(synthetic.make_model(0))
    weights = str(d / "weights.safetensors")
    save_file(tensors, weights, metadata={"num_heads": "4", "source": "odd test model"})
    acts = str(d / "acts.h5")
    shutil.copyfile(synthetic_model[1], acts)
    return weights, acts, tensors


@pytest.fixture(scope="module")
def compressed(odd_model):
    """One in-process compression of ``odd_model``: ``(path, report)``."""
    weights, acts, _ = odd_model
    out = os.path.join(os.path.dirname(weights), "out.safetensors")
    report = compress_files(weights, acts, out, RUN_CONFIG, report_path=out + ".json")
    return out, report


# ------------------------------------------------------------------ safetensors round trip
ROUND_TRIP = {
    "f64": np.linspace(-1, 1, 12).reshape(3, 4),
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3) * np.float32(0.1),
    "f16": np.array([0.5, -2.0, 65504.0, 6e-8], dtype=np.float16),
    "i64": np.array([[1, -2], [2**50, -(2**60)]], dtype=np.int64),
    "i32": np.array([7], dtype=np.int32),
    "u8": np.arange(256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def test_safetensors_round_trip(tmp_path, raw_tensors):
    path = tmp_path / "t.safetensors"
    formats.write_safetensors(path, ROUND_TRIP, {"num_heads": 4, "note": "x"})
    tensors, meta = formats.read_safetensors(path)
    assert meta == {"num_heads": "4", "note": "x"}  # metadata values are strings
    assert set(tensors) == set(ROUND_TRIP)
    raw = raw_tensors(path)
    for name, ref in ROUND_TRIP.items():
        assert tensors[name].dtype == ref.dtype, name
        assert tensors[name].shape == ref.shape, name
        np.testing.assert_array_equal(tensors[name], ref)
        assert raw[name][2] == np.ascontiguousarray(ref).astype(ref.dtype.newbyteorder("<")).tobytes(), name


def test_safetensors_round_trip_keeps_0d_shape(tmp_path, read_header):
    """A 0-d tensor (e.g. CLIP's ``logit_scale``) keeps shape ``()``, so a
    pass-through tensor is copied unchanged."""
    path = tmp_path / "t.safetensors"
    formats.write_safetensors(path, {"scale": np.array(3.25, dtype=np.float32)})
    assert read_header(path)[0]["scale"]["shape"] == []
    tensors, _ = formats.read_safetensors(path)
    assert tensors["scale"].shape == ()


def test_safetensors_reads_foreign_file(tmp_path):
    """A file written by the safetensors package itself, without metadata."""
    path = tmp_path / "t.safetensors"
    save_file(ROUND_TRIP, str(path))
    tensors, meta = formats.read_safetensors(path)
    assert meta == {}
    for name, ref in ROUND_TRIP.items():
        assert tensors[name].dtype == ref.dtype
        np.testing.assert_array_equal(tensors[name], ref)


def test_write_safetensors_non_contiguous(tmp_path):
    a = np.arange(20, dtype=np.float32).reshape(4, 5)
    formats.write_safetensors(tmp_path / "t.safetensors", {"t": a.T, "s": a[:, ::2]})
    tensors, _ = formats.read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(tensors["t"], a.T)
    np.testing.assert_array_equal(tensors["s"], a[:, ::2])


@pytest.mark.parametrize("kind", ["missing", "empty", "short", "random", "truncated", "bad-json"])
def test_read_safetensors_rejects(tmp_path, synthetic_model, kind):
    path = tmp_path / "w.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "short":
        path.write_bytes(b"\x01\x02\x03")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        blob = open(synthetic_model[0], "rb").read()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "bad-json":
        path.write_bytes(len(b"{not json").to_bytes(8, "little") + b"{not json")
    with pytest.raises(MrcError) as info:
        formats.read_safetensors(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


# ------------------------------------------------------------------ acts.h5 round trip
def _layers(rng):
    x = rng.standard_normal((40, 6))
    y = rng.standard_normal((40, 3)).astype(np.float32)
    return {
        "blocks.0.attn.qkv": {"gram": x.T @ x, "sum": x.sum(0), "rows": 40, "gram_normalized": x.T @ x / 40},
        "blocks.0.mlp.fc2": {"gram": y.T @ y, "sum": y.sum(0), "rows": np.int64(40)},
    }


def test_activations_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    layers = _layers(rng)
    proxy = rng.standard_normal((2, 5, 6))  # float64 in, float32 stored
    path = tmp_path / "acts.h5"
    formats.write_activations(path, layers, proxy_tokens=proxy, attrs={"source": "test"})

    # The contract, read with h5py alone.
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "mrc_ref.activations"
        assert f.attrs["version"] == 1 and np.issubdtype(np.asarray(f.attrs["version"]).dtype, np.integer)
        assert f.attrs["source"] == "test"
        assert sorted(f["layers"]) == sorted(layers)
        for name, st in layers.items():
            g = f["layers"][name]
            assert g["gram"].shape == st["gram"].shape and g["gram"].dtype == st["gram"].dtype
            assert g["sum"].shape == st["sum"].shape
            assert int(g.attrs["rows"]) == 40
            assert np.issubdtype(np.asarray(g.attrs["rows"]).dtype, np.integer)
            assert ("gram_normalized" in g) == ("gram_normalized" in st)
        assert f["proxy/tokens"].dtype == np.float32 and f["proxy/tokens"].shape == (2, 5, 6)

    # And through mrc_ref.
    with formats.open_activations(path) as f:
        for name, st in layers.items():
            got = formats.read_layer_stats(f, name)
            np.testing.assert_array_equal(got["gram"], st["gram"])
            assert got["gram"].dtype == st["gram"].dtype
            np.testing.assert_array_equal(got["sum"], st["sum"])
            assert got["rows"] == 40 and isinstance(got["rows"], int)
            if "gram_normalized" in st:
                np.testing.assert_array_equal(got["gram_normalized"], st["gram_normalized"])
            else:
                assert got["gram_normalized"] is None
        np.testing.assert_array_equal(formats.read_proxy_tokens(f), proxy.astype(np.float32))


def test_activations_written_by_hand_are_read(tmp_path):
    """A file written with h5py alone (fixed-length bytes format attribute,
    int32 rows, float32 Grams) follows the contract and is read."""
    path = tmp_path / "acts.h5"
    x = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = np.bytes_(b"mrc_ref.activations")
        f.attrs["version"] = np.int32(1)
        g = f.create_group("layers/a.b")
        g["gram"] = x.T @ x
        g["sum"] = x.sum(0)
        g.attrs["rows"] = np.int32(10)
    with formats.open_activations(path) as f:
        assert formats.read_proxy_tokens(f) is None
        st = formats.read_layer_stats(f, "a.b")
    assert st["rows"] == 10 and st["gram"].dtype == np.float32


def _h5(path, fmt="mrc_ref.activations", version=1, layers=True):
    with h5py.File(path, "w") as f:
        if fmt is not None:
            f.attrs["format"] = fmt
        if version is not None:
            f.attrs["version"] = version
        if layers:
            f.create_group("layers")


@pytest.mark.parametrize("kind", ["missing", "not-hdf5", "wrong-format", "no-format", "version-2",
                                  "no-version", "no-layers"])
def test_open_activations_rejects(tmp_path, kind):
    path = tmp_path / "acts.h5"
    if kind == "not-hdf5":
        path.write_text("this is not HDF5\n")
    elif kind == "wrong-format":
        _h5(path, fmt="something.else")
    elif kind == "no-format":
        _h5(path, fmt=None)
    elif kind == "version-2":
        _h5(path, version=2)
    elif kind == "no-version":
        _h5(path, version=None)
    elif kind == "no-layers":
        _h5(path, layers=False)
    with pytest.raises(MrcError) as info:
        with formats.open_activations(path):
            pass
    assert str(path) in str(info.value)


def test_read_layer_stats_missing_layer_and_dataset(tmp_path):
    path = tmp_path / "acts.h5"
    formats.write_activations(path, _layers(np.random.default_rng(3)))
    with h5py.File(path, "a") as f:
        del f["layers/blocks.0.mlp.fc2/sum"]
    with formats.open_activations(path) as f:
        with pytest.raises(MrcError) as info:
            formats.read_layer_stats(f, "blocks.9.attn.qkv", str(path))
        assert str(path) in str(info.value) and "blocks.9.attn.qkv" in str(info.value)
        with pytest.raises(MrcError) as info:
            formats.read_layer_stats(f, "blocks.0.mlp.fc2", str(path))
        assert "blocks.0.mlp.fc2" in str(info.value) and "sum" in str(info.value)


# ------------------------------------------------------------------ the compressed layout
def _factor_layout(tensors):
    """``{layer: (r, q)}`` from the factor tensors present."""
    out = {}
    for key in tensors:
        if key.endswith(".lowrank_a"):
            name = key[: -len(".lowrank_a")]
            p = tensors.get(name + ".residual_p")
            out[name] = (tensors[key].shape[1], 0 if p is None else p.shape[1])
    return out


def test_compressed_layout(compressed, odd_model):
    path, report = compressed
    _, _, original = odd_model
    tensors = load_file(path)
    ranks = {e["name"]: e["rank"] for e in report["layers"]}
    factored = [n for n, r in ranks.items() if r is not None]
    dense = [n for n, r in ranks.items() if r is None]
    assert factored and dense, "RUN_CONFIG should leave some selected layers dense"
    expected = set(original) - {n + ".weight" for n in factored}
    for name in factored:
        W = original[name + ".weight"]
        m, n = W.shape
        r = ranks[name]
        q = next(e["residual_rank"] for e in report["layers"] if e["name"] == name)
        assert q == RUN_CONFIG.residual_rank
        assert tensors[name + ".lowrank_a"].shape == (m, r)
        assert tensors[name + ".lowrank_b"].shape == (r, n)
        assert tensors[name + ".residual_p"].shape == (m, q)
        assert tensors[name + ".residual_q"].shape == (q, n)
        for s in layout.FACTOR_SUFFIXES:
            assert tensors[f"{name}.{s}"].dtype == W.dtype
            expected.add(f"{name}.{s}")
        assert name + ".bias" in tensors
    assert set(tensors) == expected


def test_untouched_tensors_are_bit_identical(compressed, odd_model, raw_tensors):
    path, report = compressed
    before, after = raw_tensors(odd_model[0]), raw_tensors(path)
    factored = {e["name"] + ".weight" for e in report["layers"] if e["rank"] is not None}
    untouched = [k for k in before if k not in factored]
    assert {"extra.half", "extra.index", "extra.mask", "head.weight", "norm.weight"} <= set(untouched)
    assert {before[k][0] for k in untouched} >= {"F16", "I64", "BOOL", "F64", "F32"}
    for key in untouched:
        assert after[key] == before[key], key  # dtype, shape and bytes


def test_densify_equals_factor_products(compressed, odd_model):
    path, report = compressed
    tensors = load_file(path)
    dense = formats.densify(tensors)
    original = odd_model[2]
    assert set(dense) == set(original)
    for name, (r, q) in _factor_layout(tensors).items():
        f = {s: tensors[f"{name}.{s}"].astype(np.float64) for s in layout.FACTOR_SUFFIXES}
        ref = f["lowrank_a"] @ f["lowrank_b"] + f["residual_p"] @ f["residual_q"]
        assert dense[name + ".weight"].dtype == original[name + ".weight"].dtype
        np.testing.assert_allclose(dense[name + ".weight"], ref.astype(np.float32), rtol=1e-6, atol=1e-9)
        W64 = formats.densify(tensors, dtype=np.float64)[name + ".weight"]
        np.testing.assert_allclose(W64, ref, rtol=1e-12, atol=1e-15)
        # and the rebuilt weight is close to the original one
        W = original[name + ".weight"].astype(np.float64)
        assert np.linalg.norm(W64 - W) < np.linalg.norm(W)
    for key, value in original.items():
        if key in tensors:
            assert dense[key].dtype == value.dtype
            np.testing.assert_array_equal(dense[key], value)


def test_densify_without_residual():
    rng = np.random.default_rng(4)
    A, B = rng.standard_normal((5, 2)), rng.standard_normal((2, 3))
    out = formats.densify({"l.lowrank_a": A, "l.lowrank_b": B, "l.bias": np.ones(5)})
    np.testing.assert_allclose(out["l.weight"], A @ B, rtol=1e-13)
    assert set(out) == {"l.weight", "l.bias"}


def test_densify_rejects_missing_b():
    with pytest.raises(MrcError, match="l"):
        formats.densify({"l.lowrank_a": np.ones((3, 1))})


def test_compressed_metadata(compressed, odd_model, read_header):
    path, report = compressed
    meta = read_header(path)[0]["__metadata__"]
    assert meta["format"] == "mrc_ref.compressed"
    assert meta["version"] == "1"
    assert meta["num_heads"] == "4" and meta["source"] == "odd test model"  # the input's own metadata
    assert all(isinstance(v, str) for v in meta.values())
    config = json.loads(meta["config"])
    assert config == RUN_CONFIG.to_json()
    assert config == report["config"]
    ranks, qs = json.loads(meta["ranks"]), json.loads(meta["residual_ranks"])
    names = [e["name"] for e in report["layers"]]
    assert list(ranks) == names and list(qs) == names
    layout = _factor_layout(load_file(path))
    for name in names:
        if ranks[name] is None:
            assert name not in layout and qs[name] == 0
        else:
            assert layout[name] == (ranks[name], qs[name])


def test_read_compressed(compressed, read_header):
    path, report = compressed
    tensors, meta = formats.read_compressed(path)
    assert meta["config"] == report["config"]
    assert meta["ranks"] == {e["name"]: e["rank"] for e in report["layers"]}
    assert meta["residual_ranks"] == {e["name"]: e["residual_rank"] for e in report["layers"]}
    assert set(tensors) == set(load_file(path))


@pytest.mark.parametrize("change", [
    {"format": "mrc_ref.activations"},
    {"format": None},
    {"version": "2"},
    {"version": None},
    {"config": None},
    {"ranks": "{not json"},
])
def test_read_compressed_rejects(compressed, tmp_path, change):
    path, _ = compressed
    tensors, meta = formats.read_safetensors(path)
    for key, value in change.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(MrcError) as info:
        formats.read_compressed(bad)
    assert str(bad) in str(info.value)


def test_read_compressed_rejects_uncompressed_model(odd_model):
    with pytest.raises(MrcError, match="format"):
        formats.read_compressed(odd_model[0])


def test_report_file_matches_returned_report(compressed):
    path, report = compressed
    with open(path + ".json") as fh:
        assert json.load(fh) == json.loads(json.dumps(report))


# ------------------------------------------------------------------ atomic writes
class _FailingFile:
    """A writable file that writes the first half of what it is given, then fails."""

    def __init__(self, path, mode="w", *args, **kwargs):
        self._fh = open(path, mode, *args, **kwargs)

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(28, "No space left on device (simulated)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def _failing_open(path, mode="r", *args, **kwargs):
    if "w" in mode:
        return _FailingFile(path, mode, *args, **kwargs)
    return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("existing", [False, True])
def test_write_safetensors_failing_midway_leaves_no_file(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.safetensors"
    if existing:
        target.write_bytes(b"previous content")
    monkeypatch.setattr(formats.tensors, "open", _failing_open, raising=False)
    with pytest.raises(MrcError, match="cannot write: .*simulated"):  # a user error, not a traceback
        formats.write_safetensors(target, ROUND_TRIP, {"a": "b"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == (["out.safetensors"] if existing else [])
    if existing:
        assert target.read_bytes() == b"previous content"


def test_write_json_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(formats.documents, "open", _failing_open, raising=False)
    with pytest.raises(MrcError, match="cannot write: .*simulated"):
        formats.write_json(tmp_path / "r.json", {"a": list(range(100))})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


class _Exploding:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot materialize (simulated)")


def test_write_activations_failing_midway_leaves_no_file(tmp_path):
    layers = _layers(np.random.default_rng(5))
    layers["zz.broken"] = {"gram": _Exploding(), "sum": np.zeros(3), "rows": 1}
    with pytest.raises(RuntimeError, match="simulated"):
        formats.write_activations(tmp_path / "acts.h5", layers)
    assert os.listdir(tmp_path) == []


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with formats.atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        assert target.read_bytes() == b"old"  # not touched until the block succeeds
        with open(tmp, "wb") as fh:
            fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_missing_directory(tmp_path):
    with pytest.raises(MrcError, match="directory"):
        with formats.atomic_path(tmp_path / "nowhere" / "out.bin"):
            pass


def test_written_files_get_ordinary_permissions(tmp_path):
    """An output is created like ``open(path, "w")`` would: mode 0o666 minus
    the umask (mkstemp's private 0o600 must not leak into the result)."""
    umask = os.umask(0)
    os.umask(umask)
    formats.write_safetensors(tmp_path / "t.safetensors", {"a": np.ones(2)})
    formats.write_json(tmp_path / "r.json", {})
    formats.write_activations(tmp_path / "acts.h5", _layers(np.random.default_rng(6)))
    for name in ("t.safetensors", "r.json", "acts.h5"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("alias", ["same", "symlink", "relative"])
def test_writers_never_overwrite_an_input(model_copy, snapshot, alias, monkeypatch):
    weights, acts = model_copy
    directory = os.path.dirname(weights)
    if alias == "symlink":
        link = os.path.join(directory, "link.safetensors")
        os.symlink(weights, link)
        target = link
    elif alias == "relative":
        monkeypatch.chdir(directory)
        target = os.path.join(".", os.path.basename(weights))
    else:
        target = weights
    before = snapshot(directory)
    inputs = (weights, acts)
    with pytest.raises(MrcError, match="input"):
        formats.write_safetensors(target, {"a": np.ones(2)}, inputs=inputs)
    with pytest.raises(MrcError, match="input"):
        formats.write_json(target, {}, inputs=inputs)
    with pytest.raises(MrcError, match="input"):
        formats.write_activations(target, {}, inputs=inputs)
    assert snapshot(directory) == before


def test_compress_files_never_overwrites_an_input(model_copy, snapshot):
    weights, acts = model_copy
    before = snapshot(os.path.dirname(weights))
    for out, rep in ((weights, None), (acts, None), (weights + ".x", acts)):
        with pytest.raises(MrcError, match="input"):
            compress_files(weights, acts, out, pipeline.Config(steps=1), report_path=rep)
    assert snapshot(os.path.dirname(weights)) == before


# ------------------------------------------------------------------ hardening
#: bfloat16 bit patterns and their values, worked out by hand: sign, 8-bit
#: exponent (bias 127), 7-bit fraction.
BF16_TABLE = [
    (0x0000, 0.0), (0x8000, -0.0), (0x3F80, 1.0), (0xBF80, -1.0), (0x4000, 2.0), (0xC040, -3.0),
    (0x3E80, 0.25), (0x3FC0, 1.5), (0x4049, 3.140625), (0x4780, 65536.0),
    (0x7F7F, (2 - 2**-7) * 2.0**127),  # the largest finite bfloat16
    (0x0080, 2.0**-126),                # the smallest normal
    (0x0001, 2.0**-133),                # the smallest subnormal
    (0x7F80, np.inf), (0xFF80, -np.inf),
]


def _bf16_file(path, bits, shape, extra=b""):
    raw = np.asarray(bits, dtype="<u2").tobytes()
    header = json.dumps({"t": {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, len(raw)]},
                         "__metadata__": {"k": "v"}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw + extra)


def test_bf16_is_widened_exactly(tmp_path):
    bits = [b for b, _ in BF16_TABLE] + [0x7FC0]  # and a quiet NaN
    want = np.array([v for _, v in BF16_TABLE], dtype=np.float64)
    path = tmp_path / "bf16.safetensors"
    _bf16_file(path, bits, (len(bits),))
    tensors, meta = formats.read_safetensors(path)
    got = tensors["t"]
    assert got.dtype == np.float32 and meta == {"k": "v"}
    np.testing.assert_array_equal(got[:-1].astype(np.float64), want)
    assert np.signbit(got[1]) and not np.signbit(got[0])
    assert np.isnan(got[-1])
    np.testing.assert_array_equal(formats.bf16_to_float32(np.array(bits[:-1], np.uint16)).astype(np.float64), want)


def test_bf16_shape_kept(tmp_path):
    path = tmp_path / "bf16.safetensors"
    _bf16_file(path, np.arange(6) + 0x3F80, (2, 3))
    assert formats.read_safetensors(path)[0]["t"].shape == (2, 3)


def _raw_file(path, header, data=b""):
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


BAD_HEADERS = [
    ("list", "[1, 2]", b"", "header is not a JSON object (got [1, 2])"),
    ("null", "null", b"", "header is not a JSON object (got null)"),
    ("number", "42", b"", "header is not a JSON object"),
    ("not-utf8", "\udcff", b"", "not valid JSON"),
    ("entry-null", {"t": None}, b"", "'t': entry is not an object"),
    ("no-dtype", {"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype null"),
    ("f8", {"t": {**F32_ENTRY, "dtype": "F8_E5M2"}}, b"\0" * 8, "dtype 'F8_E5M2', which is not supported"),
    ("shape-negative", {"t": {**F32_ENTRY, "shape": [-2]}}, b"\0" * 8, "shape"),
    ("shape-float", {"t": {**F32_ENTRY, "shape": [2.0]}}, b"\0" * 8, "shape"),
    ("offsets-reversed", {"t": {**F32_ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
    ("size-mismatch", {"t": {**F32_ENTRY, "shape": [3]}}, b"\0" * 8, "need 12"),
    ("overlap", {"t": F32_ENTRY, "u": F32_ENTRY}, b"\0" * 8, "overlap or leave a gap"),
    ("gap", {"t": {**F32_ENTRY, "data_offsets": [8, 16]}}, b"\0" * 16, "data begins at byte 8, expected 0"),
    ("trailing", {"t": F32_ENTRY}, b"\0" * 12, "4 bytes follow"),
    ("truncated-data", {"t": F32_ENTRY}, b"\0" * 5, "truncated"),
    ("metadata-list", {"__metadata__": ["a"], "t": F32_ENTRY}, b"\0" * 8, "__metadata__"),
    ("metadata-int", {"__metadata__": {"n": 4}, "t": F32_ENTRY}, b"\0" * 8, "__metadata__"),
]


@pytest.mark.parametrize("kind, header, data, words", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_read_safetensors_refuses_bad_headers(tmp_path, kind, header, data, words):
    path = tmp_path / "w.safetensors"
    if kind == "not-utf8":
        path.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}")
    else:
        _raw_file(path, header, data)
    with pytest.raises(MrcError) as info:
        formats.read_safetensors(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a readable safetensors file (") and "\n" not in msg
    assert words in msg


def test_read_safetensors_accepts_null_metadata_and_empty_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    _raw_file(path, {"__metadata__": None, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                     "t": F32_ENTRY}, np.array([1.5, -2], "<f4").tobytes())
    tensors, meta = formats.read_safetensors(path)
    assert meta == {} and tensors["e"].shape == (0, 3)
    np.testing.assert_array_equal(tensors["t"], [1.5, -2])


def _peak_bytes(fn):
    """Peak traced allocation (Python and NumPy) while ``fn()`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except MrcError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_safetensors_trailing_gigabytes_refused_without_reading(tmp_path):
    """A valid tiny file followed by 3 GB of sparse bytes is refused from its
    header and size, without reading the 3 GB."""
    path = tmp_path / "w.safetensors"
    _raw_file(path, {"t": F32_ENTRY}, b"\0" * 8)
    with open(path, "r+b") as fh:
        fh.truncate(3 * 2**30)  # sparse: takes no disk space
    with pytest.raises(MrcError, match="bytes follow"):
        formats.read_safetensors(path)
    assert _peak_bytes(lambda: formats.read_safetensors(path)) < 2**20


def test_safetensors_huge_declared_tensor_refused_without_reading(tmp_path):
    path = tmp_path / "w.safetensors"
    _raw_file(path, {"t": {"dtype": "F64", "shape": [20000, 20000], "data_offsets": [0, 8 * 20000 * 20000]}})
    with pytest.raises(MrcError, match="truncated"):
        formats.read_safetensors(path)
    assert _peak_bytes(lambda: formats.read_safetensors(path)) < 2**20


def _declared_only(path, dataset, shape, n=64):
    """An acts.h5 whose layer ``a`` is valid except ``dataset``, which declares
    ``shape`` but holds no data."""
    x = np.random.default_rng(0).standard_normal((100, n))
    formats.write_activations(path, {"a": {"gram": x.T @ x, "sum": x.sum(0), "rows": 100}})
    with h5py.File(path, "a") as f:
        del f[f"layers/a/{dataset}"]
        f.create_dataset(f"layers/a/{dataset}", shape=shape, dtype="f8", chunks=True)


@pytest.mark.parametrize("n, words", [(64, "gram has shape (20000, 20000), expected (64, 64)"),
                                      (None, "never written")])
def test_huge_declared_gram_refused_before_reading(tmp_path, n, words):
    path = tmp_path / "acts.h5"
    _declared_only(path, "gram", (20000, 20000))
    assert os.path.getsize(path) < 2**20

    def read():
        with formats.open_activations(path) as f:
            formats.read_layer_stats(f, "a", n=n)

    with pytest.raises(MrcError) as info:
        read()
    assert words in str(info.value) and str(path) in str(info.value) and "layer a" in str(info.value)
    assert _peak_bytes(read) < 2**20


def test_proxy_tokens_checked_before_reading(tmp_path):
    path = tmp_path / "acts.h5"
    formats.write_activations(path, {})
    with h5py.File(path, "a") as f:
        f.create_group("proxy").create_dataset("tokens", shape=(200000, 999, 64), dtype="f4", chunks=True)

    def read():
        with formats.open_activations(path) as f:
            formats.read_proxy_tokens(f, (17, 64))

    with pytest.raises(MrcError, match=r"proxy/tokens has shape \(200000, 999, 64\), expected \(\*, 17, 64\)"):
        read()
    assert _peak_bytes(read) < 2**20


def test_soft_links_followed_inside_the_file(tmp_path):
    """A soft link names an object of the same file: it is followed; a
    dangling one reads as missing."""
    path = tmp_path / "acts.h5"
    x = np.random.default_rng(0).standard_normal((10, 4))
    formats.write_activations(path, {"a": {"gram": x.T @ x, "sum": x.sum(0), "rows": 10}})
    with h5py.File(path, "a") as f:
        f["stash"] = f["layers/a/gram"][()]
        del f["layers/a/gram"]
        f["layers/a/gram"] = h5py.SoftLink("/stash")
        f["layers/b"] = h5py.SoftLink("/nowhere")
    with formats.open_activations(path) as f:
        np.testing.assert_array_equal(formats.read_layer_stats(f, "a")["gram"], x.T @ x)
        with pytest.raises(MrcError, match="layer b: missing"):
            formats.read_layer_stats(f, "b")


@pytest.mark.parametrize("where", ["layers", "proxy", "proxy/tokens"])
def test_external_links_refused(tmp_path, where):
    path, other = tmp_path / "acts.h5", tmp_path / "other.h5"
    formats.write_activations(path, {}, proxy_tokens=np.ones((1, 2, 3)))
    with h5py.File(path, "a") as f, h5py.File(other, "w") as o:
        f.copy(f[where], o, name="x")
        del f[where]
        f[where] = h5py.ExternalLink("other.h5", "/x")
    with pytest.raises(MrcError) as info:
        with formats.open_activations(path) as f:
            formats.read_proxy_tokens(f)
    msg = str(info.value)
    assert msg.startswith(str(path)) and f"'/{where}' is an external link to other.h5:/x" in msg


def test_virtual_dataset_refused(tmp_path):
    path, other = tmp_path / "acts.h5", tmp_path / "other.h5"
    formats.write_activations(path, {})
    with h5py.File(other, "w") as o:
        o["t"] = np.ones((2, 3, 4), np.float32)
    layout = h5py.VirtualLayout(shape=(2, 3, 4), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "t", shape=(2, 3, 4))
    with h5py.File(path, "a") as f:
        f.create_group("proxy").create_virtual_dataset("tokens", layout)
    with pytest.raises(MrcError, match="other.h5"):
        with formats.open_activations(path) as f:
            formats.read_proxy_tokens(f)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_never_holds_nan(tmp_path, value):
    path = tmp_path / "r.json"
    with pytest.raises(MrcError) as info:
        formats.write_json(path, {"layers": [{"nmse_stage3": value}]})
    assert str(path) in str(info.value) and "JSON" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("layout", ["link-dir", "dotdot", "link-file", "hard-link"])
def test_outputs_compared_by_resolved_path(tmp_path, layout):
    """Two outputs naming one file (through a linked directory, ``..``, a
    symbolic link to a file that does not exist yet, a hard link) are refused
    before anything is written."""
    real = tmp_path / "real"
    real.mkdir()
    first = str(real / "out.safetensors")
    if layout == "link-dir":
        os.symlink(real, tmp_path / "link")
        second = str(tmp_path / "link" / "out.safetensors")
    elif layout == "dotdot":
        (tmp_path / "sub").mkdir()
        second = str(tmp_path / "sub" / ".." / "real" / "out.safetensors")
    elif layout == "link-file":
        os.symlink(first, tmp_path / "alias.json")  # dangling until first is written
        second = str(tmp_path / "alias.json")
    else:
        open(first, "w").close()
        os.link(first, tmp_path / "hard.json")
        second = str(tmp_path / "hard.json")
    with pytest.raises(MrcError, match="another output"):
        formats.check_outputs([first, second])
    with pytest.raises(MrcError, match="input"):
        formats.check_output(second, inputs=[first])
    formats.check_outputs([first, str(real / "other.json")])


def test_proxy_tokens_lazy_is_checked_but_unread(tmp_path):
    path = tmp_path / "acts.h5"
    tokens = np.random.default_rng(0).standard_normal((5, 17, 64)).astype(np.float32)
    tokens[4, 0, 0] = np.nan  # values are the reader's to check, batch by batch
    formats.write_activations(path, {}, proxy_tokens=tokens)
    with formats.open_activations(path) as f:
        lazy = formats.read_proxy_tokens(f, (17, 64), lazy=True)
        assert isinstance(lazy, h5py.Dataset) and lazy.shape == (5, 17, 64)
        np.testing.assert_array_equal(lazy[1:3], tokens[1:3])
        with pytest.raises(MrcError, match="proxy/tokens contains NaN or Inf"):
            formats.read_proxy_tokens(f, (17, 64))
    with h5py.File(path, "a") as f:
        del f["proxy/tokens"]
        f["proxy/tokens"] = np.zeros((0, 17, 64), np.float32)
    with formats.open_activations(path) as f:
        with pytest.raises(MrcError, match="proxy/tokens holds no images"):
            formats.read_proxy_tokens(f, (17, 64), lazy=True)
