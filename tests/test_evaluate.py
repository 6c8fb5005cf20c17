"""Evaluation: metrics against hand computations, the evaluate and capture
command lines on the embedded example, and bad image folders."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mrc_ref import example
from mrc_ref import metrics


def run(module, *args):
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_metrics_by_hand():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 0.0, 2.0], [2.0, 2.5, 0.0]])
    labels = np.array([0, 2, 1, 1])
    assert metrics.topk_accuracy(logits, labels, 1) == 0.5  # rows 0 and 3
    assert metrics.topk_accuracy(logits, labels, 2) == 0.75  # not row 2
    assert metrics.topk_accuracy(logits, labels, 5) == 1.0
    reference = np.array([[3.0, 1.0, 2.0], [5.0, 0.0, 1.0], [1.0, 0.0, 2.0], [2.5, 2.0, 0.0]])
    assert metrics.agreement(logits, reference) == 0.5
    p = np.exp(reference) / np.exp(reference).sum(1, keepdims=True)
    r = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.mean_kl(logits, reference) == pytest.approx(np.mean(np.sum(p * np.log(p / r), 1)), rel=1e-12)
    assert metrics.mean_kl(logits, logits) == pytest.approx(0, abs=1e-15)
    assert metrics.output_nmse(logits, reference) == pytest.approx(
        np.sum((logits - reference) ** 2) / np.sum(reference**2))


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """20 test digits in class folders, copied from the example."""
    root = tmp_path_factory.mktemp("digits")
    for cls in ("0", "1"):
        src = os.path.join(example.TEST_IMAGES, cls)
        os.makedirs(root / cls)
        for name in sorted(os.listdir(src))[:10]:
            shutil.copy(os.path.join(src, name), root / cls / name)
    return root


def test_evaluate_cli_with_reference_and_saved_logits(small_folder, tmp_path):
    saved = tmp_path / "logits.npz"
    res = run("mrc_ref.evaluate", example.WEIGHTS, small_folder, "--reference", example.WEIGHTS,
              "--save-logits", saved, "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["images"] == 20 and out["top1"] >= 0.9
    assert out["top1_agreement"] == 1.0 and out["mean_kl"] == pytest.approx(0, abs=1e-12)
    data = np.load(saved)
    assert data["logits"].shape == (20, 10)
    np.testing.assert_array_equal(data["labels"], [0] * 10 + [1] * 10)
    assert metrics.topk_accuracy(data["logits"], data["labels"]) == out["top1"]


def test_evaluate_flat_folder_without_labels(small_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted((small_folder / "1").iterdir())):
        shutil.copy(path, flat / f"{i}.png")
    res = run("mrc_ref.evaluate", example.WEIGHTS, flat, "--reference", example.WEIGHTS, "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "top1" not in out and out["top1_agreement"] == 1.0


def bad_folders(root):
    (root / "empty").mkdir()
    unreadable = root / "unreadable" / "0"
    unreadable.mkdir(parents=True)
    (unreadable / "x.png").write_bytes(b"not a png at all")
    truncated = root / "truncated" / "0"
    truncated.mkdir(parents=True)
    blob = open(os.path.join(example.TEST_IMAGES, "0", sorted(os.listdir(os.path.join(example.TEST_IMAGES, "0")))[0]), "rb").read()
    (truncated / "x.png").write_bytes(blob[: len(blob) // 2])
    return {"empty": root / "empty", "unreadable": root / "unreadable", "truncated": root / "truncated",
            "missing": root / "nope"}


@pytest.mark.parametrize("module", ["mrc_ref.evaluate", "data_tools.capture"])
@pytest.mark.parametrize("case", ["empty", "unreadable", "truncated", "missing"])
def test_bad_images_exit_2(tmp_path, module, case):
    folder = bad_folders(tmp_path)[case]
    extra = ["-o", tmp_path / "acts.h5"] if module == "data_tools.capture" else []
    res = run(module, example.WEIGHTS, folder, *extra, "--quiet")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert os.path.basename(str(folder)) in lines[0] or "x.png" in lines[0]
    assert not (tmp_path / "acts.h5").exists()


def test_capture_cli_writes_a_readable_file(small_folder, tmp_path):
    out = tmp_path / "acts.h5"
    res = run("data_tools.capture", example.WEIGHTS, small_folder, "-o", out, "--proxy-images", 4, "--quiet")
    assert res.returncode == 0, res.stderr
    from mrc_ref import formats

    with formats.open_activations(out) as f:
        st = formats.read_layer_stats(f, "blocks.0.attn.qkv")
        assert st["rows"] == 20 * 17
        assert formats.read_proxy_tokens(f).shape == (4, 17, 64)


def test_reference_with_other_classes_and_bad_crop_exit_2(small_folder, tmp_path):
    from data_tools import synthetic
    from mrc_ref import formats

    other = tmp_path / "other.safetensors"
    formats.write_safetensors(other, synthetic.make_model(0, classes=5), {"num_heads": "4"})
    for extra, words in ((["--reference", other], "classes"), (["--crop-pct", "1.5"], "--crop-pct")):
        res = run("mrc_ref.evaluate", example.WEIGHTS, small_folder, *extra, "--quiet")
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and words in res.stderr


@pytest.mark.parametrize("bad", ["classes", "truncated"])
def test_a_bad_reference_is_refused_before_any_forward_pass(small_folder, tmp_path, monkeypatch, bad):
    from data_tools import synthetic
    from mrc_ref import evaluate, formats, vit
    from mrc_ref.errors import MrcError

    ref = tmp_path / "ref.safetensors"
    formats.write_safetensors(ref, synthetic.make_model(0, classes=5), {"num_heads": "4"})
    if bad == "truncated":
        ref.write_bytes(ref.read_bytes()[:-100])
    calls = []
    monkeypatch.setattr(vit, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(MrcError, match="classes" if bad == "classes" else "ref.safetensors"):
        evaluate.evaluate_files(example.WEIGHTS, small_folder, reference=str(ref))
    assert calls == []


# ------------------------------------------------------------------ hardening
def _png_header_only(path, width, height):
    """A greyscale PNG that declares ``width × height`` but holds almost no
    pixel data: enough for Pillow to read its size (the header), and cheap
    whatever size it declares."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("module", ["mrc_ref.evaluate", "data_tools.capture"])
@pytest.mark.parametrize("width, height, words", [(12000, 8000, "12000×8000 = 96.0 megapixels"),
                                                  (20000, 10000, "more than 179 megapixels")])
def test_huge_image_refused_in_one_line(tmp_path, module, width, height, words):
    """Over the limit (mrc_ref.images.MAX_PIXELS), below and above
    Pillow's own decompression-bomb error: one line naming the file, no
    warning, nothing written."""
    folder = tmp_path / "imgs" / "0"
    folder.mkdir(parents=True)
    big = folder / "big.png"
    _png_header_only(big, width, height)
    extra = ["-o", tmp_path / "acts.h5"] if module == "data_tools.capture" else []
    res = run(module, example.WEIGHTS, tmp_path / "imgs", *extra, "--quiet")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Warning" not in res.stderr, res.stderr
    assert str(big) in lines[0] and words in lines[0] and "over the limit of 64 megapixels" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_image_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    from mrc_ref import images
    from mrc_ref.errors import MrcError

    path = tmp_path / "x.png"
    _png_header_only(path, 100, 60)  # no valid pixel data: decoding would fail with another message
    monkeypatch.setattr(images, "MAX_PIXELS", 5999)
    with pytest.raises(MrcError, match="100×60 = 0.0 megapixels, over the limit"):
        images.load_image(path, size=16)


@pytest.mark.parametrize("target", ["weights-via-linked-dir", "image-of-the-folder", "reference"])
def test_save_logits_never_overwrites_an_input(small_folder, tmp_path, target):
    weights = tmp_path / "w.safetensors"
    shutil.copy(example.WEIGHTS, weights)
    folder = tmp_path / "imgs"
    shutil.copytree(small_folder, folder)
    os.symlink(tmp_path, tmp_path / "link")
    reference = tmp_path / "ref.safetensors"
    shutil.copy(example.WEIGHTS, reference)
    save = {"weights-via-linked-dir": tmp_path / "link" / "w.safetensors",
            "image-of-the-folder": tmp_path / "link" / "imgs" / "1" / sorted(os.listdir(folder / "1"))[0],
            "reference": tmp_path / "link" / "ref.safetensors"}[target]
    before = {p: open(p, "rb").read() for p in (weights, reference, save)}
    res = run("mrc_ref.evaluate", weights, folder, "--reference", reference, "--save-logits", save, "--quiet")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "would overwrite an input" in lines[0] and str(save) in lines[0]
    assert {p: open(p, "rb").read() for p in before} == before
    assert not [n for n in os.listdir(save.parent) if n.endswith(".tmp")]


def test_non_finite_logits_are_a_one_line_error(small_folder, tmp_path):
    """A NaN in a tensor that only the forward pass reads (the class token) is
    refused by the reader, naming the tensor; finite values whose forward pass
    overflows (a head row of 3e38, in float32) give non-finite logits, blamed
    on the weights file, and no warning. No NaN reaches the --json output."""
    from mrc_ref import formats

    for key, value, message in (("cls_token", np.nan, "cls_token contains NaN or Inf"),
                                ("head.weight", 3e38, "NaN or Inf logits")):
        tensors, meta = formats.read_safetensors(example.WEIGHTS)
        tensors[key] = tensors[key].copy()
        tensors[key][0] = value
        bad = tmp_path / "bad.safetensors"
        formats.write_safetensors(bad, tensors, meta)
        res = run("mrc_ref.evaluate", bad, small_folder, "--json", "--quiet", "--dtype", "float32")
        assert res.returncode == 2 and res.stdout == "", res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and message in lines[0], lines  # one line: no warning
