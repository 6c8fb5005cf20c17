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
    assert all(e["layout"] == "dense" and e["stored_params"] == e["params"] == e["shape"][0] * e["shape"][1]
               > e["numerical_rank_params"] for e in report["layers"]), report["layers"]
    # counted as stored: a dense file is as large as the original, whatever its rank
    code, text, err = run(capsys, dense, model["weights"], model["acts"], "--reduction", 0.5)
    assert code == 1 and "exceed the budget" in err and "OVER by" in text
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
    assert f"{nan}: layer base_model.model.{qkv}.lora_B: weight contains NaN or Inf" in bad(capsys, nan, weights, acts)
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


# ----------------------------------------------------------------- a stored file that lies, and other layouts
def _compressed(model, tmp_path, **kw):
    out = str(tmp_path / "c.safetensors")
    compress_files(model["weights"], model["acts"], out,
                   pipeline.Config(reduction=0.5, compensation="local", residual_rank=2), **kw)
    return out


def _rewrite(path, dst, tensors=None, **meta_changes):
    """``path`` rewritten to ``dst`` with metadata strings changed (None deletes)."""
    t, meta = formats.read_safetensors(path)
    meta = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None}
    formats.write_safetensors(dst, tensors if tensors is not None else t, meta)
    return str(dst)


@pytest.mark.parametrize("field, value, message", [
    ("reduction", float("nan"), "stored reduction must be a finite number"),
    ("reduction", 1.5, "stored reduction must be in (0, 1), got 1.5"),
    ("statistic", ["gram"], "stored statistic must be one of"),
    ("layers", "blocks.*", "stored layers must be a list of glob patterns"),
    ("residual_rank", True, "stored residual_rank must be an integer"),
])
def test_the_stored_config_is_checked_like_an_option(model, tmp_path, capsys, field, value, message):
    """A compressed file's own configuration is input: checked like a command
    line option, blamed on the compressed file, never a traceback."""
    good = _compressed(model, tmp_path)
    _, meta = formats.read_safetensors(good)
    config = json.loads(meta["config"])
    config[field] = value
    text = json.dumps(config).replace("NaN", "NaN")
    lying = _rewrite(good, tmp_path / "lying.safetensors", config=text)
    line = bad(capsys, lying, model["weights"], model["acts"])
    assert line.startswith(f"{PREFIX}error: {lying}: ") and message in line, line


def test_versions_and_int8_scales_are_checked_by_every_reader(model, tmp_path, capsys):
    """An unknown version, an int8 tensor without its scale, a zero scale on
    non-zero codes: refused by verify and evaluate alike (the one reader of
    model files), in one line naming the file."""
    from mrc_ref.evaluate import __main__ as evaluate

    q8 = _compressed(model, tmp_path, quantize="int8")
    tensors, _ = formats.read_safetensors(q8)
    key = next(k[: -len(".scale")] for k in tensors if k.endswith(".scale") and "lowrank_a" in k)
    no_scale = dict(tensors)
    del no_scale[key + ".scale"]
    zero = dict(tensors)
    zero[key + ".scale"] = tensors[key + ".scale"].copy()
    zero[key + ".scale"][int(np.flatnonzero(np.any(tensors[key] != 0, axis=1))[0])] = 0
    cases = {"version 7": (_rewrite(q8, tmp_path / "v7.safetensors", version="7"), "unsupported version '7'"),
             "no scale": (_rewrite(q8, tmp_path / "ns.safetensors", no_scale), f"int8 tensor {key} has no"),
             "zero scale": (_rewrite(q8, tmp_path / "zs.safetensors", zero), f"{key}.scale is 0 on row"),
             "v1 with int8": (_rewrite(q8, tmp_path / "v1.safetensors", version="1", quantization=None),
                              "version 1 holds int8 tensors")}
    images = tmp_path / "imgs"
    images.mkdir()
    for label, (path, message) in cases.items():
        line = bad(capsys, path, model["weights"], model["acts"])
        assert line.startswith(f"{PREFIX}error: {path}: ") and message in line, (label, line)
        try:
            code = evaluate.main([path, str(images), "--quiet"])
        except SystemExit as exit:
            code = exit.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"{path}: " in err[0] and message in err[0], (label, err)


def test_mrc_ref_int8_output_is_certified_up_to_its_rounding(model, tmp_path, capsys):
    """Version 2 is read, dequantized and certified; the int8 factors pass
    within the rounding bound, and quantized plain-SVD factors still fail."""
    q8 = _compressed(model, tmp_path, quantize="int8")
    code, text, err = run(capsys, q8, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    assert code == 0, text + err
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert all(0 < e["int8_rounding_bound"] < 0.5 for e in layers if e["layout"] == "factored")
    from mrc_ref import quantize
    plain = write_peft(model, tmp_path / "plain.safetensors", plain_svd, prefix="")
    t, _ = formats.read_safetensors(plain)
    renamed = {k.replace("lora_B.weight", "lowrank_a").replace("lora_A.weight", "lowrank_b"): v for k, v in t.items()}
    renamed.update({k: v for k, v in model["tensors"].items() if not any(k == f"{n}.weight" for n in model["names"])})
    meta = {"format": "mrc_ref.compressed", "version": "2", "config": "{}", "ranks": "{}", "residual_ranks": "{}"}
    q = quantize.quantize_tensors(renamed, [n for n in model["names"]])
    meta["quantization"] = json.dumps({"scheme": quantize.SCHEME, "tensors": quantize.quantized_keys(q)})
    formats.write_safetensors(tmp_path / "plain8.safetensors", q, meta)
    code, _, err = run(capsys, tmp_path / "plain8.safetensors", model["weights"], model["acts"])
    assert code == 1 and "widened by the int8 rounding bound" in err


def test_rounding_bound_holds_for_every_rounding():
    """certificates.rounding_bound is an upper bound of ‖(A B − Ã B̃) S‖ for
    factors anywhere within half a step of the stored ones (random and extreme
    corners), and is reached within a modest factor by the worst corner found."""
    from mrc_ref import certificates

    rng = np.random.default_rng(0)
    m, r, n = 12, 3, 9
    A, B = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    X = rng.standard_normal((40, n))
    C = X.T @ X
    hA, hB = rng.uniform(0.01, 0.05, m), rng.uniform(0.01, 0.05, r)
    bound = certificates.rounding_bound(A, B, hA, hB, C)
    seen = 0.0
    for trial in range(300):
        sign = (lambda shape: rng.choice([-1.0, 1.0], shape)) if trial % 2 else (lambda shape: rng.uniform(-1, 1, shape))
        At, Bt = A + sign((m, r)) * hA[:, None], B + sign((r, n)) * hB[:, None]
        seen = max(seen, float(np.linalg.norm((A @ B - At @ Bt) @ np.linalg.cholesky(C))))
    assert seen <= bound and bound < 20 * seen


def test_counting_says_what_the_file_stores(model, tmp_path, capsys):
    """An adapter-only file stores none of the parameters outside the selected
    layers: they are counted from the original, and the summary says so."""
    path = write_peft(model, tmp_path / "svd_llm.safetensors", svd_llm)
    code, text, _ = run(capsys, path, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    totals = json.loads((tmp_path / "r.json").read_text())["totals"]
    assert code == 0 and totals["fixed_stored_in_file"] == 0 and "counted from the original weights" in text
    assert "PEFT pair r (m + n) as stored" in text


def test_ranks_above_min_m_n_and_mixed_adapters_are_bad_input(model, tmp_path, capsys):
    qkv = model["names"][0]  # 96 × 32
    t, _ = formats.read_safetensors(write_peft(model, tmp_path / "g.safetensors", svd_llm, prefix=""))
    wide = dict(t, **{f"{qkv}.lora_B.weight": np.ones((96, 40), np.float32),
                      f"{qkv}.lora_A.weight": np.ones((40, 32), np.float32)})
    formats.write_safetensors(tmp_path / "wide.safetensors", wide)
    assert "rank 40, more than min(m, n) = 32" in bad(capsys, tmp_path / "wide.safetensors", model["weights"],
                                                      model["acts"])
    mixed = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.other.weight"): v
             for k, v in t.items()}
    formats.write_safetensors(tmp_path / "mixed.safetensors", mixed)
    assert "several adapters (default, other)" in bad(capsys, tmp_path / "mixed.safetensors", model["weights"],
                                                      model["acts"])
    for scaling in ("0", "-2", "nan"):
        assert "--lora-scaling must be a positive finite number" in bad(
            capsys, tmp_path / "g.safetensors", model["weights"], model["acts"], "--lora-scaling", scaling)


# ----------------------------------------------------------------- PEFT save_pretrained directories
def write_adapter_dir(model, directory, method, ranks, alpha=16, config=None):
    """A PEFT ``save_pretrained`` directory written by hand: per-layer ranks
    through ``rank_pattern``, ``lora_alpha = alpha``; lora_B is the left factor
    divided by PEFT's scaling alpha / r, so that s · B A is the method's product."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name, r in zip(model["names"], ranks):
        W = model["tensors"][name + ".weight"].astype(np.float64)
        left, right = method(W, model["raw"][name]["gram"], r)
        out[f"base_model.model.{name}.lora_B.weight"] = (left / (alpha / r)).astype(np.float32)
        out[f"base_model.model.{name}.lora_A.weight"] = right.astype(np.float32)
    formats.write_safetensors(os.path.join(directory, "adapter_model.safetensors"), out)
    doc = {"peft_type": "LORA", "r": ranks[0], "lora_alpha": alpha, "use_rslora": False, "use_dora": False,
           "fan_in_fan_out": False, "bias": "none", "target_modules": ["qkv", "proj", "fc1", "fc2"],
           "rank_pattern": {name: r for name, r in zip(model["names"], ranks) if r != ranks[0]},
           "alpha_pattern": {}, **(config or {})}
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(doc, fh)
    return str(directory)


def test_a_peft_directory_applies_each_layers_scaling(model, tmp_path, capsys):
    ranks = [6, 3, 5, 2]
    good = write_adapter_dir(model, tmp_path / "good", svd_llm, ranks)
    code, text, err = run(capsys, good, model["weights"], model["acts"], "--report", tmp_path / "r.json")
    assert code == 0, text + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["rank"] for e in report["layers"]] == ranks
    assert [e["lora_scaling"] for e in report["layers"]] == [16 / r for r in ranks]
    assert run(capsys, write_adapter_dir(model, tmp_path / "plain", plain_svd, ranks), model["weights"],
               model["acts"])[0] == 1
    # a single scaling for all cannot certify mixed ranks: the old way fails
    code, _, _ = run(capsys, os.path.join(good, "adapter_model.safetensors"), model["weights"], model["acts"],
                     "--lora-scaling", str(16 / 6))
    assert code == 1


@pytest.mark.parametrize("config, message", [
    ({"use_dora": True}, "sets use_dora = True, which verify does not implement"),
    ({"fan_in_fan_out": True}, "sets fan_in_fan_out = True"),
    ({"bias": "lora_only"}, "sets bias = 'lora_only'"),
    ({"modules_to_save": ["head"]}, "sets modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive finite number"),
    ({"rank_pattern": {"blocks.0.attn.qkv": 5}}, "stores a pair of rank 6, but adapter_config.json gives r = 5"),
])
def test_peft_features_verify_does_not_implement_are_refused(model, tmp_path, capsys, config, message):
    d = write_adapter_dir(model, tmp_path / "a", svd_llm, [6, 6, 6, 6], config=config)
    line = bad(capsys, d, model["weights"], model["acts"])
    assert message in line and "adapter_config.json" in line, line
    assert "--lora-scaling applies to a bare state dict" in bad(
        capsys, write_adapter_dir(model, tmp_path / "b", svd_llm, [6] * 4), model["weights"], model["acts"],
        "--lora-scaling", "2")


@pytest.mark.oracle
def test_a_real_peft_save_pretrained_directory(model, tmp_path, capsys):
    """The independent oracle: PEFT itself. A torch model with the ViT's layer
    names gets LoRA adapters (lora_alpha = 16, a per-layer rank_pattern, the
    pairs set to SVD-LLM's factors), is saved by save_pretrained and passes;
    the same with plain SVD fails; and each pair's product as verify reads it
    equals the change of PEFT's own forward."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    ranks = dict(zip(model["names"], [6, 3, 5, 2]))

    def build():
        root = nn.Module()
        for name in model["names"]:
            parent = root
            for part in name.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            W = model["tensors"][name + ".weight"]
            layer = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64)
            layer.weight.data = torch.tensor(W, dtype=torch.float64)
            parent.add_module(name.split(".")[-1], layer)
        return root

    for method, expected in ((svd_llm, 0), (plain_svd, 1)):
        config = peft.LoraConfig(r=6, lora_alpha=16, target_modules=["qkv", "proj", "fc1", "fc2"],
                                 rank_pattern={k: v for k, v in ranks.items() if v != 6})
        wrapped = peft.get_peft_model(build(), config)
        for name, r in ranks.items():
            module = wrapped.get_submodule("base_model.model." + name)
            W = model["tensors"][name + ".weight"].astype(np.float64)
            left, right = method(W, model["raw"][name]["gram"], r)
            scaling = module.scaling["default"]
            assert scaling == 16 / r
            module.lora_B["default"].weight.data = torch.tensor(left / scaling)
            module.lora_A["default"].weight.data = torch.tensor(right)
            x = torch.tensor(np.random.default_rng(0).standard_normal((7, W.shape[1])))
            with torch.no_grad():
                change = (module(x) - module.base_layer(x)).numpy()
            np.testing.assert_allclose(change, x.numpy() @ (left @ right).T, rtol=1e-10, atol=1e-12)
        directory = tmp_path / method.__name__
        wrapped.save_pretrained(str(directory))
        code, text, err = run(capsys, directory, model["weights"], model["acts"])
        assert code == expected, text + err
