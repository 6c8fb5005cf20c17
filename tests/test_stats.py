"""Statistics: streamed accumulation and validation."""

import warnings

import numpy as np
import pytest

from mrc_ref import stats
from mrc_ref.errors import MrcError


def test_streamed_equals_one_product():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 12)).astype(np.float32)
    for size in (1, 7, 256, 1000):
        got = stats.accumulate_gram((X[i : i + size] for i in range(0, len(X), size)), np)
        X64 = X.astype(np.float64)
        np.testing.assert_allclose(got["gram"], X64.T @ X64, rtol=1e-12)
        np.testing.assert_allclose(got["sum"], X64.sum(0), rtol=1e-12, atol=1e-12)
        assert got["rows"] == 1000


def test_empty_stream_is_an_error():
    with pytest.raises(MrcError, match="no token rows"):
        stats.accumulate_gram(iter([]), np)


def good(n=4, seed=0):
    X = np.random.default_rng(seed).standard_normal((20, n))
    return {"gram": X.T @ X, "sum": X.sum(0), "rows": 20, "gram_normalized": None}


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(rows=0), "rows is 0"),
    (lambda s: s.update(gram=s["gram"][:3, :3]), "shape"),
    (lambda s: s["gram"].__setitem__((0, 1), np.nan), "NaN"),
    (lambda s: s["gram"].__setitem__((0, 1), s["gram"][0, 1] + 1), "not symmetric"),
    (lambda s: s.update(gram=np.zeros((4, 4))), "all zero"),
    (lambda s: s["sum"].__setitem__(0, np.inf), "sum contains"),
    (lambda s: s.update(sum=np.zeros(3)), "sum has shape"),
    (lambda s: s.update(gram=-np.eye(4)), "negative diagonal"),
])
def test_validation_errors(edit, message):
    s = good()
    edit(s)
    with pytest.raises(MrcError, match=message):
        stats.validate(s, 4, np)


def test_per_image_needs_normalized():
    with pytest.raises(MrcError, match="gram_normalized"):
        stats.metric("per-image", stats.validate(good(), 4, np), 4, np)


def test_metrics():
    s = stats.validate(good(), 4, np)
    mean = s["sum"] / 20
    np.testing.assert_allclose(stats.metric("mean-input", s, 4, np), np.outer(mean, mean))
    np.testing.assert_array_equal(stats.metric("weight", s, 4, np), np.eye(4))
    assert stats.metric("gram", s, 4, np) is s["gram"]
    with pytest.raises(MrcError, match="unknown statistic"):
        stats.metric("nope", s, 4, np)


def test_validate_does_not_modify_input():
    s = good()
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
    stats.validate(s, 4, np)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(s[k], v)


# ------------------------------------------------------------------ positive semi-definiteness
def _hidden_indefinite(m=8, n=32, seed=0):
    """``(W, C, C_bad)``: ``C_bad = C − t v vᵀ`` with ``v`` in the null space of
    ``W`` (so ``W C_bad Wᵀ = W C Wᵀ``), a positive diagonal, and a smallest
    eigenvalue about −0.6 to −1.5 times the largest."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((100, n))
    C = X.T @ X
    W = rng.standard_normal((m, n))
    null = np.linalg.svd(W)[2][m:].T  # (n, n - m), W @ null = 0
    v = null @ rng.standard_normal(n - m)
    v /= np.linalg.norm(v)
    bad = C - 1.6 * np.linalg.eigvalsh(C)[-1] * np.outer(v, v)
    return W, C, (bad + bad.T) / 2


def test_indefinite_gram_hidden_in_the_null_space_is_refused():
    W, C, bad = _hidden_indefinite()
    evals = np.linalg.eigvalsh(bad)
    assert evals[0] < -0.5 * evals[-1] and np.diag(bad).min() > 0  # the case is what it claims
    np.testing.assert_allclose(W @ bad @ W.T, W @ C @ W.T, rtol=1e-9, atol=1e-9)  # invisible to W C Wᵀ
    s = {"gram": C, "sum": np.ones(32), "rows": 100}
    stats.validate(s, 32, np)
    with pytest.raises(MrcError, match="gram is not positive semi-definite"):
        stats.validate({**s, "gram": bad}, 32, np)
    with pytest.raises(MrcError, match="gram_normalized is not positive semi-definite"):
        stats.validate({**s, "gram_normalized": bad}, 32, np)


@pytest.mark.parametrize("rows", [5, 2000])
def test_singular_float32_gram_passes(rows):
    """Round-off of a PSD Gram stored in float32 stays inside the tolerance:
    a rank-5 Gram, and a Gram of centred rows (an exact null direction, as
    after LayerNorm)."""
    n = 256
    X = np.random.default_rng(rows).standard_normal((rows, n)) * np.linspace(0.1, 3, n)
    X -= X.mean(axis=1, keepdims=True)
    gram = (X.T @ X).astype(np.float32)
    evals = np.linalg.eigvalsh(gram.astype(np.float64))
    assert abs(evals[0]) < 1e-7 * evals[-1]  # singular up to round-off
    out = stats.validate({"gram": gram, "sum": X.sum(0).astype(np.float32), "rows": rows}, n, np)
    assert out["gram"].dtype == np.float64


@pytest.mark.parametrize("depth, ok", [(0.1, True), (10, False)])
def test_psd_tolerance_is_relative(depth, ok):
    """An eigenvalue of −depth · PSD_RTOL times the largest passes below the
    tolerance and fails above it, whatever the overall scale."""
    from mrc_ref.svd import PSD_RTOL

    for scale in (1e-30, 1.0, 1e30):
        lam = np.array([-depth * PSD_RTOL, 0.5, 1.0, 1.0]) * scale
        Q = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))[0]
        gram = (Q * lam) @ Q.T
        gram = (gram + gram.T) / 2
        assert np.diag(gram).min() > 0
        s = {"gram": gram, "sum": np.ones(4), "rows": 3}
        if ok:
            stats.validate(s, 4, np)
        else:
            with pytest.raises(MrcError, match="not positive semi-definite"):
                stats.validate(s, 4, np)


# ------------------------------------------------------------------ dtypes
BAD_DTYPES = {
    "complex": lambda g: g + 1j * g,
    "complex64": lambda g: (g + 1j * g).astype(np.complex64),
    "int64": lambda g: np.rint(g).astype(np.int64),
    "bool": lambda g: g > 0,
    "float16": lambda g: g.astype(np.float16),
    "string": lambda g: g.astype("S8"),
    "unicode": lambda g: g.astype("U8"),
    "object": lambda g: g.astype(object),
    "compound": lambda g: np.zeros(g.shape, dtype=[("a", "f8"), ("b", "f8")]),
}


@pytest.mark.parametrize("kind", list(BAD_DTYPES))
@pytest.mark.parametrize("key", ["gram", "sum", "gram_normalized"])
def test_non_float_dtypes_refused_without_warnings(kind, key):
    s = good()
    s["gram_normalized"] = s["gram"] / 20
    s[key] = BAD_DTYPES[kind](s[key])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no ComplexWarning on the way
        with pytest.raises(MrcError, match=f"^{key} has dtype .*, expected one of float32, float64$"):
            stats.validate(s, 4, np)


@pytest.mark.parametrize("rows", [2.5, "20", True, np.array([20, 3])])
def test_rows_must_be_an_integer(rows):
    with pytest.raises(MrcError, match="rows is .*positive integer"):
        stats.validate({**good(), "rows": rows}, 4, np)


def test_check_declared():
    stats.check_declared("gram", (4, 4), np.float32, (4, 4))
    stats.check_declared("proxy/tokens", (9, 17, 64), "<f8", (None, 17, 64), "pos_embed")
    with pytest.raises(MrcError, match=r"proxy/tokens has shape \(9, 16, 64\), expected \(\*, 17, 64\) from pos_embed"):
        stats.check_declared("proxy/tokens", (9, 16, 64), np.float32, (None, 17, 64), "pos_embed")
    with pytest.raises(MrcError, match=r"sum has shape \(4, 1\), expected \(4,\)"):
        stats.check_declared("sum", (4, 1), np.float32, (4,))
    with pytest.raises(MrcError, match="no data"):
        stats.check_declared("gram", None, np.float32, (4, 4))


# ------------------------------------------------------------------ the cheap PSD test
def _with_spectrum(lam, seed=0):
    """Symmetric ``Q diag(lam) Qᵀ`` for a random orthogonal ``Q``."""
    n = len(lam)
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    c = (Q * np.asarray(lam, dtype=np.float64)) @ Q.T
    return (c + c.T) / 2


def _eig_verdict(c):
    """The verdict of the eigenvalue test, the oracle: True when c passes."""
    from mrc_ref.svd import PSD_RTOL

    evals = np.linalg.eigvalsh(c)
    return bool(evals[0] >= -PSD_RTOL * evals[-1])


class _CountEigvalsh:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = np.linalg.eigvalsh

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(np.linalg, "eigvalsh", counted)


@pytest.mark.parametrize("case, branch, ok", [
    ("definite", "cholesky", True),
    ("singular", "cholesky", True),
    ("indefinite within the tolerance", "eigvalsh", True),
    ("indefinite beyond the tolerance", "eigvalsh", False),
])
def test_check_psd_branches(case, branch, ok, monkeypatch):
    """A definite and a singular PSD matrix pass on the Cholesky test alone;
    an eigenvalue of −0.5 · PSD_RTOL · λ_max (below −δ, since the diagonal is
    under λ_max) makes Cholesky fail, and eigvalsh passes it; −3 · PSD_RTOL ·
    λ_max is refused by eigvalsh with the usual message."""
    from mrc_ref.svd import PSD_RTOL

    n = 12
    head = np.r_[np.linspace(0.1, 1, n - 5), 10.0]  # λ_max = 10 spread over the diagonal
    lam = {"definite": np.r_[1.0, 1, 1, 1, 1, head],
           "singular": np.r_[0.0, 0, 0, 0, 0, head],
           "indefinite within the tolerance": np.r_[-0.5 * PSD_RTOL * 10, 0, 0, 0, 0, head],
           "indefinite beyond the tolerance": np.r_[-3 * PSD_RTOL * 10, 0, 0, 0, 0, head],
           }[case]
    c = _with_spectrum(lam)
    assert np.diag(c).max() < 0.5 * 10  # so δ = PSD_RTOL · max diag < 0.5 · PSD_RTOL · λ_max
    counter = _CountEigvalsh(monkeypatch)
    if ok:
        stats.check_psd(c, "gram", np)
    else:
        with pytest.raises(MrcError, match=r"^gram is not positive semi-definite \(smallest eigenvalue"):
            stats.check_psd(c, "gram", np)
    assert counter.calls == (branch == "eigvalsh")
    assert _eig_verdict(c) == ok


def test_check_psd_zero_diagonal_falls_back():
    """A non-zero matrix with a zero diagonal (δ = 0) is indefinite: eigvalsh says so."""
    c = np.array([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(MrcError, match="not positive semi-definite"):
        stats.check_psd(c, "gram", np)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 24),
       depth=st.floats(0.0, 3.0), spread=st.floats(0.0, 6.0), zeros=st.integers(0, 5))
def test_check_psd_verdict_equals_eigvalsh(seed, n, depth, spread, zeros):
    """Near the boundary (smallest eigenvalue −depth · PSD_RTOL · λ_max, depth
    in [0, 3], spectra spread over up to 6 decades, some exact zeros) the
    verdict is the eigenvalue test's. Cases within 1e-6 relative of the
    threshold itself are left out (there round-off decides either test)."""
    from mrc_ref.svd import PSD_RTOL

    if abs(depth - 1) < 1e-6:
        return
    rng = np.random.default_rng(seed)
    top = 10.0 ** rng.uniform(-3, 3)
    rest = top * 10.0 ** -rng.uniform(0, spread, size=max(n - 1, 0))
    rest[: min(zeros, max(n - 2, 0))] = 0.0
    lam = np.r_[top, rest]
    lam[-1] = -depth * PSD_RTOL * top
    c = _with_spectrum(lam, seed)
    expected = _eig_verdict(c)
    try:
        stats.check_psd(c, "gram", np)
        got = True
    except MrcError:
        got = False
    assert got == expected
    try:  # the screen of unused matrices never refuses what the eigenvalue test accepts
        stats.screen_psd(c, "gram_normalized", np)
    except MrcError:
        assert not expected


def test_unused_matrix_screened_by_its_2x2_minors():
    """statistic 'gram' with an indefinite gram_normalized: refused when a
    2 × 2 principal minor shows it (then eigvalsh words the refusal), passed
    when the indefinite part is invisible there (unused, not tested further);
    a PSD matrix whose minors break Cauchy–Schwarz by round-off beyond the
    screen's tolerance goes to the full test and passes."""
    _, C, hidden = _hidden_indefinite()
    visible = C.copy()
    t = 10 * np.diag(C).max()
    visible[0, 1] += t
    visible[1, 0] += t
    s = {"gram": C, "sum": np.ones(32), "rows": 100}
    with pytest.raises(MrcError, match=r"^gram_normalized is not positive semi-definite \(smallest eigenvalue"):
        stats.validate({**s, "gram_normalized": visible}, 32, np, statistic="gram")
    stats.validate({**s, "gram_normalized": hidden}, 32, np, statistic="gram")
    v = np.random.default_rng(0).standard_normal(32)
    rank_one = np.outer(v, v)  # every minor is 0: |c_ij| = √(c_ii c_jj)
    rank_one[0, 1] = rank_one[1, 0] = rank_one[0, 1] * (1 + 1e-5)  # breaks it by 1e-5, within PSD_RTOL of λ_max
    assert _eig_verdict(rank_one)
    stats.validate({**s, "gram_normalized": rank_one}, 32, np, statistic="gram")


def test_only_the_statistic_in_use_is_tested_psd(monkeypatch):
    """statistic='gram' tests gram only, 'per-image' gram_normalized only,
    'mean-input' and 'weight' neither (their C is PSD by construction); None
    tests both. The cheap checks still run on every field present."""
    _, C, bad = _hidden_indefinite()
    s = {"gram": C, "sum": np.ones(32), "rows": 100, "gram_normalized": bad}
    with pytest.raises(MrcError, match="gram_normalized is not positive semi-definite"):
        stats.validate(s, 32, np)
    with pytest.raises(MrcError, match="gram_normalized is not positive semi-definite"):
        stats.validate(s, 32, np, statistic="per-image")
    for statistic in ("gram", "mean-input", "weight"):
        stats.validate(s, 32, np, statistic=statistic)
    swapped = {**s, "gram": bad, "gram_normalized": C}
    with pytest.raises(MrcError, match="^gram is not positive semi-definite"):
        stats.validate(swapped, 32, np, statistic="gram")
    for statistic in ("per-image", "mean-input", "weight"):
        stats.validate(swapped, 32, np, statistic=statistic)
    stats.validate(swapped, 32, np, statistic="gram", psd=False)
    # cheap checks on the unused matrix still refuse
    nan = C.copy()
    nan[0, 1] = np.nan
    with pytest.raises(MrcError, match="gram_normalized contains NaN"):
        stats.validate({**s, "gram_normalized": nan}, 32, np, statistic="gram")
    with pytest.raises(MrcError, match="gram contains NaN"):
        stats.validate({**s, "gram": nan}, 32, np, statistic="per-image", psd=False)
    with pytest.raises(MrcError, match="unknown statistic"):
        stats.validate(s, 32, np, statistic="nope")
    # one PSD test per validate, on the one matrix used
    calls = []
    real = stats.check_psd
    monkeypatch.setattr(stats, "check_psd", lambda c, what, xp: calls.append(what) or real(c, what, xp))
    stats.validate(swapped, 32, np, statistic="per-image")
    assert calls == ["gram_normalized"]


@pytest.mark.parametrize("compensation", ["local", "none"])
def test_pipeline_tests_each_statistic_psd_once(compensation, monkeypatch):
    """Local Stage 3 re-reads each layer's statistic, but the PSD test runs
    once per layer (in Stage 1), on the matrix of the statistic in use."""
    from data_tools import synthetic
    from mrc_ref import pipeline

    tensors = synthetic.make_model(1, depth=1, dim=32, num_heads=4)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    raw = synthetic.make_statistics(tensors, names, seed=1)
    calls = []
    real = stats.check_psd
    monkeypatch.setattr(stats, "check_psd", lambda c, what, xp: calls.append(what) or real(c, what, xp))
    config = pipeline.Config(reduction=0.5, compensation=compensation)
    pipeline.run(tensors, raw.__getitem__, config, xp=np)
    assert calls == ["gram"] * len(names)


def test_float32_check_goes_to_eigvalsh(monkeypatch):
    """In float32 the Cholesky factorization's round-off (n ε ≈ 1e-6 already
    at n = 12) could pass what eigvalsh refuses: eigvalsh alone decides."""
    c = _with_spectrum(np.linspace(1, 10, 12)).astype(np.float32)
    counter = _CountEigvalsh(monkeypatch)
    stats.validate({"gram": c, "sum": np.ones(12), "rows": 3}, 12, np, np.float32, statistic="gram")
    assert counter.calls == 1
