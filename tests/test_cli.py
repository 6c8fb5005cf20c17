"""``python -m mrc_ref.compress`` end to end on the synthetic model
(docs/cli.md): successful runs and their outputs, then one test per kind of
bad input (exit code 2, one line on stderr naming file and layer, inputs
unchanged, nothing written)."""

import json
import math
import os

import h5py
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers import command_modules
from mrc_ref import allocate, stats
from mrc_ref.errors import ConfigError

STEPS = "20"  # Adam steps per layer: enough to move, small enough to be fast
SELECTED = [f"blocks.{b}.{k}" for b in range(2) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
LAYER_FIELDS = {"name", "shape", "statistic", "rank", "residual_rank", "params_before", "params_after",
                "nmse_stage1", "nmse_stage3"}
TOTAL_FIELDS = {"params_before", "params_after", "budget", "reduction_target", "reduction_achieved",
                "layers_selected", "layers_factored"}


def budget_of(weights, reduction, stored_params):
    """``⌊(1 − reduction) P_total⌋`` with ``P_total`` counted from the file."""
    return math.floor((1 - reduction) * stored_params(weights))


def factor_ranks(path):
    """``{layer: (r, q)}`` read from the factor tensors of an output file."""
    t = load_file(path)
    return {k[: -len(".lowrank_a")]: (v.shape[1], t[k[: -len(".lowrank_a")] + ".residual_p"].shape[1]
                                      if k[: -len(".lowrank_a")] + ".residual_p" in t else 0)
            for k, v in t.items() if k.endswith(".lowrank_a")}


def check_ok(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def run_ok(run_cli, weights, acts, out, *args):
    proc = run_cli(weights, acts, "-o", out, "--steps", STEPS, "--quiet", *args)
    check_ok(proc)
    assert os.path.isfile(out)
    return proc


# ------------------------------------------------------------------ the default run
@pytest.fixture(scope="module")
def default_run(synthetic_model, run_cli, snapshot, tmp_path_factory):
    weights, acts = synthetic_model
    inputs_before = snapshot(os.path.dirname(weights))
    d = tmp_path_factory.mktemp("default_run")
    out, report = str(d / "out.safetensors"), str(d / "report.json")
    proc = run_cli(weights, acts, "-o", out, "--report", report, "--steps", STEPS, "--quiet")
    return {"proc": proc, "out": out, "report": report, "dir": str(d), "weights": weights, "acts": acts,
            "inputs_before": inputs_before, "inputs_after": snapshot(os.path.dirname(weights))}


def test_default_run_succeeds(default_run):
    check_ok(default_run["proc"])
    assert os.path.isfile(default_run["out"]) and os.path.isfile(default_run["report"])
    # Nothing else left in the output directory (no temporary files).
    assert sorted(os.listdir(default_run["dir"])) == ["out.safetensors", "report.json"]


def test_default_run_leaves_inputs_unchanged(default_run):
    assert default_run["inputs_after"] == default_run["inputs_before"]


def test_report_fields(default_run, stored_params, read_header):
    with open(default_run["report"]) as fh:
        report = json.load(fh)
    assert {"config", "layers", "totals"} <= set(report)
    assert [e["name"] for e in report["layers"]] == SELECTED
    header = read_header(default_run["weights"])[0]
    ranks = factor_ranks(default_run["out"])
    for e in report["layers"]:
        assert LAYER_FIELDS <= set(e), e["name"]
        m, n = header[e["name"] + ".weight"]["shape"]
        assert e["shape"] == [m, n]
        assert e["statistic"] == "gram"
        assert e["params_before"] == m * n
        if e["rank"] is None:
            assert e["params_after"] == m * n and e["name"] not in ranks
        else:
            assert ranks[e["name"]] == (e["rank"], e["residual_rank"])
            assert e["params_after"] == (e["rank"] + e["residual_rank"]) * (m + n)
            assert e["params_after"] < m * n
        assert 0 <= e["nmse_stage3"] <= e["nmse_stage1"] <= 1
    t = report["totals"]
    assert TOTAL_FIELDS <= set(t)
    assert t["params_before"] == stored_params(default_run["weights"])
    assert t["params_after"] == stored_params(default_run["out"])
    assert t["budget"] == budget_of(default_run["weights"], 0.6, stored_params)
    assert t["reduction_target"] == 0.6
    assert t["reduction_achieved"] == pytest.approx(1 - t["params_after"] / t["params_before"])
    assert t["layers_selected"] == len(SELECTED)
    assert t["layers_factored"] == len(ranks)
    assert report["config"]["steps"] == int(STEPS) and report["config"]["compensation"] == "local"


def test_parameters_within_budget(default_run, stored_params):
    budget = budget_of(default_run["weights"], 0.6, stored_params)
    assert stored_params(default_run["out"]) <= budget


def test_summary_table_printed(default_run, stored_params):
    out = default_run["proc"].stdout
    assert "layer" in out and "rank" in out and "NMSE stage 1" in out and "NMSE stage 3" in out
    for name in SELECTED:
        assert name in out
    before, after = stored_params(default_run["weights"]), stored_params(default_run["out"])
    assert f"{before} -> {after}" in out
    assert default_run["out"] in out and default_run["report"] in out  # "wrote ..."


def test_metadata_matches_report(default_run):
    with open(default_run["report"]) as fh:
        report = json.load(fh)
    with safe_open(default_run["out"], "np") as f:
        meta = f.metadata()
    assert meta["format"] == "mrc_ref.compressed" and meta["version"] == "1"
    assert meta["num_heads"] == "4"
    assert json.loads(meta["config"]) == report["config"]
    assert json.loads(meta["ranks"]) == {e["name"]: e["rank"] for e in report["layers"]}
    assert json.loads(meta["residual_ranks"]) == {e["name"]: e["residual_rank"] for e in report["layers"]}


def test_deterministic(default_run, run_cli, tmp_path):
    out, rep = str(tmp_path / "out.safetensors"), str(tmp_path / "report.json")
    check_ok(run_cli(default_run["weights"], default_run["acts"], "-o", out, "--report", rep,
                     "--steps", STEPS, "--quiet"))
    with open(out, "rb") as a, open(default_run["out"], "rb") as b:
        assert a.read() == b.read()
    with open(rep) as a, open(default_run["report"]) as b:
        assert a.read() == b.read()


def test_seed_changes_only_the_adam_residual(default_run, run_cli, tmp_path):
    """The seed draws Adam's initial Q; the exact solver has no randomness."""
    outs = {}
    for solver in ("exact", "adam"):
        for seed in ("0", "1"):
            outs[solver, seed] = str(tmp_path / f"{solver}{seed}.safetensors")
            run_ok(run_cli, default_run["weights"], default_run["acts"], outs[solver, seed], "--solver", solver,
                   "--seed", seed, "--steps", "20")
    name = SELECTED[0]
    (a, b), (c, d) = ([load_file(outs[s, seed]) for seed in ("0", "1")] for s in ("exact", "adam"))
    np.testing.assert_array_equal(a[name + ".lowrank_a"], c[name + ".lowrank_a"])
    np.testing.assert_array_equal(c[name + ".lowrank_a"], d[name + ".lowrank_a"])
    np.testing.assert_array_equal(a[name + ".residual_q"], b[name + ".residual_q"])
    assert not np.array_equal(c[name + ".residual_q"], d[name + ".residual_q"])


def test_default_output_name(model_copy, run_cli, tmp_path):
    weights, acts = model_copy
    proc = run_cli(weights, acts, "--steps", "2", "--quiet", cwd=tmp_path)
    check_ok(proc)
    assert sorted(os.listdir(tmp_path)) == ["acts.h5", "weights.compressed.safetensors", "weights.safetensors"]


def test_example_mode(run_cli, tmp_path):
    proc = run_cli("--example", "--steps", "2", "--quiet", cwd=tmp_path)
    check_ok(proc)
    assert os.listdir(tmp_path) == ["example.compressed.safetensors"]
    assert "parameters" in proc.stdout


# ------------------------------------------------------------------ options
# The rules the contract names, plus any variant the library adds later.
ALLOCATIONS = ["greedy", "threshold", "uniform"] + [a for a in allocate.ALLOCATIONS
                                                    if a not in ("greedy", "threshold", "uniform")]
STATISTICS = ["gram", "per-image", "mean-input", "weight"] + [s for s in stats.STATISTICS
                                                               if s not in ("gram", "per-image", "mean-input", "weight")]


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_allocation_runs(synthetic_model, run_cli, tmp_path, stored_params, allocation):
    weights, acts = synthetic_model
    out, rep = str(tmp_path / "o.safetensors"), str(tmp_path / "r.json")
    run_ok(run_cli, weights, acts, out, "--allocation", allocation, "--report", rep)
    assert stored_params(out) <= budget_of(weights, 0.6, stored_params)
    with open(rep) as fh:
        assert json.load(fh)["config"]["allocation"] == allocation


@pytest.mark.parametrize("statistic", STATISTICS)
def test_statistic_runs(synthetic_model, run_cli, tmp_path, stored_params, statistic):
    weights, acts = synthetic_model
    out, rep = str(tmp_path / "o.safetensors"), str(tmp_path / "r.json")
    run_ok(run_cli, weights, acts, out, "--statistic", statistic, "--report", rep, "--reduction", "0.5")
    assert stored_params(out) <= budget_of(weights, 0.5, stored_params)
    with open(rep) as fh:
        report = json.load(fh)
    assert report["config"]["statistic"] == statistic
    assert {e["statistic"] for e in report["layers"]} == {statistic}


def test_compensation_none_writes_no_residual(synthetic_model, run_cli, tmp_path, stored_params):
    weights, acts = synthetic_model
    out, rep = str(tmp_path / "o.safetensors"), str(tmp_path / "r.json")
    run_ok(run_cli, weights, acts, out, "--compensation", "none", "--report", rep)
    keys = list(load_file(out))
    assert any(k.endswith(".lowrank_a") for k in keys)
    assert not any(k.endswith((".residual_p", ".residual_q")) for k in keys)
    with safe_open(out, "np") as f:
        assert set(json.loads(f.metadata()["residual_ranks"]).values()) == {0}
    with open(rep) as fh:
        report = json.load(fh)
    assert report["config"]["compensation"] == "none" and report["config"]["residual_rank"] == 0
    for e in report["layers"]:
        assert e["residual_rank"] == 0 and e["nmse_stage3"] == e["nmse_stage1"]
    assert stored_params(out) <= budget_of(weights, 0.6, stored_params)


def test_fixed_rank(synthetic_model, run_cli, tmp_path):
    weights, acts = synthetic_model
    out, rep = str(tmp_path / "o.safetensors"), str(tmp_path / "r.json")
    run_ok(run_cli, weights, acts, out, "--rank", "5", "--report", rep)
    assert factor_ranks(out) == {name: (5, 8) for name in SELECTED}
    with safe_open(out, "np") as f:
        assert json.loads(f.metadata()["ranks"]) == {name: 5 for name in SELECTED}
    with open(rep) as fh:
        assert json.load(fh)["totals"]["budget"] is None


def test_layers_subset(synthetic_model, run_cli, tmp_path, raw_tensors):
    weights, acts = synthetic_model
    out = str(tmp_path / "o.safetensors")
    run_ok(run_cli, weights, acts, out, "--layers", "blocks.0.*", "--reduction", "0.2")
    assert set(factor_ranks(out)) <= {n for n in SELECTED if n.startswith("blocks.0.")}
    before, after = raw_tensors(weights), raw_tensors(out)
    for name in SELECTED[4:]:
        assert after[name + ".weight"] == before[name + ".weight"]


def test_float32_statistics_and_dtype(model_copy, run_cli, tmp_path, stored_params):
    """Statistics stored in float32 (allowed by the contract) and float32 math."""
    weights, acts = model_copy
    with h5py.File(acts, "a") as f:
        for g in f["layers"].values():
            for key in ("gram", "sum", "gram_normalized"):
                data = g[key][()].astype(np.float32)
                del g[key]
                g[key] = data
    out = str(tmp_path / "o.safetensors")
    run_ok(run_cli, weights, acts, out, "--dtype", "float32", "--rank-step", "3")
    assert stored_params(out) <= budget_of(weights, 0.6, stored_params)


def test_error_is_one_line_without_quiet(model_copy, run_cli, tmp_path):
    """Without --quiet (the default) a failing run's stderr, read from a pipe,
    is still the one error line: progress bars must not leave lines behind
    when stderr is not a terminal."""
    weights, acts = model_copy
    with h5py.File(acts, "a") as f:
        f["layers/blocks.1.mlp.fc1/gram"][0, 0] = np.nan
    proc = run_cli(weights, acts, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "blocks.1.mlp.fc1" in proc.stderr


# ------------------------------------------------------------------ bad input
def _edit_layer(acts, layer, fn):
    with h5py.File(acts, "a") as f:
        fn(f["layers"][layer])


def _replace(group, key, value):
    del group[key]
    group[key] = value


def _set(key, fn):
    """Edit dataset ``key`` of a layer group with ``fn(array) -> array``."""
    return lambda g: _replace(g, key, fn(g[key][()]))


def _nan_00(a):
    a = a.copy()
    a[0, 0] = np.nan
    return a


def _inf_3(a):
    a = a.copy()
    a[3] = np.inf
    return a


def _asymmetric(a):
    a = a.copy()
    a[0, 1] += 0.1 * np.abs(a).max()
    return a


def _indefinite(a):
    """Symmetric, positive diagonal, eigenvalue ≈ −10·max(diag) along e0 − e1."""
    a = a.copy()
    t = 10 * np.diag(a).max()
    a[0, 1] += t
    a[1, 0] += t
    assert np.linalg.eigvalsh(a).min() < -t / 2 and np.diag(a).min() > 0
    return a


def _root_attr(acts, key, value):
    with h5py.File(acts, "a") as f:
        f.attrs[key] = value


def _delete(acts, path):
    with h5py.File(acts, "a") as f:
        del f[path]


def _dataset(acts, path):
    with h5py.File(acts, "a") as f:
        f.create_dataset(path, data=np.zeros(3))


def _write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def _cut_half(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])


def _random_bytes(path):
    with open(path, "wb") as fh:
        fh.write(np.random.default_rng(0).bytes(4096))


def _nan_weight(weights, name):
    with safe_open(weights, "np") as f:
        meta = f.metadata()
    t = load_file(weights)
    t[name] = t[name].copy()
    t[name][3, 4] = np.nan
    save_file(t, weights, metadata=meta)


def _smallest_size(weights, read_header, q=8):
    """Every selected layer at rank 1 with residual rank ``q`` (each is
    compressible at the default q), the rest as stored."""
    header = read_header(weights)[0]
    total = sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    for name in SELECTED:
        m, n = header[name + ".weight"]["shape"]
        assert (m * n) // (m + n) - q - 1 >= 1
        total += (1 + q) * (m + n) - m * n
    return total


class Case:
    """A bad input: ``setup(ctx)`` edits the copies and returns extra
    arguments; ``file`` is the path the message must name (``"weights"``,
    ``"acts"``, ``"out"``, ``"report"`` or ``None``); ``layer`` the layer it
    must name; ``words`` further text it must contain."""

    def __init__(self, setup, file=None, layer=None, words=()):
        self.setup, self.file, self.layer, self.words = setup, file, layer, words


L = "blocks.1.mlp.fc1"  # a layer in the middle of the forward order
BAD = {
    "weights-random-bytes": Case(lambda c: _random_bytes(c.weights), "weights"),
    "weights-truncated": Case(lambda c: _cut_half(c.weights), "weights"),
    "weights-missing": Case(lambda c: os.remove(c.weights), "weights"),
    "weights-nan": Case(lambda c: _nan_weight(c.weights, "blocks.1.attn.qkv.weight"), "weights",
                        "blocks.1.attn.qkv", ["nan"]),
    "acts-truncated": Case(lambda c: _cut_half(c.acts), "acts"),
    "acts-not-hdf5": Case(lambda c: _write_text(c.acts, "not an HDF5 file\n"), "acts"),
    "acts-missing": Case(lambda c: os.remove(c.acts), "acts"),
    "acts-wrong-format": Case(lambda c: _root_attr(c.acts, "format", "something.else"), "acts", None, ["format"]),
    "acts-wrong-version": Case(lambda c: _root_attr(c.acts, "version", 2), "acts", None, ["version"]),
    "layer-missing": Case(lambda c: _delete(c.acts, f"layers/{L}"), "acts", L),
    "layer-no-sum": Case(lambda c: _delete(c.acts, f"layers/{L}/sum"), "acts", L, ["sum"]),
    "gram-shape": Case(lambda c: _edit_layer(c.acts, "blocks.1.mlp.fc2", _set("gram", lambda a: a[:-1, :-1])),
                       "acts", "blocks.1.mlp.fc2", ["shape"]),
    "gram-asymmetric": Case(lambda c: _edit_layer(c.acts, L, _set("gram", _asymmetric)), "acts", L, ["symmetric"]),
    "gram-nan": Case(lambda c: _edit_layer(c.acts, L, _set("gram", _nan_00)), "acts", L, ["nan"]),
    "sum-inf": Case(lambda c: _edit_layer(c.acts, "blocks.1.attn.proj", _set("sum", _inf_3)),
                    "acts", "blocks.1.attn.proj", ["sum", "inf"]),
    "gram-zero": Case(lambda c: _edit_layer(c.acts, L, _set("gram", np.zeros_like)), "acts", L, ["zero"]),
    "rows-zero": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.attrs.__setitem__("rows", 0)),
                      "acts", L, ["rows"]),
    "rows-negative": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.attrs.__setitem__("rows", -5)),
                          "acts", L, ["rows"]),
    "gram-not-psd": Case(lambda c: _edit_layer(c.acts, "blocks.0.mlp.fc2", _set("gram", _indefinite)),
                         "acts", "blocks.0.mlp.fc2", ["semi-definite"]),
    "gram-not-psd-tall": Case(lambda c: _edit_layer(c.acts, "blocks.0.attn.qkv", _set("gram", _indefinite)),
                              "acts", "blocks.0.attn.qkv", ["semi-definite"]),
    "per-image-without-normalized": Case(
        lambda c: _delete(c.acts, "layers/blocks.1.attn.proj/gram_normalized") or ["--statistic", "per-image"],
        "acts", "blocks.1.attn.proj", ["gram_normalized"]),
    "sequential-without-proxy": Case(lambda c: ["--compensation", "sequential"], "acts", None, ["proxy"]),
    "rank-zero": Case(lambda c: ["--rank", "0"], None, None, ["--rank"]),
    "rank-too-large": Case(lambda c: ["--rank", "1000"], None, None, ["1000"]),
    "residual-rank-negative": Case(lambda c: ["--residual-rank", "-1"], None, None, ["--residual-rank"]),
    "residual-rank-too-large": Case(lambda c: ["--residual-rank", "100"], None, None, ["residual rank 100"]),
    "reduction-infeasible": Case(lambda c: ["--reduction", "0.99"], None, None,
                                 ["smallest reachable size", "{smallest}"]),
    "reduction-above-one": Case(lambda c: ["--reduction", "1.5"], None, None, ["--reduction", "1.5"]),
    "reduction-zero": Case(lambda c: ["--reduction", "0"], None, None, ["--reduction"]),
    "rank-step-zero": Case(lambda c: ["--rank-step", "0"], None, None, ["--rank-step"]),
    "steps-negative": Case(lambda c: ["--steps", "-1"], None, None, ["--steps"]),
    "lr-zero": Case(lambda c: ["--lr", "0"], None, None, ["--lr"]),
    "output-is-weights": Case(lambda c: c.set(out=c.weights), "weights", None, ["input"]),
    "output-is-acts": Case(lambda c: c.set(out=c.acts), "acts", None, ["input"]),
    "report-is-weights": Case(lambda c: c.set(report=c.weights), "weights", None, ["input"]),
    "output-dir-missing": Case(lambda c: c.set(out=os.path.join(c.dir, "nowhere", "o.safetensors")), "out"),
    "report-dir-missing": Case(lambda c: c.set(report=os.path.join(c.dir, "nowhere", "r.json")), "report"),
    "seed-negative": Case(lambda c: ["--seed", "-1"], None, None, ["--seed"]),
    "output-is-a-directory": Case(lambda c: c.set(out=c.dir), "out", None, ["directory"]),
    "report-is-output": Case(lambda c: c.set(report=c.out), "report", None, ["overwrite"]),
    "acts-version-text": Case(lambda c: _root_attr(c.acts, "version", "one"), "acts", None, ["version"]),
    "acts-layers-not-a-group": Case(lambda c: _delete(c.acts, "layers") or _root_attr(c.acts, "x", 0)
                                    or _dataset(c.acts, "layers"), "acts", None, ["layers"]),
    "acts-proxy-not-a-group": Case(lambda c: _dataset(c.acts, "proxy"), "acts", None, ["proxy"]),
    "layers-match-nothing": Case(lambda c: ["--layers", "nomatch.*"], None, None, ["nomatch"]),
    "device-cuda": Case(lambda c: ["--device", "cuda"], None, None, ["cuda"]),
}


# ------------------------------------------------------------------ bad input: hardening
def _weight(weights, layer):
    return load_file(weights)[layer + ".weight"].astype(np.float64)


def _indefinite_in_null_space(c, layer):
    """Make the Gram of a wide layer (m < n) indefinite along a direction in
    the null space of its weight (its smallest eigenvalue becomes −0.1 times
    the largest), keeping a positive diagonal: ``W C Wᵀ`` does not change, so
    only a check of the statistic itself can see it."""
    W = _weight(c.weights, layer)
    m, n = W.shape
    assert m < n

    def edit(g):
        gram = g["gram"][()]
        null = np.linalg.svd(W)[2][m:].T
        v = null @ np.linalg.eigh(null.T @ gram @ null)[1][:, 0]  # least energy within the null space
        top = np.linalg.eigvalsh(gram)[-1]
        bad = gram - (v @ gram @ v + 0.1 * top) * np.outer(v, v)
        bad = (bad + bad.T) / 2
        evals = np.linalg.eigvalsh(bad)
        assert evals[0] < -0.05 * evals[-1] and np.diag(bad).min() > 0
        assert np.allclose(W @ bad @ W.T, W @ gram @ W.T, rtol=1e-9, atol=1e-9 * top)
        _replace(g, "gram", bad)

    _edit_layer(c.acts, layer, edit)


def _declare(acts, path, shape, dtype="f4"):
    """Replace dataset ``path`` by a chunked one that declares ``shape`` but
    holds no data (the file stays small)."""
    with h5py.File(acts, "a") as f:
        if path in f:
            del f[path]
        f.create_dataset(path, shape=shape, dtype=dtype, chunks=tuple(min(s, 64) or 1 for s in shape))


def _proxy(acts, tokens):
    with h5py.File(acts, "a") as f:
        f.create_group("proxy").create_dataset("tokens", data=tokens)


def _tokens(images=3, nan=False):
    t = np.random.default_rng(0).standard_normal((images, 17, 64)).astype(np.float32)
    if nan:
        t[-1, 5, 7] = np.nan
    return t


def _external_link(c, layer, key="gram"):
    """Move ``layers/<layer>/<key>`` into ``other.h5`` and link to it."""
    other = os.path.join(c.dir, "other.h5")
    with h5py.File(c.acts, "a") as f, h5py.File(other, "a") as o:
        o[key] = f[f"layers/{layer}/{key}"][()]
        del f[f"layers/{layer}/{key}"]
        f[f"layers/{layer}/{key}"] = h5py.ExternalLink("other.h5", "/" + key)


def _external_group(c, layer):
    other = os.path.join(c.dir, "other.h5")
    with h5py.File(c.acts, "a") as f, h5py.File(other, "a") as o:
        f.copy(f[f"layers/{layer}"], o, name="g")
        del f[f"layers/{layer}"]
        f[f"layers/{layer}"] = h5py.ExternalLink("other.h5", "/g")


def _external_storage(c, layer):
    """``gram`` whose raw data is kept in a separate file, ``gram.bin``."""
    raw = os.path.join(c.dir, "gram.bin")
    with h5py.File(c.acts, "a") as f:
        gram = f[f"layers/{layer}/gram"][()]
        gram.astype("<f8").tofile(raw)
        del f[f"layers/{layer}/gram"]
        f.create_dataset(f"layers/{layer}/gram", shape=gram.shape, dtype="<f8",
                         external=[("gram.bin", 0, gram.nbytes)])


def _zero_weight(weights, name):
    with safe_open(weights, "np") as f:
        meta = f.metadata()
    t = load_file(weights)
    t[name] = np.zeros_like(t[name])
    save_file(t, weights, metadata=meta)


def _new_header(weights, header):
    """Replace the JSON header of a safetensors file, keeping its data."""
    with open(weights, "rb") as fh:
        blob = fh.read()
    hlen = int.from_bytes(blob[:8], "little")
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(weights, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + blob[8 + hlen :])


def _edit_header(weights, fn):
    with open(weights, "rb") as fh:
        hlen = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(hlen))
    fn(header)
    _new_header(weights, header)


def _set_dtype(name, code):
    return lambda h: h[name].__setitem__("dtype", code)


def _append(path, data):
    with open(path, "ab") as fh:
        fh.write(data)


def _symlinked(c, out_in, report_in, out_name="out.safetensors", report_name="out.safetensors"):
    """``real/`` and a link ``link -> real``; the output and the report in
    either (``"real"``, ``"link"``, or ``"."`` for the input directory)."""
    os.mkdir(os.path.join(c.dir, "real"))
    os.symlink("real", os.path.join(c.dir, "link"))
    os.symlink(".", os.path.join(c.dir, "here"))
    where = {"real": "real", "link": "link", ".": "here"}
    return c.set(out=os.path.join(c.dir, where[out_in], out_name),
                 report=os.path.join(c.dir, where[report_in], report_name))


FC2 = "blocks.0.mlp.fc2"  # 64 x 256: m < n, so W C Wᵀ hides part of C
BAD.update({
    # 1. the statistic itself must be positive semi-definite
    "gram-indefinite-in-null-space": Case(lambda c: _indefinite_in_null_space(c, FC2), "acts", FC2,
                                          ["gram is not positive semi-definite"]),
    "gram-normalized-indefinite": Case(lambda c: _edit_layer(c.acts, L, _set("gram_normalized", _indefinite)),
                                       "acts", L, ["gram_normalized", "semi-definite"]),
    # 3, 5. dtypes that are not real floating point, odd HDF5 types and attributes
    "gram-complex": Case(lambda c: _edit_layer(c.acts, L, _set("gram", lambda a: a + 1j * a)),
                         "acts", L, ["gram has dtype complex128"]),
    "sum-complex": Case(lambda c: _edit_layer(c.acts, L, _set("sum", lambda a: (a + 1j).astype(np.complex64))),
                        "acts", L, ["sum has dtype complex64"]),
    "gram-normalized-complex": Case(lambda c: _edit_layer(c.acts, L, _set("gram_normalized", lambda a: a + 0j)),
                                    "acts", L, ["gram_normalized has dtype complex"]),
    "gram-compound": Case(lambda c: _edit_layer(c.acts, L, _set(
        "gram", lambda a: np.zeros(a.shape, dtype=[("re", "f8"), ("im", "f8")]))), "acts", L, ["gram has dtype"]),
    "gram-string": Case(lambda c: _edit_layer(c.acts, L, _set("gram", lambda a: a.astype("S12"))),
                        "acts", L, ["gram has dtype"]),
    "gram-int": Case(lambda c: _edit_layer(c.acts, L, _set("gram", lambda a: np.rint(a).astype(np.int64))),
                     "acts", L, ["gram has dtype int64"]),
    "gram-bool": Case(lambda c: _edit_layer(c.acts, L, _set("gram", lambda a: a > 0)), "acts", L, ["gram has dtype"]),
    "gram-float16": Case(lambda c: _edit_layer(c.acts, L, _set("gram", lambda a: a.astype(np.float16))),
                         "acts", L, ["gram has dtype float16"]),
    "gram-is-a-group": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.__delitem__("gram") or g.create_group("gram")),
                            "acts", L, ["gram is not a dataset"]),
    "rows-float": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.attrs.__setitem__("rows", 2.5)),
                       "acts", L, ["rows"]),
    "rows-array": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.attrs.__setitem__("rows", [5, 6])),
                       "acts", L, ["rows"]),
    "rows-string": Case(lambda c: _edit_layer(c.acts, L, lambda g: g.attrs.__setitem__("rows", "many")),
                        "acts", L, ["rows"]),
    "acts-format-array": Case(lambda c: _root_attr(c.acts, "format", np.array(["mrc_ref.activations", "x"], "S")),
                              "acts", None, ["format"]),
    "acts-format-number": Case(lambda c: _root_attr(c.acts, "format", 3.5), "acts", None, ["format"]),
    "acts-version-array": Case(lambda c: _root_attr(c.acts, "version", [1, 1]), "acts", None, ["version"]),
    "acts-version-bool": Case(lambda c: _root_attr(c.acts, "version", True), "acts", None, ["version"]),
    # 6. declared shapes checked before any data is read
    "gram-declared-huge": Case(lambda c: _declare(c.acts, f"layers/{L}/gram", (20000, 20000)),
                               "acts", L, ["gram has shape (20000, 20000)", "(64, 64)"]),
    "sum-declared-huge": Case(lambda c: _declare(c.acts, f"layers/{L}/sum", (10**9,)),
                              "acts", L, ["sum has shape"]),
    "gram-declared-unwritten": Case(lambda c: _declare(c.acts, f"layers/{L}/gram", (64, 64)),
                                    "acts", L, ["never written"]),
    "proxy-declared-huge": Case(lambda c: _declare(c.acts, "proxy/tokens", (200000, 999, 64)),
                                "acts", None, ["proxy/tokens has shape (200000, 999, 64)", "pos_embed"]),
    "proxy-declared-unwritten": Case(lambda c: _declare(c.acts, "proxy/tokens", (200000, 17, 64)),
                                     "acts", None, ["proxy/tokens", "never written"]),
    "proxy-wrong-width": Case(lambda c: _proxy(c.acts, np.zeros((2, 17, 32), np.float32)),
                              "acts", None, ["proxy/tokens has shape (2, 17, 32)", "pos_embed"]),
    "weights-trailing-bytes": Case(lambda c: _append(c.weights, b"\0" * 4096), "weights", None, ["4096 bytes follow"]),
    "weights-data-truncated": Case(lambda c: _edit_header(c.weights, lambda h: h.__setitem__(
        "zz.extra", {"dtype": "F32", "shape": [1000], "data_offsets": [10**8, 10**8 + 4000]})),
        "weights", None, ["gap"]),
    "weights-offsets-mismatch": Case(lambda c: _edit_header(c.weights, lambda h: h["head.bias"].__setitem__(
        "shape", [3])), "weights", None, ["head.bias", "need"]),
    # 7. the right file, layer and cause
    "proxy-nan": Case(lambda c: _proxy(c.acts, _tokens(nan=True)), "acts", None, ["proxy/tokens contains nan"]),
    "proxy-zero-images": Case(lambda c: _proxy(c.acts, np.zeros((0, 17, 64), np.float32)),
                              "acts", None, ["proxy/tokens holds no images"]),
    "weights-all-zero": Case(lambda c: _zero_weight(c.weights, "blocks.1.attn.proj.weight"), "weights",
                             "blocks.1.attn.proj", ["all zero"]),
    # 8. safetensors headers
    "weights-header-list": Case(lambda c: _new_header(c.weights, "[1, 2]"), "weights", None,
                                ["header is not a json object"]),
    "weights-header-null": Case(lambda c: _new_header(c.weights, "null"), "weights", None,
                                ["header is not a json object (got null)"]),
    "weights-header-string": Case(lambda c: _new_header(c.weights, '"weights"'), "weights", None,
                                  ["header is not a json object"]),
    "weights-entry-not-object": Case(lambda c: _edit_header(c.weights, lambda h: h.__setitem__("x", 5)),
                                     "weights", None, ["'x'", "not an object"]),
    "weights-metadata-not-strings": Case(lambda c: _edit_header(c.weights, lambda h: h.__setitem__(
        "__metadata__", {"num_heads": 4})), "weights", None, ["__metadata__"]),
    "weights-f8": Case(lambda c: _edit_header(c.weights, _set_dtype("head.bias", "F8_E4M3")),
                       "weights", None, ["F8_E4M3", "not supported"]),
    # 4. outputs compared by resolved path
    "report-is-output-through-symlinked-dir": Case(lambda c: _symlinked(c, "real", "link"), "report", None,
                                                   ["overwrite", "out.safetensors"]),
    "output-is-weights-through-symlinked-dir": Case(
        lambda c: _symlinked(c, ".", "real", out_name="weights.safetensors", report_name="r.json"),
        "out", None, ["input"]),
    "report-is-acts-through-symlinked-dir": Case(
        lambda c: _symlinked(c, "real", ".", report_name="acts.h5"), "report", None, ["input"]),
    "report-is-output-via-dotdot": Case(
        lambda c: os.mkdir(os.path.join(c.dir, "sub")) or c.set(report=os.path.join(c.dir, "sub", "..", "out.safetensors")),
        "report", None, ["overwrite"]),
    # 9. float options finite and in range
    "lr-inf": Case(lambda c: ["--lr", "inf"], None, None, ["--lr must be a finite number, got inf"]),
    "lr-nan": Case(lambda c: ["--lr", "nan"], None, None, ["--lr must be a finite number, got nan"]),
    "lr-huge": Case(lambda c: ["--lr", "1e300"], None, None, ["--lr", "at most"]),
    "lr-overflow": Case(lambda c: ["--lr", "1e999"], None, None, ["--lr must be a finite number"]),
    "reduction-nan": Case(lambda c: ["--reduction", "nan"], None, None, ["--reduction must be a finite number"]),
    "reduction-minus-inf": Case(lambda c: ["--reduction=-inf"], None, None, ["--reduction must be a finite number"]),
    # 10. rank + residual rank
    "rank-plus-residual-rank-too-large": Case(lambda c: ["--rank", "60", "--residual-rank", "70"], None, None,
                                              ["rank + residual rank must not exceed min(m, n)", "192×64"]),
    # 11. HDF5 links and data in other files
    "gram-external-link": Case(lambda c: _external_link(c, L), "acts", L, ["external link", "other.h5"]),
    "layer-external-link": Case(lambda c: _external_group(c, L), "acts", L, ["external link", "other.h5"]),
    "gram-external-storage": Case(lambda c: _external_storage(c, L), "acts", L, ["gram.bin"]),
})


class Ctx:
    def __init__(self, weights, acts):
        self.weights, self.acts = weights, acts
        self.dir = os.path.dirname(weights)
        self.out = os.path.join(self.dir, "out.safetensors")
        self.report = os.path.join(self.dir, "report.json")

    def set(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)
        return []


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case, model_copy, run_cli, snapshot, read_header):
    if case == "device-cuda" and _gpu_available():
        pytest.skip("CuPy and a GPU are available: --device cuda is valid here")
    spec = BAD[case]
    ctx = Ctx(*model_copy)
    smallest = _smallest_size(ctx.weights, read_header)
    extra = spec.setup(ctx) or []
    before = snapshot(ctx.dir)
    proc = run_cli(ctx.weights, ctx.acts, "-o", ctx.out, "--report", ctx.report, "--steps", "2", "--quiet",
                   *extra, cwd=ctx.dir)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    msg = lines[0]
    if spec.file:
        assert getattr(ctx, spec.file) in msg, msg
    if spec.layer:
        assert f"layer {spec.layer}" in msg, msg
    for word in spec.words:
        assert word.format(smallest=smallest).lower() in msg.lower(), msg
    assert proc.stdout == ""
    # Inputs unchanged (bytes and mtime), no output, no stray temporary file.
    assert snapshot(ctx.dir) == before


def test_smallest_size_is_exact(synthetic_model, run_cli, tmp_path, read_header, stored_params):
    """The infeasibility message's number is reachable: a budget just above it works."""
    weights, acts = synthetic_model
    smallest = _smallest_size(weights, read_header)
    total = stored_params(weights)
    reduction = 1 - (smallest + 0.5) / total
    assert math.floor((1 - reduction) * total) >= smallest
    out = str(tmp_path / "o.safetensors")
    run_ok(run_cli, weights, acts, out, "--reduction", repr(reduction), "--compensation", "local")
    assert factor_ranks(out) == {name: (1, 8) for name in SELECTED}
    assert stored_params(out) == smallest


# ------------------------------------------------------------------ half-precision weights
def _to_half_file(src, dst, code):
    """Rewrite every float32 tensor of ``src`` as ``code`` (``"F16"``, or
    ``"BF16"``: the upper 16 bits of each float32, so the values are exact
    bfloat16 numbers); returns ``{name: float64 values as stored}``."""
    header, start = _hand_header(src)
    with open(src, "rb") as fh:
        blob = fh.read()
    out_header, chunks, values, offset = {"__metadata__": header.get("__metadata__", {})}, [], {}, 0
    for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = info["data_offsets"]
        raw = blob[start + a : start + b]
        if info["dtype"] == "F32":
            f32 = np.frombuffer(raw, "<f4")
            if code == "F16":
                half = f32.astype("<f2")
                raw, vals = half.tobytes(), half.astype(np.float64)
            else:
                bits = (f32.view("<u4") >> 16).astype("<u2")
                raw, vals = bits.tobytes(), (bits.astype("<u4") << 16).view("<f4").astype(np.float64)
            info = {**info, "dtype": code}
            values[name] = vals.reshape(info["shape"])
        out_header[name] = {**info, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(out_header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))
    return values


def _hand_header(path):
    with open(path, "rb") as fh:
        hlen = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(hlen)), 8 + hlen


@pytest.mark.parametrize("code, stored", [("BF16", "F32"), ("F16", "F16")])
def test_half_precision_weights(synthetic_model, run_cli, tmp_path, raw_tensors, code, stored):
    """BF16 tensors are read widened to float32 (exactly), F16 as stored;
    the run succeeds and a tensor passed through keeps its values."""
    weights, acts = synthetic_model
    half = str(tmp_path / "half.safetensors")
    values = _to_half_file(weights, half, code)
    out = str(tmp_path / "o.safetensors")
    run_ok(run_cli, half, acts, out, "--compensation", "local")
    raw = raw_tensors(out)
    dtype, shape, data = raw["pos_embed"]
    assert dtype == stored and shape == tuple(values["pos_embed"].shape)
    np.testing.assert_array_equal(np.frombuffer(data, "<f4" if stored == "F32" else "<f2").reshape(shape),
                                  values["pos_embed"])
    assert raw["blocks.0.attn.qkv.lowrank_a"][0] == stored


# ------------------------------------------------------------------ option values and help
def test_every_float_option_must_be_finite():
    """Every floating-point field of Config, present or added later, refuses
    NaN and ±Inf with a message naming its option."""
    import dataclasses

    from mrc_ref import pipeline

    default = pipeline.Config()
    floats = [f.name for f in dataclasses.fields(default) if isinstance(getattr(default, f.name), float)]
    assert {"lr", "reduction"} <= set(floats)
    for name in floats:
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(ConfigError, match=f"^{name} must be a finite number, got") as info:
                pipeline.check_config(dataclasses.replace(default, **{name: bad}))
            assert info.value.field == name


def test_option_errors_name_the_flag(synthetic_model, run_cli, tmp_path):
    """The library names a Config field (residual_rank); the command line
    names its flag (--residual-rank), in one line, exit code 2."""
    weights, acts = synthetic_model
    res = run_cli(weights, acts, "-o", tmp_path / "o.safetensors", "--residual-rank", "-1")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "python -m mrc_ref.compress: error: --residual-rank must be ≥ 0, got -1"]
    from mrc_ref import pipeline

    with pytest.raises(ConfigError, match="^residual_rank must be ≥ 0, got -1$"):
        pipeline.check_config(pipeline.Config(residual_rank=-1))


class _Parsed(Exception):
    pass


def _parser_of(module, monkeypatch):
    """The ArgumentParser that ``module.main`` builds, caught at parse time."""
    import argparse
    import importlib

    def catch(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed) as info:
        importlib.import_module(module).main([])
    return info.value.args[0]


def test_cli_modules_found():
    found = set(command_modules())
    assert {"mrc_ref.compress.__main__", "mrc_ref.evaluate.__main__", "mrc_ref.verify.__main__",
            "mrc_ref.report.__main__", "data_tools.capture.__main__", "data_tools.merge.__main__"} <= found


@pytest.mark.parametrize("module", command_modules())
def test_every_option_has_help_and_the_description_is_whole(module, monkeypatch):
    import argparse

    parser = _parser_of(module, monkeypatch)
    description = parser.description or ""
    assert description.strip().endswith("."), description  # a whole sentence, not the first line of one
    assert "``" not in description
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{module}: {name} has no help"
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert "%(default)" in action.help or str(action.default) in action.help, \
                f"{module}: {name} does not show its default {action.default!r}"
