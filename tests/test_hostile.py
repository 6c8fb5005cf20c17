"""The hostile-input matrix: every command line × every file kind it reads ×
each corruption class (docs/cli.md, "Exit codes and errors").

Classes: truncated; wrong dtype; NaN/Inf; a huge declared shape or count; an
unknown version; an attribute of the wrong type; a link, FIFO or loop; an
output equal to an input by any path. Each case asserts exit code 2, one
stderr line naming the problem, no Python warning, nothing written, and the
inputs unchanged (by hash). A command or file kind added to mrc_ref joins
this table in the same change (``test_every_command_is_in_the_matrix``).
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import warnings

import h5py
import numpy as np
import pytest

from data_tools import synthetic
from helpers import command_modules
from mrc_ref import formats, pipeline

#: Commands of the matrix: module, program name.
COMMANDS = {
    "compress": ("mrc_ref.compress.__main__", "python -m mrc_ref.compress"),
    "evaluate": ("mrc_ref.evaluate.__main__", "python -m mrc_ref.evaluate"),
    "verify": ("mrc_ref.verify.__main__", "python -m mrc_ref.verify"),
    "report": ("mrc_ref.report.__main__", "python -m mrc_ref.report"),
    "capture": ("data_tools.capture.__main__", "python -m data_tools.capture"),
    "merge": ("data_tools.merge.__main__", "python -m data_tools.merge"),
    "distributed": ("data_tools.distributed.__main__", "python -m data_tools.distributed"),
    "sensitivity": ("data_tools.sensitivity.__main__", "python -m data_tools.sensitivity"),
    "convert": ("data_tools.convert.__main__", "python -m data_tools.convert"),
    "export": ("mrc_ref.export.__main__", "python -m mrc_ref.export"),
}
#: Commands outside the matrix, and why.
NOT_IN_MATRIX = {
    "mrc_ref.cases.__main__": "reads only the shipped cases (their hashes are checked: tests/test_cases.py)",
    "data_tools.synthetic.__main__": "reads no file",
    "data_tools.example_table": "reads only the embedded example",
    "data_tools.sensitivity_table": "reads only the embedded example",
    "data_tools.train_example": "reads scikit-learn's digits (a maintainer's script)",
}


# ----------------------------------------------------------------- the world every case starts from
def _png(path, size=(12, 12), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Valid inputs of every kind, written once: weights, statistics,
    compressed (float and int8), sensitivity file, a labelled image folder,
    two capture parts and a PEFT directory."""
    from data_tools.capture import run as capture
    from mrc_ref.compress import compress_files

    d = tmp_path_factory.mktemp("pristine")
    weights, acts = synthetic.write_example(str(d), depth=1, dim=64, img_size=16)
    config = pipeline.Config(reduction=0.5, compensation="local", residual_rank=2)
    compress_files(weights, acts, str(d / "comp.safetensors"), config)
    compress_files(weights, acts, str(d / "comp8.safetensors"), config, quantize="int8")
    tensors, _ = formats.read_safetensors(weights)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    formats.write_sensitivity(str(d / "sens.json"), "logits nmse", {n: {"weight": 1.0 + i} for i, n in enumerate(names)})
    for c in range(2):
        os.makedirs(d / "images" / str(c))
        for i in range(2):
            _png(d / "images" / str(c) / f"{i}.png", seed=2 * c + i)
    for k in range(2):
        capture(weights, str(d / "images"), str(d / f"part{k}.h5"), shard=(k, 2), proxy_images=4, quiet=True)
    peft = d / "peft"
    peft.mkdir()
    pair = {}
    for n in names:
        m, k = tensors[n + ".weight"].shape
        pair[f"base_model.model.{n}.lora_A.weight"] = np.ones((2, k), np.float32)
        pair[f"base_model.model.{n}.lora_B.weight"] = np.ones((m, 2), np.float32)
    formats.write_safetensors(str(peft / "adapter_model.safetensors"), pair)
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (d / "out").mkdir()
    from PIL import Image

    Image.new("RGB", (8000, 8000)).save(d / "big.png")  # 64 MP colour: 0.26 GB decoded, over MAX_IMAGE_BYTES
    return d


@pytest.fixture
def w(pristine, tmp_path):
    """A fresh copy of the world, as paths."""
    root = tmp_path / "w"
    shutil.copytree(pristine, root)
    names = {"weights": "weights.safetensors", "acts": "acts.h5", "comp": "comp.safetensors",
             "comp8": "comp8.safetensors", "sens": "sens.json", "images": "images", "part0": "part0.h5",
             "part1": "part1.h5", "peft": "peft", "out": "out", "big": "big.png"}
    return {k: str(root / v) for k, v in names.items()} | {"root": str(root)}


# ----------------------------------------------------------------- corruptions
def cut(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    return path


def fifo(path):
    os.remove(path)
    os.mkfifo(path)
    return path


def loop(path):
    os.remove(path)
    os.symlink(os.path.basename(path), path)  # a link to itself
    return path


def edit_tensors(path, fn, meta=None):
    tensors, metadata = formats.read_safetensors(path)
    fn(tensors)
    metadata.update(meta or {})
    formats.write_safetensors(path, tensors, {k: v for k, v in metadata.items() if v is not None})
    return path


def first_weight(tensors):
    """The first block matrix: a dense weight or a factor."""
    return next(k for k in tensors if k.startswith("blocks.") and k.endswith((".weight", ".lowrank_a"))
                and tensors[k].ndim == 2)


def huge_header(path):
    """A tensor that declares a 10⁹ × 10⁹ shape (its offsets unchanged)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        rest = fh.read()
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [10**9, 10**9]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + rest)
    return path


def h5_edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def first_layer(f):
    return f["layers"][sorted(f["layers"])[0]]


def replace(group, key, data):
    del group[key]
    group.create_dataset(key, data=data)


def nan_gram(f):
    g = first_layer(f)
    a = g["gram"][()]
    a[0, 0] = np.nan
    replace(g, "gram", a)


def asymmetric_gram(f):
    g = first_layer(f)
    a = g["gram"][()]
    a[0, 1] += 1e3 * np.abs(a).max()
    replace(g, "gram", a)


def indefinite_gram(f):
    g = first_layer(f)
    a = g["gram"][()]
    replace(g, "gram", a - 2 * np.abs(np.linalg.eigvalsh(a)).max() * np.eye(len(a)))


def declare_huge(f):
    g = first_layer(f)
    del g["gram"]
    g.create_dataset("gram", shape=(100_000, 100_000), dtype="f8")  # declared, never written


def same_as(kind, target, out_dir):
    """An output path that names ``target`` by another spelling."""
    if kind == "symlink":
        link = os.path.join(out_dir, "link.out")
        os.symlink(target, link)
        return link
    if kind == "hardlink":
        link = os.path.join(out_dir, "hard.out")
        os.link(target, link)
        return link
    return os.path.join(out_dir, "..", os.path.relpath(target, os.path.dirname(out_dir)))  # dir/../file


# ----------------------------------------------------------------- the cases: (argv, fragment of the message)
def _compress(w, **o):
    return [o.get("weights", w["weights"]), o.get("acts", w["acts"]), "-o", o.get("out", w["out"] + "/c.safetensors"),
            "--quiet", *o.get("extra", [])]


def _evaluate(w, **o):
    return [o.get("model", w["comp"]), o.get("images", w["images"]), "--quiet", *o.get("extra", [])]


def _verify(w, **o):
    return [o.get("comp", w["comp"]), o.get("weights", w["weights"]), o.get("acts", w["acts"]), "--quiet",
            *o.get("extra", [])]


def _report(w, **o):
    return [o.get("weights", w["weights"]), o.get("acts", w["acts"]), o.get("images", w["images"]),
            "-o", o.get("out", w["out"] + "/rep"), "--quiet", "--reductions", "0.5", *o.get("extra", [])]


def _capture(w, **o):
    return [o.get("weights", w["weights"]), o.get("images", w["images"]), "-o", o.get("out", w["out"] + "/a.h5"),
            "--quiet"]


def _merge(w, **o):
    return [*o.get("parts", [w["part0"], w["part1"]]), "-o", o.get("out", w["out"] + "/m.h5"), "--quiet"]


def _sensitivity(w, **o):
    return [o.get("weights", w["weights"]), o.get("acts", w["acts"]), "-o", o.get("out", w["out"] + "/s.json"),
            "--quiet", "--images", o.get("images", w["images"])]


def _convert(w, **o):
    return [o.get("src", w["weights"]), "-o", o.get("out", w["out"] + "/x.safetensors")]


def _export(w, **o):
    return [o.get("model", w["comp"]), "-o", o.get("out", w["out"] + "/m.onnx")]


def _distributed(w, **o):
    return [w["weights"], o.get("images", w["images"]), "-o", o["out"], "--dask", "tcp://127.0.0.1:9", "--quiet"]



def weights_corruptions(dtype_words):
    """Corruption class -> (corrupt(path), words expected in the message) of
    a weights file (``dtype_words``: the words for a wrong dtype; None: any)."""
    return {
        "truncated": (cut, "truncated"),
        "wrong dtype": (lambda p: edit_tensors(p, lambda t: t.update(
            {first_weight(t): t[first_weight(t)].astype(np.int32)})), dtype_words),
        "nan": (lambda p: edit_tensors(p, lambda t: t[first_weight(t)].__setitem__((0, 0), np.nan)), "NaN"),
        "huge shape": (huge_header, "data_offsets"),
        "unknown version": (lambda p: edit_tensors(p, lambda t: None, {"format": "mrc_ref.compressed",
                                                                       "version": "7"}), "unsupported version"),
        "attribute type": (lambda p: edit_tensors(p, lambda t: None, {"num_heads": "four"}), "num_heads"),
        "fifo": (fifo, "not a regular file"),
        "loop": (loop, "cannot read"),
    }

def weights_cases():
    """The model file read by compress, evaluate, verify, report, capture, sensitivity, convert."""
    runs = {"compress": lambda w, p: _compress(w, weights=p), "evaluate": lambda w, p: _evaluate(w, model=p),
            "verify": lambda w, p: _verify(w, weights=p), "report": lambda w, p: _report(w, weights=p),
            "capture": lambda w, p: _capture(w, weights=p), "sensitivity": lambda w, p: _sensitivity(w, weights=p),
            "convert": lambda w, p: _convert(w, src=p), "export": lambda w, p: _export(w, model=p)}
    corruptions = weights_corruptions(dtype_words=None)
    for command, run in runs.items():
        for label, (corrupt, fragment) in corruptions.items():
            if label == "attribute type" and command in ("compress", "verify", "convert"):
                continue  # they do not read num_heads (compress: no proxy tokens here)
            yield (f"{command}/weights/{label}", command,
                   lambda w, run=run, corrupt=corrupt, name=("comp" if command in ("evaluate", "export") else "weights"):
                   run(w, corrupt(w[name])), fragment)


def acts_cases():
    runs = {"compress": lambda w, p: _compress(w, acts=p), "verify": lambda w, p: _verify(w, acts=p),
            "report": lambda w, p: _report(w, acts=p), "sensitivity": lambda w, p: _sensitivity(w, acts=p),
            "merge": lambda w, p: _merge(w, parts=[p, w["part1"]])}
    corruptions = {
        "truncated": (cut, "HDF5"),
        "wrong dtype": (lambda p: h5_edit(p, lambda f: replace(first_layer(f), "gram",
                                                                first_layer(f)["gram"][()].astype(np.int64))),
                        "dtype"),
        "nan": (lambda p: h5_edit(p, nan_gram), "NaN"),
        "huge shape": (lambda p: h5_edit(p, declare_huge), "100000"),
        "unknown version": (lambda p: h5_edit(p, lambda f: f.attrs.__setitem__("version", 2)),
                            "unsupported version"),
        "attribute type": (lambda p: h5_edit(p, lambda f: first_layer(f).attrs.__setitem__("rows", "many")),
                           "rows"),
        "fifo": (fifo, "not a regular file"),
        "loop": (loop, "cannot read"),
    }
    for command, run in runs.items():
        for label, (corrupt, fragment) in corruptions.items():
            name = "part0" if command == "merge" else "acts"
            yield (f"{command}/acts/{label}", command,
                   lambda w, run=run, corrupt=corrupt, name=name: run(w, corrupt(w[name])), fragment)


def parts_cases():
    def attr(key, value):
        return lambda p: h5_edit(p, lambda f: f.attrs.__setitem__(key, value))

    corruptions = {
        "shard index not an integer": (attr("shard_index", "one"), "shard_index"),
        "shard index a float": (attr("shard_index", 1.9), "shard_index"),
        "huge shard count": (attr("shard_count", 10**12), "shard"),
        "no image at all": (lambda p: h5_edit(p, lambda f: [f.attrs.__setitem__(k, 0) for k in
                                                           ("images_total", "num_images")]), "no image"),
        "other proxy shape": (lambda p: h5_edit(p, lambda f: replace(f["proxy"], "tokens",
                                                                     np.zeros((1, 3, 5), np.float32))), "proxy"),
        **{f"{key} an array": (attr(key, np.array([1, 1])), key)
           for key in ("shard_index", "shard_count", "images_total", "num_images")},
        "rows an array": (lambda p: h5_edit(p, lambda f: first_layer(f).attrs.__setitem__("rows", np.array([4, 4]))),
                          "rows"),
        "rows zero": (lambda p: h5_edit(p, lambda f: first_layer(f).attrs.__setitem__("rows", 0)), "rows"),
        "batch size not an integer": (attr("batch_size", "x"), "batch_size"),
        "hash not a string": (attr("weights_sha256", np.array([1, 2])), "weights_sha256"),
        "asymmetric gram": (lambda p: h5_edit(p, asymmetric_gram), "not symmetric"),
        "gram not positive semi-definite": (lambda p: h5_edit(p, indefinite_gram), "semi-definite"),
    }
    for label, (corrupt, fragment) in corruptions.items():
        yield (f"merge/part/{label}", "merge",
               lambda w, corrupt=corrupt: _merge(w, parts=[w["part0"], corrupt(w["part1"])]), fragment)


def sensitivity_cases():
    def doc(edit):
        def corrupt(p):
            with open(p) as fh:
                d = json.load(fh)
            text = edit(d)
            with open(p, "w") as fh:
                fh.write(text if isinstance(text, str) else json.dumps(d))
            return p
        return corrupt

    first = lambda d: next(iter(d["layers"].values()))  # noqa: E731
    corruptions = {
        "truncated": (cut, "JSON"),
        "wrong type": (doc(lambda d: first(d).__setitem__("weight", "0.5")), "weight must be a number"),
        "nan": (doc(lambda d: json.dumps(d).replace('"weight": 1.0', '"weight": NaN', 1)), "finite"),
        "huge number": (doc(lambda d: json.dumps(d).replace('"weight": 1.0', '"weight": ' + "9" * 401, 1)),
                        "finite"),
        "sum overflows": (doc(lambda d: [e.__setitem__("weight", 1e308) for e in d["layers"].values()]),
                          "largest float64"),
        "unknown version": (doc(lambda d: d.__setitem__("version", 2)), "unsupported version"),
        "unknown layer": (doc(lambda d: d["layers"].__setitem__("blocks.9.mlp.fc1", {"weight": 1.0})),
                          "no such linear layer"),
        "fifo": (fifo, "not a regular file"),
    }
    for command, run in {"compress": lambda w, p: _compress(w, extra=["--sensitivity", p]),
                         "report": lambda w, p: _report(w, extra=["--sensitivity", p])}.items():
        for label, (corrupt, fragment) in corruptions.items():
            yield (f"{command}/sensitivity/{label}", command,
                   lambda w, run=run, corrupt=corrupt: run(w, corrupt(w["sens"])), fragment)


def ranks_entry(value):
    def corrupt(p):
        ranks = json.loads(formats.read_safetensors(p)[1]["ranks"])
        name = next(n for n, r in ranks.items() if r is not None)
        return edit_tensors(p, lambda t: None, {"ranks": json.dumps(dict(ranks, **{name: value}))})
    return corrupt


def stray_scale(dtype):
    def add(t):
        bias = next(k for k in t if k.endswith(".bias"))
        t[bias + ".scale"] = np.ones(t[bias].shape, dtype)
    return lambda p: edit_tensors(p, add)


def residual_above_min(p, q=100):
    """The first factored layer's residual pair made rank ``q`` (100 > min(m, n)
    = 64; or 60, with r + q above 64), its metadata updated to match (so only
    the rank is wrong)."""
    tensors, meta = formats.read_safetensors(p)
    name = next(k[: -len(".residual_p")] for k in tensors if k.endswith(".residual_p"))
    m, n = tensors[name + ".lowrank_a"].shape[0], tensors[name + ".lowrank_b"].shape[1]
    rng = np.random.default_rng(0)
    tensors[name + ".residual_p"] = (1e-3 * rng.standard_normal((m, q))).astype(np.float32)
    tensors[name + ".residual_q"] = (1e-3 * rng.standard_normal((q, n))).astype(np.float32)
    meta["residual_ranks"] = json.dumps(dict(json.loads(meta["residual_ranks"]), **{name: q}))
    formats.write_safetensors(p, tensors, meta)
    return p


def compressed_cases():
    def meta(**changes):
        return lambda p: edit_tensors(p, lambda t: None, changes)

    def drop_scale(p):
        return edit_tensors(p, lambda t: t.pop(next(k for k in t if k.endswith(".scale"))))

    corruptions = {
        "truncated": (cut, "truncated", "comp"),
        "unknown version": (meta(version="7"), "unsupported version '7'", "comp"),
        "config of the wrong type": (meta(config=json.dumps({"reduction": "half"})), "stored reduction", "comp"),
        "int8 without its scale": (drop_scale, "has no", "comp8"),
        "fifo": (fifo, "not a regular file", "comp"),
        "ranks of the wrong type": (ranks_entry("x"), "'ranks' entry must be a non-negative integer", "comp"),
        "ranks not the stored count": (ranks_entry(1), "stored factors have", "comp"),
        "unknown format": (meta(format="mrc_ref.compressed2"), "unknown format", "comp"),
        "stray float scale": (stray_scale(np.float32), "not int8", "comp"),
        "int8 scale on a float tensor": (stray_scale(np.int8), "not int8", "comp8"),
    }
    for command, run in {"verify": lambda w, p: _verify(w, comp=p), "evaluate": lambda w, p: _evaluate(w, model=p),
                         "export": lambda w, p: _export(w, model=p)}.items():
        for label, (corrupt, fragment, name) in corruptions.items():
            if command == "evaluate" and label == "config of the wrong type":
                fragment = "stored reduction"
            yield (f"{command}/compressed/{label}", command,
                   lambda w, run=run, corrupt=corrupt, name=name: run(w, corrupt(w[name])), fragment)
    yield ("verify/compressed/residual rank above min(m, n)", "verify",
           lambda w: _verify(w, comp=residual_above_min(w["comp"]), extra=["--budget", "10000000"]),
           "residual_p/residual_q has rank 100, more than min(m, n)")
    for extra in ([], ["--budget", "10000000"]):  # exit 2 as bad input, not 1 as a failed budget certificate
        yield (f"verify/compressed/rank plus residual above min(m, n){' (budget given)' if extra else ''}", "verify",
               lambda w, extra=extra: _verify(w, comp=residual_above_min(w["comp"], q=60), extra=extra),
               "plus residual rank 60")


def peft_cases():
    def config(doc):
        def corrupt(d):
            with open(os.path.join(d, "adapter_config.json"), "w") as fh:
                fh.write(doc if isinstance(doc, str) else json.dumps(doc))
            return d
        return corrupt

    corruptions = {
        "truncated": (config('{"peft_type": "LORA", "r": '), "JSON"),
        "attribute type": (config({"peft_type": "LORA", "r": "2", "lora_alpha": 4}), "r must be a positive integer"),
        "unknown version": (config({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}), "use_dora"),
        "no adapter file": (lambda d: (os.remove(os.path.join(d, "adapter_model.safetensors")), d)[1], "no such file"),
        "fifo": (lambda d: (fifo(os.path.join(d, "adapter_config.json")), d)[1], "not a regular file"),
    }
    for label, (corrupt, fragment) in corruptions.items():
        yield (f"verify/peft/{label}", "verify", lambda w, corrupt=corrupt: _verify(w, comp=corrupt(w["peft"])),
               fragment)


def reference_cases():
    """evaluate --reference: a model file, read by the one model reader, with
    the corruptions of the weights (the reference is a copy of WEIGHTS)."""
    corruptions = weights_corruptions(dtype_words="dtype")

    def reference(w):
        path = os.path.join(w["root"], "ref.safetensors")
        shutil.copy(w["weights"], path)
        return path

    for label, (corrupt, fragment) in corruptions.items():
        yield (f"evaluate/reference/{label}", "evaluate",
               lambda w, corrupt=corrupt: _evaluate(w, extra=["--reference", corrupt(reference(w))]),
               fragment)


def config_cases():
    """convert's config.json (read when --num-heads is not given): blamed on config.json."""
    def config(text):
        def corrupt(w):
            path = os.path.join(w["root"], "config.json")
            if text is None:
                os.mkfifo(path)
            else:
                with open(path, "w") as fh:
                    fh.write(text)
            return w["weights"]
        return corrupt

    corruptions = {
        "truncated": (config('{"num_attention_heads": '), "not a valid JSON"),
        "attribute type": (config('{"num_attention_heads": true}'), "num_attention_heads must be a positive integer"),
        "zero heads": (config('{"num_attention_heads": 0}'), "num_attention_heads must be a positive integer"),
        "heads not dividing the width": (config('{"num_attention_heads": 3}'),
                                         "num_attention_heads = 3 does not divide the model width"),
        "not an object": (config("[2]"), "is not a JSON object"),
        "fifo": (config(None), "cannot read: not a regular file"),
    }
    for label, (corrupt, fragment) in corruptions.items():
        yield (f"convert/config/{label}", "convert", lambda w, corrupt=corrupt: _convert(w, src=corrupt(w)),
               "config.json: " + fragment)


def image_cases():
    def huge_png(w):
        from PIL import Image

        path = os.path.join(w["images"], "0", "wide.png")
        Image.new("L", (64_000_000, 1)).save(path)  # at the pixel limit, but its resize alone would take 62 GB
        return w["images"]

    def cut_png(w):
        cut(os.path.join(w["images"], "1", "0.png"))
        return w["images"]

    def huge_decoded(w):
        shutil.copy(w["big"], os.path.join(w["images"], "1", "big.png"))
        return w["images"]

    def folder_replaced(make):
        def corrupt(w):
            shutil.rmtree(w["images"])
            make(w["images"])
            return w["images"]
        return corrupt

    def link_into_other_class(target):
        def corrupt(w):
            os.symlink(target, os.path.join(w["images"], "0", "other" + os.path.splitext(target)[1]))
            return w["images"]
        return corrupt

    def hard_link_across_classes(w):
        os.link(os.path.join(w["images"], "1", "0.png"), os.path.join(w["images"], "0", "same.png"))
        return w["images"]

    corruptions = {
        "truncated": (cut_png, "cannot read image", False),
        "huge after resizing": (huge_png, "megapixels", False),
        "huge decoded": (huge_decoded, "MB per image", False),
        "fifo": (folder_replaced(os.mkfifo), "not a folder", True),
        "loop": (folder_replaced(lambda p: os.symlink(os.path.basename(p), p)), "not a folder", True),
        "link to a file of another class": (link_into_other_class("../1/0.png"), "reached from classes '0' and '1'",
                                            True),
        "link to another class folder": (link_into_other_class("../1"), "reached from classes '0' and '1'", True),
        "hard link across classes": (hard_link_across_classes, "reached from classes '0' and '1'", True),
    }
    commands = {"evaluate": lambda w, p: _evaluate(w, images=p), "capture": lambda w, p: _capture(w, images=p),
                "report": lambda w, p: _report(w, images=p), "sensitivity": lambda w, p: _sensitivity(w, images=p),
                "distributed": lambda w, p: _distributed(w, images=p, out=w["out"] + "/d.h5")}
    for label, (corrupt, fragment, walk) in corruptions.items():
        for command, run in commands.items():
            if command == "distributed" and not walk:
                continue  # decoding runs on the cluster's workers (tests/test_distributed.py)
            yield (f"{command}/images/{label}", command, lambda w, run=run, corrupt=corrupt: run(w, corrupt(w)),
                   fragment)


def output_cases():
    spellings = ("symlink", "hardlink", "dotdot")
    outputs = {"compress": (lambda w, o: _compress(w, out=o), "weights"),
               "evaluate": (lambda w, o: _evaluate(w, extra=["--save-logits", o]), "comp"),
               "verify": (lambda w, o: _verify(w, extra=["--report", o]), "acts"),
               "capture": (lambda w, o: _capture(w, out=o), "image"),
               "distributed": (lambda w, o: _distributed(w, out=o), "image"),
               "merge": (lambda w, o: _merge(w, out=o), "part1"),
               "sensitivity": (lambda w, o: _sensitivity(w, out=o), "acts"),
               "convert": (lambda w, o: _convert(w, out=o), "weights"),
               "export": (lambda w, o: _export(w, out=o), "comp")}
    for i, (command, (run, target)) in enumerate(outputs.items()):
        for spelling in (spellings[i % 3], spellings[(i + 1) % 3]):
            def build(w, run=run, target=target, spelling=spelling):
                path = os.path.join(w["images"], "0", "0.png") if target == "image" else w[target]
                return run(w, same_as(spelling, path, w["out"]))
            yield f"{command}/output/{spelling}", command, build, "overwrite"
    yield ("compress/output/report over the model", "compress",
           lambda w: _compress(w, extra=["--report", same_as("symlink", w["weights"], w["out"])]), "overwrite")
    yield ("report/output/inside the images", "report", lambda w: _report(w, out=os.path.join(w["images"], "r")),
           "inside the image folder")
    yield ("report/output/unwritable", "report", lambda w: _report(w, out="/proc/mrc-report"),
           "cannot create the output directory")
    yield ("report/output/missing parent", "report", lambda w: _report(w, out=w["out"] + "/no/rep"),
           "parent of the output directory does not exist")
    yield ("report/output/file over an image", "report",
           lambda w: _report(w, out=_report_dir_with_link(w)), "overwrite")
    writers = {"capture": lambda w, o: _capture(w, out=o), "distributed": lambda w, o: _distributed(w, out=o),
               "evaluate": lambda w, o: _evaluate(w, extra=["--save-logits", o]),
               "sensitivity": lambda w, o: _sensitivity(w, out=o)}
    for command, run in writers.items():  # the one output check of every writer that reads images
        yield (f"{command}/output/new file named like an image", command,
               lambda w, run=run: run(w, os.path.join(w["images"], "1", "new.png")), "inside the image folder")
        yield (f"{command}/output/new file in the images", command,
               lambda w, run=run: run(w, os.path.join(w["images"], "out.bin")), "inside the image folder")
        yield (f"{command}/output/an image", command,
               lambda w, run=run: run(w, os.path.join(w["images"], "0", "0.png")), "overwrite")
        for spelling in ("symlink", "hardlink"):
            yield (f"{command}/output/{spelling} to an image", command,
                   lambda w, run=run, spelling=spelling: run(w, same_as(spelling, os.path.join(w["images"], "0", "1.png"),
                                                                          w["out"])), "image")


def _report_dir_with_link(w):
    """An existing report folder whose report.md is a hard link to an image."""
    directory = os.path.join(w["out"], "rep")
    os.mkdir(directory)
    os.link(os.path.join(w["images"], "0", "0.png"), os.path.join(directory, "report.md"))
    return directory


CASES = [*weights_cases(), *acts_cases(), *parts_cases(), *sensitivity_cases(), *compressed_cases(), *peft_cases(),
         *reference_cases(), *config_cases(), *image_cases(), *output_cases()]


def _snapshot(root):
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[path] = ("file", hashlib.sha256(fh.read()).hexdigest())
            elif os.path.isdir(path):
                out[path] = ("dir",)
            else:
                out[path] = ("special",)
    return out


class _Timeout(Exception):
    pass


def _run(command, argv):
    """``main(argv)`` in this process, with its stderr and warnings, under a
    30 s alarm (a command that opens a FIFO would block forever)."""
    import importlib

    module, _ = COMMANDS[command]
    main = importlib.import_module(module).main
    err = io.StringIO()

    def alarm(*_):
        raise _Timeout(f"{command} still running after 30 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    try:
        with warnings.catch_warnings(record=True) as seen, contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exit:
                code = exit.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue(), [str(x.message) for x in seen]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, w):
    label, command, build, fragment = case
    if command == "report":
        pytest.importorskip("matplotlib")
    if command == "export":
        pytest.importorskip("onnx")
    argv = build(w)
    before = _snapshot(w["root"])
    code, err, seen = _run(command, argv)
    lines = err.strip().splitlines()
    assert code == 2, (label, code, err)
    assert len(lines) == 1 and lines[0].startswith(COMMANDS[command][1] + ": error: "), (label, err)
    assert "Traceback" not in err and not seen, (label, err, seen)
    if fragment is not None:
        assert fragment.lower() in lines[0].lower(), (label, lines[0])
    assert _snapshot(w["root"]) == before, f"{label}: something was written or an input changed"


def test_every_command_is_in_the_matrix():
    """A new command line joins the matrix (or says here why it does not read user files)."""
    covered = {module for module, _ in COMMANDS.values()} | set(NOT_IN_MATRIX)
    assert set(command_modules()) <= covered, set(command_modules()) - covered
    classes = {"truncated", "wrong dtype", "nan", "huge shape", "unknown version", "attribute type", "fifo",
               "output"}
    seen = {label.split("/")[2] for label, *_ in CASES} | {"output" for label, *_ in CASES if "/output/" in label}
    assert classes <= seen, classes - seen
    assert {c for _, c, *_ in CASES} == set(COMMANDS)


# ----------------------------------------------------------------- what must not be an error
def test_image_folders_count_each_file_once_skip_fifos_and_never_loop(pristine, tmp_path):
    """Links to ``.`` (two of them: 2^N paths if followed naively), a FIFO
    named like an image and a hard link: each image is listed once, the FIFO
    is skipped (reading it would block), and the walk ends at once."""
    from mrc_ref.images import list_images

    folder = tmp_path / "imgs"
    shutil.copytree(pristine / "images", folder)
    for c in ("0", "1"):
        os.symlink(".", folder / c / "again")
        os.symlink(".", folder / c / "and_again")
        os.mkfifo(folder / c / "zz.png")
    os.link(folder / "0" / "0.png", folder / "0" / "hard.png")
    paths, labels, classes = list_images(folder)
    assert [os.path.relpath(p, folder) for p in paths] == ["0/0.png", "0/1.png", "1/0.png", "1/1.png"]
    assert labels.tolist() == [0, 0, 1, 1] and classes == ["0", "1"]


def test_a_one_element_array_attribute_is_read_as_its_integer(w):
    """merge: an integer attribute stored as a one-element array (as some HDF5
    writers store scalars) is that integer; only larger arrays are refused."""
    h5_edit(w["part1"], lambda f: (f.attrs.__setitem__("shard_index", np.array([1])),
                                   first_layer(f).attrs.__setitem__("rows", np.array([first_layer(f).attrs["rows"]]))))
    code, err, _ = _run("merge", _merge(w))
    assert code in (0, None), err
    with h5py.File(w["out"] + "/m.h5", "r") as f:
        assert int(f.attrs["merged_shards"]) == 2


def test_a_file_reached_from_two_classes_is_an_error_naming_both(pristine, tmp_path):
    """A class's images are the regular files reached under its folder: a
    link from class 0 to a file or to the folder of class 1 (or a hard link
    between them) is an error naming both paths, not a label chosen by walk
    order, and never makes class 1 look empty."""
    from mrc_ref.errors import MrcError
    from mrc_ref.images import list_images

    for make in (lambda f: os.symlink("../1/0.png", f / "0" / "a.png"),
                 lambda f: os.symlink("../1", f / "0" / "other"),
                 lambda f: os.link(f / "1" / "0.png", f / "0" / "hard.png")):
        folder = tmp_path / f"imgs{len(os.listdir(tmp_path))}"
        shutil.copytree(pristine / "images", folder)
        make(folder)
        with pytest.raises(MrcError) as info:
            list_images(folder)
        message = str(info.value)
        assert "reached from classes '0' and '1'" in message and str(folder / "1" / "0.png") in message, message
        assert str(folder / "0") in message and "holds no images" not in message, message
    folder = tmp_path / "fine"
    shutil.copytree(pristine / "images", folder)
    os.symlink("..", folder / "0" / "root")  # a link back to the image folder is not entered
    os.symlink("../0/1.png", folder / "0" / "again.png")  # the same file twice in one class: counted once
    paths, labels, _ = list_images(folder)
    assert [os.path.relpath(p, folder) for p in paths] == ["0/0.png", "0/1.png", "1/0.png", "1/1.png"]
    assert labels.tolist() == [0, 0, 1, 1]


def test_every_image_command_walks_links_and_fifos_safely(w):
    """Through the commands (not only list_images): two links to '.' and a
    FIFO named like an image in each class: each runs to the end on the four
    images, at once (the FIFO is never opened)."""
    import importlib

    for c in ("0", "1"):
        os.symlink(".", os.path.join(w["images"], c, "again"))
        os.symlink(".", os.path.join(w["images"], c, "and_again"))
        os.mkfifo(os.path.join(w["images"], c, "zz.png"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = importlib.import_module("mrc_ref.evaluate.__main__").main([w["comp"], w["images"], "--quiet",
                                                                          "--json"])
    assert code in (0, None) and json.loads(out.getvalue())["images"] == 4
    code, err, _ = _run("capture", _capture(w))
    assert code in (0, None), err
    with h5py.File(w["out"] + "/a.h5", "r") as f:
        assert int(f.attrs["images_total"]) == 4
    code, err, _ = _run("sensitivity", _sensitivity(w))
    assert code in (0, None), err


def test_one_image_stays_under_the_memory_bound(tmp_path):
    """A 1,000,000 × 64 greyscale PNG (64 MP,
    accepted) took 0.43 GB in the transform (a full-size RGB copy, then the
    resize); the bound is images.MAX_IMAGE_BYTES. Measured as the growth of
    the peak resident size (VmHWM) of a fresh interpreter while it reads the
    image, which must stay under the bound and under transform_bytes' estimate."""
    import subprocess
    import sys

    from PIL import Image

    from mrc_ref import images

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status")
    path = tmp_path / "wide.png"
    Image.new("L", (1_000_000, 64)).save(path)
    child = ("import sys\n"
             "def hwm():\n"
             "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n"
             "from mrc_ref.images import load_image\n"
             "before = hwm()\n"
             "load_image(sys.argv[1], size=16)\n"
             "print(hwm() - before)\n")
    done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout)
    estimate = images.transform_bytes("L", 1_000_000, 64, size=16)
    assert grown <= estimate <= images.MAX_IMAGE_BYTES, (grown, estimate)


def test_an_image_over_the_memory_bound_is_refused_from_its_header(w):
    """A 64-megapixel colour image would take 0.26 GB decoded: refused before
    it is decoded, naming the file, with the memory it would need."""
    from mrc_ref.errors import MrcError
    from mrc_ref.images import load_image

    with pytest.raises(MrcError, match=r"big.png: image is 8000×8000 in mode RGB: decoding and resizing it would "
                                       r"take about \d+ MB, over the limit of 220 MB per image"):
        load_image(w["big"], size=224)


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_greyscale_is_resized_before_it_becomes_rgb_with_the_same_pixels(mode):
    """The bounded route (greyscale resized and cropped, then made RGB; 16-bit
    scaled in integers by bands) gives exactly the pixels of the old route
    (RGB at full size first; 16-bit through float64 rint), the oracle written here."""
    import math

    from PIL import Image

    from mrc_ref import images

    def old_route(img, size, crop_pct=images.DEFAULT_CROP_PCT):
        if img.mode == "I;16":
            img = Image.fromarray(np.rint(np.asarray(img).astype(np.float64) / 257.0).astype(np.uint8), mode="L")
        img = img.convert("RGB")
        shorter = int(math.floor(size / crop_pct))
        width, height = img.size
        new = (shorter, int(shorter * height / width)) if width <= height else (int(shorter * width / height), shorter)
        if new != img.size:
            img = img.resize(new, Image.BICUBIC)
        img = img.crop(images._center_crop_box(img.size[0], img.size[1], size))
        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        mean = np.asarray(images.IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(images.IMAGENET_STD, np.float32).reshape(3, 1, 1)
        return (x.transpose(2, 0, 1) - mean) / std

    rng = np.random.default_rng(0)
    for width, height in ((300, 200), (17, 40), (1000, 31), (256, 256), (5, 900), (333, 777)):
        for size in (16, 32, 224):
            if mode == "L":
                img = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
            else:
                codes = rng.integers(0, 65536, (height, width), dtype=np.uint16)
                img = Image.frombytes("I;16", (width, height), codes.astype("<u2").tobytes())
            assert img.mode == mode
            np.testing.assert_array_equal(images.eval_transform(img, size=size), old_route(img, size))
    codes = np.arange(65536, dtype=np.uint32)  # every 16-bit value: the integer rounding is rint(v / 257)
    np.testing.assert_array_equal((2 * codes + 257) // 514, np.rint(codes / 257.0))


def test_no_stderr_line_is_a_python_warning(w, tmp_path):
    """In a fresh interpreter that shows every warning, the commands' error
    and success paths print no warning: a user error is one line."""
    import subprocess
    import sys

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="default")
    runs = [["mrc_ref.compress", w["weights"], w["acts"], "-o", w["out"] + "/ok.safetensors", "--quiet",
             "--sensitivity", w["sens"]],
            ["mrc_ref.verify", w["comp8"], w["weights"], w["acts"], "--quiet"],
            ["mrc_ref.evaluate", w["comp8"], w["images"], "--quiet"],
            ["mrc_ref.compress", w["weights"], w["acts"], "--reduction", "0.9999", "--quiet"],
            ["data_tools.merge", w["part0"], w["part1"], "-o", w["out"] + "/m.h5", "--quiet"]]
    for argv in runs:
        done = subprocess.run([sys.executable, "-W", "default", "-m", *argv], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode in (0, 2), (argv, done.stderr)
        assert not [line for line in done.stderr.splitlines() if "Warning" in line], (argv, done.stderr)


def test_a_failed_run_leaves_no_output(w):
    """compress --quantize int8 --report into a directory where nothing can be
    written (/proc): refused before any work, and the -o file is not left
    behind (every output's directory is probed first; outputs are written all
    or none)."""
    out = os.path.join(w["out"], "c.safetensors")
    before = _snapshot(w["root"])
    code, err, _ = _run("compress", [w["weights"], w["acts"], "-o", out, "--quantize", "int8", "--report",
                                     "/proc/r.json", "--quiet"])
    assert code == 2 and "cannot write in the output directory" in err and err.count("\n") == 1
    assert _snapshot(w["root"]) == before and not os.path.exists(out)


@pytest.mark.parametrize("command", ["compress", "report", "verify"])
def test_a_compressed_model_given_as_the_original_is_named(w, command):
    """WEIGHTS must be the original dense model: a compressed or int8 file is
    refused naming the file and saying what it is, not 'matches no layer'."""
    if command == "report":
        pytest.importorskip("matplotlib")
    argv = {"compress": _compress(w, weights=w["comp8"]), "report": _report(w, weights=w["comp8"]),
            "verify": _verify(w, weights=w["comp8"])}[command]
    code, err, _ = _run(command, argv)
    assert code == 2 and f"{w['comp8']}: is a compressed model (mrc_ref.compressed version 2)" in err, err


def test_the_report_refuses_before_any_work(w, monkeypatch):
    """A sensitivity file naming a layer the model lacks, or --layers matching
    nothing, is refused before a single compression runs."""
    pytest.importorskip("matplotlib")
    from mrc_ref.report import orchestration

    def no_work(*args, **kwargs):
        raise AssertionError("the report started working on bad input")

    monkeypatch.setattr(orchestration, "audit", no_work)
    with open(w["sens"]) as fh:
        doc = json.load(fh)
    doc["layers"]["blocks.7.mlp.fc1"] = {"weight": 1.0}
    with open(w["sens"], "w") as fh:
        json.dump(doc, fh)
    code, err, _ = _run("report", _report(w, extra=["--sensitivity", w["sens"]]))
    assert code == 2 and "layer blocks.7.mlp.fc1: named in the sensitivity weights" in err, err
    code, err, _ = _run("report", _report(w, extra=["--layers", "nothing.*"]))
    assert code == 2 and "--layers nothing.* matches no 2-D" in err, err
    code, err, _ = _run("report", _report(w, out="/proc/mrc-report"))  # an output folder that cannot be made
    assert code == 2 and "/proc/mrc-report: cannot create the output directory" in err, err


def test_the_output_folder_probe_leaves_no_trace(tmp_path):
    """formats.check_output_dir creates and removes a folder beside the output
    folder: the parent's listing and modification time are as before."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep").write_text("x")
    os.utime(parent, ns=(1_000_000_000, 2_000_000_000))
    before = (sorted(os.listdir(parent)), os.stat(parent).st_mtime_ns)
    formats.check_output_dir(str(parent / "rep"), ("report.md",))
    assert (sorted(os.listdir(parent)), os.stat(parent).st_mtime_ns) == before


@pytest.mark.parametrize("command", ["capture", "evaluate", "sensitivity", "export", "distributed", "convert"])
def test_num_heads_is_checked_as_an_option(w, command):
    """--num-heads 0 is a usage error of the option, never blamed on the model."""
    if command == "export":
        pytest.importorskip("onnx")
    argv = {"capture": _capture(w), "evaluate": _evaluate(w), "sensitivity": _sensitivity(w),
            "export": _export(w), "distributed": _distributed(w, out=w["out"] + "/d.h5"),
            "convert": _convert(w)}[command] + ["--num-heads", "0"]
    code, err, _ = _run(command, argv)
    assert code == 2 and "argument --num-heads: must be a positive integer, got 0" in err, err
    assert w["weights"] not in err and w["comp"] not in err
