"""Stage 2: mixed-rank allocation under a parameter budget (METHOD.md, Stage 2).

A layer ``(m, n)`` stores ``m n`` parameters dense, or ``(r + q)(m + n)``
factored at rank ``r`` with residual rank ``q``. It stays dense at or above
the break-even rank ``r_max = ⌊m n / (m + n)⌋ − q``. A rank is an ``int``;
``None`` means dense.

The functions here are pure over host arrays: the per-layer NMSE curves
``nmse[l][r]`` (from :func:`mrc_ref.svd.nmse_curve`) and shapes.
"""

import heapq

import numpy as np

from .errors import MrcError


def break_even_rank(m, n, q):
    """``r_max = ⌊m n / (m + n)⌋ − q`` (METHOD.md): a layer at rank ``≥ r_max``
    stays dense. (Where ``m n / (m + n)`` is not whole, rank ``r_max`` itself
    would still save a few parameters; METHOD.md's rule keeps it dense.)"""
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
        raise MrcError(
            f"no selected layer can be compressed with residual rank {q} "
            "(break-even rank ⌊mn/(m+n)⌋ − q must exceed 1)"
        )
    floor = min_params(shapes, q, fixed)
    if budget < floor:
        raise MrcError(
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
    METHOD.md). Stop as soon as the total is at or under ``budget``. Ties break
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
    (METHOD.md's optional pass).

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
    energies at which some layer's rank changes."""
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

    values = [0.0] + sorted({float(e) for l, c in enumerate(energies) if ok[l] for e in c[1 : break_even_rank(*shapes[l], q) + 1]})
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
        if not 1 <= rank <= min(m, n) - q:
            raise MrcError(f"rank {rank} out of range for a {m}×{n} layer with residual rank {q} "
                           f"(1 … {min(m, n) - q})")
    return [rank] * len(shapes)


#: Allocation name -> rule ``(nmse, shapes, q, fixed, budget, step)``; each
#: returns a rank (or None) per layer.
ALLOCATIONS = {
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


