"""Tests of mrc_ref.images: folder listing, the DeiT eval transform, loading errors."""

import os

import numpy as np
import pytest
from PIL import Image

from mrc_ref import images
from mrc_ref.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    iter_batches,
    list_images,
    load_image,
    model_input_size,
)
from mrc_ref.errors import MrcError

EXAMPLE = os.path.join(os.path.dirname(images.__file__), "example")
MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def _save(path, array=None, mode="RGB", size=(5, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array is None:
        Image.new(mode, size).save(path)
    else:
        Image.fromarray(array).save(path)
    return str(path)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _unnormalise(x):
    """float32 (3, H, W) -> the uint8 pixels it came from."""
    return np.rint((x * STD + MEAN) * 255.0).astype(np.int64)


# ----------------------------------------------------------------- list_images
def test_class_folders_sorted_names_and_files(tmp_path):
    for cls, names in {"b": ["z.png", "a.JPG"], "a": ["2.png", "10.png"], "10": ["x.jpeg"], "2": ["y.bmp"]}.items():
        for n in names:
            _save(tmp_path / cls / n)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _save(tmp_path / "a" / ".hidden.png")
    paths, labels, classes = list_images(tmp_path)
    assert classes == ["10", "2", "a", "b"]
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    assert rel == [os.path.join(*r) for r in [("10", "x.jpeg"), ("2", "y.bmp"), ("a", "10.png"), ("a", "2.png"), ("b", "a.JPG"), ("b", "z.png")]]
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 2, 2, 3, 3]


def test_class_folder_recurses_in_imagefolder_order(tmp_path):
    _save(tmp_path / "c" / "sub" / "a.png")
    _save(tmp_path / "c" / "b.png")
    paths, labels, classes = list_images(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in paths] == [os.path.join("c", "b.png"), os.path.join("c", "sub", "a.png")]
    assert classes == ["c"] and labels.tolist() == [0, 0]


def test_flat_folder_has_no_labels(tmp_path):
    for n in ["b.PNG", "a.webp", "c.tif", "d.gif"]:
        _save(tmp_path / n, mode="RGB" if not n.endswith("gif") else "P")
    (tmp_path / "readme.md").write_text("x")
    paths, labels, classes = list_images(tmp_path)
    assert [os.path.basename(p) for p in paths] == ["a.webp", "b.PNG", "c.tif", "d.gif"]
    assert labels is None and classes is None


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "empty_class", "mixed"])
def test_list_images_errors_name_the_folder(tmp_path, case):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    if case == "no_images":
        (folder / "a.txt").write_text("x")
    if case == "empty_class":
        _save(folder / "cat" / "1.png")
        (folder / "dog").mkdir()
    if case == "mixed":
        _save(folder / "cat" / "1.png")
        _save(folder / "loose.png")
    with pytest.raises(MrcError) as info:
        list_images(folder)
    assert str(folder) in str(info.value)
    assert "\n" not in str(info.value)


def test_list_images_on_a_file_is_an_error(tmp_path):
    path = _save(tmp_path / "one.png")
    with pytest.raises(MrcError, match="one.png"):
        list_images(path)


# ----------------------------------------------------------------- eval_transform
@pytest.mark.parametrize("h, top", [(19, 2), (20, 3), (21, 4), (16, 1)])
def test_identity_resize_and_exact_crop_offsets(h, top):
    # size 14, crop_pct 0.875 -> shorter side int(14 / 0.875) = 16 = the width:
    # the resize is the identity and the crop is exact; round() is Python's
    # (half to even), as in torchvision: (19-14)/2 = 2.5 -> 2, (21-14)/2 = 3.5 -> 4.
    pix = _rgb(h, 16)
    x = eval_transform(Image.fromarray(pix), size=14, crop_pct=0.875)
    assert x.shape == (3, 14, 14) and x.dtype == np.float32
    np.testing.assert_array_equal(_unnormalise(x), pix[top : top + 14, 1:15].transpose(2, 0, 1))


def test_wide_image_crop_offsets():
    # width is longer: (H, W) = (16, 23), left = round(9 / 2) = round(4.5) = 4
    pix = _rgb(16, 23, seed=1)
    x = eval_transform(pix, size=14)
    np.testing.assert_array_equal(_unnormalise(x), pix[1:15, 4:18].transpose(2, 0, 1))


def test_normalisation_numbers():
    pix = np.zeros((16, 16, 3), dtype=np.uint8)
    pix[..., 0] = 255
    pix[..., 1] = 128
    x = eval_transform(pix, size=16, crop_pct=1.0)
    expected = np.array([(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225])
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, 0], 2.2489083, rtol=1e-6)
    np.testing.assert_allclose(x[2, 0, 0], -1.8044444, rtol=1e-6)
    assert np.all(x == x[:, :1, :1])


def test_custom_mean_std():
    pix = np.full((4, 4, 3), 51, dtype=np.uint8)  # 0.2
    x = eval_transform(pix, size=4, crop_pct=1.0, mean=(0.0, 0.1, 0.2), std=(1.0, 0.5, 0.25))
    np.testing.assert_allclose(x[:, 0, 0], [0.2, 0.2, 0.0], atol=1e-6)


def test_bicubic_resize_then_centre_crop_against_pillow():
    # (H, W) = (20, 30), size 16: shorter side -> 18, longer int(18 * 30 / 20) = 27;
    # crop top round(2 / 2) = 1, left round(11 / 2) = round(5.5) = 6.
    pix = _rgb(20, 30, seed=2)
    resized = np.asarray(Image.fromarray(pix).resize((27, 18), Image.BICUBIC))
    expected = resized[1:17, 6:22].transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    expected = (expected - MEAN) / STD
    np.testing.assert_array_equal(eval_transform(Image.fromarray(pix), size=16), expected)


def test_default_size_is_deit():
    assert eval_transform(Image.new("RGB", (300, 260)), crop_pct=0.9).shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK", "I", "F"])
def test_modes_become_rgb(mode):
    x = eval_transform(Image.new(mode, (10, 12)), size=8)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32


def test_greyscale_is_replicated_on_three_channels():
    grey = np.random.default_rng(3).integers(0, 256, size=(16, 16), dtype=np.uint8)
    x = eval_transform(Image.fromarray(grey), size=16, crop_pct=1.0)
    pix = _unnormalise(x)
    assert np.all(pix[0] == grey) and np.all(pix[1] == grey) and np.all(pix[2] == grey)


def test_rgba_drops_alpha():
    rgba = np.concatenate([_rgb(8, 8, seed=4), np.zeros((8, 8, 1), np.uint8)], axis=2)
    x = eval_transform(Image.fromarray(rgba), size=8, crop_pct=1.0)
    np.testing.assert_array_equal(_unnormalise(x), rgba[..., :3].transpose(2, 0, 1))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 10], [257 * 200, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    x = load_image(path, size=2, crop_pct=1.0)
    np.testing.assert_array_equal(_unnormalise(x)[1], [[0, 10], [200, 255]])


def test_unsupported_mode():
    with pytest.raises(MrcError, match="unsupported image mode"):
        eval_transform(Image.new("La", (4, 4)), size=4)


def test_unsupported_mode_names_the_file(tmp_path, monkeypatch):
    path = _save(tmp_path / "odd.png", mode="L")

    def refuse(self, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(MrcError, match="unsupported image mode") as info:
        load_image(path, size=4)
    assert path in str(info.value)


@pytest.mark.parametrize("crop_pct, size", [(0.0, 16), (1.5, 16), (0.875, 0)])
def test_bad_transform_arguments(crop_pct, size):
    with pytest.raises(MrcError):
        eval_transform(Image.new("RGB", (8, 8)), size=size, crop_pct=crop_pct)


# ----------------------------------------------------------------- load_image
def test_load_image_matches_eval_transform(tmp_path):
    pix = _rgb(20, 25, seed=5)
    path = _save(tmp_path / "a.png", pix)
    np.testing.assert_array_equal(load_image(path, size=16), eval_transform(Image.fromarray(pix), size=16))


@pytest.mark.parametrize("case", ["missing", "not_an_image", "truncated", "empty", "directory"])
def test_load_image_errors_name_the_file(tmp_path, case):
    path = tmp_path / "bad.png"
    if case == "not_an_image":
        path.write_text("this is not a PNG")
    elif case == "truncated":
        _save(path, _rgb(64, 64, seed=6))
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    with pytest.raises(MrcError) as info:
        load_image(path, size=8)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- iter_batches
def _class_tree(root, counts):
    for c, n in enumerate(counts):
        for i in range(n):
            _save(root / f"c{c}" / f"{i:02d}.png", _rgb(10, 12, seed=10 * c + i))


def test_iter_batches_shapes_labels_and_order(tmp_path):
    _class_tree(tmp_path, [3, 4])
    paths, labels, _ = list_images(tmp_path)
    batches = list(iter_batches(tmp_path, 3, size=8))
    assert [b[0].shape for b in batches] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int64 for b in batches)
    assert np.concatenate([b[1] for b in batches]).tolist() == labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert sum((b[2] for b in batches), []) == paths
    np.testing.assert_array_equal(batches[1][0][2], load_image(paths[5], size=8))


def test_iter_batches_limit(tmp_path):
    _class_tree(tmp_path, [3, 4])
    batches = list(iter_batches(tmp_path, 3, size=8, limit=4))
    assert [len(b[2]) for b in batches] == [3, 1]
    assert np.concatenate([b[1] for b in batches]).tolist() == [0, 0, 0, 1]
    assert sum(len(b[2]) for b in iter_batches(tmp_path, 5, size=8, limit=100)) == 7


def test_iter_batches_flat_folder(tmp_path):
    for i in range(5):
        _save(tmp_path / f"{i}.jpg", _rgb(9, 9, seed=i))
    batches = list(iter_batches(tmp_path, 2, size=8, crop_pct=1.0))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert all(b[1] is None for b in batches)


def test_iter_batches_checks_at_call_time(tmp_path):
    with pytest.raises(MrcError, match="nowhere"):
        iter_batches(tmp_path / "nowhere", 4, size=8)
    with pytest.raises(MrcError):
        iter_batches(tmp_path, 0, size=8)


def test_iter_batches_bad_file_named_while_iterating(tmp_path):
    _class_tree(tmp_path, [2])
    bad = tmp_path / "c0" / "01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    it = iter_batches(tmp_path, 1, size=8)
    next(it)
    with pytest.raises(MrcError, match="01.png"):
        next(it)


# ----------------------------------------------------------------- model_input_size
def _params(tokens, patch, dim=8, dist=False):
    p = {"pos_embed": np.zeros((1, tokens, dim), np.float32), "patch_embed.proj.weight": np.zeros((dim, 3, patch, patch), np.float32)}
    if dist:
        p["dist_token"] = np.zeros((1, 1, dim), np.float32)
    return p


@pytest.mark.parametrize(
    "tokens, patch, dist, size",
    [(197, 16, False, 224), (198, 16, True, 224), (17, 4, False, 16), (50, 32, False, 224), (577, 16, False, 384), (6, 7, True, 14)],
)
def test_model_input_size(tokens, patch, dist, size):
    assert model_input_size(_params(tokens, patch, dist=dist)) == size


@pytest.mark.parametrize(
    "params",
    [_params(198, 16), _params(197, 16, dist=True), _params(1, 16), {"pos_embed": np.zeros((1, 17, 8))}, {"patch_embed.proj.weight": np.zeros((8, 3, 4, 4))},
     {"pos_embed": np.zeros((17, 8)), "patch_embed.proj.weight": np.zeros((8, 3, 4, 4))}],
)
def test_model_input_size_errors(params):
    with pytest.raises(MrcError):
        model_input_size(params)


# ----------------------------------------------------------------- the shipped example
def test_shipped_example_layout():
    if not os.path.isdir(EXAMPLE):
        pytest.skip("data_tools/example not generated")
    from mrc_ref.formats import read_safetensors

    params, meta = read_safetensors(os.path.join(EXAMPLE, "model.safetensors"))
    assert meta["num_heads"] == "4"
    assert model_input_size(params) == 16
    assert all(v.dtype == np.float32 for v in params.values())
    for split, n in [("calib", 300), ("test", 497)]:
        paths, labels, classes = list_images(os.path.join(EXAMPLE, "images", split))
        assert len(paths) == n and classes == [str(c) for c in range(10)]
        assert np.bincount(labels).min() >= n // 10 - 3
    x, y, _ = next(iter_batches(os.path.join(EXAMPLE, "images", "test"), 4, size=16))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 0]
