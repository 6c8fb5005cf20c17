"""Statistics: streamed accumulation and validation."""

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
