"""Tests of data_tools.capture: streamed per-layer input statistics.

Oracle: the raw inputs of every layer, collected with a plain hook into a
list over all images at once, and the statistics computed from them
directly (``X^T X`` etc. in float64, the dense ``A B + P Q`` for the
weight of compressed layers).
"""

import functools
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from data_tools.capture import capture_statistics
from data_tools.synthetic import random_vit
from mrc_ref import vit
from mrc_ref.errors import MrcError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Batching only changes the order of float64 sums (and BLAS blocking),
#: a few ulps per entry; 1e-12 relative leaves ample room. Entries near zero
#: (cancellation) are compared with the same tolerance times the largest entry.
RTOL = 1e-12


random_params = functools.partial(random_vit, dim=16, mlp=32, classes=4, grid=2)


def compress_some(params, rng):
    """Factor two layers (one with a residual); return (params, dense weights by layer)."""
    comp, dense = dict(params), {}
    for name, residual in (("blocks.0.mlp.fc1", 2), ("blocks.1.attn.qkv", 0)):
        m, n = comp.pop(f"{name}.weight").shape
        a, b = rng.standard_normal((m, 3)), rng.standard_normal((3, n)) / math.sqrt(3 * n)
        comp[f"{name}.lowrank_a"], comp[f"{name}.lowrank_b"] = a, b
        w = a @ b
        if residual:
            pp, qq = rng.standard_normal((m, residual)), rng.standard_normal((residual, n)) / math.sqrt(n)
            comp[f"{name}.residual_p"], comp[f"{name}.residual_q"] = pp, qq
            w = w + pp @ qq
        dense[name] = w
    return comp, dense


def images(n, rng, side=8):
    return rng.standard_normal((n, 3, side, side)).astype(np.float32)


def reference_statistics(params, x, dense):
    """Statistics straight from the raw layer inputs of all images at once."""
    raw = {}
    vit.forward(params, x, num_heads=2, hook=lambda name, a: raw.setdefault(name, []).append(np.array(a)))
    out = {}
    for name, chunks in raw.items():
        if name in ("head", "head_dist"):
            continue
        (inputs,) = chunks  # one forward call: one chunk (N, T, n)
        w = dense.get(name, params.get(f"{name}.weight"))
        flat = inputs.reshape(-1, inputs.shape[-1]).astype(np.float64)
        normalized = sum(xi.T @ xi / np.sum((xi @ w.T) ** 2) for xi in inputs) / len(inputs)
        out[name] = {"gram": flat.T @ flat, "sum": flat.sum(axis=0), "rows": flat.shape[0], "gram_normalized": normalized}
    return out


def batched(x, size, as_tuples=False):
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        yield (chunk, None, [f"{start + i}.png" for i in range(len(chunk))]) if as_tuples else chunk


def assert_close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("dist", [False, True])
def test_statistics_equal_direct_computation_for_any_batch_size(dist):
    rng = np.random.default_rng(0)
    params, dense = compress_some(random_params(rng, dist=dist), rng)
    x = images(7, rng)
    ref = reference_statistics(params, x, dense)
    assert list(ref) == [n for n in vit.linear_names(params) if not n.startswith("head")]
    results = []
    for size in (1, 3, 7):
        layers, proxy = capture_statistics(params, batched(x, size, as_tuples=size == 3), num_heads=2,
                                           proxy_images=4, xp=np)
        assert list(layers) == list(ref)
        for name, want in ref.items():
            got = layers[name]
            assert got["rows"] == want["rows"] == 7 * (5 + dist)
            for key in ("gram", "sum", "gram_normalized"):
                assert got[key].dtype == np.float64
                assert_close(got[key], want[key], f"{name} {key} (batch size {size})")
        results.append(layers)
    for other in results[1:]:  # batch sizes agree with each other too
        for name in ref:
            for key in ("gram", "sum", "gram_normalized"):
                assert_close(other[name][key], results[0][name][key], f"{name} {key}")


def test_proxy_tokens_are_the_embeddings_of_the_first_images():
    rng = np.random.default_rng(1)
    params = random_params(rng)
    x = images(7, rng)
    want = vit.embed(vit.prepare(params, np), x.astype(np.float64), np)
    _, proxy = capture_statistics(params, batched(x, 3), num_heads=2, proxy_images=5, xp=np)
    assert proxy.dtype == np.float32 and proxy.shape == (5, 5, 16)
    np.testing.assert_array_equal(proxy, want[:5].astype(np.float32))
    _, proxy = capture_statistics(params, batched(x, 3), num_heads=2, proxy_images=32, xp=np)
    assert proxy.shape == (7, 5, 16)  # min(K, N)
    _, proxy = capture_statistics(params, batched(x, 3), num_heads=2, proxy_images=0, xp=np)
    assert proxy is None


def test_float32_capture_agrees_with_float64():
    """``dtype=float32``: the forward pass and each batch's products in float32,
    summed in float64. Float32 rounding (2^-24 ~ 6e-8 per op) through two
    blocks and sums of a few hundred terms stays below ~1e-5 of the largest
    entry; 1e-4 is a safe bound that a float32 sum across batches or a
    wrong scaling of gram_normalized would still exceed in other tests."""
    rng = np.random.default_rng(6)
    params = random_params(rng)
    x = images(9, rng)
    want, _ = capture_statistics(params, batched(x, 4), num_heads=2, proxy_images=0, xp=np)
    got, _ = capture_statistics(params, batched(x, 4), num_heads=2, proxy_images=0, xp=np, dtype=np.float32)
    for name, st in want.items():
        assert got[name]["rows"] == st["rows"]
        for key in ("gram", "sum", "gram_normalized"):
            assert got[name][key].dtype == np.float64
            np.testing.assert_allclose(got[name][key], st[key], rtol=1e-4, atol=1e-4 * np.abs(st[key]).max(),
                                       err_msg=f"{name} {key}")
            assert np.abs(got[name][key] - st[key]).max() > 0  # really computed in float32
        np.testing.assert_array_equal(got[name]["gram"], got[name]["gram"].T)


def test_out_hook_gives_each_linear_output_right_after_its_input():
    """The capture takes ``||X_i W^T||`` from ``vit``'s ``out_hook`` (output
    minus bias): it must be the layer's own output, for dense and factored
    layers, in forward order."""
    rng = np.random.default_rng(8)
    params, _ = compress_some(random_params(rng), rng)
    prepared = vit.prepare(params, np)
    events = []
    h = vit.embed(prepared, images(3, rng).astype(np.float64), np)
    vit.blocks(prepared, h, 2, np, hook=lambda n, x: events.append(("in", n, x)),
               out_hook=lambda n, y: events.append(("out", n, y)))
    names = [n for n in vit.linear_names(params) if not n.startswith("head")]
    assert [(kind, n) for kind, n, _ in events] == [(k, n) for n in names for k in ("in", "out")]
    for (_, name, x), (_, _, y) in zip(events[::2], events[1::2]):
        np.testing.assert_allclose(y, vit.linear(prepared, name, x, np), rtol=1e-13, atol=1e-13, err_msg=name)


def test_progress_and_errors():
    rng = np.random.default_rng(2)
    params = random_params(rng)
    done = []
    capture_statistics(params, batched(images(5, rng), 2), num_heads=2, proxy_images=1, xp=np, progress=done.append)
    assert done == [2, 2, 1]
    with pytest.raises(MrcError, match="no images"):
        capture_statistics(params, iter(()), num_heads=2, proxy_images=1, xp=np)
    zero = dict(params, **{"blocks.1.mlp.fc2.weight": np.zeros((16, 32))})
    with pytest.raises(MrcError, match="blocks.1.mlp.fc2.*zero"):
        capture_statistics(zero, [images(2, rng)], num_heads=2, proxy_images=1, xp=np)
    with pytest.raises(MrcError, match="pos_embed"):
        capture_statistics(params, [images(2, rng, side=12)], num_heads=2, proxy_images=1, xp=np)


def _peak_bytes(params, n_images, batch_size):
    def stream():  # images made on the fly: the input set is never held whole
        rng = np.random.default_rng(3)
        for start in range(0, n_images, batch_size):
            yield images(min(batch_size, n_images - start), rng, side=16)

    tracemalloc.start()
    try:
        capture_statistics(params, stream(), num_heads=2, proxy_images=4, xp=np)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_images():
    """Peak traced memory for 8N images stays within 10% (+ 64 KiB) of that
    for N. The accumulators, the prepared parameters and one batch are the
    same in both runs; the constant covers Python-object noise (frames,
    small dicts, allocator free-list churn) that does not scale with the
    data. Holding all layer inputs would grow the peak about 8x."""
    rng = np.random.default_rng(4)
    params = random_params(rng, dim=32, mlp=64, grid=4)  # 16 x 16 images, 17 tokens
    _peak_bytes(params, 4, 4)  # warm-up: lazy imports and caches
    small = _peak_bytes(params, 16, 4)
    large = _peak_bytes(params, 128, 4)
    assert large <= 1.10 * small + 64 * 1024, (small, large)


# ----------------------------------------------------------------- CLI
def test_cli_writes_the_statistics(tmp_path):
    images_mod = pytest.importorskip("mrc_ref.images", reason="image loading is mrc_ref/images.py")
    from PIL import Image

    from mrc_ref.formats import (
        open_activations,
        read_layer_stats,
        read_proxy_tokens,
        write_safetensors,
    )

    rng = np.random.default_rng(5)
    params = {k: v.astype(np.float32) for k, v in random_params(rng, grid=4).items()}  # 16 x 16 input
    weights = tmp_path / "w.safetensors"
    write_safetensors(weights, params, {"num_heads": "2"})
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "acts.h5"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "data_tools.capture", str(weights), str(folder), "-o", str(out),
         "--batch-size", "2", "--proxy-images", "3", "--max-images", "4", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet
    batches = images_mod.iter_batches(folder, 4, size=16, limit=4)
    want, want_proxy = capture_statistics(params, batches, num_heads=2, proxy_images=3, xp=np)
    with open_activations(out) as f:
        assert f.attrs["num_images"] == 4 and f.attrs["batch_size"] == 2
        assert f.attrs["weights_file"] == "w.safetensors"
        assert list(f["layers"]) == sorted(want)
        for name, st in want.items():
            got = read_layer_stats(f, name)
            assert got["rows"] == st["rows"] == 4 * 17
            for key in ("gram", "sum", "gram_normalized"):
                assert_close(got[key], st[key], f"{name} {key}")
        np.testing.assert_array_equal(read_proxy_tokens(f), want_proxy)

    bad = subprocess.run(
        [sys.executable, "-m", "data_tools.capture", str(weights), str(tmp_path / "missing"), "-o", str(out),
         "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr

    image = folder / "01.png"  # an output that is one of the images (here through a link) is refused first
    before = image.read_bytes()
    (tmp_path / "link").symlink_to(folder)
    over = subprocess.run(
        [sys.executable, "-m", "data_tools.capture", str(weights), str(folder), "-o", str(tmp_path / "link" / "01.png"),
         "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert over.returncode == 2 and "overwrite an input" in over.stderr, over.stderr
    assert len(over.stderr.strip().splitlines()) == 1 and image.read_bytes() == before


def test_help_has_no_duplicated_metavar(capsys):
    """Each placeholder of the usage names one thing (the positional IMAGES
    once clashed with ``--images IMAGES``)."""
    import re

    from data_tools.capture.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    metavars = re.findall(r"(?<![\w-])[A-Z][A-Z0-9_]*(?:/[A-Z][A-Z0-9_]*)?(?![\w-])", usage)
    assert len(metavars) == len(set(metavars)), metavars
    assert {"WEIGHTS", "IMAGES", "ACTS", "M", "K/N"} <= set(metavars)
    assert "--max-images M" in usage and "--images" not in usage.replace("--max-images", "")
