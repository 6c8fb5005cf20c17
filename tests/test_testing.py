"""mrc_ref.testing against independent oracles: Eckart–Young on raw outputs,
the whitened SVD-LLM form, brute-force allocation, a generic optimizer for
Stage 3; and the worked PyTorch example of docs/testing.md."""

import importlib.util
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from mrc_ref import compensate, svd, testing
from mrc_ref.certificates import metric_root
from mrc_ref.errors import MrcError

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "testing.md")


def layer(m, n, rows, seed, dead=()):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)) @ np.diag(np.exp(-np.arange(n) / n * 3))
    X[:, list(dead)] = 0
    return rng.standard_normal((m, n)), X


def output_optimum(W, X, r):
    """Eckart–Young on the outputs Y = X Wᵀ: the best rank-r error is the
    tail of Y's squared singular values."""
    s = np.linalg.svd(X @ W.T, compute_uv=False)
    return np.sum(s[r:] ** 2) / np.sum(s**2)


def whitened(W, C, r):
    """SVD-LLM: C = L Lᵀ, W L = U Σ Vᵀ, A = U_r Σ_r, B = V_rᵀ L⁻¹."""
    L = np.linalg.cholesky(C)
    U, s, Vt = np.linalg.svd(W @ L, full_matrices=False)
    return U[:, :r] * s[:r], scipy.linalg.solve_triangular(L, Vt[:r].T, lower=True, trans="T").T


def plain_svd(W, r):
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :r] * s[:r], Vt[:r]


# ----------------------------------------------------------------- inputs
def test_as_host_accepts_lists_and_device_arrays():
    np.testing.assert_array_equal(testing.as_host([[1, 2], [3, 4]]), np.array([[1.0, 2], [3, 4]]))
    assert testing.as_host(np.float32([1.5])).dtype == np.float64
    fake_cupy = type("ndarray", (), {"__module__": "cupy._core.core", "get": lambda self: np.arange(3.0)})()
    np.testing.assert_array_equal(testing.as_host(fake_cupy), np.arange(3.0))


@pytest.mark.gpu
def test_cupy_arrays_are_certified_on_the_host():
    from mrc_ref import backend

    try:
        cp = backend.get_xp("cuda")
    except MrcError as err:
        pytest.skip(f"needs CuPy and a usable GPU ({err})")
    W, X = layer(12, 9, 70, seed=11)
    C = X.T @ X
    U, _ = svd.output_basis(cp.asarray(W), cp.asarray(C), cp)
    A, B = svd.factors(cp.asarray(W), U, 4)
    host = testing.certify_stage1(W, C, cp.asnumpy(A), cp.asnumpy(B))
    device = testing.certify_stage1(cp.asarray(W), cp.asarray(C), A, B)
    assert device["nmse"] == pytest.approx(host["nmse"], rel=1e-12) and device["excess"] == pytest.approx(1, abs=1e-9)
    testing.assert_factorization_close(A, B, cp.asnumpy(A), cp.asnumpy(B), gram=cp.asarray(C))


@pytest.mark.slow  # importing torch takes seconds
def test_as_host_accepts_torch_tensors_that_need_gradients():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    np.testing.assert_array_equal(testing.as_host(t), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(testing.as_host(t.to(torch.bfloat16)), np.arange(6.0).reshape(2, 3))


# ----------------------------------------------------------------- Stage 1
@pytest.mark.parametrize("m,n,rows", [(12, 7, 60), (7, 12, 60), (9, 9, 40), (10, 16, 5), (16, 10, 4)])
def test_optimum_equals_eckart_young_on_the_outputs(m, n, rows):
    """Includes singular C (fewer rows than features), both branches."""
    W, X = layer(m, n, rows, seed=m + n + rows)
    curve = testing.optimal_nmse_curve(W, X.T @ X)
    for r in range(min(m, n) + 1):
        assert curve[r] == pytest.approx(output_optimum(W, X, r), rel=1e-8, abs=1e-13)


def test_mrc_ref_and_svd_llm_factorizations_certify_as_optimal():
    W, X = layer(14, 10, 80, seed=1)
    C = X.T @ X
    U, _ = svd.output_basis(W, C, np)
    for r in (1, 4, 9):
        for A, B in (svd.factors(W, U, r), whitened(W, C, r)):
            cert = testing.certify_stage1(W, C, A, B)
            assert cert["excess"] == pytest.approx(1, abs=1e-9)
            assert cert["stationarity_left"] < 1e-12 and cert["stationarity_right"] < 1e-12
            assert cert["max_angle"] < 1e-6
            testing.assert_stage1_optimal(W, C, A, B, rtol=1e-9)


def test_the_certificate_is_gauge_invariant():
    W, X = layer(8, 11, 50, seed=2)
    C = X.T @ X
    A, B = whitened(W, C, 3)
    G = np.random.default_rng(0).standard_normal((3, 3)) + 3 * np.eye(3)
    one, two = testing.certify_stage1(W, C, A, B), testing.certify_stage1(W, C, A @ G, np.linalg.solve(G, B))
    for key in ("nmse", "nmse_optimal", "excess", "max_angle"):
        assert one[key] == pytest.approx(two[key], rel=1e-9, abs=1e-12)
    testing.assert_factorization_close(A @ G, np.linalg.solve(G, B), A, B, gram=C, rtol=1e-10)
    testing.assert_factorization_close(A @ G, np.linalg.solve(G, B), A, B, rtol=1e-10)


def test_plain_weight_svd_fails_with_a_message_naming_everything():
    W, X = layer(12, 9, 70, seed=3)
    C = X.T @ X
    A, B = plain_svd(W, 4)
    excess = testing.certify_stage1(W, C, A, B)["excess"]
    assert excess > 1.05
    with pytest.raises(AssertionError) as info:
        testing.assert_stage1_optimal(W, C, A, B, layer="blocks.3.mlp.fc1")
    message = str(info.value)
    for part in ("layer blocks.3.mlp.fc1: rank 4: Stage-1 NMSE", "observed", "allowed ≤",
                 "rtol=1e-06", "atol=1e-10", f"{excess:.8g}"):
        assert part in message, (part, message)
    assert len(message.splitlines()) == 2


def test_rank_is_checked_when_given():
    """Optimal at r − 1 passes without rank= (it is optimal at its own rank)
    and fails with rank=r, naming the shapes, in two lines."""
    W, X = layer(12, 9, 70, seed=3)
    C = X.T @ X
    A, B = whitened(W, C, 3)
    testing.assert_stage1_optimal(W, C, A, B)
    testing.assert_stage1_optimal(W, C, A, B, rank=3)
    with pytest.raises(AssertionError) as info:
        testing.assert_stage1_optimal(W, C, A, B, rank=4, layer="fc1", case="v2/demo")
    message = str(info.value)
    assert message.splitlines() == [
        "case v2/demo: layer fc1: rank 4: factor shapes: observed A 12×3, B 3×9, allowed A 12×4, B 4×9",
        "  (exact: A is m × rank, B is rank × n, for W 12×9)"]
    A4, B4 = whitened(W, C, 4)
    testing.assert_stage1_optimal(W, C, A4, B4, rank=4)
    with pytest.raises(AssertionError, match="rank 4: Stage-1 NMSE"):  # right shapes, rank-3 content
        testing.assert_stage1_optimal(W, C, np.column_stack([A, np.zeros(12)]), np.vstack([B, np.zeros(9)]), rank=4)


@pytest.mark.parametrize("bad", ["transposed", "inner", "vector", "rank"])
def test_wrong_shapes_are_failed_assertions_naming_the_layer(bad):
    """What an implementation returns is judged, not trusted: transposed
    factors, mismatched inner dimensions, a 1-D factor, another rank are an
    AssertionError (not ValueError) of at most two lines, naming the case,
    layer, rank, observed and allowed shapes; for a long layer name too."""
    W, X = layer(10, 14, 60, seed=8)
    C = X.T @ X
    A, B = whitened(W, C, 3)
    wrong = {"transposed": (B.T, A.T), "inner": (A, B[:2]), "vector": (A[:, 0], B[:1]),
             "rank": (A[:, :2], B[:2])}[bad]
    long = "encoder.layers.23.self_attention.query_key_value.base_layer.lora_wrapped" * 3
    for name in ("fc", long):
        for check in (lambda: testing.assert_stage1_optimal(W, C, *wrong, rank=3, layer=name, case="v2/x"),
                      lambda: testing.assert_factorization_close(*wrong, A, B, gram=C, layer=name, case="v2/x"),
                      lambda: testing.assert_factorization_close(*wrong, A, B, layer=name, case="v2/x")):
            with pytest.raises(AssertionError) as info:
                check()
            lines = str(info.value).splitlines()
            assert len(lines) == 2 and lines[0].startswith(f"case v2/x: layer {name}: rank 3: factor shapes: "), lines
            assert "observed A " in lines[0] and "allowed A 10×3, B 3×14" in lines[0], lines


def test_product_failure_says_the_rank_in_two_short_lines():
    W, X = layer(16, 12, 80, seed=9)
    C = X.T @ X
    A, B = whitened(W, C, 4)
    with pytest.raises(AssertionError) as info:
        testing.assert_factorization_close(A, 1.01 * B, A, B, gram=C, layer="blocks.0.attn.qkv")
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("layer blocks.0.attn.qkv: rank 4: product A B (in the metric C): "
                                                   "observed ‖error‖ "), lines
    assert ", allowed ≤ " in lines[0] and "rtol=1e-07" in lines[1] and max(map(len, lines)) < 160, lines


def test_ties_keep_the_nmse_but_not_the_subspace():
    """W C Wᵀ = U diag(4, 2, 2, 1) Uᵀ: at rank 2 every mixture of the tied
    pair is optimal; the certificate passes and reports a zero gap."""
    rng = np.random.default_rng(4)
    U, V = np.linalg.qr(rng.standard_normal((4, 4)))[0], np.linalg.qr(rng.standard_normal((6, 4)))[0]
    W = (U * np.sqrt([4.0, 2, 2, 1])) @ V.T  # C = I
    C = np.eye(6)
    c, s = np.cos(0.7), np.sin(0.7)
    mixed = np.column_stack([U[:, 0], c * U[:, 1] + s * U[:, 2]])
    cert = testing.certify_stage1(W, C, mixed, mixed.T @ W)
    assert cert["excess"] == pytest.approx(1, abs=1e-12)
    assert cert["eigen_gap"] == pytest.approx(0, abs=1e-12)
    testing.assert_stage1_optimal(W, C, mixed, mixed.T @ W)
    with pytest.raises(AssertionError, match="product A B"):
        testing.assert_factorization_close(mixed, mixed.T @ W, U[:, :2], U[:, :2].T @ W)


def test_products_that_differ_on_the_null_space_of_c_are_equal_under_c():
    W, X = layer(6, 8, 100, seed=5, dead=(2, 5))
    C = X.T @ X
    A, B = whitened(W, C + 1e-9 * np.eye(8), 3)
    B2 = B.copy()
    B2[:, [2, 5]] += 1.0  # only the dead channels change
    testing.assert_factorization_close(A, B2, A, B, gram=C, rtol=1e-12)
    with pytest.raises(AssertionError, match="Frobenius"):
        testing.assert_factorization_close(A, B2, A, B)
    with pytest.raises(AssertionError, match="rank 3: factor shapes: observed A 6×2, B 2×8, allowed A 6×3, B 3×8"):
        testing.assert_factorization_close(A[:, :2], B[:2], A, B, gram=C)


def test_the_metric_of_c_is_measured_on_its_numerical_range():
    """‖D‖_C of a D that lives on the null space of a singular C (fewer rows
    than features) is 0 to round-off, and the norm of a D on the range is
    tr(D C Dᵀ)^½ to round-off; the direct trace formula puts √(n ε λ_max)
    noise on the first (the comparisons under C used it)."""
    rng = np.random.default_rng(12)
    X = rng.standard_normal((6, 20)) * 10.0
    C = X.T @ X  # rank 6
    S = metric_root(C)
    assert S.shape == (20, 6)
    null = scipy.linalg.null_space(X)  # 20 × 14
    D0 = rng.standard_normal((5, 14)) @ null.T * 100.0
    scale = np.linalg.norm(D0) * np.sqrt(np.linalg.norm(C, 2))  # ~5e4
    assert np.linalg.norm(D0 @ S) < 1e-14 * scale  # ~1e-11
    assert np.sqrt(abs(float(np.sum((D0 @ C) * D0)))) > 1e-10 * scale  # the direct formula: ~5e-5, √ε
    D1 = rng.standard_normal((5, 20))
    assert np.linalg.norm(D1 @ S) ** 2 == pytest.approx(np.sum((D1 @ C) * D1), rel=1e-12)
    A, B = rng.standard_normal((5, 2)), rng.standard_normal((2, 20))
    testing.assert_factorization_close(A, B + rng.standard_normal((2, 5)) @ null[:, :5].T * 1e3, A, B, gram=C,
                                       rtol=1e-12)


# ----------------------------------------------------------------- Stage 2
SHAPES = [(12, 16), (16, 10), (14, 14)]


def spectra(seed):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.exponential(size=min(s)) ** 3)[::-1] for s in SHAPES]


def brute_force(curves, shapes, q, fixed, budget):
    best = None
    options = [[None] + list(range(1, (m * n) // (m + n) - q)) for m, n in shapes]
    for ranks in itertools.product(*options):
        cost = fixed + sum(m * n if r is None else (r + q) * (m + n) for r, (m, n) in zip(ranks, shapes))
        if cost <= budget:
            value = sum(0 if r is None else c[r] for c, r in zip(curves, ranks))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("budget", [200, 300, 420])
def test_allocation_gap_against_brute_force(budget):
    s2 = spectra(budget)
    curves = [np.concatenate([np.cumsum(s[::-1])[::-1], [0]]) / s.sum() for s in s2]
    optimum = brute_force(curves, SHAPES, 1, 10, budget)
    gap = testing.allocation_gap([1, 1, 1], s2, SHAPES, budget, 1, fixed=10)
    assert gap["exact"] and gap["optimum"] == pytest.approx(optimum, rel=1e-12)
    assert gap["objective"] == pytest.approx(sum(c[1] for c in curves))
    assert gap["gap"] == pytest.approx((gap["objective"] - optimum) / optimum)
    best = testing.allocation_gap(gap["optimal_ranks"], s2, SHAPES, budget, 1, fixed=10)
    assert best["gap"] == pytest.approx(0, abs=1e-12)


def test_allocation_gap_takes_mappings():
    s2 = spectra(0)
    names = ["a", "b", "c"]
    gap = testing.allocation_gap(dict(zip(names, [2, None, 1])), dict(zip(names, s2)), dict(zip(names, SHAPES)),
                                 400, 1, fixed=0)
    assert set(gap["optimal_ranks"]) == set(names) and gap["params"] == 3 * 28 + 160 + 2 * 28


def test_allocation_validity():
    testing.assert_allocation_valid([2, None, 3], SHAPES, 361, 1, fixed=5)  # 84 + 160 + 112 + 5
    with pytest.raises(AssertionError, match=r"total parameters: observed 361, allowed ≤ 360\n  \(exact"):
        testing.assert_allocation_valid([2, None, 3], SHAPES, 360, 1, fixed=5)
    with pytest.raises(AssertionError, match="layer b: rank: observed 0"):
        testing.assert_allocation_valid({"a": 1, "b": 0, "c": 1}, dict(zip("abc", SHAPES)), 9999, 1)
    with pytest.raises(AssertionError, match="rank: observed 11"):  # r + q > min(m, n)
        testing.assert_allocation_valid([11, None, None], SHAPES, 9999, 2)
    with pytest.raises(AssertionError, match="rank: observed 2.0"):
        testing.assert_allocation_valid([2.0, None, None], SHAPES, 9999, 2)
    with pytest.raises(AssertionError, match="number of layers"):
        testing.assert_allocation_valid([1, 1], SHAPES, 999, 1)


# ----------------------------------------------------------------- Stage 3
def grams(n, rows, seed, shift=0.3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)) @ np.diag(np.exp(-np.arange(n) / n * 2))
    Xt = X + shift * rng.standard_normal((rows, n)) @ np.diag(np.exp(-np.arange(n) / n))
    return X, Xt


def test_local_undamped_optimum_is_stage_one_at_rank_r_plus_q():
    W, X = layer(9, 12, 80, seed=6)
    C = X.T @ X
    A, B = whitened(W, C, 3)
    P, Q = np.zeros((9, 2)), np.zeros((2, 12))
    cert = testing.certify_residual(W, A, B, P, Q, C, damp=0.0)
    assert cert["loss_optimal"] == pytest.approx(output_optimum(W, X, 5), rel=1e-8)
    assert cert["loss_stage1"] == pytest.approx(output_optimum(W, X, 3), rel=1e-8)


@pytest.mark.parametrize("damp", [0.0, 1e-2])
def test_residual_optimum_against_a_generic_optimizer(damp):
    """Sequential form (K, C̃ from shifted inputs): L-BFGS over (P, Q) from
    several starts never beats the certified optimum and reaches it."""
    m, n, q = 5, 6, 2
    rng = np.random.default_rng(7)
    W = rng.standard_normal((m, n))
    X, Xt = grams(n, 40, 8)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    A, B = whitened(W, C, 2)
    cert = testing.certify_residual(W, A, B, np.zeros((m, q)), np.zeros((q, n)), C, K=K, Ct=Ct, damp=damp)

    Z = np.sum((W @ C) * W)
    delta = damp * np.trace(Ct) / n

    def loss(v):  # the damped loss written out from its definition
        M = v[: m * q].reshape(m, q) @ v[m * q :].reshape(q, n)
        W_hat = A @ B + M
        return (Z - 2 * np.sum((W_hat @ K) * W) + np.sum((W_hat @ Ct) * W_hat) + delta * np.sum(M * M)) / Z

    found = min(scipy.optimize.minimize(loss, rng.standard_normal(m * q + q * n), method="BFGS",
                                        options={"gtol": 1e-12}).fun for _ in range(4))
    assert found >= cert["loss_optimal"] - 1e-10
    assert found == pytest.approx(cert["loss_optimal"], rel=1e-5)


def test_exact_solver_passes_and_few_adam_steps_fail():
    m, n, q = 10, 8, 2
    W = np.random.default_rng(9).standard_normal((m, n))
    X, Xt = grams(n, 60, 10)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    A, B = whitened(W, C, 3)
    P, Q, info = compensate.solve(W, A, B, q, C, K=K, Ct=Ct, damp=1e-3, xp=np)
    testing.assert_residual_optimal(W, A, B, P, Q, C, K=K, Ct=Ct, damp=1e-3, rtol=1e-9, layer="fc")
    cert = testing.certify_residual(W, A, B, P, Q, C, K=K, Ct=Ct, damp=1e-3)
    assert cert["nmse_stage3"] == pytest.approx(info["nmse_stage3"], rel=1e-9)
    assert cert["loss"] == pytest.approx(info["loss_stage3"], rel=1e-9)
    P, Q, _ = compensate.solve(W, A, B, q, C, K=K, Ct=Ct, solver="adam", steps=3, damp=1e-3, xp=np)
    with pytest.raises(AssertionError, match=r"layer fc: Stage-3 damped loss at residual rank 2 \(damp=0.001\)"):
        testing.assert_residual_optimal(W, A, B, P, Q, C, K=K, Ct=Ct, damp=1e-3, layer="fc")


# ----------------------------------------------------------------- cases
def test_iter_cases_filters_by_version_and_tags():
    everything = [c["id"] for c in testing.iter_cases(version=1)]
    assert "near-tie" in everything and "vit-example" in everything
    tall = [c["id"] for c in testing.iter_cases(tags="tall", exclude="end-to-end")]
    assert tall and "vit-example" not in tall
    assert [c["id"] for c in testing.iter_cases(tags=["near-tie", "wide"])] == ["near-tie"]
    assert list(testing.iter_cases(tags=["near-tie", "end-to-end"])) == []


def test_load_case_by_id_and_by_versioned_id():
    case = testing.load_case("v1/near-tie")
    assert case["id"] == "near-tie" and case["version"] == "v1" and case["difficulty"] == "higher"
    name, lay = next(iter(case["layers"].items()))
    assert lay["W"].dtype == np.float64 and lay["C"].shape == (lay["shape"][1],) * 2
    assert case["expected"]["layers"][name] is lay["expected"]
    with pytest.raises(MrcError, match="unknown case 'nope'"):
        testing.load_case("nope")
    with pytest.raises(MrcError, match="unknown case version 'v99'"):
        testing.load_case("near-tie", version=99)


def test_assert_case_close_applies_the_case_tolerance():
    case = testing.load_case("well-conditioned")
    name, lay = next(iter(case["layers"].items()))
    spectrum = np.asarray(lay["expected"]["spectrum"])
    testing.assert_case_close(spectrum * (1 + 1e-12), spectrum, case, "spectrum", layer=name)
    with pytest.raises(AssertionError) as info:
        testing.assert_case_close(spectrum * (1 + 1e-6), spectrum, case, "spectrum", layer=name)
    assert re.fullmatch(rf"case {case['version']}/well-conditioned: layer {re.escape(name)}: spectrum: observed max "
                        r"\|error\| .*, allowed ≤ .*\n  \(array, rtol=1e-10, atol=0; why: .*\)", str(info.value))
    product = lay["expected"]["stage1"][1]["product"]
    testing.assert_case_close(product[0] @ product[1], product, case, "stage1_product", layer=name)
    with pytest.raises(AssertionError, match="in the metric C"):
        testing.assert_case_close((2 * product[0], product[1]), product, case, "stage1_product", layer=name)
    for wrong, seen in (((product[1].T, product[0].T), "factors 32×1 and 1×48"),  # transposed
                        ((product[0], product[1][:, :5]), "factors 48×1 and 1×5")):
        with pytest.raises(AssertionError) as info:
            testing.assert_case_close(wrong, product, case, "stage1_product", layer=name)
        lines = str(info.value).splitlines()
        assert len(lines) == 2 and lines[0].startswith(
            f"case {case['version']}/well-conditioned: layer {name}: rank 1: stage1_product: observed {seen}, "
            "allowed a product of shape 48×32"), lines


# ----------------------------------------------------------------- docs/testing.md
def doc_example():
    """The worked example of docs/testing.md: the python block after the
    marker ``<!-- tested: tests/test_testing.py -->``."""
    text = open(DOCS, encoding="utf-8").read()
    match = re.search(r"<!-- tested: tests/test_testing.py -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/testing.md lost its tested example"
    return match.group(1)


def test_doc_example_is_a_pytest_module_that_skips_without_torch():
    source = doc_example()
    compile(source, "docs/testing.md", "exec")
    assert 'pytest.importorskip("torch")' in source and "def test_" in source


@pytest.mark.slow
def test_doc_example_passes_under_pytest(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the example skips itself")
    path = tmp_path / "test_doc_example.py"
    path.write_text(doc_example(), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(path)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.parametrize("kind", ["orthonormal", "graded", "rank-deficient", "ill-conditioned", "zero column"])
def test_the_certificates_column_basis_against_an_svd(kind):
    """certificates._orth (Cholesky QR twice, pivoted QR where that fails)
    spans what the SVD of ``a`` says, with scipy.linalg.orth's rank rule."""
    import scipy.linalg

    from mrc_ref import certificates

    rng = np.random.default_rng(7)
    m, r = 60, 12
    a = rng.standard_normal((m, r))
    if kind == "orthonormal":
        a = np.linalg.qr(a)[0]
    elif kind == "graded":
        a = a * np.logspace(0, -5, r)
    elif kind == "rank-deficient":
        a[:, -3:] = a[:, :3] @ rng.standard_normal((3, 3))
    elif kind == "ill-conditioned":
        a = a * np.logspace(0, -12, r)
    else:
        a[:, 4] = 0.0
    q = certificates._orth(a)
    oracle = scipy.linalg.orth(a)
    assert q.shape == oracle.shape
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-13)
    np.testing.assert_allclose(q @ q.T, oracle @ oracle.T, atol=1e-10)  # the same projector


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
@pytest.mark.parametrize("c_kind", ["definite", "singular"])
def test_certify_stage1_figures_equal_their_definitions(shape, c_kind):
    """NMSE, the whole layer's NMSE and the stationarity residuals, on every
    route of certify_stage1 (m > n through F = W L, m ≤ n and singular C
    through W C), against their definitions written out directly."""
    from mrc_ref import certificates

    rng = np.random.default_rng(11)
    m, n = shape
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((3 * n if c_kind == "definite" else n // 2, n))
    C = X.T @ X
    A, B = rng.standard_normal((m, 5)), rng.standard_normal((5, n))
    P, Q = rng.standard_normal((m, 2)), rng.standard_normal((2, n))
    cert = certificates.certify_stage1(W, C, A, B, residual=(P, Q))
    D = W - A @ B
    energy = np.trace(W @ C @ W.T)
    R = D @ C
    left, right = np.linalg.qr(A)[0], np.linalg.qr(B.T)[0]
    scale = np.linalg.norm(W @ C)
    assert cert["nmse"] == pytest.approx(np.trace(D @ C @ D.T) / energy, rel=1e-12)
    assert cert["nmse_layer"] == pytest.approx(np.trace((D - P @ Q) @ C @ (D - P @ Q).T) / energy, rel=1e-12)
    assert cert["stationarity_left"] == pytest.approx(np.linalg.norm(left.T @ R) / scale, rel=1e-10)
    assert cert["stationarity_right"] == pytest.approx(np.linalg.norm(R @ right) / scale, rel=1e-10)
