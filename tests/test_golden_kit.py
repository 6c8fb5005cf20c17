"""The golden kit as a downstream project meets it.

An independent Stage 1 (tests/downstream.py: NumPy only, whitening by an
eigendecomposition of C with a pseudo-inverse, and the output-Gram route)
runs through every probe of every shipped case under every comparison that
docs/testing.md shows; the recipe of docs/testing.md (the README's) alone
catches each of eight wrong variants, with an AssertionError naming the
layer; float32 implementations pass ``testing.FLOAT32`` while the variants
still fail. The figures quoted in docs/testing.md are printed by
tests/benchmarks/golden_kit_figures.py.
"""

import os
import re

import numpy as np
import pytest

import downstream as ds
from mrc_ref import cases, svd, testing

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "testing.md")
EPS32 = float(np.finfo(np.float32).eps)
LATEST = cases.versions()[-1]
ALL = [(version, case_id) for version in cases.versions() for case_id in cases.case_ids(version)]
#: v1's errata (CHANGELOG.md): vit-example's blocks.0.attn.qkv Gram is
#: indefinite (float32 rounding of a rank-34 Gram), so at rank 9 the expected
#: NMSE is missed by every correct product, Frobenius products disagree, and
#: the NMSE curve from the eigenvalues of W C Wᵀ misses by 1.4e-10.
V1_ERRATA = {("vit-example", "blocks.0.attn.qkv", 9, "stage1_nmse"),
             ("vit-example", "blocks.0.attn.qkv", 9, "Frobenius"),
             ("vit-example", "blocks.0.attn.qkv", None, "nmse_curve")}
ERRATA_REASON = ("v1 erratum (CHANGELOG.md): vit-example's blocks.0.attn.qkv Gram is indefinite, its rank-9 NMSE "
                 "unattainable; fixed in v2")

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Hundreds of small eigendecompositions: one BLAS thread each (several
    threads only contend on a loaded machine)."""
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(1, user_api="blas"):
            yield


_LOADED = {}
#: The real assertion (run_recipe patches the module's name to record outcomes).
ASSERT_STAGE1_OPTIMAL = testing.assert_stage1_optimal


def load(version, case_id):
    if (version, case_id) not in _LOADED:
        _LOADED[version, case_id] = testing.load_case(case_id, version)
    return _LOADED[version, case_id]


def probes(version=LATEST):
    """``(case, name, layer, rank, expected item)`` of every Stage-1 probe."""
    for case_id in cases.case_ids(version):
        case = load(version, case_id)
        for name, layer in case["layers"].items():
            for rank, item in layer["expected"]["stage1"].items():
                yield case, name, layer, rank, item


def mrc_ref_stage1(W, C, rank):
    U, _ = svd.output_basis(W, C, np)
    return svd.factors(W, U, rank)


# ----------------------------------------------------------------- item 1
@pytest.mark.parametrize("version", ["v1", LATEST])
def test_product_comparisons_under_a_singular_c_never_raise(version):
    """Issue 17, item 1: on rank-deficient-c (r = 5, 20) and vit-example's
    blocks.0.attn.qkv (r = 9), correct factors meet every product comparison
    under C, although round-off makes tr(D C Dᵀ) of their difference
    negative (it used to be raised to the power ½: a complex number, then a
    TypeError)."""
    raw = []
    for case_id, name, rank in (("rank-deficient-c", "layers.0", 5), ("rank-deficient-c", "layers.0", 20),
                                ("rank-deficient-c", "layers.1", 5), ("rank-deficient-c", "layers.1", 20),
                                ("vit-example", "blocks.0.attn.qkv", 9)):
        case = load(version, case_id)
        layer = case["layers"][name]
        W, C = layer["W"], layer["C"]
        expected = layer["expected"]["stage1"][rank]["product"]
        for A, B in (ds.stage1(W, C, rank), ds.stage1_output_gram(W, C, rank), mrc_ref_stage1(W, C, rank)):
            D = A @ B - expected[0] @ expected[1]
            raw.append(float(np.sum((D @ C) * D)))
            testing.assert_factorization_close(A, B, *expected, gram=C, layer=name, case=case)
            testing.assert_case_close((A, B), expected, case, "stage1_product", layer=name)
            testing.assert_stage1_optimal(W, C, A, B, rank=rank, layer=name, case=case)
            assert testing.certify_stage1(W, C, A, B)["nmse"] >= 0
    assert min(raw) < 0, raw  # the situation of the report did arise


def test_products_that_differ_only_on_the_null_space_compare_equal_to_round_off():
    """Under C the kit measures ‖D S‖ on C's numerical range: the whitening
    product (no null-space part) and mrc_ref's (W's null-space part kept)
    agree to 1e-12 on every singular Gram of the cases, where the direct
    tr(D C Dᵀ)^½ is off by ~1e-9 (√ε), and they differ by 17–73 % in
    Frobenius norm."""
    seen = 0
    for case, name, layer, rank, item in probes():
        W, C = layer["W"], layer["C"]
        if item["product"] is None or np.linalg.matrix_rank(C) == C.shape[0]:
            continue
        A, B = ds.stage1(W, C, rank)
        L, R = item["product"]
        testing.assert_factorization_close(A, B, L, R, gram=C, rtol=1e-12, layer=name, case=case)
        D, ref = A @ B - L @ R, L @ R
        assert np.linalg.norm(D) > 0.1 * np.linalg.norm(ref)
        direct = np.sqrt(max(float(np.sum((D @ C) * D)), 0.0)) / np.sqrt(float(np.sum((ref @ C) * ref)))
        seen += direct > 1e-11
    assert seen >= 3  # the direct formula would not have met rtol=1e-12 there


# ----------------------------------------------------------------- item 2
def comparisons(case, name, layer, rank, item, A, B):
    """``(label, check)`` for every comparison docs/testing.md shows for
    Stage-1 factors at a probe."""
    W, C = layer["W"], layer["C"]
    yield "assert_stage1_optimal", lambda: testing.assert_stage1_optimal(W, C, A, B, rank=rank, layer=name,
                                                                         case=case)
    yield "stage1_nmse", lambda: testing.assert_case_close(testing.certify_stage1(W, C, A, B)["nmse"], item["nmse"],
                                                           case, "stage1_nmse", layer=name, where=f"rank {rank}")
    if item["product"] is not None:
        yield "stage1_product", lambda: testing.assert_case_close((A, B), item["product"], case, "stage1_product",
                                                                  layer=name)
        yield "gram=C", lambda: testing.assert_factorization_close(A, B, *item["product"], gram=C, layer=name,
                                                                   case=case)
        if np.linalg.matrix_rank(C) == C.shape[0]:  # docs: Frobenius only where C has full rank
            yield "Frobenius", lambda: testing.assert_factorization_close(A, B, *item["product"], layer=name,
                                                                          case=case)


def spectral_comparisons(case, name, layer):
    """The layer's spectrum, NMSE curve and eigen-gaps, computed independently."""
    s2 = ds.spectrum(layer["W"], layer["C"])
    expected = layer["expected"]
    yield "spectrum", lambda: testing.assert_case_close(s2, expected["spectrum"], case, "spectrum", layer=name)
    yield "nmse_curve", lambda: testing.assert_case_close(ds.nmse_curve(s2), expected["nmse_curve"], case,
                                                          "nmse_curve", layer=name)
    for rank, item in expected["stage1"].items():
        yield f"stage1_gap {rank}", (lambda r=rank, e=item["eigen_gap"]: testing.assert_case_close(
            ds.eigen_gap(s2, r), e, case, "stage1_gap", layer=name, where=f"rank {r}"))


IMPLEMENTATIONS = {
    "whitening": ds.stage1,
    "output Gram": ds.stage1_output_gram,
    "mrc_ref": mrc_ref_stage1,
}


@pytest.mark.parametrize("version,case_id", ALL, ids=[f"{v}/{c}" for v, c in ALL])
def test_an_independent_stage1_meets_every_documented_comparison(version, case_id):
    """Issue 17, item 2: every probe, every comparison, by an independent
    implementation (two routes), by mrc_ref's factors, and by the case's own
    expected product (which must attain the case's NMSE). v2 passes fully;
    v1 fails exactly its errata."""
    case = load(version, case_id)
    failures = set()
    messages = []
    for name, layer in case["layers"].items():
        for label, check in spectral_comparisons(case, name, layer):
            try:
                check()
            except AssertionError as err:
                failures.add((case_id, name, None, label))
                messages.append(str(err))
        for rank, item in layer["expected"]["stage1"].items():
            W, C = layer["W"], layer["C"]
            pairs = {impl: f(W, C, rank) for impl, f in IMPLEMENTATIONS.items()}
            if item["product"] is not None:
                pairs["expected product"] = item["product"]
            for impl, (A, B) in pairs.items():
                for label, check in comparisons(case, name, layer, rank, item, A, B):
                    if impl == "expected product" and label not in ("assert_stage1_optimal", "stage1_nmse"):
                        continue
                    try:
                        check()
                    except AssertionError as err:
                        failures.add((case_id, name, rank, label))
                        messages.append(f"{impl}: {err}")
    if version == "v1":
        errata = {e for e in V1_ERRATA if e[0] == case_id}
        assert failures <= errata, messages
        if errata:
            assert ("vit-example", "blocks.0.attn.qkv", 9, "stage1_nmse") in failures, failures
            pytest.xfail(ERRATA_REASON)
    assert not failures, "\n".join(messages)


def test_v1_erratum_is_what_the_report_says():
    """The reported figures: at rank 9 the expected NMSE 0.0214633414 is
    missed by ~7e-10 by correct factors, mrc_ref's expected product included;
    in v2 the miss is round-off."""
    for version, worst in (("v1", (5e-10, 1e-9)), (LATEST, (0, 1e-14))):
        layer = load(version, "vit-example")["layers"]["blocks.0.attn.qkv"]
        item = layer["expected"]["stage1"][9]
        for A, B in (ds.stage1(layer["W"], layer["C"], 9), item["product"]):
            miss = abs(testing.certify_stage1(layer["W"], layer["C"], A, B)["nmse"] - item["nmse"])
            assert worst[0] <= miss < worst[1], (version, miss)


# ----------------------------------------------------------------- the recipe and the wrong variants
def recipe():
    """The recipe of docs/testing.md (the README's): the python block after
    ``<!-- tested: tests/test_golden_kit.py -->``."""
    text = open(DOCS, encoding="utf-8").read()
    match = re.search(r"<!-- tested: tests/test_golden_kit.py -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/testing.md lost its tested recipe"
    return match.group(1)


def run_recipe(your_stage1, monkeypatch, tolerances=None):
    """Run the docs' recipe verbatim with ``your_stage1`` on the latest
    cases, recording each probe's outcome instead of stopping at the first
    failure: ``[(case id, layer, rank, None or the AssertionError)]``."""
    outcomes = []

    def recording(W, C, A, B, *args, **kwargs):
        where = (kwargs["case"]["id"], kwargs["layer"], kwargs["rank"])
        try:
            ASSERT_STAGE1_OPTIMAL(W, C, A, B, *args, **kwargs, **(tolerances or {}))
        except AssertionError as err:
            outcomes.append(where + (err,))
        else:
            outcomes.append(where + (None,))

    monkeypatch.setattr(testing, "iter_cases", lambda: [load(LATEST, c) for c in cases.case_ids(LATEST)])
    monkeypatch.setattr(testing, "assert_stage1_optimal", recording)
    exec(compile(recipe(), "docs/testing.md", "exec"), {"your_stage1": your_stage1})
    return outcomes


def by_layer(variant):
    """``your_stage1(W, C, rank)`` of a variant that also wants the layer's
    raw statistics (the centred Gram), found by the identity of ``W``."""
    layers = {id(layer["W"]): layer for case_id in cases.case_ids(LATEST)
              for layer in load(LATEST, case_id)["layers"].values()}
    return lambda W, C, rank: variant(W, C, rank, layers[id(W)])


def test_the_recipe_passes_a_correct_implementation_on_every_probe(monkeypatch):
    total = sum(1 for _ in probes())
    for impl in (ds.stage1, ds.stage1_output_gram):
        outcomes = run_recipe(impl, monkeypatch)
        assert len(outcomes) == total == 53 and [o for o in outcomes if o[3]] == []


@pytest.mark.parametrize("variant", list(ds.VARIANTS))
def test_the_recipe_alone_catches_each_wrong_variant(variant, monkeypatch, record_property):
    """Each wrong variant fails on probes of the
    latest cases under the recipe alone, with an AssertionError of at most
    two lines naming the case, the layer and the rank; the counts are those
    of docs/testing.md."""
    outcomes = run_recipe(by_layer(ds.VARIANTS[variant]), monkeypatch)
    failed = [o for o in outcomes if o[3] is not None]
    record_property("probes_failed", len(failed))
    assert len(outcomes) == 53 and len(failed) >= 1, variant
    for case_id, name, rank, err in failed:
        lines = str(err).splitlines()
        assert len(lines) <= 2 and lines[0].startswith(f"case {LATEST}/{case_id}: layer {name}: rank {rank}: "), lines
    documented = {"plain weight SVD": 51, "whitening by C": 47, "C + 0.01 mean(diag) I": 46,
                  "transposed factors": 53, "rank - 1": 53, "mean-centred Gram": 51, "float16 W S": 43,
                  "B's rows by norm": 47}
    assert len(failed) == documented[variant], (variant, len(failed))


# ----------------------------------------------------------------- float32
FLOAT32_ROUTES = {
    "output Gram": lambda W, C, rank: ds.stage1_output_gram(W, C, rank, np.float32),
    "whitening, λ > 0 kept": lambda W, C, rank: ds.stage1(W, C, rank, np.float32),
    "whitening, cut at ε λ_max": lambda W, C, rank: ds.stage1(W, C, rank, np.float32, EPS32),
}


@pytest.mark.parametrize("route", list(FLOAT32_ROUTES))
def test_float32_implementations_pass_the_float32_preset(route, monkeypatch):
    """Issue 17, item 9: a correct float32 Stage 1 passes FLOAT32 on every
    probe, with room (its excess × 100 still passes)."""
    outcomes = run_recipe(FLOAT32_ROUTES[route], monkeypatch, dict(testing.FLOAT32))
    assert len(outcomes) == 53 and [o for o in outcomes if o[3]] == []
    strict = {"rtol": testing.FLOAT32["rtol"] / 100, "atol": testing.FLOAT32["atol"] / 100}
    outcomes = run_recipe(FLOAT32_ROUTES[route], monkeypatch, strict)
    assert [o for o in outcomes if o[3]] == []


@pytest.mark.parametrize("variant", list(ds.VARIANTS))
def test_the_wrong_variants_fail_the_float32_preset(variant, monkeypatch):
    outcomes = run_recipe(by_layer(ds.VARIANTS[variant]), monkeypatch, dict(testing.FLOAT32))
    assert sum(o[3] is not None for o in outcomes) >= 8, variant


def test_a_pseudo_inverse_cut_at_n_eps_is_a_loss_not_round_off(monkeypatch):
    """docs/testing.md: a float32 whitening that cuts C's spectrum at n ε λ_max
    drops directions that carry output energy: it fails even FLOAT32."""
    route = lambda W, C, rank: ds.stage1(W, C, rank, np.float32, C.shape[0] * EPS32)  # noqa: E731
    assert sum(o[3] is not None for o in run_recipe(route, monkeypatch, dict(testing.FLOAT32))) >= 10


def test_the_readme_shows_the_tested_recipe():
    """The README's golden-kit block is the recipe run above, verbatim (so the
    README's recipe alone catches the wrong variants too)."""
    readme = open(os.path.join(os.path.dirname(DOCS), "..", "README.md"), encoding="utf-8").read()
    match = re.search(r"```python\n(from mrc_ref import testing\n.*?)```", readme, re.S)
    assert match and match.group(1) == recipe()
