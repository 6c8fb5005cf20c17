"""Calibrated mixed-rank allocation (docs/sensitivity.md): the weighted
Stage-2 objective against brute force, the sensitivity file and its bad
inputs, ``data_tools.sensitivity`` on a synthetic ViT against an independent
recomputation, and the arithmetic of the documented PyTorch recipe."""

import dataclasses
import itertools
import json
import os
import re

import numpy as np
import pytest

from data_tools import sensitivity as producer
from data_tools.sensitivity import __main__ as producer_cli
from data_tools import synthetic
from data_tools.capture import capture_statistics
from mrc_ref import allocate as al
from mrc_ref import formats, pipeline, sensitivity, svd, vit
from mrc_ref.compress import __main__ as compress
from mrc_ref.errors import MrcError

HEADS = 4
PROG = "python -m mrc_ref.compress: error: "


# ------------------------------------------------------------------ weighted allocation vs brute force
def curve_from(s2):
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return tail / tail[0]


def weighted_problem(seed):
    """2–4 small layers, decaying spectra, weights with zeros and values
    above 1 (so 1 − w·NMSE, the threshold's energy, goes negative)."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 5))
    shapes = [tuple(int(x) for x in rng.integers(6, 16, size=2)) for _ in range(count)]
    curves = []
    for m, n in shapes:
        k = min(m, n)
        curves.append(curve_from(np.sort(rng.exponential(size=k) * np.exp(-np.arange(k) * rng.uniform(0.05, 1)))[::-1]))
    weights = [float(w) for w in rng.choice([0.0, 0.01, 0.3, 1.0, 7.0, 120.0], size=count)]
    return shapes, curves, weights, int(rng.integers(0, 3)), int(rng.integers(0, 200))


def weighted_error(curves, weights, ranks):
    return sum(0.0 if r is None else w * float(c[r]) for c, w, r in zip(curves, weights, ranks))


def brute_force(shapes, curves, weights, q, fixed, budget):
    """Least Σ w_l NMSE_l(r_l) over every combination within the budget."""
    choices = [[None] + list(range(1, al.break_even_rank(m, n, q))) for m, n in shapes]
    return min(weighted_error(curves, weights, ranks) for ranks in itertools.product(*choices)
               if al.total_params(shapes, ranks, q, fixed) <= budget)


PROBLEMS = [p for p in map(weighted_problem, range(60)) if any(al.compressible(p[0], p[3]))]


def budgets(shapes, q, fixed):
    lo, hi = al.min_params(shapes, q, fixed), al.total_params(shapes, [None] * len(shapes), q, fixed)
    return [int(lo + f * (hi - lo)) for f in (0.0, 0.15, 0.5, 0.85)]


def test_weighted_optimum_and_bound_equal_brute_force():
    """optimal on w·NMSE curves is the exact weighted optimum (zero weights
    included), its bound is that optimum, and the LP bound is below it."""
    for shapes, curves, weights, q, fixed in PROBLEMS:
        scaled = al.weighted(curves, weights)
        for b in budgets(shapes, q, fixed):
            best = brute_force(shapes, curves, weights, q, fixed, b)
            ranks, bound, exact = al.optimal(scaled, shapes, q, fixed, b)
            tol = 1e-12 * max(1.0, best)
            assert exact and al.total_params(shapes, ranks, q, fixed) <= b
            assert weighted_error(curves, weights, ranks) == pytest.approx(best, abs=tol)
            assert bound == pytest.approx(best, abs=tol)
            assert al.lp_bound(scaled, shapes, q, fixed, b)[0] <= best + tol


@pytest.mark.parametrize("rule", ["greedy", "greedy-hull", "threshold", "uniform"])
def test_weighted_rules_meet_the_budget_and_never_beat_the_optimum(rule):
    for shapes, curves, weights, q, fixed in PROBLEMS:
        scaled = al.weighted(curves, weights)
        for b in budgets(shapes, q, fixed):
            ranks = al.allocate(rule, scaled, shapes, q, fixed, b)
            assert al.total_params(shapes, ranks, q, fixed) <= b, (rule, shapes, weights, b)
            value = al.objective(scaled, ranks)
            best = brute_force(shapes, curves, weights, q, fixed, b)
            assert value == pytest.approx(weighted_error(curves, weights, ranks), rel=1e-12, abs=1e-15)
            assert value >= best - 1e-12 * max(1.0, best)
            searched = al.local_search(scaled, shapes, q, fixed, b, ranks)
            assert best - 1e-12 * max(1.0, best) <= al.objective(scaled, searched) <= value + 1e-12


def test_weighted_threshold_is_the_smallest_common_cap():
    """Independent reading of the weighted threshold: each layer takes the
    smallest rank with w_l NMSE_l(r) ≤ ε (dense at r ≥ r_max), and ε is the
    smallest cap whose allocation meets the budget."""
    for shapes, curves, weights, q, fixed in PROBLEMS:
        ok = al.compressible(shapes, q)

        def ranks_at(eps):
            out = []
            for (m, n), c, w, fits in zip(shapes, curves, weights, ok):
                top = al.break_even_rank(m, n, q)
                r = next(r for r in range(1, len(c)) if w * c[r] <= eps) if fits else top
                out.append(None if r >= top else r)
            return out

        caps = sorted({w * float(c[r]) for c, w in zip(curves, weights) for r in range(1, len(c))})
        for b in budgets(shapes, q, fixed):
            eps = next(e for e in caps if al.total_params(shapes, ranks_at(e), q, fixed) <= b)
            expected = ranks_at(eps)
            got = al.threshold(al.weighted(curves, weights), shapes, q, fixed, b)
            assert al.objective(al.weighted(curves, weights), got) == pytest.approx(
                weighted_error(curves, weights, expected), rel=1e-12, abs=1e-15)


def test_weights_are_validated():
    curves = [curve_from(np.array([3.0, 2.0, 1.0]))]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(MrcError, match="finite number ≥ 0"):
            al.weighted(curves, [bad])
    with pytest.raises(MrcError, match="2 weights for 1 layers"):
        al.weighted(curves, [1.0, 1.0])


# ------------------------------------------------------------------ the pipeline with weights
@pytest.fixture(scope="module")
def small_model():
    tensors = synthetic.make_model(3, depth=2, dim=64, num_heads=HEADS)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    return tensors, synthetic.make_statistics(tensors, names, seed=3), names


def _ranks(report):
    return [e["rank"] for e in report["layers"]]


def test_unit_and_scaled_weights_give_the_papers_allocation(small_model):
    """w = 1 everywhere is the paper's objective; multiplying every weight by
    a power of two (exact in floating point) changes no rank; a file naming
    one layer gives the others its weight (the mean)."""
    tensors, raw, names = small_model
    config = pipeline.Config(compensation="none", reduction=0.6)

    def run(weights):
        return pipeline.run(tensors, raw.__getitem__, dataclasses.replace(config, sensitivity=weights), xp=np)[1]

    plain = pipeline.run(tensors, raw.__getitem__, config, xp=np)[1]
    ones = run({n: 1.0 for n in names})
    four = run({names[3]: 4.0})
    assert _ranks(plain) == _ranks(ones) == _ranks(four)
    assert plain["allocation"]["weights"] == "uniform" and ones["allocation"]["weights"] == "sensitivity"
    assert ones["allocation"]["objective"] == plain["allocation"]["objective"]
    assert four["allocation"]["objective"] == 4 * plain["allocation"]["objective"]
    assert four["allocation"]["default_weight"] == 4.0
    assert four["allocation"]["defaulted_layers"] == [n for n in names if n != names[3]]
    assert all(e["weight"] == 1.0 for e in plain["layers"]) and all(e["weight"] == 4.0 for e in four["layers"])


def test_report_of_a_weighted_run(small_model):
    """The report's objective is Σ w·NMSE of its own layers and its bound
    the exact weighted optimum; weights land in the configuration."""
    tensors, raw, names = small_model
    weights = {n: float(w) for n, w in zip(names, [0.0, 3.0, 0.5, 9.0, 0.02, 1.0, 4.0])}  # last layer defaulted
    config = pipeline.Config(compensation="none", reduction=0.6, sensitivity=weights)
    _, report = pipeline.run(tensors, raw.__getitem__, config, xp=np)
    mean = float(np.mean(list(weights.values())))
    assert [e["weight"] for e in report["layers"]] == [weights.get(n, mean) for n in names]
    a = report["allocation"]
    assert a["objective"] == pytest.approx(sum(e["weight"] * e["nmse_stage1"] for e in report["layers"]), rel=1e-12)
    assert a["nmse_sum"] == pytest.approx(sum(e["nmse_stage1"] for e in report["layers"]), rel=1e-12)
    assert a["bound"] == "exact optimum" and a["relative_gap"] == 0.0
    assert report["config"]["sensitivity"] == weights
    assert a["defaulted_layers"] == [names[-1]]


def test_unknown_layer_is_an_error_and_unselected_layers_are_ignored(small_model):
    tensors, raw, names = small_model
    for config in (pipeline.Config(compensation="none", sensitivity={"head": 2.0, names[0]: 1.0}),
                   pipeline.Config(compensation="none", layers=("blocks.0.*",), reduction=0.2,
                                   sensitivity={names[-1]: 1.0})):
        pipeline.run(tensors, raw.__getitem__, config, xp=np)
    bad = pipeline.Config(compensation="none", sensitivity={"blocks.7.mlp.fc1": 1.0})
    with pytest.raises(MrcError, match="layer blocks.7.mlp.fc1: named in the sensitivity weights") as err:
        pipeline.run(tensors, raw.__getitem__, bad, xp=np, files=("w", "a", "s.json"))
    assert str(err.value).startswith("s.json: ")
    with pytest.raises(MrcError, match="layer x: weight must be ≥ 0"):
        pipeline.check_config(pipeline.Config(sensitivity={"x": -1.0}))


def test_layer_weights_and_fit():
    w, default, defaulted = sensitivity.layer_weights(["a", "b", "c"], {"a": 1.0, "c": 4.0}, known="abcd")
    assert (w, default, defaulted) == ([1.0, 2.5, 4.0], 2.5, ["b"])
    with pytest.raises(MrcError, match="layer e: named"):
        sensitivity.layer_weights(["a"], {"e": 1.0}, known="abcd")
    rng = np.random.default_rng(0)
    pts = np.abs(rng.standard_normal((3, 2)))
    weight, residual = sensitivity.fit(pts)
    slope = np.linalg.lstsq(pts[:, :1], pts[:, 1], rcond=None)[0][0]
    assert weight == pytest.approx(slope, rel=1e-12)
    assert residual == pytest.approx(np.linalg.norm(pts[:, 1] - slope * pts[:, 0]) / np.linalg.norm(pts[:, 1]))
    assert sensitivity.fit([[0.1, 0.3], [0.2, 0.6]]) == pytest.approx((3.0, 0.0))
    with pytest.raises(MrcError):
        sensitivity.fit([[0.0, 1.0]])


def test_per_layer_for_reports():
    doc = {"metric": "m", "layers": {"a": {"weight": 2.0, "points": [(0.1, 0.2)]}, "c": {"weight": 4.0, "points": []}}}
    assert sensitivity.per_layer(doc, ["a", "b"]) == [
        {"name": "a", "weight": 2.0, "defaulted": False, "points": [[0.1, 0.2]]},
        {"name": "b", "weight": 3.0, "defaulted": True, "points": []}]


# ------------------------------------------------------------------ the file and its bad inputs
def _doc(layers=None, **root):
    doc = {"format": "mrc_ref.sensitivity", "version": 1, "metric": "logits NMSE",
           "layers": layers if layers is not None else {"blocks.0.attn.qkv": {"weight": 0.5, "points": [[0.1, 0.05]]},
                                                        "blocks.1.mlp.fc2": {"weight": 2.0}}}
    doc.update(root)
    return json.dumps(doc)


def test_write_and_read_back(tmp_path):
    path = tmp_path / "s.json"
    formats.write_sensitivity(path, "logits NMSE", {"a.b": {"weight": 1, "points": [[0.1, 0.2]], "ranks": [3]}},
                              {"source": "test"})
    assert formats.read_sensitivity(path) == {"metric": "logits NMSE",
                                              "layers": {"a.b": {"weight": 1.0, "points": [(0.1, 0.2)]}}}
    with pytest.raises(MrcError, match="layer a: weight must be finite"):
        formats.write_sensitivity(tmp_path / "t.json", "m", {"a": {"weight": float("nan")}})
    assert not os.path.exists(tmp_path / "t.json")


Q = "blocks.0.attn.qkv"
BAD_FILES = {  # name: (file text, layer named in the message or None, words)
    "not-json": ("{", None, ["not a valid json"]),
    "not-utf8": (b"\xff\xfe{}", None, ["not a valid json"]),
    "root-list": ("[1]", None, ["not a json object"]),
    "format-wrong": (_doc(format="mrc_ref.activations"), None, ["format is 'mrc_ref.activations'"]),
    "format-missing": (json.dumps({"version": 1, "metric": "m", "layers": {Q: {"weight": 1}}}), None,
                       ["format is null"]),
    "version-2": (_doc(version=2), None, ["unsupported version 2"]),
    "version-string": (_doc(version="1"), None, ["unsupported version '1'"]),
    "version-float": (_doc(version=1.0), None, ["unsupported version 1.0"]),
    "version-bool": (_doc(version=True), None, ["unsupported version true"]),
    "metric-missing": (_doc(metric=None), None, ["metric must be a string"]),
    "layers-list": (_doc(layers=[]), None, ["layers must be a non-empty object"]),
    "layers-empty": (_doc(layers={}), None, ["layers must be a non-empty object"]),
    "entry-number": (_doc(layers={Q: 0.5}), Q, ["entry is not an object"]),
    "weight-missing": (_doc(layers={Q: {"points": []}}), Q, ["has no weight"]),
    "weight-nan": (_doc(layers={Q: {"weight": float("nan")}}), Q, ["weight must be finite, got nan"]),
    "weight-infinity": (_doc(layers={Q: {"weight": float("inf")}}), Q, ["weight must be finite"]),
    "weight-overflow": ('{"format": "mrc_ref.sensitivity", "version": 1, "metric": "m", '
                        '"layers": {"' + Q + '": {"weight": 1e999}}}', Q, ["weight must be finite"]),
    "weight-negative": (_doc(layers={Q: {"weight": -0.5}}), Q, ["weight must be ≥ 0, got -0.5"]),
    "weight-string": (_doc(layers={Q: {"weight": "0.5"}}), Q, ["weight must be a number, got '0.5'"]),
    "weight-bool": (_doc(layers={Q: {"weight": True}}), Q, ["weight must be a number, got true"]),
    "weight-null": (_doc(layers={Q: {"weight": None}}), Q, ["weight must be a number, got null"]),
    "points-not-list": (_doc(layers={Q: {"weight": 1, "points": {"a": 1}}}), Q, ["points must be a list"]),
    "point-short": (_doc(layers={Q: {"weight": 1, "points": [[0.1]]}}), Q, ["point 0 must be a pair"]),
    "point-negative": (_doc(layers={Q: {"weight": 1, "points": [[0.1, 0.2], [0.1, -1]]}}), Q, ["point 1"]),
    "point-nan": (_doc(layers={Q: {"weight": 1, "points": [[float("nan"), 0.2]]}}), Q, ["point 0"]),
    "duplicate-layer": ('{"format": "mrc_ref.sensitivity", "version": 1, "metric": "m", "layers": '
                        '{"' + Q + '": {"weight": 1}, "' + Q + '": {"weight": 2}}}', None, ["twice", Q]),
    "unknown-layer": (_doc(layers={Q: {"weight": 1}, "blocks.7.attn.qkv": {"weight": 1}}), "blocks.7.attn.qkv",
                      ["the model has no such linear layer"]),
    "empty-name": (_doc(layers={"": {"weight": 1}}), None, ["a layer name is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_sensitivity_file(case, model_copy, snapshot, capsys):
    """One line on stderr naming the file (and layer), exit 2, nothing on
    stdout, inputs unchanged, no output written."""
    text, layer, words = BAD_FILES[case]
    weights, acts = model_copy
    folder = os.path.dirname(weights)
    sens = os.path.join(folder, "sens.json")
    with open(sens, "wb") as fh:
        fh.write(text if isinstance(text, bytes) else text.encode())
    before = snapshot(folder)
    code = compress.main([weights, acts, "-o", os.path.join(folder, "out.safetensors"), "--quiet",
                          "--compensation", "none", "--sensitivity", sens])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}{sens}: " + (f"layer {layer}: " if layer else "")), lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_unreadable_sensitivity_file(case, model_copy, capsys, tmp_path):
    weights, acts = model_copy
    sens = str(tmp_path / "none.json") if case == "missing" else str(tmp_path)
    code = compress.main([weights, acts, "-o", str(tmp_path / "o.safetensors"), "--quiet", "--sensitivity", sens])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"{PROG}{sens}: " + ("no such file" if case == "missing" else "cannot read"))
    assert len(err.splitlines()) == 1


def test_compress_cli_with_sensitivity(synthetic_model, run_cli, tmp_path, read_header):
    """The real command line: weights in the report, the metadata's config
    and the summary."""
    weights, acts = synthetic_model
    sens = tmp_path / "s.json"
    sens.write_text(_doc())
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    proc = run_cli(weights, acts, "-o", out, "--report", report, "--quiet", "--compensation", "none",
                   "--sensitivity", sens)
    assert proc.returncode == 0, proc.stderr
    assert "stage 2 objective Σ w·NMSE" in proc.stdout
    rep = json.loads(report.read_text())
    by_name = {e["name"]: e["weight"] for e in rep["layers"]}
    assert by_name[Q] == 0.5 and by_name["blocks.1.mlp.fc2"] == 2.0 and by_name["blocks.0.mlp.fc1"] == 1.25
    assert rep["inputs"]["sensitivity"] == "s.json" and rep["inputs"]["sensitivity_metric"] == "logits NMSE"
    meta = read_header(str(out))[0]["__metadata__"]
    assert json.loads(meta["config"])["sensitivity"] == {Q: 0.5, "blocks.1.mlp.fc2": 2.0}


# ------------------------------------------------------------------ data_tools.sensitivity on a synthetic ViT
#: The layer whose weight and bias are scaled by 0.1: its output is a tenth of
#: the residual stream's, so its end-to-end sensitivity (and that of the fc1
#: feeding it) falls by about 100× — the mechanism of the calibrated allocation in miniature.
QUIET = "blocks.0.mlp.fc2"
#: Stated tolerance: at held-out ranks (between the measured ones) every
#: prediction w_l · NMSE_l(r) is within a factor 2 of the measured end-to-end
#: error, and the median within a factor 1.3 (measured: 1.85 and 1.24),
#: while the weights span more than 50× (measured: ~190×).
HELD_OUT_FACTOR, HELD_OUT_MEDIAN_FACTOR, MIN_SPREAD = 2.0, 1.3, 50.0


@pytest.fixture(scope="module")
def vit_case(tmp_path_factory):
    """A synthetic ViT, its statistics captured from 24 random images by the
    forward pass, and those images' block-0 tokens as proxy tokens."""
    tensors = synthetic.make_model(5, depth=2, dim=64, num_heads=HEADS, dtype=np.float64)
    for key in ("weight", "bias"):
        tensors[f"{QUIET}.{key}"] = tensors[f"{QUIET}.{key}"] * 0.1
    images = np.random.default_rng(1).standard_normal((24, 3, 16, 16))
    layers, proxy = capture_statistics(tensors, [images], num_heads=HEADS, proxy_images=24, xp=np)
    seen = {}  # the head's inputs (the capture covers the block linears only)
    params = vit.prepare(tensors, np)
    vit.head(params, vit.blocks(params, proxy.astype(np.float64), HEADS, np), np, hook=seen.__setitem__)
    layers["head"] = {"gram": seen["head"].T @ seen["head"], "sum": seen["head"].sum(axis=0),
                      "rows": len(seen["head"])}
    folder = tmp_path_factory.mktemp("sensitivity")
    weights, acts = str(folder / "w.safetensors"), str(folder / "acts.h5")
    formats.write_safetensors(weights, tensors, {"num_heads": str(HEADS)})
    formats.write_activations(acts, layers, proxy_tokens=proxy)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    measured, unmeasured = producer.layer_sensitivity(tensors, layers.__getitem__, proxy, num_heads=HEADS,
                                                      names=names)
    return {"tensors": tensors, "stats": layers, "tokens": proxy, "weights": weights, "acts": acts,
            "names": names, "measured": measured, "unmeasured": unmeasured}


def own_stage_one(case, name):
    """Basis and NMSE curve of ``W C Wᵀ`` by a plain eigh (the recipe's way,
    m × m whatever the shape), independent of mrc_ref.svd."""
    W = case["tensors"][name + ".weight"]
    C = case["stats"][name]["gram"]
    s2, U = np.linalg.eigh(W @ C @ W.T)
    s2, U = np.clip(s2[::-1], 0, None), U[:, ::-1]
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return U, tail / tail[0]


def end_to_end(case, name, U, r):
    """Logits NMSE with ``W`` of ``name`` replaced by ``U_r U_rᵀ W`` (dense),
    by a full forward pass from block 0 over all tokens at once."""
    params = vit.prepare(case["tensors"], np)
    h = case["tokens"].astype(np.float64)
    ref = vit.head(params, vit.blocks(params, h, HEADS, np), np)
    p = dict(params)
    p[name + ".weight"] = U[:, :r] @ U[:, :r].T @ params[name + ".weight"]
    z = vit.head(p, vit.blocks(p, h, HEADS, np), np)
    return float(np.sum((z - ref) ** 2) / np.sum(ref**2))


def test_measured_points_match_an_independent_forward_pass(vit_case):
    """Each recorded point [NMSE(r), e2e(r)] equals the test's own Stage 1 and
    a full forward pass with the dense truncated weight, and the weight the
    least-squares slope through the origin of those points."""
    assert vit_case["unmeasured"] == []
    for name in vit_case["names"]:
        entry = vit_case["measured"][name]
        U, curve = own_stage_one(vit_case, name)
        assert len(entry["ranks"]) == 3
        for r, (x, y) in zip(entry["ranks"], entry["points"]):
            assert x == pytest.approx(curve[r], rel=1e-9)
            assert 0.005 < x < 0.3  # spread over the NMSE range (nearest ranks)
            assert y == pytest.approx(end_to_end(vit_case, name, U, r), rel=1e-8)
        x, y = np.array(entry["points"]).T
        assert entry["weight"] == pytest.approx(x @ y / (x @ x), rel=1e-12)


def test_weights_predict_held_out_ranks(vit_case, record_property):
    """The fitted weight predicts the end-to-end error of truncations at
    ranks it was not fitted on (midway between the measured ones)."""
    measured = vit_case["measured"]
    ratios = []
    for name in vit_case["names"]:
        U, curve = own_stage_one(vit_case, name)
        ranks = measured[name]["ranks"]
        for r in [(a + b) // 2 for a, b in zip(ranks, ranks[1:])]:
            assert r not in ranks
            ratios.append(measured[name]["weight"] * curve[r] / end_to_end(vit_case, name, U, r))
    factors = np.exp(np.abs(np.log(ratios)))
    weights = [measured[n]["weight"] for n in vit_case["names"]]
    record_property("worst_factor", float(factors.max()))
    record_property("weight_spread", max(weights) / min(weights))
    assert factors.max() <= HELD_OUT_FACTOR and np.median(factors) <= HELD_OUT_MEDIAN_FACTOR
    assert max(weights) / min(weights) >= MIN_SPREAD
    # the quiet layer and the fc1 feeding it are the two least sensitive
    assert sorted(vit_case["names"], key=lambda n: measured[n]["weight"])[:2] == ["blocks.0.mlp.fc1", QUIET]


def test_batches_and_disk_scratch_change_nothing(vit_case):
    tensors, names = vit_case["tensors"], vit_case["names"][::3]
    with formats.scratch_space() as scratch:
        again, _ = producer.layer_sensitivity(tensors, vit_case["stats"].__getitem__, vit_case["tokens"],
                                              num_heads=HEADS, names=names, batch=5, scratch=scratch)
    for name in names:
        assert np.allclose(again[name]["points"], vit_case["measured"][name]["points"], rtol=1e-10, atol=0)


def test_choose_ranks():
    gentle = curve_from(np.exp(-np.arange(64) / 12.0))
    ranks = producer.choose_ranks(gentle)
    assert len(ranks) == 3 and all(0.015 < gentle[r] < 0.2 for r in ranks)
    assert gentle[ranks[0]] > gentle[ranks[1]] > gentle[ranks[2]]
    steep = curve_from(np.exp(-np.arange(16) * 5.0))  # even rank 1 is below the range: the smallest ranks
    assert steep[1] < 0.02 and producer.choose_ranks(steep) == [1, 2, 3]
    flat = curve_from(np.ones(4))  # NMSE 0.75, 0.5, 0.25 at ranks 1-3, all above: the ranks nearest to it
    assert producer.choose_ranks(flat) == [1, 2, 3] and producer.choose_ranks(flat, points=2) == [2, 3]
    assert producer.choose_ranks(curve_from(np.array([1.0, 0.0, 0.0]))) == []  # nothing to measure
    one = producer.choose_ranks(gentle, points=1, nmse_range=(0.05, 0.05))
    two = producer.choose_ranks(gentle, points=2, nmse_range=(0.05, 0.05))  # a duplicate target is refilled
    assert len(two) == 2 and set(one) < set(two)


def test_block_passes():
    assert producer.block_passes([0, 0, 0, 0, 1, 1, 1, 1], 2, 3) == 4 + 3 * (4 * 2 + 4 * 1)
    assert producer.block_passes([2], 2, 3) == 4  # the head alone: no block after it


def test_command_line_writes_a_file_compress_reads(vit_case, tmp_path, capsys):
    out = str(tmp_path / "sens.json")
    code = producer_cli.main([vit_case["weights"], vit_case["acts"], "-o", out, "--quiet", "--layers",
                          "blocks.1.*,head", "--points", "2", "--max-images", "12", "--batch-size", "5"])
    assert code == 0, capsys.readouterr().err
    doc = formats.read_sensitivity(out)
    assert list(doc["layers"]) == [f"blocks.1.{leaf}" for leaf in vit.BLOCK_LINEARS] + ["head"]
    assert all(len(e["points"]) == 2 for e in doc["layers"].values())
    with open(out) as fh:
        raw = json.load(fh)
    assert raw["images"] == 12 and raw["statistic"] == "gram" and "12 proxy/tokens" in raw["metric"]
    code = compress.main([vit_case["weights"], vit_case["acts"], "-o", str(tmp_path / "c.safetensors"),
                          "--report", str(tmp_path / "r.json"), "--quiet", "--compensation", "none",
                          "--sensitivity", out])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["allocation"]["defaulted_layers"] == [f"blocks.0.{leaf}" for leaf in vit.BLOCK_LINEARS]


def _acts(case, folder, drop=None, proxy=True, normalized=True, nan=False):
    """A copy of the case's acts.h5 without layer ``drop``, without proxy
    tokens, without ``gram_normalized`` or with a NaN in the last token."""
    layers = {n: {k: v for k, v in st.items() if normalized or k != "gram_normalized"}
              for n, st in case["stats"].items() if n != drop}
    acts = os.path.join(folder, "acts.h5")
    tokens = case["tokens"].copy()
    tokens[-1, -1, -1] = np.nan if nan else tokens[-1, -1, -1]
    formats.write_activations(acts, layers, proxy_tokens=tokens if proxy else None)
    return {"acts": acts}


BAD_RUNS = {  # name: (edit(case, folder) -> {"acts", "output", "extra"}, file named, layer named, words)
    "no-proxy-tokens": (lambda c, d: _acts(c, d, proxy=False), "acts", None, ["no proxy/tokens", "--images"]),
    "missing-stats": (lambda c, d: _acts(c, d, drop="blocks.1.attn.proj"), "acts", "blocks.1.attn.proj",
                      ["missing"]),
    "per-image-without-gram-normalized": (lambda c, d: {**_acts(c, d, normalized=False),
                                                        "extra": ["--statistic", "per-image"]},
                                          "acts", "blocks.0.attn.qkv", ["gram_normalized"]),
    "proxy-nan": (lambda c, d: _acts(c, d, nan=True), "acts", None, ["nan", "images 0–23"]),
    "output-is-input": (lambda c, d: {"output": c["weights"]}, "output", None, ["input"]),
    "layers-match-nothing": (lambda c, d: {"extra": ["--layers", "nothing.*"]}, "weights", None, ["matches no"]),
    "range-reversed": (lambda c, d: {"extra": ["--nmse-range", "0.2", "0.1"]}, None, None, ["--nmse-range"]),
    "points-zero": (lambda c, d: {"extra": ["--points", "0"]}, None, None, ["--points must be ≥ 1"]),
    "images-missing": (lambda c, d: {"extra": ["--images", os.path.join(d, "none")]}, None, None,
                       ["image folder does not exist"]),
}


@pytest.mark.parametrize("name", list(BAD_RUNS), ids=list(BAD_RUNS))
def test_bad_producer_input(name, vit_case, tmp_path, snapshot, capsys):
    """One line on stderr naming the file and layer, exit 2, inputs
    unchanged, no output."""
    edit, which, layer, words = BAD_RUNS[name]
    change = edit(vit_case, str(tmp_path))
    files = {"weights": vit_case["weights"], "acts": change.get("acts", vit_case["acts"]),
             "output": change.get("output", str(tmp_path / "sens.json"))}
    before = snapshot(str(tmp_path)), snapshot(os.path.dirname(vit_case["weights"]))
    code = producer_cli.main([files["weights"], files["acts"], "-o", files["output"], "--quiet",
                          *change.get("extra", [])])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    msg = err.strip()
    assert msg.startswith("python -m data_tools.sensitivity: error: ")
    if which:
        assert files[which] in msg, msg
    if layer:
        assert f"layer {layer}" in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    assert (snapshot(str(tmp_path)), snapshot(os.path.dirname(vit_case["weights"]))) == before


# ------------------------------------------------------------------ the PyTorch recipe (docs/sensitivity.md)
def test_recipe_arithmetic_in_numpy(vit_case):
    """The recipe's steps, in NumPy, on one layer of the synthetic ViT: its
    Gram from the layer's inputs, eigh of W C Wᵀ (m × m), tail sums for the
    NMSE, the output hook y ↦ (y − b) P + b with P = U_r U_rᵀ, and the fit
    w = Σxy / Σx² agree with mrc_ref's Stage 1 and with data_tools.sensitivity."""
    name = "blocks.1.mlp.fc1"  # m > n: mrc_ref takes the SVD branch, the recipe eigh(m × m)
    params = vit.prepare(vit_case["tensors"], np)
    tokens = vit_case["tokens"].astype(np.float64)
    seen = {}
    vit.blocks(params, tokens, HEADS, np, hook=lambda n, x: seen.setdefault(n, x.reshape(-1, x.shape[-1])))
    X = seen[name]
    W, b = params[name + ".weight"], params[name + ".bias"]
    C = X.T @ X  # the recipe's gram hook
    s2, U = np.linalg.eigh(W @ C @ W.T)
    s2, U = np.clip(s2[::-1], 0, None), U[:, ::-1]
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    nmse = tail / tail[0]
    U_ref, s2_ref = svd.output_basis(W, C, np)
    k = len(s2_ref)  # min(m, n); the recipe's m × m spectrum is 0 beyond it
    assert np.allclose(nmse[: k + 1], svd.nmse_curve(s2_ref, np), rtol=1e-9, atol=1e-12)
    assert np.allclose(nmse[k + 1 :], 0, atol=1e-12)
    ranks = sorted({int(np.nonzero(nmse[1:] <= t)[0][0]) + 1 for t in (0.02, 0.055, 0.15)})
    assert len(ranks) == 3
    points = []
    for r in ranks:
        P = U[:, :r] @ U[:, :r].T
        Y = X @ W.T + b
        hooked = (Y - b) @ P + b
        A, B = svd.factors(W, U_ref, r)
        assert np.allclose(hooked, X @ (A @ B).T + b, rtol=0, atol=1e-9 * np.abs(Y).max())  # Ŵ = P W = A B
        assert np.sum((Y - hooked) ** 2) / np.sum((Y - b) ** 2) == pytest.approx(nmse[r], rel=1e-9)
        points.append([nmse[r], end_to_end(vit_case, name, U, r)])
    x, y = np.array(points).T
    w = float(x @ y / (x @ x))
    assert w == pytest.approx(sensitivity.fit(points)[0], rel=1e-12)
    errors = producer.measure(params, vit_case["tokens"], {name: [svd.factors(W, U_ref, r) for r in ranks]},
                              num_heads=HEADS, xp=np)[name]
    assert np.allclose(errors, y, rtol=1e-8)


def _recipe_source():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "sensitivity.md"), encoding="utf-8").read()
    section = text.split("## A PyTorch recipe", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.oracle
@pytest.mark.slow  # importing torch takes seconds
def test_recipe_code_runs_and_matches_numpy(tmp_path):
    """The recipe of docs/sensitivity.md, executed as written with torch on a
    tiny two-layer model, gives the weights a NumPy recomputation gives."""
    torch = pytest.importorskip("torch")
    scope = {}
    exec(compile(_recipe_source(), "docs/sensitivity.md", "exec"), scope)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 5)).double()
    batches = [torch.randn(7, 3, 12, dtype=torch.float64) for _ in range(2)]
    layers = {"fc1": model[0], "fc2": model[2]}
    doc = scope["sensitivity"](model, layers, batches, path=str(tmp_path / "s.json"))
    assert formats.read_sensitivity(tmp_path / "s.json")["layers"].keys() == {"fc1", "fc2"}

    from scipy.special import erf

    W1, b1, W2, b2 = (t.detach().numpy() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    X = np.concatenate([x.numpy().reshape(-1, 12) for x in batches])

    def forward(V1, V2):
        h = X @ V1.T + b1
        return (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ V2.T + b2

    ref = forward(W1, W2)
    inputs = {"fc1": X, "fc2": (lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2))))(X @ W1.T + b1)}
    for name, W in (("fc1", W1), ("fc2", W2)):
        C = inputs[name].T @ inputs[name]
        U, s2 = svd.output_basis(W, C, np)
        curve = svd.nmse_curve(s2, np)
        pts = []
        for x, _ in doc["layers"][name]["points"]:
            r = int(np.argmin(np.abs(curve - x)))
            Wr = U[:, :r] @ U[:, :r].T @ W
            z = forward(Wr, W2) if name == "fc1" else forward(W1, Wr)
            pts.append([curve[r], np.sum((z - ref) ** 2) / np.sum(ref**2)])
        assert np.allclose(doc["layers"][name]["points"], pts, rtol=1e-7)
        assert doc["layers"][name]["weight"] == pytest.approx(sensitivity.fit(pts)[0], rel=1e-7)
