"""The Stage-2 certificate every run reports, and the budget at the
pipeline level."""

import numpy as np
import pytest

from data_tools import synthetic
from mrc_ref import allocate, compress, pipeline
from mrc_ref.errors import MrcError


@pytest.fixture(scope="module")
def model():
    tensors = synthetic.make_model(5, depth=2, dim=64, num_heads=4)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    return tensors, synthetic.make_statistics(tensors, names, seed=5)


def run(model, **options):
    tensors, stats = model
    return pipeline.run(tensors, stats.__getitem__, pipeline.Config(compensation="local", **options), xp=np)[1]


@pytest.mark.parametrize("rule", list(allocate.ALLOCATIONS))
def test_every_rule_reports_objective_bound_and_gap(model, rule):
    """The objective is Σ NMSE_stage1 of the layers the report lists (dense: 0),
    the bound is the exact optimum (the optimal rule's own objective), and the
    gap is (objective − bound) / bound."""
    report = run(model, allocation=rule, reduction=0.5)
    cert = report["allocation"]
    optimum = run(model, allocation="optimal", reduction=0.5)["allocation"]
    assert cert["rule"] == rule and cert["bound"] == "exact optimum"
    assert cert["objective"] == pytest.approx(sum(e["nmse_stage1"] for e in report["layers"]), rel=1e-12)
    assert cert["lower_bound"] == pytest.approx(optimum["objective"], rel=1e-12)
    assert cert["objective"] >= cert["lower_bound"] * (1 - 1e-12)
    assert cert["relative_gap"] == pytest.approx((cert["objective"] - cert["lower_bound"]) / cert["lower_bound"],
                                                 abs=1e-12)
    if rule == "optimal":
        assert cert["relative_gap"] == 0.0


def test_too_large_an_exact_solve_says_so(model, monkeypatch):
    monkeypatch.setattr(allocate, "MAX_DP_CELLS", 0)
    cert = run(model, reduction=0.5)["allocation"]
    assert cert["bound"] == "LP relaxation"
    assert cert["lower_bound"] <= cert["objective"]
    lines = compress.summary(run(model, reduction=0.5)).splitlines()
    assert any("lower bound" in line and "LP relaxation" in line and "relative gap" in line for line in lines)


def test_fixed_rank_has_no_bound(model):
    cert = run(model, rank=4)["allocation"]
    assert cert["rule"] == "fixed rank" and cert["lower_bound"] is None and cert["relative_gap"] is None


def test_budget_of_exactly_the_smallest_size_is_met():
    """P_total = 100,000 and a smallest reachable size of exactly 10,000
    (two 4092×12 layers at rank 1, q = 0: 2 × 4104, plus 1,792 fixed): with
    --reduction 0.9 the budget is 10,000 and the run succeeds; the float
    floor ⌊0.1 × 100000⌋ = 9,999 refused it."""
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.mlp.fc1.weight": rng.standard_normal((4092, 12)).astype(np.float32) for i in range(2)}
    tensors["fixed"] = np.zeros(1792, dtype=np.float32)
    assert pipeline.count_params(tensors) == 100_000
    X = rng.standard_normal((64, 12))
    stats = {"gram": X.T @ X, "sum": X.sum(0), "rows": 64}
    config = pipeline.Config(layers=("blocks.*.mlp.fc1",), reduction=0.9, compensation="none")
    _, report = pipeline.run(tensors, lambda name: stats, config, xp=np)
    assert report["totals"]["budget"] == 10_000
    assert report["totals"]["params_after"] == 10_000
    with pytest.raises(MrcError, match="smallest reachable size is 10000"):
        pipeline.run(tensors, lambda name: stats, pipeline.Config(layers=("blocks.*.mlp.fc1",), reduction=0.90001,
                                                                  compensation="none"), xp=np)
