"""int8 post-training quantization (mrc_ref.quantize): the round-trip bound,
an independent implementation, the file layout written by
``compress --quantize int8`` and its reading by densify and the forward pass."""

import json

import numpy as np
import pytest

from data_tools.synthetic import random_vit
from mrc_ref import formats, quantize, vit
from mrc_ref.compress import __main__ as compress
from mrc_ref.errors import MrcError


def _oracle(w):
    """Symmetric per-row int8, written independently: a Python loop over rows,
    ``Fraction``-free but in float64 with explicit half-to-even rounding."""
    w = np.asarray(w, dtype=np.float64)
    q = np.zeros(w.shape, dtype=np.int8)
    s = np.zeros(w.shape[0], dtype=np.float32)
    for i, row in enumerate(w):
        top = max((abs(float(v)) for v in row), default=0.0)
        scale = np.float32(top / 127.0)
        if top > 0 and scale == 0:
            scale = np.float32(np.finfo(np.float32).smallest_subnormal)
        s[i] = scale
        if scale == 0:
            continue
        for j, v in enumerate(row):
            x = float(v) / float(scale)
            lo = np.floor(x)
            frac = x - lo
            k = lo + 1 if frac > 0.5 or (frac == 0.5 and lo % 2 == 1) else lo
            q[i, j] = int(min(127, max(-127, k)))
    return q, s


def _cases():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 13))
    w[2] = 0.0                                 # a zero row
    w[3] *= 1e-40                              # a subnormal float32 scale
    w[6] *= 1e-45                              # max/127 underflows float32: the smallest positive scale
    w[4, 5] = 1e6                              # an outlier: the rest of the row rounds to few codes
    w[5] = np.linspace(-1, 1, 13) * 127 / 2   # exact halves on the grid: round-half-to-even
    return {"random": rng.standard_normal((16, 24)).astype(np.float32), "edges": w,
            "column": rng.standard_normal((5, 1)), "row": rng.standard_normal((1, 7))}


@pytest.mark.parametrize("case", list(_cases()))
def test_round_trip_bound_per_channel(case):
    w = _cases()[case]
    q, s = quantize.quantize(w, np)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (w.shape[0],)
    assert np.abs(q.astype(int)).max() <= 127
    back = quantize.dequantize(q, s, np)
    err = np.abs(w.astype(np.float64) - back)
    bound = s.astype(np.float64)[:, None] / 2
    assert np.all(err <= bound * (1 + 1e-12) + 1e-300), (err / np.maximum(bound, 1e-300)).max()
    top = np.abs(w.astype(np.float64)).max(axis=1)
    np.testing.assert_allclose(s[top > 1e-30], (top / 127)[top > 1e-30], rtol=1e-7)  # min–max scale
    assert np.all(q[top == 0] == 0) and np.all(s[top == 0] == 0)  # zero rows: scale 0, codes 0, exact


@pytest.mark.parametrize("case", list(_cases()))
def test_matches_an_independent_implementation(case):
    w = _cases()[case]
    q, s = quantize.quantize(w, np)
    q_ref, s_ref = _oracle(w)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(q, q_ref)


def test_same_codes_under_the_strict_cupy_double():
    """The device path (tests/strict_xp.py, CuPy's semantics) gives the NumPy codes and scales bit for bit."""
    from strict_xp import xp as sx

    w = _cases()["edges"]
    q, s = quantize.quantize(sx.asarray(w), sx)
    q_np, s_np = quantize.quantize(w, np)
    np.testing.assert_array_equal(q.get(), q_np)
    np.testing.assert_array_equal(s.get(), s_np)
    np.testing.assert_array_equal(quantize.dequantize(q, s, sx).get(), quantize.dequantize(q_np, s_np, np))


def test_max_of_each_row_is_code_127():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 10))
    q, _ = quantize.quantize(w, np)
    assert np.all(np.abs(q[np.arange(6), np.abs(w).argmax(axis=1)]) == 127)


def test_refuses_non_finite_and_non_matrices():
    with pytest.raises(MrcError, match="NaN or Inf"):
        quantize.quantize(np.array([[1.0, np.nan]]), np)
    with pytest.raises(MrcError, match="2-D"):
        quantize.quantize(np.ones(3), np)


def _compressed_model():
    rng = np.random.default_rng(2)
    t = random_vit(rng, dim=16, depth=1, mlp=32, classes=3, grid=2, dtype=np.float32)
    name = "blocks.0.mlp.fc1"
    W = t.pop(name + ".weight")
    t[name + ".lowrank_a"], t[name + ".lowrank_b"] = W[:, :4].copy(), rng.standard_normal((4, 16)).astype(np.float32)
    t[name + ".residual_p"], t[name + ".residual_q"] = (rng.standard_normal((32, 2)).astype(np.float32),
                                                        rng.standard_normal((2, 16)).astype(np.float32))
    return t


def test_quantize_tensors_covers_linear_matrices_only():
    t = _compressed_model()
    q = quantize.quantize_tensors(t)
    keys = set(quantize.quantized_keys(q))
    assert keys == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc2.weight", "head.weight",
                    *(f"blocks.0.mlp.fc1.{s}" for s in ("lowrank_a", "lowrank_b", "residual_p", "residual_q"))}
    for key in t:
        if key not in keys:
            assert q[key] is t[key]  # biases, norms, tokens, patch embedding unchanged
    assert q["patch_embed.proj.weight"].dtype == np.float32
    with pytest.raises(MrcError, match="already quantized"):
        quantize.quantize_tensors(q | {"head.weight": t["head.weight"]})


def test_dequantize_checks_the_scales():
    t = quantize.quantize_tensors(_compressed_model())
    bad = dict(t, **{"head.weight.scale": t["head.weight.scale"][:-1]})
    with pytest.raises(MrcError, match="one scale per row"):
        quantize.dequantize_tensors(bad)
    bad = dict(t, **{"head.weight.scale": -t["head.weight.scale"]})
    with pytest.raises(MrcError, match="negative or non-finite"):
        quantize.dequantize_tensors(bad)


def test_forward_and_densify_read_int8(tmp_path):
    """The file round trip: int8 tensors and scales written, read back, the
    forward pass and densify dequantize them to q · s exactly."""
    t = _compressed_model()
    q = quantize.quantize_tensors(t)
    path = tmp_path / "q.safetensors"
    formats.write_safetensors(path, q, {"num_heads": "2"})
    back, _ = formats.read_safetensors(path)
    assert back["head.weight"].dtype == np.int8 and back["head.weight.scale"].dtype == np.float32
    want = {k: (v.astype(np.float64) * back[k + ".scale"].astype(np.float64)[:, None] if k + ".scale" in back else v)
            for k, v in back.items() if not k.endswith(".scale")}
    images = np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = vit.forward(back, images, num_heads=2, xp=np)
    ref = vit.forward(want, images, num_heads=2, xp=np)
    np.testing.assert_array_equal(got, ref)
    dense = formats.densify(back)
    assert not any(k.endswith(".scale") for k in dense)
    name = "blocks.0.mlp.fc1"
    W = want[name + ".lowrank_a"] @ want[name + ".lowrank_b"] + want[name + ".residual_p"] @ want[name + ".residual_q"]
    np.testing.assert_array_equal(dense[name + ".weight"], W.astype(np.float32))
    assert dense["head.weight"].dtype == np.float32
    np.testing.assert_array_equal(dense["head.weight"], want["head.weight"].astype(np.float32))


def test_compress_quantize_int8_file_layout(tmp_path):
    """``compress --quantize int8``: version 2, ``quantization`` metadata,
    every factor and dense linear weight int8 with a float32 scale per row,
    and the stored values those of quantize_tensors on the float output."""
    from data_tools.synthetic import write_example

    weights, acts = write_example(tmp_path / "syn", seed=0, depth=1, dim=32, img_size=8, num_heads=2)
    plain, q8 = tmp_path / "c.safetensors", tmp_path / "q.safetensors"
    report = tmp_path / "q.json"
    common = [weights, acts, "--quiet", "--reduction", "0.5", "--compensation", "local"]
    assert compress.main([*map(str, common), "-o", str(plain)]) == 0
    assert compress.main([*map(str, common), "-o", str(q8), "--quantize", "int8", "--report", str(report)]) == 0
    float_t, meta = formats.read_compressed(plain)
    int8_t, meta8 = formats.read_compressed(q8)
    assert meta["version"] == "1" and meta8["version"] == "2"
    info = meta8["quantization"]  # parsed by read_compressed
    assert info["scheme"] == quantize.SCHEME
    want = quantize.quantize_tensors(float_t)
    assert set(int8_t) == set(want) and set(info["tensors"]) == set(quantize.quantized_keys(want))
    for key, value in want.items():
        assert int8_t[key].dtype == value.dtype
        np.testing.assert_array_equal(int8_t[key], value)
    for key in info["tensors"]:
        assert int8_t[key].dtype == np.int8 and int8_t[key + ".scale"].shape == (int8_t[key].shape[0],)
    rep = json.loads(report.read_text())
    assert rep["quantization"]["bytes_after"] < rep["quantization"]["bytes_before"]
    dense = formats.densify(int8_t)
    assert set(dense) == set(formats.densify(float_t))


def test_read_compressed_checks_the_int8_version(tmp_path):
    """Version 2 needs its ``quantization`` metadata; int8 tensors with scales
    in a version-1 file are refused (a version-1 reader would misread them)."""
    from safetensors.numpy import save_file

    t = quantize.quantize_tensors(_compressed_model())
    meta = {"format": formats.COMPRESSED_FORMAT, "config": "{}", "ranks": "{}", "residual_ranks": "{}"}
    for version, extra, words in [("1", {}, "int8 files are version 2"), ("2", {}, "metadata has no 'quantization'"),
                                  ("2", {"quantization": "{not json"}, "metadata 'quantization' is not valid JSON")]:
        path = tmp_path / f"v{version}.safetensors"
        save_file(t, str(path), metadata={**meta, "version": version, **extra})
        with pytest.raises(MrcError, match=words):
            formats.read_compressed(path)
    save_file(t, str(path), metadata={**meta, "version": "2", "quantization": '{"scheme": "x", "tensors": []}'})
    with pytest.raises(MrcError, match="quantization scheme 'x' is unknown"):  # a scheme it does not know
        formats.read_compressed(path)
