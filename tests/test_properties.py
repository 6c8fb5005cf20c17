"""Property-based tests (hypothesis): shapes and ranks at the edges."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mrc_ref import allocate as al
from mrc_ref import compensate as cp
from mrc_ref import formats, svd
from mrc_ref.errors import MrcError

dims = st.integers(1, 12)


@settings(max_examples=60, deadline=None)
@given(m=dims, n=dims, rows=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_stage_one_invariants(m, n, rows, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n))
    W = rng.standard_normal((m, n))
    C = X.T @ X
    U, s2 = svd.output_basis(W, C, np)
    k = min(m, n)
    assert U.shape == (m, k) and s2.shape == (k,)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    assert np.all(np.diff(s2) <= 1e-12 * s2[0]) and np.all(s2 >= 0)
    curve = svd.nmse_curve(s2, np)
    assert curve[0] == 1 and curve[-1] == 0 and np.all(np.diff(curve) <= 1e-15)
    Y = X @ W.T
    for r in sorted({1, k // 2 or 1, k}):
        A, B = svd.factors(W, U, r)
        assert A.shape == (m, r) and B.shape == (r, n)
        brute = np.sum((Y - X @ (A @ B).T) ** 2) / np.sum(Y**2)
        assert abs(brute - curve[r]) <= 1e-9


@st.composite
def allocation_problem(draw):
    L = draw(st.integers(1, 5))
    shapes = [(draw(st.integers(1, 40)), draw(st.integers(1, 40))) for _ in range(L)]
    q = draw(st.integers(0, 4))
    curves = []
    for m, n in shapes:
        s2 = np.sort(np.array(draw(st.lists(st.floats(0.01, 10), min_size=min(m, n), max_size=min(m, n)))))[::-1]
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
        curves.append(tail / tail[0])
    fixed = draw(st.integers(0, 100))
    frac = draw(st.floats(-0.2, 1.0))
    return shapes, curves, q, fixed, frac


@settings(max_examples=150, deadline=None)
@given(problem=allocation_problem(), name=st.sampled_from(list(al.ALLOCATIONS)), step=st.integers(1, 3))
def test_allocation_meets_budget_or_says_why(problem, name, step):
    shapes, curves, q, fixed, frac = problem
    dense = al.total_params(shapes, [None] * len(shapes), q, fixed)
    if not any(al.compressible(shapes, q)):
        try:
            al.allocate(name, curves, shapes, q, fixed, dense, step)
        except MrcError as err:
            assert "no selected layer can be compressed" in str(err)
        else:
            raise AssertionError("expected an error")
        return
    lo = al.min_params(shapes, q, fixed)
    budget = int(lo + frac * (dense - lo))
    try:
        ranks = al.allocate(name, curves, shapes, q, fixed, budget, step)
    except MrcError as err:
        assert budget < lo and f"smallest reachable size is {lo}" in str(err)
        return
    assert budget >= lo
    assert al.total_params(shapes, ranks, q, fixed) <= budget
    for r, (m, n), ok in zip(ranks, shapes, al.compressible(shapes, q)):
        assert r is None or (ok and 1 <= r < al.break_even_rank(m, n, q))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 9), q=st.integers(0, 3), seed=st.integers(0, 99))
def test_densify_rebuilds_a_b_plus_p_q(m, n, r, q, seed):
    rng = np.random.default_rng(seed)
    t = {"x.lowrank_a": rng.standard_normal((m, r)).astype(np.float32),
         "x.lowrank_b": rng.standard_normal((r, n)).astype(np.float32), "x.bias": np.ones(m, np.float32)}
    if q:
        t["x.residual_p"] = rng.standard_normal((m, q)).astype(np.float32)
        t["x.residual_q"] = rng.standard_normal((q, n)).astype(np.float32)
    dense = formats.densify(t)
    want = t["x.lowrank_a"].astype(np.float64) @ t["x.lowrank_b"].astype(np.float64)
    if q:
        want += t["x.residual_p"].astype(np.float64) @ t["x.residual_q"].astype(np.float64)
    assert set(dense) == {"x.weight", "x.bias"}
    np.testing.assert_array_equal(dense["x.weight"], want.astype(np.float32))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 8), q=st.integers(1, 3), seed=st.integers(0, 99))
def test_compensation_never_ends_above_stage_one(m, n, q, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((12, n))
    W = rng.standard_normal((m, n))
    U, s2 = svd.output_basis(W, X.T @ X, np)
    A, B = svd.factors(W, U, 1)
    P0, Q0 = cp.init_residual(m, n, q, 0, 0, np, np.float64)
    P, Q, history = cp.adam(W, A, B, P0, Q0, X.T @ X, steps=20, lr=0.05, xp=np)
    Y = X @ W.T  # the losses from the raw rows, not from the code's own history
    start = np.sum((Y - X @ (A @ B).T) ** 2) / np.sum(Y**2)
    end = np.sum((Y - X @ (A @ B + P @ Q).T) ** 2) / np.sum(Y**2)
    assert end <= start * (1 + 1e-12) + 1e-15
    assert end == pytest.approx(history.min(), rel=1e-9, abs=1e-15)
    assert abs(history[0] - svd.nmse_curve(s2, np)[1]) < 1e-12
