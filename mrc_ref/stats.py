"""Statistics of a layer's inputs: streamed accumulation, validation, and
the metric ``C`` of each named statistic (docs/math.md, Stage 1).

All functions are pure over arrays of the module ``xp``.
"""

import numpy as np

from .errors import MrcError
from .svd import PSD_RTOL, cholesky

__all__ = ["SYMMETRY_RTOL", "FLOAT_DTYPES", "STATISTICS", "METRIC_MATRIX", "accumulate_gram", "check_declared",
           "validate", "check_psd", "screen_psd", "metric", "metric_gram", "metric_per_image", "metric_mean_input",
           "metric_weight"]

#: Relative tolerance of the symmetry check, ``max|C - Cᵀ| <= tol * max|C|``;
#: loose enough for Grams summed and stored in float32.
SYMMETRY_RTOL = 1e-5

#: Dtypes a statistic may have: the real floating-point dtypes of the
#: ``acts.h5`` contract. Anything else (complex, integer, bool, string,
#: compound, float16...) is refused rather than converted.
FLOAT_DTYPES = ("float32", "float64")


def accumulate_gram(chunks, xp, dtype=None):
    """Accumulate the Gram, sum and row count of token rows, one chunk at a time.

    ``C = Σ_t x_t x_tᵀ``, ``s = Σ_t x_t``, ``rows = N_tok``; memory is that of
    one chunk plus the ``n × n`` accumulator, whatever the number of rows.

    Parameters
    ----------
    chunks : iterable of array, each (rows_k, n)
        Token rows (any array type ``xp.asarray`` accepts, e.g. HDF5 slices).
    xp : module
        Array module.
    dtype : dtype, optional
        Accumulation dtype, float64 by default.

    Returns
    -------
    dict
        ``gram`` (n, n), ``sum`` (n,), ``rows`` (int).
    """
    dtype = dtype or xp.float64
    gram = total = buffer = None
    rows = 0
    for chunk in chunks:
        src = xp.asarray(chunk)  # no cast here: the cast goes into one reused buffer
        if src.ndim != 2:
            raise MrcError(f"token rows must be 2-D, got shape {tuple(src.shape)}")
        k, n = src.shape
        if src.dtype == dtype:
            x = src
        else:
            if buffer is None or buffer.shape[0] < k or buffer.shape[1] != n:
                buffer = xp.empty((k, n), dtype=dtype)
            x = buffer[:k]
            x[...] = src
        if gram is None:
            gram = xp.zeros((n, n), dtype=dtype)
            total = xp.zeros(n, dtype=dtype)
        gram += x.T @ x
        total += x.sum(axis=0)
        rows += k
        del src, x, chunk  # free this chunk before the next one is read
    if gram is None:
        raise MrcError("no token rows to accumulate")
    return {"gram": gram, "sum": total, "rows": rows}


def check_declared(what, shape, dtype, expected, origin="the layer's weight"):
    """Check the shape and dtype of a statistic before it is read.

    Cheap: only metadata is looked at, so a file can be refused before a
    declared ``20000 × 20000`` dataset is loaded. Used on HDF5 datasets by
    :mod:`mrc_ref.formats` and on arrays by :func:`validate`.

    Parameters
    ----------
    what : str
        Name of the statistic in messages (``"gram"``, ``"proxy/tokens"``...).
    shape : tuple of int or None
        Declared shape (``None``: an HDF5 dataset without a dataspace).
    dtype : numpy.dtype-like
        Declared dtype; must be real floating point (:data:`FLOAT_DTYPES`).
    expected : tuple
        Expected shape; an entry ``None`` matches any size.
    origin : str
        Where the expected shape comes from, for the message.

    Raises
    ------
    MrcError
        The dtype is not real floating point (complex, integer, bool,
        string, compound...), or the shape differs from ``expected``.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in FLOAT_DTYPES:
        shown = dt if dt is not None else dtype
        raise MrcError(f"{what} has dtype {shown}, expected one of {', '.join(FLOAT_DTYPES)}")
    if shape is None:
        raise MrcError(f"{what} has no data (empty dataspace)")
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "")
        raise MrcError(f"{what} has shape {shape}, expected ({want}) from {origin}")


def _as_float(a, what, expected, xp, dtype):
    """``a`` on ``xp`` in ``dtype`` after :func:`check_declared` on its own
    shape and dtype (so no complex part is dropped with a warning)."""
    if not hasattr(a, "dtype"):
        a = np.asarray(a)
    check_declared(what, a.shape, a.dtype, expected)
    return xp.asarray(a, dtype=dtype)


def _check_matrix(c, what, xp):
    """The cheap checks of a statistic matrix (O(n²)): finite, not all zero,
    symmetric, non-negative diagonal. Returns ``(c + cᵀ) / 2``."""
    if not bool(xp.isfinite(c).all()):
        raise MrcError(f"{what} contains NaN or Inf")
    scale = float(xp.abs(c).max())
    if scale == 0.0:
        raise MrcError(f"{what} is all zero")
    sym = (c + c.T) / 2  # the one strided (transposed) read; c − sym = (c − cᵀ)/2 up to ε|c|
    if 2 * float(xp.abs(c - sym).max()) > SYMMETRY_RTOL * scale:
        raise MrcError(f"{what} is not symmetric")
    if float(xp.diagonal(c).min()) < 0:
        raise MrcError(f"{what} has a negative diagonal entry, so it is not positive semi-definite")
    return sym


def check_psd(c, what, xp):
    """Refuse a symmetric ``c`` (n, n) whose smallest eigenvalue is below
    ``−PSD_RTOL ×`` its largest, cheaply when it passes.

    First a Cholesky factorization of ``c + δ I`` with ``δ = PSD_RTOL · max_i c_ii``
    (about ``n³/3`` flops). For a symmetric matrix ``λ_max ≥ max_i c_ii``
    (the Rayleigh quotient of a unit vector ``e_i``), so ``δ ≤ PSD_RTOL · λ_max``:
    if ``c + δ I`` is positive definite then ``λ_min > −δ ≥ −PSD_RTOL · λ_max``
    and the eigenvalue test passes too. When the factorization fails, the
    verdict and its message come from ``eigvalsh`` (about ``4n³/3`` flops), as
    before. Either way the verdict is that of the eigenvalue test, neither
    stricter nor looser (up to the round-off of either factorization, about
    ``n ε ‖c‖``, far below the tolerance). A singular or float32-rounded Gram
    usually passes at the first step; one within the tolerance whose negative
    round-off exceeds ``δ`` falls back to ``eigvalsh``. The first step is
    taken only where ``n ε ≤ PSD_RTOL / 100`` for the dtype of ``c`` (float64;
    in float32 the factorization's round-off could exceed ``δ``, and
    ``eigvalsh`` alone decides, as before).

    Raises
    ------
    MrcError
        ``<what> is not positive semi-definite (smallest eigenvalue …)``.
    """
    n = c.shape[0]
    delta = PSD_RTOL * float(xp.diagonal(c).max())
    if n * float(np.finfo(c.dtype).eps) <= PSD_RTOL / 100 and delta > 0 \
            and cholesky(c + delta * xp.eye(n, dtype=c.dtype), xp) is not None:
        return
    evals = xp.linalg.eigvalsh(c)  # ascending
    low, top = float(evals[0]), float(evals[-1])
    if low < -PSD_RTOL * top:
        raise MrcError(f"{what} is not positive semi-definite (smallest eigenvalue {low:.3g}, "
                       f"{low / top:.3g} times the largest; tolerance {PSD_RTOL:g})")


def screen_psd(c, what, xp):
    """A necessary condition of positive semi-definiteness, in O(n²), for a
    matrix present but not used by the statistic: every 2 × 2 principal minor
    non-negative, ``|c_ij| ≤ √(c_ii c_jj)`` (Cauchy–Schwarz, which every Gram
    obeys), up to a factor ``1 + PSD_RTOL`` for round-off. A matrix that
    breaks it goes to :func:`check_psd`, which gives the verdict (so nothing
    the eigenvalue test accepts is refused); one that obeys it is not tested
    further (an indefinite part invisible in the 2 × 2 minors passes here).

    Raises
    ------
    MrcError
        As :func:`check_psd`.
    """
    root = xp.sqrt(xp.diagonal(c))  # the diagonal is non-negative (checked before)
    if bool((xp.abs(c) > (1 + PSD_RTOL) * (root[:, None] * root[None, :])).any()):
        check_psd(c, what, xp)


#: Statistic name -> the stored matrix its metric ``C`` is (``None``: ``C`` is
#: built from other fields and positive semi-definite by construction,
#: ``x̄ x̄ᵀ`` or ``I``).
METRIC_MATRIX = {"gram": "gram", "per-image": "gram_normalized", "mean-input": None, "weight": None}


def validate(stats, n, xp, dtype=None, statistic=None, psd=True):
    """Check one layer's raw statistics and return them on ``xp`` in ``dtype``.

    Checks, on every field present: ``gram`` (and ``gram_normalized`` when
    present) is ``n × n`` of a real floating dtype, finite, symmetric
    (``SYMMETRY_RTOL``), not all zero, with a non-negative diagonal; ``sum``
    has ``n`` finite entries; ``rows`` is a positive integer. These cost
    O(n²). Only the matrix the statistic's metric ``C`` is
    (:data:`METRIC_MATRIX`) is then checked positive semi-definite (smallest
    eigenvalue ``≥ −PSD_RTOL ×`` the largest, which admits the round-off of a
    Gram stored in float32), by :func:`check_psd`: a Cholesky test, with
    ``eigvalsh`` only when it fails. A matrix present but not used gets the
    O(n²) screen of :func:`screen_psd` (its 2 × 2 principal minors), and the
    full test only when that fails.

    Parameters
    ----------
    stats : dict
        ``gram`` (n, n), ``sum`` (n,), ``rows``, optional ``gram_normalized`` (n, n).
    n : int
        Input features of the layer.
    xp : module
    dtype : dtype, optional
        float64 by default.
    statistic : str, optional
        The statistic in use (:data:`STATISTICS`); ``None`` checks both
        matrices positive semi-definite.
    psd : bool
        ``False`` skips the positive semi-definite test, for statistics whose
        test has already run once (the local Stage 3 re-reads what Stage 1
        validated).

    Returns
    -------
    dict
        ``gram`` (n, n) symmetrized, ``sum`` (n,), ``rows``, ``gram_normalized``
        (n, n) symmetrized or ``None``.

    Raises
    ------
    MrcError
        Naming the problem; the caller adds file and layer.
    """
    dtype = dtype or xp.float64
    if statistic is not None and statistic not in METRIC_MATRIX:
        raise MrcError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")
    rows = stats["rows"]
    if isinstance(rows, (bool, np.bool_)) or not isinstance(rows, (int, np.integer)):
        raise MrcError(f"rows is {rows!r}, must be a positive integer")
    rows = int(rows)
    if rows <= 0:
        raise MrcError(f"rows is {rows}, must be positive")
    out = {"rows": rows, "gram_normalized": None}
    out["gram"] = _check_matrix(_as_float(stats["gram"], "gram", (n, n), xp, dtype), "gram", xp)
    out["sum"] = _as_float(stats["sum"], "sum", (n,), xp, dtype)
    if not bool(xp.isfinite(out["sum"]).all()):
        raise MrcError("sum contains NaN or Inf")
    normalized = stats.get("gram_normalized")
    if normalized is not None:
        out["gram_normalized"] = _check_matrix(_as_float(normalized, "gram_normalized", (n, n), xp, dtype),
                                               "gram_normalized", xp)
    if psd:
        used = ("gram", "gram_normalized") if statistic is None else (METRIC_MATRIX[statistic],)
        for key in ("gram", "gram_normalized"):
            if out[key] is not None:
                (check_psd if key in used else screen_psd)(out[key], key, xp)
    return out


def metric_gram(stats, n, xp):
    """``gram``: the token Gram ``C = Σ_t x_t x_tᵀ`` (the default **[choice]**)."""
    return stats["gram"]


def metric_per_image(stats, n, xp):
    """``per-image``: ``C_norm = (1/N_img) Σ_i X_iᵀ X_i / ‖X_i Wᵀ‖²_F``, stored
    as ``gram_normalized`` by the capture (it needs the layer's weight)."""
    if stats["gram_normalized"] is None:
        raise MrcError("statistic 'per-image' needs 'gram_normalized', which the activations file lacks")
    return stats["gram_normalized"]


def metric_mean_input(stats, n, xp):
    """``mean-input``: the rank-one metric ``x̄ x̄ᵀ`` with ``x̄ = Σ_t x_t / N_tok``."""
    mean = stats["sum"] / stats["rows"]
    return xp.outer(mean, mean)


def metric_weight(stats, n, xp):
    """``weight``: ``C = I``, plain SVD of ``W`` (the baseline)."""
    return xp.eye(n, dtype=stats["gram"].dtype)


#: Statistic name -> function ``(validated stats, n, xp) -> C (n, n)``.
STATISTICS = {
    "gram": metric_gram,
    "per-image": metric_per_image,
    "mean-input": metric_mean_input,
    "weight": metric_weight,
}


def metric(name, stats, n, xp):
    """Return the metric ``C`` (n, n) of the statistic ``name``.

    Parameters
    ----------
    name : {"gram", "per-image", "mean-input", "weight"}
    stats : dict
        Validated statistics (:func:`validate`).
    """
    try:
        fn = STATISTICS[name]
    except KeyError:
        raise MrcError(f"unknown statistic {name!r}; expected one of {', '.join(STATISTICS)}") from None
    return fn(stats, n, xp)
