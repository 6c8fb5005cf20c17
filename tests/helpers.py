"""Helpers shared by several test files: Stage 1 on any array module (the
backend-parity tests) and the list of command-line modules."""

import importlib
import pkgutil

import data_tools
import mrc_ref
from mrc_ref import stats, svd


def command_modules():
    """Every command-line module of mrc_ref and data_tools: the modules that
    define both ``build_parser`` and ``main`` (``python -m`` entry points)."""
    found = []
    for package in (mrc_ref, data_tools):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            if callable(getattr(module, "build_parser", None)) and callable(getattr(module, "main", None)):
                found.append(info.name)
    return sorted(found)


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
