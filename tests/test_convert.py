"""Tests of data_tools.convert: transformers / timm checkpoints -> timm safetensors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.convert import convert_file, convert_state_dict
from data_tools.synthetic import random_vit
from mrc_ref import vit
from mrc_ref.errors import MrcError
from mrc_ref.formats import read_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timm_params(rng, *, dim=64, depth=2, mlp=96, classes=5, patch=4, grid=2, dist=False, dtype=np.float32):
    """A random timm-layout state dict (numpy)."""
    return random_vit(rng, dim=dim, depth=depth, mlp=mlp, classes=classes, patch=patch, grid=grid, dist=dist,
                      dtype=dtype)


def to_legacy_hf(timm, prefix="vit."):
    """The same model under the older transformers names (hand-written map)."""
    hf = {
        f"{prefix}embeddings.cls_token": timm["cls_token"],
        f"{prefix}embeddings.position_embeddings": timm["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": timm["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": timm["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": timm["norm.weight"],
        f"{prefix}layernorm.bias": timm["norm.bias"],
        "classifier.weight": timm["head.weight"],
        "classifier.bias": timm["head.bias"],
    }
    dim = timm["cls_token"].shape[-1]
    for i in range(vit.depth(timm)):
        e, b = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = timm[f"{b}attn.qkv.{kind}"]
            hf[f"{e}attention.attention.query.{kind}"] = qkv[:dim]
            hf[f"{e}attention.attention.key.{kind}"] = qkv[dim : 2 * dim]
            hf[f"{e}attention.attention.value.{kind}"] = qkv[2 * dim :]
            hf[f"{e}attention.output.dense.{kind}"] = timm[f"{b}attn.proj.{kind}"]
            hf[f"{e}intermediate.dense.{kind}"] = timm[f"{b}mlp.fc1.{kind}"]
            hf[f"{e}output.dense.{kind}"] = timm[f"{b}mlp.fc2.{kind}"]
            hf[f"{e}layernorm_before.{kind}"] = timm[f"{b}norm1.{kind}"]
            hf[f"{e}layernorm_after.{kind}"] = timm[f"{b}norm2.{kind}"]
    return hf


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def run_cli(*args):
    """Run ``python -m data_tools.convert ARGS`` in a subprocess."""
    cmd = [sys.executable, "-m", "data_tools.convert"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _torch():
    return pytest.importorskip("torch", reason="torch reads and writes .pth checkpoints")


def save_pth(torch, path, state, wrap=None):
    obj = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save({wrap: obj, "epoch": 3} if wrap else obj, path)


# ----------------------------------------------------------------- transformers
@pytest.mark.oracle
def test_transformers_model_fuses_q_k_v():
    _torch()
    tf = pytest.importorskip("transformers", reason="a real transformers state dict")
    cfg = tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, num_labels=3, qkv_bias=True)
    state = {k: v.numpy() for k, v in tf.ViTForImageClassification(cfg).state_dict().items()}
    tensors, meta = convert_state_dict(state, num_heads=4)
    assert meta == {"num_heads": "4", "source": "transformers"}
    for i in range(2):
        names = [k for k in state if k.startswith(f"vit.layers.{i}.attention.") and "o_proj" not in k]
        assert len(names) == 6, names  # q, k, v weight and bias under the current names
        for kind in ("weight", "bias"):
            parts = [state[f"vit.layers.{i}.attention.{x}_proj.{kind}"] for x in "qkv"]
            np.testing.assert_array_equal(tensors[f"blocks.{i}.attn.qkv.{kind}"], np.concatenate(parts, axis=0))
        np.testing.assert_array_equal(tensors[f"blocks.{i}.attn.proj.weight"], state[f"vit.layers.{i}.attention.o_proj.weight"])
        np.testing.assert_array_equal(tensors[f"blocks.{i}.mlp.fc1.weight"], state[f"vit.layers.{i}.mlp.fc1.weight"])
        np.testing.assert_array_equal(tensors[f"blocks.{i}.norm2.bias"], state[f"vit.layers.{i}.layernorm_after.bias"])
    np.testing.assert_array_equal(tensors["head.weight"], state["classifier.weight"])
    np.testing.assert_array_equal(tensors["pos_embed"], state["vit.embeddings.position_embeddings"])
    assert vit.linear_names(tensors)[-1] == "head"


def test_legacy_transformers_names_give_the_timm_tensors():
    timm = timm_params(np.random.default_rng(0))
    for prefix in ("vit.", ""):
        tensors, meta = convert_state_dict(to_legacy_hf(timm, prefix))
        assert_same_tensors(tensors, timm)
        assert meta == {"num_heads": "1", "source": "transformers"}  # D = 64 -> 64 // 64


def test_legacy_deit_with_teacher_and_pooler():
    rng = np.random.default_rng(1)
    timm = timm_params(rng, dist=True)
    hf = to_legacy_hf(timm, prefix="deit.")
    del hf["classifier.weight"], hf["classifier.bias"]
    hf["deit.embeddings.distillation_token"] = timm["dist_token"]
    hf["cls_classifier.weight"], hf["cls_classifier.bias"] = timm["head.weight"], timm["head.bias"]
    hf["distillation_classifier.weight"] = timm["head_dist.weight"]
    hf["distillation_classifier.bias"] = timm["head_dist.bias"]
    hf["deit.pooler.dense.weight"] = rng.standard_normal((64, 64)).astype(np.float32)  # unused by classification
    hf["deit.pooler.dense.bias"] = rng.standard_normal(64).astype(np.float32)
    tensors, _ = convert_state_dict(hf, num_heads=2)
    assert_same_tensors(tensors, timm)


def test_missing_qkv_bias_and_half_precision():
    timm = timm_params(np.random.default_rng(2), dtype=np.float16)
    hf = to_legacy_hf(timm)
    for key in [k for k in hf if ".attention.attention." in k and k.endswith(".bias")]:
        del hf[key]  # qkv_bias=False
    tensors, _ = convert_state_dict(hf)
    assert "blocks.0.attn.qkv.bias" not in tensors
    assert all(v.dtype == np.float32 for v in tensors.values())
    np.testing.assert_array_equal(tensors["blocks.1.attn.qkv.weight"], timm["blocks.1.attn.qkv.weight"].astype(np.float32))
    f64 = convert_state_dict(timm_params(np.random.default_rng(3), dtype=np.float64))[0]
    assert all(v.dtype == np.float64 for v in f64.values())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"fc_norm.weight": np.ones(64, np.float32)}), "fc_norm.weight"),
        (lambda s: s.pop("blocks.1.mlp.fc2.weight"), "blocks.1.mlp.fc2"),
        (lambda s: s.pop("pos_embed"), "pos_embed"),
        (lambda s: s.update({"blocks.0.attn.qkv.weight": np.ones((3, 3), np.int64)}), "dtype int64"),
        (lambda s: s.clear() or s.update({"encoder.weight": np.ones(3, np.float32)}), "unknown checkpoint layout"),
    ],
)
def test_bad_state_dicts_raise(edit, message):
    state = timm_params(np.random.default_rng(4))
    edit(state)
    with pytest.raises(MrcError, match=message):
        convert_state_dict(state)


# ----------------------------------------------------------------- files and CLI
def test_timm_pth_round_trip(tmp_path):
    torch = _torch()
    timm = timm_params(np.random.default_rng(5), dist=True)
    src = tmp_path / "deit.pth"
    save_pth(torch, src, timm, wrap="model")
    out = tmp_path / "w.safetensors"
    r = run_cli(src, "-o", out, "--num-heads", "4")
    assert r.returncode == 0, r.stderr
    tensors, meta = read_safetensors(out)
    assert_same_tensors(tensors, timm)
    assert meta == {"num_heads": "4", "source": "timm-pytorch"}


def test_pth_half_precision_state_dict_key_and_config_json(tmp_path):
    torch = _torch()
    timm = timm_params(np.random.default_rng(6), dtype=np.float16)
    src = tmp_path / "pytorch_model.bin"
    save_pth(torch, src, to_legacy_hf(timm), wrap="state_dict")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "hidden_size": 64}))
    out = tmp_path / "w.safetensors"
    convert_file(src, out)  # in-process: the CLI path is covered by the test above
    tensors, meta = read_safetensors(out)
    assert_same_tensors(tensors, {k: v.astype(np.float32) for k, v in timm.items()})
    assert meta == {"num_heads": "8", "source": "transformers-pytorch"}


def test_safetensors_input_keeps_metadata_num_heads(tmp_path):
    from safetensors.numpy import save_file

    timm = timm_params(np.random.default_rng(7))
    src = tmp_path / "in.safetensors"
    save_file(timm, str(src), metadata={"num_heads": "2"})
    out = tmp_path / "out.safetensors"
    r = run_cli(src, "-o", out)
    assert r.returncode == 0, r.stderr
    tensors, meta = read_safetensors(out)
    assert_same_tensors(tensors, timm)
    assert meta == {"num_heads": "2", "source": "timm-safetensors"}
    r = run_cli(src, "-o", out, "--num-heads", "16")  # the flag wins
    assert r.returncode == 0, r.stderr
    assert read_safetensors(out)[1]["num_heads"] == "16"


@pytest.mark.parametrize("case", ["unknown-layout", "extra-tensor"])
def test_pth_with_bad_layout_raises(tmp_path, case):
    """The layout checks after loading are shared with .safetensors (tested
    through the CLI there); here in-process, to save torch start-ups."""
    torch = _torch()
    timm = timm_params(np.random.default_rng(10))
    src, out = tmp_path / "ckpt.pth", tmp_path / "out.safetensors"
    if case == "unknown-layout":
        save_pth(torch, src, {"backbone.conv1.weight": np.ones((4, 3, 3, 3), np.float32)}, wrap="state_dict")
        fragment = "unknown checkpoint layout"
    else:
        save_pth(torch, src, dict(timm, **{"blocks.0.ls1.gamma": np.ones(64, np.float32)}))  # layer scale
        fragment = "blocks.0.ls1.gamma"
    with pytest.raises(MrcError, match=fragment) as info:
        convert_file(src, out)
    assert str(src) in str(info.value)
    assert not out.exists()


def _has_torch():
    """Whether torch imports (data_tools.convert's own test, any failure counts)."""
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


def _write_bad_inputs(root):
    """Build every bad input in its own folder: case -> (folder, src, out, stderr fragment)."""
    from safetensors.numpy import save_file

    timm = timm_params(np.random.default_rng(8))
    cases = {}

    def folder(case):
        d = root / case
        d.mkdir()
        return d

    d = folder("truncated-safetensors")
    save_file(timm, str(d / "w.safetensors"))
    blob = (d / "w.safetensors").read_bytes()
    (d / "w.safetensors").write_bytes(blob[: len(blob) // 2])
    cases["truncated-safetensors"] = (d, d / "w.safetensors", None, "truncated")
    d = folder("not-a-checkpoint")
    (d / "notes.pth").write_text("these are not the weights you are looking for\n")
    # without torch, any .pth is refused first for the missing package (one line all the same)
    cases["not-a-checkpoint"] = (d, d / "notes.pth", None,
                                 "not a readable PyTorch checkpoint" if _has_torch() else "needs torch")
    d = folder("unknown-extension")
    (d / "weights.onnx").write_bytes(b"\x08\x01")
    cases["unknown-extension"] = (d, d / "weights.onnx", None, "unknown checkpoint extension")
    d = folder("unknown-layout-safetensors")
    save_file({"encoder.weight": np.ones((2, 2), np.float32)}, str(d / "other.safetensors"))
    cases["unknown-layout-safetensors"] = (d, d / "other.safetensors", None, "unknown checkpoint layout")
    d = folder("output-is-input")
    save_file(timm, str(d / "good.safetensors"))
    cases["output-is-input"] = (d, d / "good.safetensors", d / "good.safetensors", "overwrite an input")
    d = folder("no-torch")
    (d / "model.pth").write_bytes(b"PK\x03\x04 pretend zip")
    cases["no-torch"] = (d, d / "model.pth", None, "needs torch")
    try:
        import torch
    except ImportError:
        return cases
    d = folder("truncated-pth")
    save_pth(torch, d / "ckpt.pth", timm)
    blob = (d / "ckpt.pth").read_bytes()
    (d / "ckpt.pth").write_bytes(blob[: len(blob) // 2])
    cases["truncated-pth"] = (d, d / "ckpt.pth", None, "not a readable PyTorch checkpoint")
    return cases


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Run the CLI on every bad input, all subprocesses at once (for speed)."""
    cases = _write_bad_inputs(tmp_path_factory.mktemp("bad"))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for case, (d, src, out, fragment) in cases.items():
        out = out or d / "out.safetensors"
        if case == "no-torch":  # torch made unimportable in the child
            cmd = [sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                   "from data_tools.convert.__main__ import main; sys.exit(main(sys.argv[1:]))"]
        else:
            cmd = [sys.executable, "-m", "data_tools.convert"]
        before = (src.read_bytes(), sorted(os.listdir(d)))
        proc = subprocess.Popen(cmd + [str(src), "-o", str(out)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[case] = (d, src, fragment, before, proc)
    results = {}
    for case, (d, src, fragment, before, proc) in runs.items():
        _, err = proc.communicate(timeout=120)
        results[case] = (d, src, fragment, before, proc.returncode, err)
    return results


@pytest.mark.parametrize(
    "case",
    ["truncated-safetensors", "not-a-checkpoint", "unknown-extension", "unknown-layout-safetensors",
     "output-is-input", "no-torch", "truncated-pth"],
)
def test_cli_bad_input_exits_2(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("torch is needed to write .pth test inputs")
    d, src, fragment, (blob, listing), code, err = bad_runs[case]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert str(src) in lines[0]  # names the file
    assert src.read_bytes() == blob  # input unchanged
    assert sorted(os.listdir(d)) == listing  # no output, no temporary left behind
