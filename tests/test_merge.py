"""Tests of sharded capture (``data_tools.capture --shard``) and ``data_tools.merge``.

Oracle: one capture of the whole image list in one process (itself checked
against the direct computation in tests/test_capture.py). The parts are
captured from real PNG files through the command-line functions, merged in
another order than the shard order, and compared with it.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data_tools import capture, merge
from data_tools.capture import __main__ as capture_cli
from data_tools.merge import __main__ as merge_cli
from data_tools.synthetic import random_vit
from mrc_ref import formats, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 7
PROXY = 3  # crosses the shard boundary for N = 3 (shards of 2, 2, 3 images)
#: Sharding changes only how the float64 sums are grouped (per batch, per
#: shard, then across shards). A sum of m terms in float64 is off by at most
#: (m - 1) u sum|terms| (u = 2^-53); for a Gram entry sum|x_i x_j| <= max
#: diagonal <= max|C|, so two groupings of 7 x 17 = 119 rows differ by at most
#: ~2.6e-14 max|C|; gram_normalized adds a multiply and divide by the image
#: counts (a few ulps more). 1e-12 of the largest entry leaves a 40x margin,
#: while a wrong weighting of gram_normalized (plain mean of the parts' means,
#: here 2, 2, 3 images) is off by ~1e-2.
RTOL = 1e-12
#: Proxy tokens are float32 casts of float64 embeddings; a batch of another
#: size may move a float64 product by an ulp and so, rarely, the float32
#: rounding by one float32 ulp (2^-23 relative).
PROXY_RTOL = 2.0**-22


# ----------------------------------------------------------------- fixtures
def _write_model(path, seed):
    from mrc_ref.formats import write_safetensors

    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float32) for k, v in random_vit(rng, dim=16, mlp=32, classes=4, grid=4).items()}
    write_safetensors(path, params, {"num_heads": "2"})
    return str(path)


def _write_images(folder, seed, count=IMAGES):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / ("cat" if i % 2 else "dog")  # class sub-folders: ImageFolder order is not file order
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Weights, a second model, an image folder, a full capture and the parts for N = 2 and 3."""
    d = tmp_path_factory.mktemp("merge")
    s = {
        "weights": _write_model(d / "w.safetensors", 0),
        "other_weights": _write_model(d / "other.safetensors", 1),
        "images": _write_images(d / "imgs", 2),
        "dir": d,
    }
    s["full"] = str(d / "full.h5")
    capture.run(s["weights"], s["images"], s["full"], proxy_images=PROXY, batch_size=2, quiet=True)
    for n in (1, 2, 3):
        s[n] = [str(d / f"part{n}-{k}.h5") for k in range(n)]
        for k, path in enumerate(s[n]):
            capture.run(s["weights"], s["images"], path, shard=(k, n), proxy_images=PROXY, batch_size=2,
                        quiet=True)
    return s


def read(path):
    with formats.open_activations(path) as f:
        layers = {name: formats.read_layer_stats(f, name) for name in f["layers"]}
        return layers, formats.read_proxy_tokens(f), {k: getattr(v, "item", lambda v=v: v)()
                                                       for k, v in f.attrs.items()}


def assert_close(got, want, what, rtol=RTOL):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=what)


def run_merge(capsys, *args):
    rc = merge_cli.main([str(a) for a in args] + ["--quiet"])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------- shards
@pytest.mark.parametrize("total", [0, 1, 2, 5, 7, 10, 23])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_partition_the_list_in_order(total, count):
    bounds = [capture.shard_bounds(k, count, total) for k in range(count)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(total))  # disjoint, complete, in order
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text, want", [("0/1", (0, 1)), ("2/3", (2, 3)), (" 0/16 ", (0, 16))])
def test_parse_shard(text, want):
    assert capture.parse_shard(text) == want


@pytest.mark.parametrize("text", ["3/3", "1/0", "0/0", "-1/2", "1", "a/b", "1/2/3", "1.0/2", ""])
def test_bad_shard_is_a_one_line_error(text, setup, capsys, tmp_path):
    rc = capture_cli.main([setup["weights"], setup["images"], "-o", str(tmp_path / "x.h5"), f"--shard={text}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m data_tools.capture: error: --shard") and "0-based" in err
    assert not os.listdir(tmp_path)


def test_empty_shard_is_refused(setup, capsys, tmp_path):
    rc = capture_cli.main([setup["weights"], setup["images"], "-o", str(tmp_path / "x.h5"), "--shard", "0/4",
                       "--max-images", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is empty" in err, err


def test_parts_record_what_the_merge_checks(setup):
    with open(setup["weights"], "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()  # independent of capture.file_sha256
    rel = sorted(os.path.relpath(os.path.join(r, f), setup["images"]).replace(os.sep, "/")
                 for r, _, files in os.walk(setup["images"]) for f in files)
    for k, path in enumerate(setup[3]):
        _, proxy, attrs = read(path)
        assert attrs["weights_sha256"] == digest and attrs["weights_file"] == "w.safetensors"
        assert attrs["image_list_sha256"] == hashlib.sha256("\n".join(rel).encode()).hexdigest()
        assert (attrs["shard_index"], attrs["shard_count"], attrs["images_total"]) == (k, 3, IMAGES)
        assert attrs["num_images"] == (2, 2, 3)[k] and attrs["proxy_images"] == PROXY
        assert '"size": 16' in attrs["preprocess"] and attrs["num_heads"] == 2
        assert len(proxy) == min(PROXY, attrs["num_images"])  # each part is a usable acts.h5 on its own
    assert read(setup["full"])[2]["shard_count"] == 1


# ----------------------------------------------------------------- the merge
@pytest.mark.parametrize("n", [1, 2, 3])
def test_merge_of_n_shards_equals_one_capture(setup, n, capsys, tmp_path):
    out = tmp_path / "acts.h5"
    rc, err = run_merge(capsys, *reversed(setup[n]), "-o", out)  # any order of the parts
    assert rc == 0 and err == "", err
    want, want_proxy, want_attrs = read(setup["full"])
    got, proxy, attrs = read(out)
    assert list(got) == list(want) and len(got) == 8
    for name, st in want.items():
        assert got[name]["rows"] == st["rows"] == IMAGES * 17
        for key in ("gram", "sum", "gram_normalized"):
            assert got[name][key].dtype == np.float64
            assert_close(got[name][key], st[key], f"N={n}: {name} {key}")
        stats.validate(got[name], 16 if "fc2" not in name else 32, np)  # what compress checks
    assert proxy.shape == want_proxy.shape == (PROXY, 17, 16)
    assert_close(proxy, want_proxy, "proxy tokens", PROXY_RTOL)
    for key in merge.MATCHING:
        if key != "shard_count":
            assert attrs[key] == want_attrs[key], key
    assert (attrs["num_images"], attrs["shard_index"], attrs["shard_count"], attrs["merged_shards"]) == \
        (IMAGES, 0, 1, n)


def test_gram_normalized_is_weighted_by_image_counts(setup):
    """Shards of 2, 2 and 3 images: the unweighted mean of the parts' means differs."""
    parts = [read(p)[0]["blocks.0.attn.qkv"]["gram_normalized"] for p in setup[3]]
    want = read(setup["full"])[0]["blocks.0.attn.qkv"]["gram_normalized"]
    assert_close((2 * parts[0] + 2 * parts[1] + 3 * parts[2]) / 7, want, "weighted")
    assert np.abs(np.mean(parts, axis=0) - want).max() > 1e-4 * np.abs(want).max()


def test_combine_in_memory_is_order_free(setup):
    parts = [merge.read_part(p) for p in setup[3]]
    left = merge.finish(merge.combine(merge.combine(parts[0], parts[1]), parts[2]))
    right = merge.finish(merge.combine(parts[2], merge.combine(parts[1], parts[0])))
    for name, st in left[0].items():
        for key in ("gram", "sum", "gram_normalized"):
            assert_close(right[0][name][key], st[key], f"{name} {key}")
    np.testing.assert_array_equal(left[1], right[1])
    assert parts[0]["layers"]["blocks.0.attn.qkv"]["rows"] == 2 * 17  # inputs of combine not modified


def test_merged_statistics_feed_compress(setup, tmp_path, capsys):
    from mrc_ref.compress import __main__ as compress

    acts = tmp_path / "acts.h5"
    assert run_merge(capsys, *setup[3], "-o", acts)[0] == 0
    out = tmp_path / "c.safetensors"
    rc = compress.main([setup["weights"], str(acts), "-o", str(out), "--rank", "2", "--residual-rank", "1", "--steps", "2",
                        "--statistic", "per-image", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert formats.read_compressed(out)[1]["config"]["compensation"] == "sequential"  # proxy tokens merged


def test_float32_store(setup, tmp_path, capsys):
    out = tmp_path / "acts.h5"
    assert run_merge(capsys, *setup[2], "-o", out, "--store-dtype", "float32")[0] == 0
    got, want = read(out)[0], read(setup["full"])[0]
    for name, st in want.items():
        assert got[name]["gram"].dtype == np.float32
        assert_close(got[name]["gram"], st["gram"], name, 2.0**-23)


# ----------------------------------------------------------------- refusals
def _edited(path, dst, edit):
    shutil.copyfile(path, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return str(dst)


def _case(name, s, tmp):
    """(part paths, the file the error must name, a phrase of the message)."""
    p2, p3 = s[2], s[3]
    if name == "different weights":
        other = str(tmp / "other-1.h5")
        capture.run(s["other_weights"], s["images"], other, shard=(1, 2), proxy_images=PROXY, quiet=True)
        return [p2[0], other], other, "different weights (sha256"
    if name == "different preprocessing":
        bad = _edited(p2[1], tmp / "pre.h5",
                      lambda f: f.attrs.__setitem__("preprocess", f.attrs["preprocess"].replace("16", "32")))
        return [p2[0], bad], bad, "different preprocessing"
    if name == "different image list":
        folder = _write_images(tmp / "imgs", 9, count=IMAGES)  # same count, other files
        os.rename(os.path.join(folder, "cat", "01.png"), os.path.join(folder, "cat", "99.png"))
        other = str(tmp / "list-1.h5")
        capture.run(s["weights"], folder, other, shard=(1, 2), proxy_images=PROXY, quiet=True)
        return [p2[0], other], other, "different image list"
    if name == "different layers":
        bad = _edited(p2[1], tmp / "layers.h5", lambda f: f["layers"].__delitem__("blocks.1.mlp.fc2"))
        return [p2[0], bad], bad, "different layers: here none, there blocks.1.mlp.fc2 (n=32)"
    if name == "no gram_normalized in one part":
        bad = _edited(p2[1], tmp / "gn.h5", lambda f: f["layers/blocks.0.attn.proj"].__delitem__("gram_normalized"))
        return [p2[0], bad], bad, "blocks.0.attn.proj (n=16, no gram_normalized)"
    if name == "different shard count":
        return [p2[0], p3[1], p3[2]], p3[1], "different number of shards"
    if name == "the same part twice":
        return [p3[0], p3[1], p3[1], p3[2]], p3[1], "given twice (shard 1/3)"
    if name == "overlapping parts":
        again = str(tmp / "again-1.h5")
        capture.run(s["weights"], s["images"], again, shard=(1, 3), proxy_images=PROXY, batch_size=3, quiet=True)
        return [*p3, again], again, f"shard 1/3 overlaps {p3[1]}"
    if name == "missing shard":
        return [p3[2], p3[0]], p3[0], "incomplete: shard(s) 1/3 missing"
    if name == "other format version":
        bad = _edited(p2[1], tmp / "v2.h5", lambda f: f.attrs.__setitem__("version", 2))
        return [p2[0], bad], bad, "unsupported version"
    if name == "no shard information":
        old = os.path.join(REPO, "mrc_ref", "example", "acts.h5")  # written before shards existed
        return [old], old, "no shard information"
    if name == "image count not the shard's":
        bad = _edited(p2[1], tmp / "count.h5", lambda f: f.attrs.__setitem__("num_images", 3))
        return [p2[0], bad], bad, "holds 3 images, but shard 1/2 of 7 images holds 4"
    if name == "not an HDF5 file":
        bad = tmp / "junk.h5"
        bad.write_bytes(b"not hdf5")
        return [p2[0], str(bad)], str(bad), "not a readable HDF5 file"
    raise AssertionError(name)


CASES = ["different weights", "different preprocessing", "different image list", "different layers",
         "no gram_normalized in one part", "different shard count", "the same part twice", "overlapping parts",
         "missing shard", "other format version", "no shard information", "image count not the shard's",
         "not an HDF5 file"]


@pytest.mark.parametrize("case", CASES)
def test_merge_refuses_parts_that_do_not_belong_together(case, setup, tmp_path, capsys, snapshot):
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    paths, culprit, phrase = _case(case, setup, bad_dir)
    before = {p: snapshot(os.path.dirname(p)) for p in paths}
    out = tmp_path / "acts.h5"
    rc, err = run_merge(capsys, *paths, "-o", out)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"python -m data_tools.merge: error: {culprit}: "), err
    assert phrase in err, err
    assert not out.exists() and os.listdir(tmp_path) == ["inputs"]  # no output, no stray temporary file
    assert {p: snapshot(os.path.dirname(p)) for p in paths} == before  # inputs untouched


def test_output_that_is_an_input_is_refused(setup, capsys):
    rc, err = run_merge(capsys, *setup[2], "-o", setup[2][1])
    assert rc == 2 and err.count("\n") == 1 and "overwrite an input" in err, err


def test_command_line_error_has_no_traceback(setup, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "data_tools.merge", setup[3][0], setup[3][2], "-o",
                        str(tmp_path / "acts.h5")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == f"python -m data_tools.merge: error: {setup[3][0]}: incomplete: shard(s) 1/3 missing " \
                       f"(given 0/3, 2/3)\n"
