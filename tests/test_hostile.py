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
    return d


@pytest.fixture
def w(pristine, tmp_path):
    """A fresh copy of the world, as paths."""
    root = tmp_path / "w"
    shutil.copytree(pristine, root)
    names = {"weights": "weights.safetensors", "acts": "acts.h5", "comp": "comp.safetensors",
             "comp8": "comp8.safetensors", "sens": "sens.json", "images": "images", "part0": "part0.h5",
             "part1": "part1.h5", "peft": "peft", "out": "out"}
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
    return [w["weights"], w["images"], "-o", o["out"], "--dask", "tcp://127.0.0.1:9", "--quiet"]


def weights_cases():
    """The model file read by compress, evaluate, verify, report, capture, sensitivity, convert."""
    runs = {"compress": lambda w, p: _compress(w, weights=p), "evaluate": lambda w, p: _evaluate(w, model=p),
            "verify": lambda w, p: _verify(w, weights=p), "report": lambda w, p: _report(w, weights=p),
            "capture": lambda w, p: _capture(w, weights=p), "sensitivity": lambda w, p: _sensitivity(w, weights=p),
            "convert": lambda w, p: _convert(w, src=p), "export": lambda w, p: _export(w, model=p)}
    corruptions = {
        "truncated": (cut, "truncated"),
        "wrong dtype": (lambda p: edit_tensors(p, lambda t: t.update(
            {first_weight(t): t[first_weight(t)].astype(np.int32)})), None),
        "nan": (lambda p: edit_tensors(p, lambda t: t[first_weight(t)].__setitem__((0, 0), np.nan)), "NaN"),
        "huge shape": (huge_header, "data_offsets"),
        "unknown version": (lambda p: edit_tensors(p, lambda t: None, {"format": "mrc_ref.compressed",
                                                                       "version": "7"}), "unsupported version"),
        "attribute type": (lambda p: edit_tensors(p, lambda t: None, {"num_heads": "four"}), "num_heads"),
        "fifo": (fifo, "not a regular file"),
        "loop": (loop, "cannot read"),
    }
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
    }
    for command, run in {"verify": lambda w, p: _verify(w, comp=p), "evaluate": lambda w, p: _evaluate(w, model=p),
                         "export": lambda w, p: _export(w, model=p)}.items():
        for label, (corrupt, fragment, name) in corruptions.items():
            if command == "evaluate" and label == "config of the wrong type":
                fragment = "stored reduction"
            yield (f"{command}/compressed/{label}", command,
                   lambda w, run=run, corrupt=corrupt, name=name: run(w, corrupt(w[name])), fragment)


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


def image_cases():
    def huge_png(w):
        from PIL import Image

        path = os.path.join(w["images"], "0", "wide.png")
        Image.new("L", (64_000_000, 1)).save(path)  # at the pixel limit, but its resize alone would take 62 GB
        return w["images"]

    def cut_png(w):
        cut(os.path.join(w["images"], "1", "0.png"))
        return w["images"]

    for label, (corrupt, fragment) in {"truncated": (cut_png, "cannot read image"),
                                       "huge after resizing": (huge_png, "megapixels")}.items():
        for command, run in {"evaluate": lambda w, p: _evaluate(w, images=p),
                             "capture": lambda w, p: _capture(w, images=p),
                             "report": lambda w, p: _report(w, images=p),
                             "sensitivity": lambda w, p: _sensitivity(w, images=p)}.items():
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


CASES = [*weights_cases(), *acts_cases(), *parts_cases(), *sensitivity_cases(), *compressed_cases(), *peft_cases(),
         *image_cases(), *output_cases()]


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
        pytest.importorskip("threadpoolctl")
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


@pytest.mark.parametrize("command", ["capture", "evaluate", "sensitivity", "export"])
def test_num_heads_is_checked_as_an_option(w, command):
    """--num-heads 0 is a usage error of the option, never blamed on the model."""
    if command == "export":
        pytest.importorskip("onnx")
    argv = {"capture": _capture(w), "evaluate": _evaluate(w), "sensitivity": _sensitivity(w),
            "export": _export(w)}[command] + ["--num-heads", "0"]
    code, err, _ = _run(command, argv)
    assert code == 2 and "argument --num-heads: must be a positive integer, got 0" in err, err
    assert w["weights"] not in err and w["comp"] not in err
