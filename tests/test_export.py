"""``python -m mrc_ref.export`` (docs/export.md): the ONNX graph against
independent oracles, its parameter count against compress's report, and the
bad-input contract.

Oracles: ``onnx.checker`` (full check with strict shape inference);
onnxruntime, an independent engine, whose logits must equal mrc_ref's own
forward pass (float64, ``mrc_ref.vit.forward``) and, for the dense example,
PyTorch's (``test_logits.npy``); element counts read off the ONNX
initializers against compress's report and against the ranks.

Tolerance of the logits: ``max |ort − ref| ≤ 1e-4 · max |ref|`` (REL). The
graph runs in float32 (unit round-off 6e-8); over a few blocks the
accumulated round-off stays near 1e-6 relative, 100× below the bound, while
a wrong op moves them further: LN eps 1e-5 instead of 1e-6 moves the trained
example's logits by more than 1e-4; a lost distillation head, a wrong head
count or a missing bias by far more.

The DeiT-S-shaped model keeps every layer's shape of DeiT-S (width 384,
6 heads, MLP 1536, 16×16 patches, 1000 classes) but has 2 blocks instead of
12 and 64×64 images (16 patches) instead of 224×224, to keep the test fast.

The onnxruntime sessions set ``session.qdq_matmulnbits_accuracy_level`` to
1 (float32 arithmetic): by default onnxruntime turns DequantizeLinear →
MatMul into its MatMulNBits kernel at accuracy level 4, which also
quantizes the activations to int8, so its int8 logits move by ~1e-2
(docs/export.md, "int8").
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from data_tools import synthetic
from mrc_ref import formats, layout, quantize, vit
from mrc_ref.example import ACTS, EXAMPLE_DIR, TEST_IMAGES, WEIGHTS

PROG = "python -m mrc_ref.export"
REL = 1e-4
#: Exact float32 arithmetic for DequantizeLinear → MatMul in onnxruntime (see the module docstring).
EXACT = {"session.qdq_matmulnbits_accuracy_level": "1"}


def _onnx():
    """(onnx, onnxruntime), or skip the test."""
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def run_main(argv, capsys):
    """``main(argv)`` in-process: ``(exit code, stdout, stderr lines)``."""
    from mrc_ref.export.__main__ import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def ort_logits(path, images, threads=1):
    """Logits of the ONNX file at ``path`` in onnxruntime (CPU)."""
    _, ort = _onnx()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for key, value in EXACT.items():
        so.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def rel_error(logits, ref):
    return float(np.abs(np.asarray(logits, np.float64) - ref).max() / np.abs(ref).max())


def checked_model(path):
    """The ONNX model at ``path`` after ``onnx.checker.check_model(full_check=True)``."""
    onnx, _ = _onnx()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def initializer_elements(model, dtype=None):
    """Elements of the initializers (of one ONNX element type when given)."""
    return sum(math.prod(i.dims) for i in model.graph.initializer if dtype is None or i.data_type == dtype)


def stored_elements(tensors):
    return sum(int(np.prod(v.shape)) for v in tensors.values())


def export_ok(src, dst, capsys, *args):
    code, out, err = run_main([src, "-o", dst, *args], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {dst}") and not err
    return checked_model(dst)


# ------------------------------------------------------------------ the embedded example
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example model, compressed (float) and int8 by ``python -m mrc_ref.compress``
    (its defaults: reduction 0.6, q = 8, sequential compensation), with reports."""
    _onnx()  # skip before the work when the extra is missing
    d = tmp_path_factory.mktemp("export_example")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    files = {"dense": (WEIGHTS, None)}
    for kind, extra in (("compressed", []), ("int8", ["--quantize", "int8"])):
        out, report = d / f"{kind}.safetensors", d / f"{kind}.json"
        subprocess.run([sys.executable, "-m", "mrc_ref.compress", WEIGHTS, ACTS, "-o", str(out), "--report",
                        str(report), "--quiet", *extra], check=True, capture_output=True, env=env, timeout=300)
        files[kind] = (str(out), str(report))
    return files


@pytest.fixture(scope="module")
def example_images():
    from mrc_ref.images import iter_batches

    images, labels, _ = next(iter_batches(TEST_IMAGES, 48, size=16, limit=48))
    return images, labels


@pytest.mark.parametrize("kind", ["dense", "compressed", "int8"])
def test_example_logits_equal_forward(kind, example, example_images, tmp_path, capsys):
    src = example[kind][0]
    model = export_ok(src, tmp_path / "m.onnx", capsys)
    images, labels = example_images
    logits = ort_logits(tmp_path / "m.onnx", images)
    tensors, meta = formats.read_safetensors(src)
    ref = vit.forward(tensors, images.astype(np.float64), metadata=meta)
    assert logits.shape == ref.shape == (48, 10)
    assert rel_error(logits, ref) < REL
    assert (logits.argmax(1) == labels).mean() > 0.9
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "", ""]
    assert model.opset_import[0].version == 13
    if kind == "dense":  # a second, independent framework: the PyTorch logits the example was trained with
        torch_logits = np.load(os.path.join(EXAMPLE_DIR, "test_logits.npy"))[:48]
        assert np.abs(logits - torch_logits).max() < REL * np.abs(torch_logits).max()


@pytest.mark.parametrize("kind", ["compressed", "int8"])
def test_example_parameters_equal_report(kind, example, tmp_path, capsys, raw_tensors):
    """The initializers hold exactly what compress counted: ``params_after``,
    plus the scales (``quantization.scale_elements``) in the int8 file; the
    int8 codes stay INT8, as many as the file stores."""
    import json

    onnx, _ = _onnx()
    src, report_path = example[kind]
    model = export_ok(src, tmp_path / "m.onnx", capsys)
    with open(report_path) as fh:
        report = json.load(fh)
    expected = report["totals"]["params_after"]
    int8_stored = sum(math.prod(shape) for dt, shape, _ in raw_tensors(src).values() if dt == "I8")
    if kind == "int8":
        expected += report["quantization"]["scale_elements"]
        assert int8_stored > 0.9 * report["totals"]["params_after"]
    assert initializer_elements(model) == expected
    assert initializer_elements(model, onnx.TensorProto.INT8) == int8_stored
    if kind == "compressed":
        assert initializer_elements(model, onnx.TensorProto.FLOAT) == expected


def test_factored_layers_stay_factored(example, tmp_path, capsys):
    """Each factored layer is two MatMuls at rank r + q: ``[B; Q]ᵀ`` (n, r + q)
    and ``[A P]ᵀ`` (r + q, m) as initializers, never an (m, n) weight."""
    src = example["compressed"][0]
    model = export_ok(src, tmp_path / "m.onnx", capsys)
    _, meta = formats.read_compressed(src)
    tensors, _ = formats.read_safetensors(src)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    assert meta["ranks"]
    for name, r in meta["ranks"].items():
        q = meta["residual_ranks"][name]
        m, n = tensors[f"{name}.lowrank_a"].shape[0], tensors[f"{name}.lowrank_b"].shape[1]
        assert r is not None and q == 8
        assert dims[f"{name}.lowrank_b+residual_q.T"] == [n, r + q]
        assert dims[f"{name}.lowrank_a+residual_p.T"] == [r + q, m]
        assert not any(k.startswith(f"{name}.weight") for k in dims)
    inner = {i.name for i in model.graph.initializer if i.name.endswith("lowrank_b+residual_q.T")}
    assert sum(node.op_type == "MatMul" and node.input[1] in inner for node in model.graph.node) == len(meta["ranks"])


def test_onnxruntime_fuses_layer_norm_and_gelu(example, tmp_path, capsys):
    """The written-out LayerNorm and exact GELU (opset 13 has neither op) are
    the patterns onnxruntime fuses at load (docs/export.md, "Opset"): its
    optimized graph has one LayerNormalization per norm, one GELU kernel per
    block, and none of the ops they were written with."""
    onnx, ort = _onnx()
    export_ok(WEIGHTS, tmp_path / "m.onnx", capsys)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("LayerNormalization") == 2 * 4 + 1
    assert sum(ops.count(op) for op in ("Gelu", "BiasGelu")) == 4
    assert not {"Erf", "ReduceMean", "Pow", "Sqrt"} & set(ops)


def test_dynamic_batch(example, example_images, tmp_path, capsys):
    export_ok(example["compressed"][0], tmp_path / "m.onnx", capsys)
    images = example_images[0][:3]
    batch = ort_logits(tmp_path / "m.onnx", images)
    one = np.concatenate([ort_logits(tmp_path / "m.onnx", images[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(one, batch, rtol=1e-5, atol=1e-5 * np.abs(batch).max())


# ------------------------------------------------------------------ DeiT-S-shaped and distilled models
@pytest.fixture(scope="module")
def deit_s():
    """Every layer shaped as DeiT-S (2 blocks, 64×64 images), dense and compressed at reduction 0.6, q = 8."""
    _onnx()
    t = synthetic.random_vit(np.random.default_rng(3), dim=384, depth=2, mlp=1536, classes=1000, patch=16,
                             grid=4, dtype=np.float32)
    compressed, ranks = synthetic.factored(t, reduction=0.6, residual_rank=8)
    return {"dense": t, "compressed": compressed, "ranks": ranks}


@pytest.mark.parametrize("kind", ["dense", "compressed"])
def test_deit_s_shaped_logits_and_count(kind, deit_s, tmp_path, capsys):
    tensors = deit_s[kind]
    src = tmp_path / "deit_s.safetensors"
    save_file(tensors, str(src), metadata={"num_heads": "6"})
    export_ok(src, tmp_path / "m.onnx", capsys)
    images = np.random.default_rng(4).standard_normal((2, 3, 64, 64))
    ref = vit.forward(tensors, images, metadata={"num_heads": "6"})
    assert rel_error(ort_logits(tmp_path / "m.onnx", images), ref) < REL
    model = checked_model(tmp_path / "m.onnx")
    dense = deit_s["dense"]
    expected = stored_elements(dense)  # a second derivation: P_total - Σ m n + Σ (r + q)(m + n)
    if kind == "compressed":
        for name, r in deit_s["ranks"].items():
            m, n = dense[f"{name}.weight"].shape
            assert r is not None
            expected += (r + 8) * (m + n) - m * n
        assert expected < 0.4 * stored_elements(dense)
    assert initializer_elements(model) == expected == stored_elements(tensors)


@pytest.fixture(scope="module")
def distilled():
    _onnx()
    t = synthetic.random_vit(np.random.default_rng(5), dim=64, depth=2, mlp=128, classes=7, patch=4, grid=3,
                             dist=True, dtype=np.float32)
    compressed, _ = synthetic.factored(t, reduction=0.5, residual_rank=4)
    no_residual, _ = synthetic.factored(t, reduction=0.5, residual_rank=0)
    mixed = dict(compressed)  # one layer left dense; int8 factors beside float ones
    for suffix in layout.FACTOR_SUFFIXES:
        del mixed[f"blocks.1.mlp.fc2.{suffix}"]
    mixed["blocks.1.mlp.fc2.weight"] = t["blocks.1.mlp.fc2.weight"]
    half_int8 = quantize.quantize_tensors(mixed, ["blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head_dist"])
    a = quantize.quantize_tensors({"x.weight": compressed["blocks.1.attn.proj.lowrank_a"]})  # A int8, P float
    half_int8["blocks.1.attn.proj.lowrank_a"], half_int8["blocks.1.attn.proj.lowrank_a.scale"] = \
        a["x.weight"], a["x.weight.scale"]
    return {"dense": t, "compressed": compressed, "int8": quantize.quantize_tensors(compressed),
            "int8-no-residual": quantize.quantize_tensors(no_residual), "mixed": mixed, "mixed-int8": half_int8}


@pytest.mark.parametrize("kind", ["dense", "compressed", "int8", "int8-no-residual", "mixed", "mixed-int8"])
def test_distilled_deit(kind, distilled, tmp_path, capsys):
    """``(head(cls) + head_dist(dist)) / 2`` over a dist token: the oracle's own
    head averaging; the logits differ from head(cls) alone, so the test would
    see a graph that dropped the distillation head. The variants reach every
    layout of a linear layer: dense, factored with and without a residual,
    float and int8, and an int8 A beside a float P."""
    tensors = distilled[kind]
    src = tmp_path / "deit.safetensors"
    save_file(tensors, str(src), metadata={"num_heads": "4"})
    export_ok(src, tmp_path / "m.onnx", capsys)
    images = np.random.default_rng(6).standard_normal((3, 3, 12, 12))
    ref = vit.forward(tensors, images, metadata={"num_heads": "4"})
    logits = ort_logits(tmp_path / "m.onnx", images)
    assert rel_error(logits, ref) < REL
    params = vit.prepare(tensors, np)
    z = vit.layer_norm(params, "norm", vit.blocks(params, vit.embed(params, images, np), 4, np), np)
    cls_only = vit.linear(params, "head", z[:, 0], np)
    assert rel_error(logits, cls_only) > 100 * REL


def test_num_heads_resolved_as_forward(tmp_path, capsys):
    """No metadata: D / 64 heads; metadata num_heads; --num-heads over both.
    Different head counts give different logits, each equal to the forward's."""
    _onnx()
    t = synthetic.random_vit(np.random.default_rng(7), dim=128, depth=1, mlp=256, classes=5, patch=4, grid=2,
                             dtype=np.float32)
    images = np.random.default_rng(8).standard_normal((2, 3, 8, 8))
    save_file(t, str(tmp_path / "plain.safetensors"))
    save_file(t, str(tmp_path / "meta.safetensors"), metadata={"num_heads": "4"})
    seen = []
    for src, args, heads in (("plain", [], 2), ("meta", [], 4), ("meta", ["--num-heads", "8"], 8)):
        out = tmp_path / f"{src}{heads}.onnx"
        export_ok(tmp_path / f"{src}.safetensors", out, capsys, *args)
        logits = ort_logits(out, images)
        assert rel_error(logits, vit.forward(t, images, num_heads=heads)) < REL
        seen.append(logits)
    assert rel_error(seen[0], seen[1].astype(np.float64)) > 100 * REL
    assert rel_error(seen[1], seen[2].astype(np.float64)) > 100 * REL


def test_command_line_subprocess(example, tmp_path):
    _onnx()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mrc_ref.export", example["int8"][0], "-o", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'm.onnx'}: opset 13, compressed v2 model")
    checked_model(tmp_path / "m.onnx")


def test_default_output_beside_the_model(tmp_path, capsys):
    _onnx()
    shutil.copyfile(WEIGHTS, tmp_path / "model.safetensors")
    code, out, err = run_main([tmp_path / "model.safetensors"], capsys)
    assert code == 0 and not err and (tmp_path / "model.onnx").is_file()


# ------------------------------------------------------------------ bad input
def _tensors(path):
    return formats.read_safetensors(path)


def _write(path, tensors, meta):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta or None)


def make_bad(case, example, d):
    """``(argv, expected words)`` for a bad-input case, its files made in ``d``."""
    src = d / "model.safetensors"
    out = d / "out.onnx"
    dense, dmeta = _tensors(WEIGHTS)
    comp, cmeta = _tensors(example["compressed"][0])
    int8, imeta = _tensors(example["int8"][0])
    if case == "not-a-vit":
        _write(src, {"x": np.zeros(3, np.float32)}, {})
        return [src, "-o", out], [str(src), "patch_embed.proj.weight", "missing"]
    if case == "not-safetensors":
        src.write_text("not a model\n")
        return [src, "-o", out], [str(src), "not a readable safetensors file"]
    if case == "missing-file":
        return [d / "absent.safetensors", "-o", out], ["absent.safetensors", "no such file"]
    if case == "missing-norm":
        del dense["blocks.1.norm2.weight"]
        _write(src, dense, dmeta)
        return [src, "-o", out], [str(src), "blocks.1.norm2", "missing tensor"]
    if case == "missing-head":
        del dense["head.weight"]
        _write(src, dense, dmeta)
        return [src, "-o", out], [str(src), "layer head", "no classifier head"]
    if case == "missing-block-linear":
        del dense["blocks.2.mlp.fc1.weight"]
        _write(src, dense, dmeta)
        return [src, "-o", out], [str(src), "blocks.2.mlp.fc1", "missing"]
    if case == "half-factored-residual":
        del comp["blocks.0.mlp.fc1.residual_q"]
        _write(src, comp, cmeta)
        return [src, "-o", out], [str(src), "blocks.0.mlp.fc1", "both residual_p and residual_q"]
    if case == "half-factored-lowrank":
        del comp["blocks.3.attn.proj.lowrank_b"]
        _write(src, comp, cmeta)
        return [src, "-o", out], [str(src), "blocks.3.attn.proj", "needs both lowrank_a and lowrank_b"]
    if case == "factors-do-not-chain":
        comp["blocks.1.attn.qkv.lowrank_b"] = comp["blocks.1.attn.qkv.lowrank_b"][:-1]
        _write(src, comp, cmeta)
        return [src, "-o", out], [str(src), "blocks.1.attn.qkv", "do not chain"]
    if case == "unknown-version":
        _write(src, comp, {**cmeta, "version": "3"})
        return [src, "-o", out], [str(src), "unsupported version '3'"]
    if case == "int8-without-scale":
        del int8["blocks.0.attn.qkv.lowrank_a.scale"]
        _write(src, int8, imeta)
        return [src, "-o", out], [str(src), "blocks.0.attn.qkv", "has no blocks.0.attn.qkv.lowrank_a.scale"]
    if case == "int8-in-version-1":
        _write(src, int8, {**imeta, "version": "1"})
        return [src, "-o", out], [str(src), "int8"]
    if case == "unused-tensor":
        dense["fc_norm.weight"] = np.ones(64, np.float32)
        _write(src, dense, dmeta)
        return [src, "-o", out], [str(src), "does not use: fc_norm.weight"]
    if case == "nan-weight":
        dense["blocks.0.attn.proj.weight"] = dense["blocks.0.attn.proj.weight"].copy()
        dense["blocks.0.attn.proj.weight"][3, 4] = np.nan
        _write(src, dense, dmeta)
        return [src, "-o", out], [str(src), "blocks.0.attn.proj", "NaN"]
    if case == "bad-num-heads":
        _write(src, dense, {**dmeta, "num_heads": "5"})
        return [src, "-o", out], [str(src), "does not divide"]
    shutil.copyfile(WEIGHTS, src)
    if case == "output-is-input":
        return [src, "-o", src], [str(src), "overwrite an input"]
    if case == "output-via-dotdot":
        (d / "sub").mkdir()
        return [src, "-o", d / "sub" / ".." / "model.safetensors"], ["overwrite an input"]
    if case == "output-via-symlink":
        os.symlink(src, d / "link.onnx")
        return [src, "-o", d / "link.onnx"], ["link.onnx", "overwrite an input"]
    if case == "output-via-hardlink":
        os.link(src, d / "hard.onnx")
        return [src, "-o", d / "hard.onnx"], ["hard.onnx", "overwrite an input"]
    if case == "output-dir-missing":
        return [src, "-o", d / "no" / "m.onnx"], ["output directory does not exist"]
    if case == "output-is-dir":
        (d / "dir.onnx").mkdir()
        return [src, "-o", d / "dir.onnx"], ["output is a directory"]
    if case == "unwritable-dir":  # root writes anywhere but in sysfs, where no file can be created
        (d / "ro").mkdir()
        os.chmod(d / "ro", 0o555)
        target = d / "ro" / "m.onnx" if os.geteuid() != 0 else "/sys/mrc_ref_export_test.onnx"
        return [src, "-o", target], [os.path.basename(target), "cannot write"]
    raise AssertionError(case)


BAD = ["not-a-vit", "not-safetensors", "missing-file", "missing-norm", "missing-head", "missing-block-linear",
       "half-factored-residual", "half-factored-lowrank", "factors-do-not-chain", "unknown-version",
       "int8-without-scale", "int8-in-version-1", "unused-tensor", "nan-weight", "bad-num-heads",
       "output-is-input", "output-via-dotdot", "output-via-symlink", "output-via-hardlink", "output-dir-missing",
       "output-is-dir", "unwritable-dir"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, example, tmp_path, capsys, snapshot):
    _onnx()
    if case == "unwritable-dir" and os.geteuid() == 0 and not os.path.isdir("/sys"):
        pytest.skip("root writes into a read-only directory, and there is no /sys")
    argv, words = make_bad(case, example, tmp_path)
    before = snapshot(tmp_path)
    try:
        code, out, err = run_main(argv, capsys)
    finally:
        if case == "unwritable-dir":
            os.chmod(tmp_path / "ro", 0o755)
    assert code == 2 and not out
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err[0]
    for word in words:
        assert word in err[0], (word, err[0])
    assert snapshot(tmp_path) == before  # nothing written, no temporary left, inputs unchanged (hash, size, mtime)
    if case == "unwritable-dir":
        assert not os.listdir(tmp_path / "ro") and not os.path.exists("/sys/mrc_ref_export_test.onnx")


@pytest.mark.parametrize("argv", [[], ["a.safetensors", "b.safetensors"], ["a.safetensors", "--bogus"],
                                  ["a.safetensors", "--num-heads", "x"]])
def test_usage_errors_one_line(argv, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2 and not out
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: "), err


def test_without_onnx_one_line(tmp_path, capsys, monkeypatch):
    """Runs without the extra too: ``import onnx`` fails, one line names the extra."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    shutil.copyfile(WEIGHTS, tmp_path / "model.safetensors")
    code, out, err = run_main([tmp_path / "model.safetensors", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"{PROG}: error: onnx is not installed")
    assert "pip install" in err[0] and "[onnx]" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_core_never_imports_onnx():
    """The command line and the driver import without onnx; only an export loads it."""
    code = ("import sys, mrc_ref.export, mrc_ref.export.__main__, mrc_ref.vit, mrc_ref.formats; "
            "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
