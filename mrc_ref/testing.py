"""Assertions and certificates for holding an implementation of the method
against mrc_ref, in the style of :mod:`numpy.testing` (docs/testing.md).

**Inputs.** Every function takes anything :func:`numpy.asarray` takes
(NumPy arrays, nested lists, CPU torch tensors, JAX arrays on the CPU), torch
tensors that need a gradient or live on a GPU (detached and copied to the
host) and CuPy arrays (copied to the host). The math runs in float64 on the
host.

**Gauge invariance.** A factorization ``A B`` is defined only up to an
invertible ``r × r`` matrix ``G``: ``(A G)(G⁻¹ B)`` is the same layer. Nothing
here compares factors. What is compared: products ``A B`` (plainly, or under
the metric ``C`` as ``‖(A B − A' B') S‖_F`` with ``S Sᵀ = C``), NMSE values,
ranks, and principal angles between subspaces
(:func:`scipy.linalg.subspace_angles`).

**Independence.** Where a certificate needs an optimum it computes it by its
own route, not with the code it may be certifying (:mod:`mrc_ref.certificates`,
re-exported here): the Stage-1 optimum from SciPy's ``eigh`` of the output
Gram (:func:`output_spectrum`), the Stage-3 optimum from the singular values
of the whitened regression residual (:func:`certify_residual`). Only the exact
Stage-2 optimum is mrc_ref's own dynamic programme
(:func:`mrc_ref.allocate.optimal`), itself tested against brute force.

**Messages.** Each ``assert_*`` raises :class:`AssertionError` with a
two-line message: the case, layer and rank (when known), the quantity, the
observed and the allowed value; then the tolerance, e.g.::

    case v2/tiny-1xn: layer layers.2: rank 4: Stage-1 NMSE: observed 0.33745984, allowed ≤ 0.081788698
      (optimum 0.081788616 · (1 + rtol) + atol; rtol=1e-06, atol=1e-10); excess ratio 4.1260001

Factors of the wrong shape fail the same way (they are what an
implementation returned), never with a ``ValueError``.

Reference cases: :func:`iter_cases` and :func:`load_case` (the files are
described in docs/testing.md), and :func:`assert_case_close` to compare a
value with a case's expected value under the tolerance the case states.
"""

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import scipy.linalg

from . import allocate, cases
from .cases.compare import assert_case_close
from .certificates import (EXCESS_FLOOR, as_host, certify_residual, certify_stage1, eigen_gap,
                           factor_pair, failure, g8, matrix, metric_root, nmse_tail, optimal_nmse_curve,
                           output_spectrum)
from .compensate import DEFAULT_DAMP

#: Default tolerances of :func:`assert_stage1_optimal`: the achieved NMSE may
#: exceed the optimum by ``rtol`` relative plus ``atol`` absolute. A float64
#: implementation lands within ~1e-15 of the optimum on the shipped cases;
#: any method that is not the Stage-1 optimum (plain weight SVD, a wrong
#: basis, float16 ``W S``) misses by far more. ``atol`` covers optima of ~0
#: (a rank at or above the rank of ``W C Wᵀ``). See :data:`FLOAT32`.
STAGE1_RTOL, STAGE1_ATOL = 1e-6, 1e-10

#: Tolerances of :func:`assert_stage1_optimal` for a float32 implementation,
#: ``assert_stage1_optimal(W, C, A, B, rank=r, **testing.FLOAT32)``. Measured
#: on every probe of the v2 cases (docs/testing.md, "float32
#: implementations"): a float32 Stage 1 by the eigendecomposition of
#: ``W C Wᵀ``, or by whitening that keeps every positive eigenvalue of ``C``,
#: exceeds the optimum by at most 1.3e-9 absolute (4.4e-8 relative), far
#: inside these; each of eight wrong variants (plain weight SVD, whitening by
#: ``C``, a ridge on ``C``, transposed factors, rank − 1, a centred Gram,
#: float16 ``W S``, ``B``'s rows kept by norm) still fails on 8 probes or
#: more. A whitening that cuts ``C``'s spectrum at ``n ε₃₂ λ_max`` (a
#: pseudo-inverse's default) is not float32 round-off: it drops directions
#: that carry output energy, up to 3.6e-4 of the NMSE, and fails.
FLOAT32 = MappingProxyType({"rtol": 1e-5, "atol": 1e-8})

#: Default tolerance of :func:`assert_factorization_close`: relative error of
#: the product (Frobenius, or under the metric ``C``); ~1e-13 for two float64
#: implementations of the same optimum with a clear eigen-gap at the cut.
PRODUCT_RTOL = 1e-7

#: Default tolerances of :func:`assert_residual_optimal` on the damped
#: Stage-3 loss (the same reasoning as :data:`STAGE1_RTOL`).
RESIDUAL_RTOL, RESIDUAL_ATOL = 1e-6, 1e-10

# ----------------------------------------------------------------- Stage 1
def _dims(a):
    return "×".join(map(str, a.shape)) if a.ndim else "a scalar"


def _checked_factors(A, B, m, n, rank, *, layer, case):
    """``A (m, r)`` and ``B (r, n)`` as host float64 arrays, after asserting
    their shapes (``r = rank`` when given): a pair of the wrong shape is what
    an implementation returned, so it fails as an assertion, not as an error."""
    A, B = as_host(A), as_host(B)
    ok = (A.ndim == 2 and B.ndim == 2 and A.shape[0] == m and B.shape[1] == n and A.shape[1] == B.shape[0]
          and (rank is None or A.shape[1] == rank))
    if not ok:
        r = "r" if rank is None else rank
        raise failure(layer, "factor shapes", f"A {_dims(A)}, B {_dims(B)}", f"A {m}×{r}, B {r}×{n}",
                      f"exact: A is m × rank, B is rank × n, for W {m}×{n}", case=case, rank=rank)
    return A, B


def assert_stage1_optimal(W, C, A, B, rtol=STAGE1_RTOL, atol=STAGE1_ATOL, *, rank=None, layer=None, case=None):
    """Assert that ``A B`` attains the Stage-1 optimum at rank ``r``:

        NMSE(A B) ≤ NMSE_opt(r) · (1 + rtol) + atol

    (:func:`certify_stage1`). With ``rank=``, ``A`` must be ``m × rank`` and
    ``B`` ``rank × n``, so that an implementation that returns another rank
    than it was asked for (optimal at that other rank) fails; without it, the
    rank is ``A``'s. Robust to ties in the spectrum: any rank-``r`` optimum
    passes, whichever of the tied directions it keeps.

    Parameters
    ----------
    W : array (m, n)
    C : array (n, n)
    A : array (m, r), B : array (r, n)
        The factors under test (any array :func:`as_host` takes).
    rtol, atol : float
        Allowed excess over the optimum (:data:`STAGE1_RTOL`,
        :data:`STAGE1_ATOL`; :data:`FLOAT32` for float32 implementations).
    rank : int, optional
        The rank the factors were asked for.
    layer : str, optional
    case : dict or str, optional
        A loaded case (or its name), named in the message.

    Raises
    ------
    AssertionError
        In two lines: the case, layer and rank, the observed and allowed NMSE
        (or factor shapes), the tolerance and the excess ratio.
    """
    W, C = matrix(W, "W"), matrix(C, "C")
    A, B = _checked_factors(A, B, *W.shape, rank, layer=layer, case=case)
    cert = certify_stage1(W, C, A, B)
    allowed = cert["nmse_optimal"] * (1 + rtol) + atol
    if not cert["nmse"] <= allowed:
        raise failure(layer, "Stage-1 NMSE", g8(cert["nmse"]), f"≤ {g8(allowed)}",
                      f"optimum {g8(cert['nmse_optimal'])} · (1 + rtol) + atol; rtol={rtol:g}, atol={atol:g}",
                      f"; excess ratio {g8(cert['excess'])}", case=case, rank=cert["rank"])


def assert_factorization_close(A, B, A_ref, B_ref, gram=None, rtol=PRODUCT_RTOL, atol=0.0, *, layer=None,
                               case=None):
    """Assert that the products ``A B`` and ``A_ref B_ref`` agree:

        ‖A B − A_ref B_ref‖ ≤ atol + rtol · ‖A_ref B_ref‖,

    in the Frobenius norm, or with ``gram=C`` in the metric of the layer's
    outputs, ``‖D‖_C = tr(D C Dᵀ)^{1/2}`` (computed as ``‖D S‖_F`` on the
    numerical range of ``C``, :func:`metric_root`). Under ``C`` two products
    that differ only on the null space of ``C`` (dead input channels, fewer
    tokens than features), which give the same outputs on the data, are
    equal; use it whenever ``C`` may be singular. The factors must have the reference's
    shapes (the same rank); the factors themselves are never compared.

    Parameters
    ----------
    A : array (m, r), B : array (r, n)
        The factors under test.
    A_ref : array (m, r), B_ref : array (r, n)
    gram : array (n, n), optional
    rtol, atol : float
    layer : str, optional
    case : dict or str, optional
        Named in the message.

    Raises
    ------
    AssertionError
        In two lines: the case, layer and rank, the observed and allowed
        error (or factor shapes), the tolerance.
    """
    A_ref, B_ref = factor_pair(A_ref, B_ref, "reference")
    C = None if gram is None else matrix(gram, "gram")
    rank = A_ref.shape[1]
    A, B = _checked_factors(A, B, A_ref.shape[0], B_ref.shape[1], rank, layer=layer, case=case)
    ref = A_ref @ B_ref
    S = None if C is None else metric_root(C)  # ‖D‖_C = ‖D S‖_F, on the numerical range of C
    err = float(np.linalg.norm(A @ B - ref if S is None else (A @ B - ref) @ S))
    size = float(np.linalg.norm(ref if S is None else ref @ S))
    allowed = atol + rtol * size
    if not err <= allowed:
        metric = "Frobenius" if C is None else "in the metric C"
        note = ""
        if rank and np.linalg.matrix_rank(A) and np.linalg.matrix_rank(A_ref):
            angle = np.max(scipy.linalg.subspace_angles(scipy.linalg.orth(A), scipy.linalg.orth(A_ref)))
            note = f"; largest principal angle between the column spaces {angle:.3g} rad"
        relative = err / size if size else float("inf")
        raise failure(layer, f"product A B ({metric})", f"‖error‖ {g8(err)} (relative {g8(relative)})",
                      f"≤ {g8(allowed)}", f"atol + rtol · ‖reference‖; rtol={rtol:g}, atol={atol:g}", note,
                      case=case, rank=rank)


# ----------------------------------------------------------------- Stage 2
def _named(ranks, shapes):
    """``(names, ranks list, shapes list)`` from sequences or mappings."""
    if isinstance(ranks, Mapping):
        names = list(ranks)
        ranks = [ranks[k] for k in names]
        if isinstance(shapes, Mapping):
            missing = [k for k in names if k not in shapes]
            if missing:
                raise ValueError(f"no shape for layer(s) {', '.join(missing)}")
            shapes = [shapes[k] for k in names]
    else:
        ranks = list(ranks)
        names = list(shapes) if isinstance(shapes, Mapping) else [str(i) for i in range(len(ranks))]
        if isinstance(shapes, Mapping):
            shapes = [shapes[k] for k in names]
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    if len(shapes) != len(ranks):
        raise failure(None, "number of layers", len(ranks), len(shapes), "exact: one rank per shape")
    return names, ranks, shapes


def assert_allocation_valid(ranks, shapes, budget, q, *, fixed=0):
    """Assert that an allocation is feasible.

    Each rank is ``None`` (the layer stays dense, ``m n`` parameters) or an
    integer with ``1 ≤ r`` and ``r + q ≤ min(m, n)`` (``(r + q)(m + n)``
    parameters), and the model's total ``fixed + Σ_l cost_l`` is at most
    ``budget``.

    Parameters
    ----------
    ranks : sequence of int or None, or mapping layer -> int or None
    shapes : sequence of (m, n), or mapping layer -> (m, n)
    budget : int
        The parameter budget ``P*`` of the whole model.
    q : int
        Residual rank stored with every factored layer.
    fixed : int
        Parameters outside the listed layers (the rest of the model).
    """
    names, ranks, shapes = _named(ranks, shapes)
    total = int(fixed)
    for name, r, (m, n) in zip(names, ranks, shapes):
        if r is None:
            total += m * n
            continue
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(m, n) - q:
            raise failure(name, "rank", repr(r),
                        f"an integer 1 ≤ r ≤ min(m, n) − q = {min(m, n) - q}, or None (dense)",
                        f"exact; shape {m}x{n}, q={q}")
        total += (int(r) + q) * (m + n)
    if total > budget:
        raise failure(None, "total parameters", total, f"≤ {budget}",
                    f"exact; fixed {fixed} + Σ (r + q)(m + n), or m n for dense layers")


def allocation_gap(ranks, spectra, shapes, budget, q, *, fixed=0):
    """The gap of an allocation to the exact Stage-2 optimum.

    Objective: ``Σ_l NMSE_l(r_l)`` with ``NMSE_l(r) = Σ_{i>r} σ_{l,i}² / Σ_i σ_{l,i}²``
    (0 for a dense layer), minimised over allocations that meet ``budget``.

    Parameters
    ----------
    ranks : sequence or mapping (as :func:`assert_allocation_valid`, which
        is asserted first)
    spectra : sequence or mapping of array (k_l,)
        Per layer, the eigenvalues ``σ²`` of ``W C Wᵀ`` (any order, any
        positive scale), e.g. from :func:`output_spectrum`.
    shapes, budget, q, fixed :
        As :func:`assert_allocation_valid`.

    Returns
    -------
    dict
        ``objective`` of ``ranks``; ``optimum`` (the exact optimum, or the
        best allocation found when the problem is too large to solve
        exactly); ``lower_bound`` (equal to ``optimum`` when ``exact``);
        ``exact``; ``gap`` ``(objective − lower_bound) / lower_bound`` (0
        when both are 0, None when only the bound is); ``optimal_ranks``
        (same container type as ``ranks``); ``params`` of ``ranks``.
    """
    assert_allocation_valid(ranks, shapes, budget, q, fixed=fixed)
    names, rank_list, shape_list = _named(ranks, shapes)
    if isinstance(spectra, Mapping):
        spectra = [spectra[k] for k in names] if isinstance(ranks, Mapping) else list(spectra.values())
    curves = [nmse_tail(s) for s in spectra]
    if len(curves) != len(rank_list):
        raise ValueError(f"{len(curves)} spectra for {len(rank_list)} layers")
    value = float(sum(0.0 if r is None else curves[i][min(int(r), len(curves[i]) - 1)]
                      for i, r in enumerate(rank_list)))
    if any(allocate.compressible(shape_list, q)):
        best, bound, exact = allocate.optimal(curves, shape_list, q, fixed, budget)
    else:  # no layer can be factored below its dense size: all dense is optimal
        best, bound, exact = [None] * len(shape_list), 0.0, True
    best_value = allocate.objective(curves, best)
    params = int(fixed) + sum(m * n if r is None else (int(r) + q) * (m + n)
                              for r, (m, n) in zip(rank_list, shape_list))
    return {
        "objective": value,
        "optimum": best_value,
        "lower_bound": float(bound),
        "exact": bool(exact),
        "gap": allocate.relative_gap(value, float(bound)),
        "optimal_ranks": dict(zip(names, best)) if isinstance(ranks, Mapping) else best,
        "params": params,
    }


# ----------------------------------------------------------------- Stage 3
def assert_residual_optimal(W, A, B, P, Q, C, *, K=None, Ct=None, damp=DEFAULT_DAMP, rtol=RESIDUAL_RTOL,
                            atol=RESIDUAL_ATOL, layer=None):
    """Assert that the residual ``P Q`` attains the exact Stage-3 optimum for
    the given ``A, B``, Grams and ``damp`` (:func:`certify_residual`):

        L(P Q) ≤ L* · (1 + rtol) + atol.

    Robust to ties: it certifies ``P Q`` against the caller's own ``A B``, so
    any optimal ``A B`` (whichever tied direction it keeps) can be checked.
    """
    cert = certify_residual(W, A, B, P, Q, C, K=K, Ct=Ct, damp=damp)
    allowed = cert["loss_optimal"] * (1 + rtol) + atol
    if not cert["loss"] <= allowed:
        raise failure(layer, f"Stage-3 damped loss at residual rank {cert['rank']} (damp={damp:g})", g8(cert["loss"]),
                    f"≤ {g8(allowed)}",
                    f"optimum {g8(cert['loss_optimal'])} · (1 + rtol) + atol; rtol={rtol:g}, atol={atol:g}",
                    f"; excess ratio {g8(cert['excess'])}")


# ----------------------------------------------------------------- reference cases
def iter_cases(version=None, tags=None, *, exclude=()):
    """Yield the shipped reference cases, loaded (:func:`load_case`), in id order.

    Parameters
    ----------
    version : str or int, optional
        ``"v1"`` or ``1``; default the latest version.
    tags : str or iterable of str, optional
        Only cases that carry every one of these tags.
    exclude : str or iterable of str
        Skip cases that carry any of these tags (e.g. ``"end-to-end"``).
    """
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    version = cases.resolve_version(version)
    for case_id in cases.case_ids(version):
        manifest = cases.read_manifest(cases.case_dir(case_id, version))
        have = set(manifest["tags"])
        if tags <= have and not exclude & have:
            yield load_case(case_id, version)


def load_case(case_id, version=None):
    """Load one reference case after checking every file against its manifest.

    Parameters
    ----------
    case_id : str
        ``"near-tie"``, ``"v2/near-tie"``, or the path of a case directory.
    version : str or int, optional
        Default: the version in ``case_id``, else the latest (v2).

    Returns
    -------
    dict
        ``id``, ``version``, ``path``, ``description``, ``tags``,
        ``difficulty``, ``notes``, ``manifest``, ``tolerances`` (per quantity:
        ``kind``, ``rtol``, ``atol``, ``metric``, ``reason``), ``config``
        (the options, as ``pipeline.Config`` fields), ``expected`` (the
        expected values; products as ``(left, right)`` factor pairs whose
        product is the expected matrix; each layer's Stage-1 probes keyed by
        ``int`` rank, ``expected["layers"][name]["stage1"][5]``, with
        ``nmse``, ``eigen_gap``, ``product``), ``tensors`` and ``metadata`` (the
        weights as stored), ``layers`` (per selected layer: ``W`` and ``C``
        in float64, ``shape``, ``stats`` as stored, ``expected``), ``budget``,
        ``fixed``, ``residual_rank``, ``damp``, ``tokens`` (proxy tokens or
        None).

    Raises
    ------
    MrcError
        Unknown id; a manifest that is not a case manifest of a schema this
        release reads (a field missing or of the wrong type); a file that is
        missing or whose SHA-256 differs from the manifest. The message names
        the file.
    """
    return cases.read_case(cases.case_dir(case_id, version))


def relative_gap(s2, r):
    """Deprecated name of :func:`eigen_gap` (the eigen-gap at the cut; not the
    allocation's optimality gap, which reports call ``relative_gap``)."""
    import warnings

    warnings.warn("mrc_ref.testing.relative_gap is deprecated; use eigen_gap", DeprecationWarning, stacklevel=2)
    return eigen_gap(s2, r)


__all__ = [
    "as_host", "output_spectrum", "optimal_nmse_curve", "eigen_gap", "certify_stage1", "certify_residual",
    "assert_stage1_optimal", "assert_factorization_close", "assert_allocation_valid", "allocation_gap",
    "assert_residual_optimal", "iter_cases", "load_case", "assert_case_close",
    "STAGE1_RTOL", "STAGE1_ATOL", "FLOAT32", "PRODUCT_RTOL", "RESIDUAL_RTOL", "RESIDUAL_ATOL", "EXCESS_FLOOR",
]
