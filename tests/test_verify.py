"""``python -m mrc_ref.verify`` on models written by other implementations:
an independent SVD-LLM (Cholesky whitening, uniform ranks) passes, plain
weight SVD fails naming the layer and the excess, an over-budget model
fails, mrc_ref's own output passes; bad input is one stderr line, exit 2."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from data_tools import synthetic
from mrc_ref import formats, pipeline
from mrc_ref.verify import __main__ as verify
from mrc_ref.compress import compress_files

PREFIX = "python -m mrc_ref.verify: "
RANK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A one-block ViT (width 32, MLP 64) whose statistics have more token
    rows (204) than any layer has inputs, so every Gram is positive definite."""
    d = tmp_path_factory.mktemp("verify")
    tensors = synthetic.make_model(3, depth=1, dim=32, num_heads=2, mlp_ratio=2, img_size=8, classes=5)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    raw = synthetic.make_statistics(tensors, names, images=12)
    weights, acts = str(d / "weights.safetensors"), str(d / "acts.h5")
    formats.write_safetensors(weights, tensors, {"num_heads": "2"})
    formats.write_activations(acts, raw)
    return {"dir": d, "weights": weights, "acts": acts, "tensors": tensors, "raw": raw, "names": names}


def svd_llm(W, C, r):
    """SVD-LLM (Wang et al. 2024), written here from the paper: whiten with
    the Cholesky factor C = L Lᵀ, truncate the SVD of W L = U Σ Vᵀ, and split
    W ≈ (U_r Σ_r^{1/2}) (Σ_r^{1/2} V_rᵀ L⁻¹)."""
    L = np.linalg.cholesky(C)
    U, s, Vt = np.linalg.svd(W @ L, full_matrices=False)
    root = np.sqrt(s[:r])
    right = scipy.linalg.solve_triangular(L, (root[:, None] * Vt[:r]).T, lower=True, trans="T").T
    return U[:, :r] * root, right


def plain_svd(W, C, r):
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :r] * s[:r], Vt[:r]


def write_peft(model, path, method, r=RANK, prefix="base_model.model."):
    """A PEFT-style adapter file: <prefix><name>.lora_B.weight (m, r) and .lora_A.weight (r, n)."""
    out = {}
    for name in model["names"]:
        W = model["tensors"][name + ".weight"].astype(np.float64)
        left, right = method(W, model["raw"][name]["gram"], r)
        out[f"{prefix}{name}.lora_B.weight"] = left.astype(np.float32)
        out[f"{prefix}{name}.lora_A.weight"] = right.astype(np.float32)
    formats.write_safetensors(path, out)
    return str(path)


def run(capsys, *args):
    try:
        code = verify.main([str(a) for a in args])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def own_size(model, r=RANK):
    t = model["tensors"]
    shapes = [t[k + ".weight"].shape for k in model["names"]]
    return pipeline.count_params(t) + sum(r * (m + n) - m * n for m, n in shapes)


# ----------------------------------------------------------------- the four verdicts
def test_an_independent_svd_llm_passes(model, tmp_path, capsys):
    path = write_peft(model, tmp_path / "svd_llm.safetensors", svd_llm)
    code, out, err = run(capsys, path, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    assert code == 0, out + err
    assert err == "" and "PASS: 4 layers certified" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and [e["rank"] for e in report["layers"]] == [RANK] * 4
    assert all(e["layout"] == "lora" and abs(e["excess"] - 1) < 1e-4 for e in report["layers"])
    assert report["totals"]["params_after"] == own_size(model) and report["totals"]["budget"] is None
    assert report["totals"]["allocation_gap"] >= 0  # uniform ranks: some gap to the optimum of the same size


def test_plain_weight_svd_fails_naming_layer_and_excess(model, tmp_path, capsys):
    path = write_peft(model, tmp_path / "plain.safetensors", plain_svd, prefix="")
    code, out, err = run(capsys, path, model["weights"], model["acts"])
    assert code == 1 and "FAIL:" in out
    lines = err.strip().splitlines()
    assert len(lines) == 4
    for name, line in zip(model["names"], lines):
        assert line.startswith(f"{PREFIX}certificate failed: layer {name}: Stage-1 NMSE at rank {RANK} is "), line
        factor = float(line.split("by a factor ")[1].split()[0])
        assert factor > 1.01 and "allowed ≤" in line


def test_a_model_over_budget_fails(model, tmp_path, capsys):
    path = write_peft(model, tmp_path / "svd_llm.safetensors", svd_llm)
    size = own_size(model)
    assert run(capsys, path, model["weights"], model["acts"], "--budget", size)[0] == 0
    code, out, err = run(capsys, path, model["weights"], model["acts"], "--budget", size - 1)
    assert code == 1 and "OVER" in out
    assert err.strip() == f"{PREFIX}certificate failed: total parameters {size} exceed the budget {size - 1} " \
                          f"(from --budget; {pipeline.count_params(model['tensors'])} parameters before) by 1"


@pytest.mark.parametrize("compensation", ["local", "none"])
def test_mrc_ref_output_passes(model, tmp_path, capsys, compensation):
    out = str(tmp_path / "c.safetensors")
    compress_files(model["weights"], model["acts"], out,
                   pipeline.Config(reduction=0.5, compensation=compensation, residual_rank=2))
    code, text, err = run(capsys, out, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    assert code == 0, text + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["budget_source"] == "the compressed file's reduction"
    assert report["totals"]["allocation_gap"] == pytest.approx(0, abs=1e-12)  # optimal allocation
    assert run(capsys, out, model["weights"], model["acts"], "--reduction", 0.5)[0] == 0
    code, _, err = run(capsys, out, model["weights"], model["acts"], "--reduction", 0.7)
    assert code == 1 and "exceed the budget" in err


def test_dense_merged_weights_are_certified_at_their_numerical_rank(model, tmp_path, capsys):
    out = str(tmp_path / "c.safetensors")
    compress_files(model["weights"], model["acts"], out, pipeline.Config(reduction=0.5, compensation="none"))
    tensors, meta = formats.read_compressed(out)
    dense = str(tmp_path / "dense.safetensors")
    formats.write_safetensors(dense, formats.densify(tensors))
    code, text, err = run(capsys, dense, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    assert code == 0, text + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert {e["name"]: e["rank"] for e in report["layers"]} == meta["ranks"]
    assert all(e["layout"] == "dense" and e["stored_params"] > e["params"] for e in report["layers"])
    noisy = dict(model["tensors"])
    name = model["names"][1]
    noisy[name + ".weight"] = noisy[name + ".weight"] * np.float32(1.01)
    formats.write_safetensors(dense, noisy)
    code, _, err = run(capsys, dense, model["weights"], model["acts"])
    assert code == 1 and f"layer {name}: dense weight of full numerical rank" in err


def test_a_pair_on_a_base_weight_is_certified_against_the_base_error(model, tmp_path, capsys):
    """EoRA's problem: the pair approximates W − W_base under C."""
    out = {}
    for method, expected in ((svd_llm, 0), (plain_svd, 1)):
        for name in model["names"]:
            W = model["tensors"][name + ".weight"].astype(np.float64)
            base = np.round(W * 8) / 8  # a coarse quantization
            left, right = method(W - base, model["raw"][name]["gram"], 3)
            out.update({f"{name}.base_layer.weight": base, f"{name}.lora_B.weight": left,
                        f"{name}.lora_A.weight": right})
        path = str(tmp_path / "eora.safetensors")
        formats.write_safetensors(path, out)
        code, text, err = run(capsys, path, model["weights"], model["acts"], "--report", tmp_path / "r.json")
        assert code == expected, text + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["allocation_gap"] is None and "base weight" in report["totals"]["gap_note"]
    assert "NMSE of the pair s·lora_B lora_A against the base's error W − W_base at rank 3" in err


# ----------------------------------------------------------------- bad input: exit 2
def bad(capsys, *args):
    code, out, err = run(capsys, *args)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + "error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_are_one_line_and_leave_the_inputs_unchanged(model, tmp_path, capsys, snapshot):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("weights", "acts"):
        shutil.copy(model[name], d)
    weights, acts = str(d / "weights.safetensors"), str(d / "acts.h5")
    good = write_peft(model, d / "good.safetensors", svd_llm)
    tensors, _ = formats.read_safetensors(good)
    qkv, fc1 = model["names"][0], model["names"][2]

    def variant(file, edit):
        t = dict(tensors)
        edit(t)
        formats.write_safetensors(d / file, t)
        return str(d / file)

    missing = variant("missing.safetensors", lambda t: [t.pop(k) for k in list(t) if fc1 in k])
    shape = variant("shape.safetensors", lambda t: t.update({f"base_model.model.{qkv}.lora_A.weight":
                                                             np.zeros((RANK, 7), np.float32)}))
    nan = variant("nan.safetensors", lambda t: t.update({f"base_model.model.{qkv}.lora_B.weight":
                                                         np.full((96, RANK), np.nan, np.float32)}))
    truncated = d / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:-10])
    before = snapshot(d)
    assert f"{missing}: layer {fc1}: not found in the compressed file" in bad(capsys, missing, weights, acts)
    line = bad(capsys, shape, weights, acts)
    assert f"{shape}: layer {qkv}: base_model.model.{qkv}.lora_A.weight has shape (4, 7), expected (*, 32)" in line
    assert f"{nan}: layer {qkv}: " in bad(capsys, nan, weights, acts)
    assert f"{truncated}: not a readable safetensors file" in bad(capsys, truncated, weights, acts)
    line = bad(capsys, good, weights, acts, "--layers", "blocks.*.mlp.*")
    assert f"layer {model['names'][1]}: stored in low-rank form but not selected" in line
    assert "not allowed with argument" in bad(capsys, good, weights, acts, "--budget", 5, "--reduction", 0.5)
    assert "--rtol must be a finite number ≥ 0" in bad(capsys, good, weights, acts, "--rtol", -1)
    assert "output would overwrite an input file" in bad(capsys, good, weights, acts, "--report", acts)
    assert snapshot(d) == before


def test_statistics_problems_name_the_acts_file_and_layer(model, tmp_path, capsys):
    acts = str(tmp_path / "acts.h5")
    raw = dict(model["raw"])
    proj = model["names"][1]
    raw.pop(proj)
    formats.write_activations(acts, raw)
    good = write_peft(model, tmp_path / "good.safetensors", svd_llm)
    assert f"{acts}: layer {proj}: missing from the activations file" in bad(capsys, good, model["weights"], acts)


def test_the_command_line_in_a_subprocess(model, tmp_path):
    good = write_peft(model, tmp_path / "good.safetensors", svd_llm)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "mrc_ref.verify", good, model["weights"], model["acts"]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "PASS" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "mrc_ref.verify", good, model["weights"], str(tmp_path / "none.h5")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"{PREFIX}error: {tmp_path / 'none.h5'}: no such file")


@pytest.mark.slow
def test_the_embedded_example_with_sequential_compensation_passes(tmp_path, capsys):
    from mrc_ref.example import example_paths

    weights, acts = example_paths()
    out = str(tmp_path / "example.compressed.safetensors")
    compress_files(weights, acts, out, pipeline.Config())  # sequential exact Stage 3, q = 8
    code, text, err = run(capsys, out, weights, acts)
    assert code == 0, text + err
    assert "PASS: 16 layers certified" in text and "exact optimum" in text
