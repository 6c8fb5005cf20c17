"""Comparing values with a reference case's expected values, under the
tolerance the case states for each quantity (docs/testing.md, "Tolerances")."""

import numpy as np

from ..certificates import as_host, factor_pair, failure, g8, metric_root

__all__ = ["assert_case_close", "items", "lookup", "compare"]

#: Per-layer figures of a compressed layer, as the pipeline reports them.
LOSS_KEYS = ("nmse_stage1", "loss_stage1", "nmse_stage3", "loss_stage3", "residual_norm")


def _plain(value):
    """Containers and NumPy scalars as plain lists, dicts and numbers, so that
    ``(48, 32)`` equals ``[48, 32]`` in an exact comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _close(kind, actual, expected, tol, C):
    """``(ok, observed, allowed)`` of one comparison of :func:`assert_case_close`."""
    rtol, atol = float(tol.get("rtol", 0.0)), float(tol.get("atol", 0.0))
    if kind == "exact":
        return _plain(actual) == _plain(expected), repr(actual), repr(expected)
    if kind == "scalar":
        if expected is None or actual is None:
            return actual is expected, repr(actual), repr(expected)
        err = abs(float(actual) - float(expected))
        allowed = atol + rtol * abs(float(expected))
        return err <= allowed, f"{g8(float(actual))} (|error| {g8(err)})", f"{g8(float(expected))} ± {g8(allowed)}"
    if kind == "array":
        a, e = as_host(actual), as_host(expected)
        if a.shape != e.shape:
            return False, f"shape {a.shape}", f"shape {e.shape}"
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        allowed = atol + rtol * (float(np.max(np.abs(e))) if e.size else 0.0)
        return err <= allowed, f"max |error| {g8(err)}", f"≤ {g8(allowed)}"
    if kind == "product":
        ref_left, ref_right = factor_pair(*expected, "reference")
        left, right = (as_host(a) for a in actual)
        shape = (ref_left.shape[0], ref_right.shape[1])
        if not (left.ndim == right.ndim == 2 and left.shape[1] == right.shape[0]
                and (left.shape[0], right.shape[1]) == shape):
            dims = [("×".join(map(str, a.shape)) or "a scalar") for a in (left, right)]
            return False, f"factors {dims[0]} and {dims[1]}", f"a product of shape {shape[0]}×{shape[1]}"
        ref = ref_left @ ref_right
        S = None if C is None else metric_root(C)  # ‖D‖_C = ‖D S‖_F, on the numerical range of C
        err = float(np.linalg.norm(left @ right - ref if S is None else (left @ right - ref) @ S))
        allowed = atol + rtol * float(np.linalg.norm(ref if S is None else ref @ S))
        return err <= allowed, f"‖error‖ {g8(err)}", f"≤ {g8(allowed)}"
    raise ValueError(f"unknown tolerance kind {kind!r}")


def assert_case_close(actual, expected, case, quantity, *, layer=None, where=None):
    """Assert that ``actual`` matches a case's ``expected`` value within the
    tolerance the case states for ``quantity`` (``case["tolerances"]``).

    Tolerance kinds: ``exact`` (equality: ranks, shapes, counts);
    ``scalar`` ``|a − e| ≤ atol + rtol |e|``; ``array``
    ``max|a − e| ≤ atol + rtol max|e|`` (normwise, as LAPACK's scaled
    residuals); ``product`` (``actual`` and ``expected`` are factor pairs
    ``(left, right)`` or a matrix) ``‖a − e‖ ≤ atol + rtol ‖e‖``, Frobenius,
    or under the layer's metric ``C`` when the tolerance's ``metric`` is
    ``"C"``.

    Parameters
    ----------
    actual, expected :
        The value to check and the case's value.
    case : dict
        From :func:`load_case`.
    quantity : str
        A key of ``case["tolerances"]`` (``"spectrum"``, ``"stage1_product"``, …).
    layer : str, optional
        The layer, named in the message (and whose ``C`` a ``product``
        tolerance in the metric ``C`` uses).
    where : str, optional
        More context for the message (a rank, a rule).

    Raises
    ------
    AssertionError
        In two lines: the case, layer (and, for a product, its rank), the
        quantity, the observed and allowed values, the tolerance. Factors of
        the wrong shapes fail too.
    """
    tol = case["tolerances"].get(quantity)
    if tol is None:
        raise KeyError(f"case {case['id']} states no tolerance for {quantity!r}")
    C = None
    if tol["kind"] == "product":
        if tol.get("metric") == "C":
            if layer is None:
                raise ValueError(f"quantity {quantity!r} is compared under C: pass layer=")
            C = case["layers"][layer]["C"]
        actual = actual if isinstance(actual, tuple) else (actual, np.eye(np.shape(actual)[1]))
        expected = expected if isinstance(expected, tuple) else (expected, np.eye(np.shape(expected)[1]))
    ok, observed, allowed = _close(tol["kind"], actual, expected, tol, C)
    if not ok:
        rank = None
        if tol["kind"] == "product" and isinstance(expected, tuple) and np.ndim(expected[0]) == 2:
            rank = np.shape(expected[0])[1]  # the expected product's rank: the probe's
            if np.ndim(actual[0]) == 2 and np.shape(actual[0])[1] != rank:
                observed = f"rank {np.shape(actual[0])[1]}, {observed}"
        name = quantity if where is None or where == f"rank {rank}" else f"{quantity} ({where})"
        metric = " in the metric C" if C is not None else ""
        raise failure(layer, name, observed, allowed,
                      f"{tol['kind']}{metric}, rtol={tol.get('rtol', 0):g}, atol={tol.get('atol', 0):g}; "
                      f"why: the case's tolerances[{quantity!r}]['reason']", case=case, rank=rank)


def items(doc):
    """Every expected value of a document (in the form of
    :func:`mrc_ref.cases.normalize`), as ``(quantity, layer, where, path)``;
    ``path`` is the key path into ``doc``, ``quantity`` the key of its
    tolerance in the manifest. Omitted values are not listed."""
    for name, layer in doc["layers"].items():
        base = ("layers", name)
        yield "shape", name, None, base + ("shape",)
        yield "spectrum", name, None, base + ("spectrum",)
        yield "nmse_curve", name, None, base + ("nmse_curve",)
        for r, item in layer["stage1"].items():
            yield "stage1_nmse", name, f"rank {r}", base + ("stage1", r, "nmse")
            yield "stage1_gap", name, f"rank {r}", base + ("stage1", r, "eigen_gap")
            if item.get("product") is not None:
                yield "stage1_product", name, f"rank {r}", base + ("stage1", r, "product")
        comp = layer["compressed"]
        for key in ("rank", "residual_rank"):
            yield "ranks", name, key, base + ("compressed", key)
        for key in LOSS_KEYS:
            if key in comp:
                yield "losses", name, key, base + ("compressed", key)
        if comp.get("residual_product") is not None:
            yield "residual_product", name, None, base + ("compressed", "residual_product")
    for key in ("p_total", "fixed", "budget", "residual_rank", "exact"):
        yield "counts", None, f"allocation {key}", ("allocation", key)
    for key in ("optimum", "lower_bound"):
        yield "objective", None, f"allocation {key}", ("allocation", key)
    for rule in doc["allocation"]["rules"]:
        path = ("allocation", "rules", rule)
        yield "ranks", None, f"rule {rule}", path + ("ranks",)
        yield "objective", None, f"rule {rule}", path + ("objective",)
        yield "counts", None, f"rule {rule} params", path + ("params",)
    for key in doc["totals"]:
        yield "counts", None, f"totals {key}", ("totals", key)
    if "logits" in doc:
        yield "counts", None, "logits images", ("logits", "images")
        for key in ("original", "compressed"):
            yield "logits", None, key, ("logits", key)


def lookup(doc, path):
    """The value at a key path of a document (``KeyError`` when absent)."""
    for key in path:
        doc = doc[key]
    return doc


def compare(actual, expected, case):
    """Compare every value of the (resolved) ``expected`` document with
    ``actual`` under the case's tolerances; returns the failure messages."""
    failures = []
    for quantity, layer, where, path in items(expected):
        try:
            value = lookup(actual, path)
        except KeyError:
            failures.append(f"{'/'.join(path)}: missing from the recomputed values")
            continue
        try:
            assert_case_close(value, lookup(expected, path), case, quantity, layer=layer, where=where)
        except AssertionError as err:
            failures.append(str(err))
    return failures


