"""Stage 2: mixed-rank allocation under a parameter budget (docs/math.md, Stage 2).

A layer ``(m, n)`` stores ``m n`` parameters dense, or ``(r + q)(m + n)``
factored at rank ``r`` with residual rank ``q``. It stays dense at or above
the break-even rank ``r_max = ⌊m n / (m + n)⌋ − q``. A rank is an ``int``;
``None`` means dense.

The functions here are pure over host arrays: the per-layer NMSE curves
``nmse[l][r]`` (from :func:`mrc_ref.svd.nmse_curve`) and shapes.

Weighted objective **[choice]**: with per-layer sensitivity weights
``w_l ≥ 0`` the objective ``Σ_l w_l NMSE_l(r_l)`` is the unweighted one on
the curves ``w_l NMSE_l`` (:func:`weighted`); every rule here then works on
those curves unchanged (the greedy scores, the threshold, the DP, the LP
bound and the gap). ``w_l = 1`` is the paper's objective.
"""

import heapq
import math
from fractions import Fraction

import numpy as np

from .errors import InfeasibleBudget, MrcError

__all__ = ["ALLOCATIONS", "MAX_DP_CELLS", "allocate", "optimal", "greedy", "threshold", "uniform",
           "fixed_rank", "local_search", "lp_bound", "objective", "weighted", "relative_gap",
           "parameter_budget", "break_even_rank", "layer_params", "total_params", "compressible",
           "min_params", "check_budget"]


def parameter_budget(p_total, reduction):
    """``P* = ⌊(1 − reduction) · P_total⌋`` in exact arithmetic.

    ``reduction`` is read as the shortest decimal that round-trips to its
    float (``repr``), so ``--reduction 0.9`` on 100000 parameters gives 10000,
    not the 9999 that binary floating point gives.
    """
    return math.floor((1 - Fraction(repr(float(reduction)))) * int(p_total))


def break_even_rank(m, n, q):
    """``r_max = ⌊m n / (m + n)⌋ − q``: a layer at rank ``≥ r_max``
    stays dense. (Where ``m n / (m + n)`` is not whole, rank ``r_max`` itself
    would still save a few parameters; the rule keeps it dense.)"""
    return (m * n) // (m + n) - q


def layer_params(m, n, rank, q):
    """Stored parameters of one layer: ``m n`` dense (``rank is None``), else
    ``(rank + q)(m + n)``."""
    return m * n if rank is None else (rank + q) * (m + n)


def total_params(shapes, ranks, q, fixed):
    """Stored parameters of the model: ``fixed`` (every tensor that is not a
    selected weight) plus each selected layer at its rank."""
    return fixed + sum(layer_params(m, n, r, q) for (m, n), r in zip(shapes, ranks))


def compressible(shapes, q):
    """Mask of layers for which some rank ``1 ≤ r < r_max`` saves parameters."""
    return [break_even_rank(m, n, q) - 1 >= 1 for m, n in shapes]


def min_params(shapes, q, fixed):
    """The smallest reachable size: every compressible layer at rank 1."""
    ranks = [1 if ok else None for ok in compressible(shapes, q)]
    return total_params(shapes, ranks, q, fixed)


def check_budget(shapes, q, fixed, budget):
    """Raise :class:`MrcError` if ``budget`` is below :func:`min_params`."""
    if not any(compressible(shapes, q)):
        raise InfeasibleBudget(
            f"no selected layer can be compressed with residual rank {q} "
            "(break-even rank ⌊mn/(m+n)⌋ − q must exceed 1)"
        )
    floor = min_params(shapes, q, fixed)
    if budget < floor:
        raise InfeasibleBudget(
            f"budget of {budget} parameters is infeasible: the smallest reachable size "
            f"is {floor} parameters (every selected layer at rank 1 with residual rank {q})"
        )


def greedy(nmse, shapes, q, fixed, budget, step=1, entry="break-even"):
    """Greedy mixed-rank allocation.

    Start with every layer dense; repeatedly lower the rank of the layer whose
    next step loses the least normalized energy per parameter saved,

        score_l = (NMSE_l(r_new) − NMSE_l(r)) / (params_l(r) − params_l(r_new)),

    where the first step of a dense layer goes to ``r_max − step`` and saves
    ``m n − (r_max − step + q)(m + n)`` at once (``entry="break-even"``, as in
    docs/math.md). Stop as soon as the total is at or under ``budget``. Ties break
    by layer order (deterministic).

    With ``entry="hull"`` **[choice]** the first step of a dense layer goes to
    the rank ``r*`` of least ``NMSE_l(r) / (m n − (r + q)(m + n))`` over all
    ``r < r_max`` on the step grid: the slope of the lower convex hull of the
    layer's (parameters, error) points. Each layer's factored curve is convex
    (descending spectrum), so this greedy walks the convex hulls, and the state
    before its last step is optimal for its own size: its error exceeds the
    optimum by at most the loss of that last step.

    Parameters
    ----------
    nmse : sequence of array (k_l + 1,)
        ``nmse[l][r]``, the Stage-1 error of layer ``l`` at rank ``r``.
    shapes : sequence of (m, n)
    q : int
        Residual rank, counted in every factored layer.
    fixed : int
        Parameters outside the selected weights.
    budget : int
        Target ``P* = (1 − reduction) P_total``.
    step : int
        Ranks removed per step (``k``; default 1).
    entry : {"break-even", "hull"}
        How a dense layer's first step is chosen (see above).

    Returns
    -------
    list of int or None
        Rank per layer, ``None`` for dense.
    """
    if step < 1:
        raise MrcError(f"rank step must be ≥ 1, got {step}")
    if entry not in ("break-even", "hull"):
        raise MrcError(f"unknown greedy entry {entry!r}; expected 'break-even' or 'hull'")
    check_budget(shapes, q, fixed, budget)
    ranks = [None] * len(shapes)
    total = total_params(shapes, ranks, q, fixed)
    ok = compressible(shapes, q)
    heap = []

    def push(l):
        m, n = shapes[l]
        r = ranks[l]
        if r is None:
            if not ok[l]:
                return
            top = break_even_rank(m, n, q) - step
            grid = range(max(1, top), 0, -step) if entry == "hull" else [max(1, top)]
            # least error per parameter saved; ties go to the larger rank
            new = min(grid, key=lambda c: (float(nmse[l][c]) / (m * n - layer_params(m, n, c, q)), -c))
            lost = float(nmse[l][new])
        elif r > 1:
            new = max(1, r - step)
            lost = float(nmse[l][new] - nmse[l][r])
        else:
            return
        saved = layer_params(m, n, r, q) - layer_params(m, n, new, q)
        heapq.heappush(heap, (lost / saved, l, new))

    for l in range(len(shapes)):
        push(l)
    while total > budget:
        _, l, new = heapq.heappop(heap)  # feasibility was checked: never empty here
        m, n = shapes[l]
        total -= layer_params(m, n, ranks[l], q) - layer_params(m, n, new, q)
        ranks[l] = new
        push(l)
    return ranks


def _moves(nmse, shapes, q, l, r):
    """The single-step moves of layer ``l`` at rank ``r`` (``None`` = dense):
    ``(new rank, Δparams, ΔNMSE)`` one rank up (to dense from ``r_max − 1``)
    and one rank down (to ``r_max − 1`` from dense)."""
    m, n = shapes[l]
    top = break_even_rank(m, n, q) - 1
    if top < 1:
        return []
    out = []
    for new in ([top] if r is None else [r - 1, r + 1 if r < top else None]):
        if new == 0:
            continue
        lost = (0.0 if new is None else float(nmse[l][new])) - (0.0 if r is None else float(nmse[l][r]))
        out.append((new, layer_params(m, n, new, q) - layer_params(m, n, r, q), lost))
    return out


def local_search(nmse, shapes, q, fixed, budget, ranks):
    """Improve an allocation by single-rank moves while ``Σ_l NMSE_l`` falls
    (the optional pass of docs/math.md).

    Repeats until no move helps: (1) spend the slack ``budget − total`` on the
    rank increase with the largest error decrease per parameter that fits;
    (2) otherwise make the best exchange of one rank up in a layer for one
    rank down in another that fits the budget and lowers the total error.
    Ties break by layer order. The result never has a larger error than
    ``ranks`` and meets the same budget.

    Returns
    -------
    list of int or None
    """
    ranks = list(ranks)
    total = total_params(shapes, ranks, q, fixed)
    if total > budget:
        raise MrcError(f"allocation of {total} parameters exceeds the budget of {budget}")
    while True:
        slack = budget - total
        moves = [[(l, *mv) for mv in _moves(nmse, shapes, q, l, r)] for l, r in enumerate(ranks)]
        ups = [mv for per in moves for mv in per if mv[2] > 0 and mv[3] < 0]
        downs = [mv for per in moves for mv in per if mv[2] < 0]
        fill = [mv for mv in ups if mv[2] <= slack]
        if fill:
            l, new, dp, de = min(fill, key=lambda mv: (mv[3] / mv[2], mv[0]))
            ranks[l], total = new, total + dp
            continue
        best = None
        for up in ups:
            for down in downs:
                if up[0] != down[0] and up[2] + down[2] <= slack:
                    gain = up[3] + down[3]
                    if gain < -1e-15 and (best is None or gain < best[0]):
                        best = (gain, up, down)
        if best is None:
            return ranks
        for l, new, dp, _ in best[1:]:
            ranks[l], total = new, total + dp


def weighted(nmse, weights):
    """The curves of the weighted objective: ``w_l · NMSE_l(r)`` for every
    layer ``l`` and rank ``r``.

    ``Σ_l w_l NMSE_l(r_l)`` is ``Σ_l NMSE'_l(r_l)`` with ``NMSE'_l = w_l NMSE_l``,
    so the exact optimum, the greedy scores ``ΔNMSE'/Δparams``, the LP bound
    and the gap of the weighted problem are those of the unweighted machinery
    applied to these curves. Each scaled curve is still non-increasing and
    convex, so the hull greedy's guarantee holds too. ``threshold`` on these
    curves gives each layer the smallest rank with ``w_l NMSE_l(r) ≤ 1 − τ``
    (one cap on every layer's predicted end-to-end error). ``w_l = 0`` makes
    the layer free to cut; the ties then go as in the unweighted rules.

    Parameters
    ----------
    nmse : sequence of array (k_l + 1,)
    weights : sequence of float, one per layer, each finite and ``≥ 0``

    Returns
    -------
    list of ndarray (k_l + 1,) float64
    """
    if len(weights) != len(nmse):
        raise MrcError(f"{len(weights)} weights for {len(nmse)} layers")
    out = []
    for curve, w in zip(nmse, weights):
        w = float(w)
        if not (math.isfinite(w) and w >= 0):
            raise MrcError(f"sensitivity weight must be a finite number ≥ 0, got {w}")
        out.append(w * np.asarray(curve, dtype=np.float64))
    return out


def objective(nmse, ranks):
    """The Stage-2 objective ``Σ_l NMSE_l(r_l)`` of an allocation (a dense
    layer contributes 0); ``Σ_l w_l NMSE_l(r_l)`` on :func:`weighted` curves."""
    return float(sum(0.0 if r is None else float(c[r]) for c, r in zip(nmse, ranks)))


def _layer_options(curve, m, n, q):
    """The options of one layer: ``[(rank, cost, error)]``, dense first
    (``None``, ``m n``, 0), then every factored rank from ``r_max − 1`` down
    to 1 (cost ``(r + q)(m + n)``, error ``NMSE(r)``). This order is the
    tie-break of :func:`optimal`: among equal totals the larger rank wins."""
    top = break_even_rank(m, n, q) - 1
    return [(None, m * n, 0.0)] + [(r, (r + q) * (m + n), float(curve[r])) for r in range(top, 0, -1)]


#: Largest dynamic-programming table (cost states × options, summed over the
#: layers) that :func:`optimal` solves exactly; about 1 s per 10⁹ cells on
#: one core. The 48 DeiT-B linears at reduction 0.6, q = 8, need 1.3 × 10⁹.
MAX_DP_CELLS = 10**10


def optimal(nmse, shapes, q, fixed, budget, max_cells=None):
    """The exact optimum of the Stage-2 objective (a multiple-choice knapsack)

        minimise Σ_l NMSE_l(r_l)   subject to   Σ_l cost_l(r_l) ≤ budget − fixed,

    each layer either dense (``m n``, error 0) or at a rank ``1 ≤ r < r_max``.

    Every cost is a multiple of ``g``, the greatest common divisor of all the
    options' costs (768 for DeiT-B), so dynamic programming over the capacity
    in units of ``g`` is exact: ``T_l[c] = min_o T_{l−1}[c − k_o] + e_o`` with
    ``T_0 = 0``, each layer's table kept, and the ranks read back from
    ``T_L[⌊(budget − fixed) / g⌋]`` by exact comparison of the same sums
    (ties go to the option listed first by :func:`_layer_options`, layers
    read back from last to first). Pure floating-point additions and minima:
    the result does not depend on the BLAS or the thread count.

    When the table would exceed ``max_cells`` the solve is not exact: the
    best of the LP-rounded allocation (:func:`lp_bound`) and the hull greedy,
    each improved by :func:`local_search`, is returned with the LP lower bound.

    Parameters
    ----------
    nmse : sequence of array (k_l + 1,)
    shapes : sequence of (m, n)
    q, fixed, budget : int
    max_cells : int, optional
        Default :data:`MAX_DP_CELLS`.

    Returns
    -------
    ranks : list of int or None
    lower_bound : float
        A proven lower bound of the optimum: the optimum itself when exact.
    exact : bool

    Examples
    --------
    On two layers, the same optimum as trying every pair of ranks:

    >>> import itertools
    >>> import numpy as np
    >>> shapes = [(8, 6), (6, 10)]
    >>> curves = [np.linspace(1, 0, 7) ** 2, np.linspace(1, 0, 7) ** 3]
    >>> budget = 70
    >>> ranks, bound, exact = optimal(curves, shapes, 0, 0, budget)
    >>> pairs = itertools.product([None, 1, 2], [None, 1, 2])
    >>> best = min(objective(curves, p) for p in pairs if total_params(shapes, p, 0, 0) <= budget)
    >>> exact, objective(curves, ranks) == best == bound
    (True, True)
    """
    check_budget(shapes, q, fixed, budget)
    options = [_layer_options(c, m, n, q) for c, (m, n) in zip(nmse, shapes)]
    unit = math.gcd(*(cost for opts in options for _, cost, _ in opts))
    capacity = (budget - fixed) // unit
    if (capacity + 1) * sum(map(len, options)) > (MAX_DP_CELLS if max_cells is None else max_cells):
        bound, lp_ranks = lp_bound(nmse, shapes, q, fixed, budget)
        candidates = [local_search(nmse, shapes, q, fixed, budget, r)
                      for r in (lp_ranks, greedy(nmse, shapes, q, fixed, budget, entry="hull"))]
        return min(candidates, key=lambda r: objective(nmse, r)), bound, False
    tables = [np.zeros(capacity + 1)]
    for opts in options:
        prev, table = tables[-1], np.full(capacity + 1, np.inf)
        for _, cost, err in opts:
            k = cost // unit
            if k <= capacity:
                np.minimum(table[k:], prev[: capacity + 1 - k] + err, out=table[k:])
        tables.append(table)
    ranks, c = [None] * len(options), capacity
    for l in range(len(options) - 1, -1, -1):
        prev, target = tables[l], tables[l + 1][c]
        for rank, cost, err in options[l]:
            k = cost // unit
            if k <= c and prev[c - k] + err == target:
                ranks[l], c = rank, c - k
                break
    return ranks, float(tables[-1][capacity]), True


def _lower_hull(points):
    """Vertices of the lower convex hull of ``(cost, error)`` points sorted
    by cost (Andrew's monotone chain; collinear points dropped)."""
    hull = []
    for p in points:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def lp_bound(nmse, shapes, q, fixed, budget):
    """A proven lower bound of :func:`optimal`: the LP relaxation of the
    knapsack (equivalently its Lagrangian dual) over each layer's lower convex
    hull of ``(cost, NMSE)`` points.

    Every layer starts at its cheapest option (rank 1, or dense when it
    cannot be factored); hull segments ``(Δcost, ΔNMSE < 0)`` are then taken
    in order of slope ``ΔNMSE / Δcost``, most negative first, while they fit
    the budget; the first that does not fit is taken fractionally. Within a
    layer the slopes increase (convexity), so the order is feasible.

    Returns
    -------
    bound : float
        The LP optimum, ``≤`` the optimum of the integer problem.
    ranks : list of int or None
        The integral part of the LP solution (a feasible allocation).
    """
    check_budget(shapes, q, fixed, budget)
    ranks, slack, bound, segments = [], budget - fixed, 0.0, []
    for l, (c, (m, n)) in enumerate(zip(nmse, shapes)):
        points = sorted(((cost, err, rank) for rank, cost, err in _layer_options(c, m, n, q)),
                        key=lambda p: p[0])
        hull = _lower_hull(points)
        ranks.append(hull[0][2])
        slack -= hull[0][0]
        bound += hull[0][1]
        segments += [((b[1] - a[1]) / (b[0] - a[0]), l, b[0] - a[0], b[1] - a[1], b[2])
                     for a, b in zip(hull, hull[1:]) if b[1] < a[1]]
    for _, l, dcost, derr, rank in sorted(segments, key=lambda s: s[:2]):
        if dcost > slack:
            bound += derr * slack / dcost
            break
        ranks[l], slack, bound = rank, slack - dcost, bound + derr
    return bound, ranks


def relative_gap(value, bound):
    """``(value − bound) / bound``, 0 when both are 0, ``None`` when only the
    bound is (an unbounded ratio)."""
    if bound > 0:
        return (value - bound) / bound
    return 0.0 if value <= 0 else None


def _ranks_at(candidate_ranks, shapes, q):
    return [None if r >= break_even_rank(m, n, q) else r for r, (m, n) in zip(candidate_ranks, shapes)]


def _largest_feasible(values, ranks_of, shapes, q, fixed, budget):
    """Bisection over sorted candidate ``values`` for the largest whose ranks
    meet ``budget`` (parameters grow monotonically with the value)."""
    lo, hi = 0, len(values) - 1  # values[0] is feasible by construction
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_params(shapes, ranks_of(values[mid]), q, fixed) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return ranks_of(values[lo])


def threshold(nmse, shapes, q, fixed, budget):
    """One global energy threshold ``τ``: each layer takes the smallest rank
    ``r ≥ 1`` with ``E_l(r) = 1 − NMSE_l(r) ≥ τ`` (dense at ``r ≥ r_max``); the
    largest ``τ`` that meets ``budget`` is found by bisection over the sorted
    energies at which some layer's rank changes. On weighted curves
    (:func:`weighted`) ``E_l(r) = 1 − w_l NMSE_l(r)`` may be negative; the
    search starts at ``τ = −∞`` (every layer at rank 1), feasible by
    :func:`check_budget`."""
    check_budget(shapes, q, fixed, budget)
    ok = compressible(shapes, q)
    energies = [1 - np.asarray(c, dtype=np.float64) for c in nmse]

    def ranks_of(tau):
        cand = []
        for l, (m, n) in enumerate(shapes):
            if not ok[l]:
                cand.append(break_even_rank(m, n, q))
                continue
            # smallest r ≥ 1 with E(r) ≥ tau; E is non-decreasing in r
            r = int(np.searchsorted(energies[l][1:], tau, side="left")) + 1
            cand.append(min(r, len(energies[l]) - 1))
        return _ranks_at(cand, shapes, q)

    values = [-math.inf] + sorted({float(e) for l, c in enumerate(energies) if ok[l] for e in c[1 : break_even_rank(*shapes[l], q) + 1]})
    return _largest_feasible(values, ranks_of, shapes, q, fixed, budget)


def uniform(shapes, q, fixed, budget):
    """One rank ratio ``ρ`` for every layer: ``r_l = max(1, ⌊ρ min(m, n)⌋)``
    (dense at ``r ≥ r_max``); the largest ``ρ`` that meets ``budget`` is found by
    bisection over the ratios at which some layer's rank changes. The baseline."""
    check_budget(shapes, q, fixed, budget)
    ok = compressible(shapes, q)

    def ranks_of(rho):
        cand = [max(1, int(np.floor(rho * min(m, n) + 1e-12))) if ok[l] else break_even_rank(m, n, q)
                for l, (m, n) in enumerate(shapes)]
        return _ranks_at(cand, shapes, q)

    values = sorted({0.0} | {j / min(m, n) for l, (m, n) in enumerate(shapes) if ok[l]
                             for j in range(1, break_even_rank(m, n, q) + 1)})
    return _largest_feasible(values, ranks_of, shapes, q, fixed, budget)


def fixed_rank(shapes, q, rank):
    """Every layer at the given ``rank`` (no budget): ``1 ≤ rank ≤ min(m, n) − q``."""
    for m, n in shapes:
        if rank < 1:
            raise MrcError(f"rank must be at least 1, got {rank}")
        if rank + q > min(m, n):
            raise MrcError(f"rank {rank} plus residual rank {q} is {rank + q}, more than min(m, n) = {min(m, n)} "
                           f"of a {m}×{n} layer: rank + residual rank must not exceed min(m, n)")
    return [rank] * len(shapes)


#: Allocation name -> rule ``(nmse, shapes, q, fixed, budget, step)``; each
#: returns a rank (or None) per layer.
ALLOCATIONS = {
    "optimal": lambda nmse, shapes, q, fixed, budget, step: optimal(nmse, shapes, q, fixed, budget)[0],
    "greedy": lambda nmse, shapes, q, fixed, budget, step: greedy(nmse, shapes, q, fixed, budget, step),
    "greedy-hull": lambda nmse, shapes, q, fixed, budget, step: greedy(nmse, shapes, q, fixed, budget, step, "hull"),
    "threshold": lambda nmse, shapes, q, fixed, budget, step: threshold(nmse, shapes, q, fixed, budget),
    "uniform": lambda nmse, shapes, q, fixed, budget, step: uniform(shapes, q, fixed, budget),
}


def allocate(name, nmse, shapes, q, fixed, budget, step=1):
    """Dispatch to the allocation rule ``name`` (see :data:`ALLOCATIONS`)."""
    try:
        rule = ALLOCATIONS[name]
    except KeyError:
        raise MrcError(f"unknown allocation {name!r}; expected one of {', '.join(ALLOCATIONS)}") from None
    return rule(nmse, shapes, q, fixed, budget, step)


