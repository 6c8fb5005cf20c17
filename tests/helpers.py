"""Helpers shared by the backend-parity tests (strict double, GPU)."""

from mrc_ref import stats, svd


def stage_one(xp, raw, weight, statistic, rank):
    """Validate ``raw`` statistics and run Stage 1 on ``xp``: returns the
    validated Gram, metric ``C``, basis, spectrum, NMSE/energy curves, the
    factors at ``rank`` and the direct NMSE of ``A B`` (all on ``xp``)."""
    n = weight.shape[1]
    st = stats.validate(raw, n, xp)
    C = stats.metric(statistic, st, n, xp)
    W = xp.asarray(weight)
    U, s2 = svd.output_basis(W, C, xp)
    A, B = svd.factors(W, U, rank)
    return dict(gram=st["gram"], C=C, U=U, s2=s2, curve=svd.nmse_curve(s2, xp), energy=svd.energy_curve(s2, xp),
                A=A, B=B, AB=A @ B, nmse=svd.nmse(W, A @ B, C, xp))
