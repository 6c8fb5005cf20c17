"""Per-layer sensitivity weights of the Stage-2 objective (no file I/O).

The paper's Stage 2 minimises ``Σ_l NMSE_l(r_l)``: a unit of normalized
error costs the same in every layer. With weights ``w_l ≥ 0`` it minimises
``Σ_l w_l NMSE_l(r_l)`` instead **[choice]**, where ``w_l`` is the
end-to-end error (e.g. the NMSE of the logits) per unit of layer ``l``'s
NMSE, measured by truncating that layer alone:

    e2e_l(r) ≈ w_l · NMSE_l(r),   w_l = Σ_i x_i y_i / Σ_i x_i²   (least squares through the origin)

over measured points ``(x_i, y_i) = (NMSE_l(r_i), e2e_l(r_i))``
(:func:`fit`). The weights come from a ``mrc_ref.sensitivity`` file
(docs/formats.md), read by :func:`mrc_ref.formats.read_sensitivity`;
:func:`layer_weights` gives each selected layer its weight, and
:func:`mrc_ref.allocate.weighted` scales the curves.

A layer the weights do not name gets the mean of the given weights
**[choice]**: the allocation depends only on the ratios of the weights (it
is unchanged when every weight is multiplied by the same ``c > 0``), and the
mean keeps that property (a fixed default such as 1 would not: its meaning
would change with the unit of the metric).
"""

import math

import numpy as np

from .errors import MrcError, describe

__all__ = ["check_weight", "check_weights", "default_weight", "layer_weights", "fit", "per_layer"]


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_weight(value):
    """The problem with a weight, or ``None`` when it is a finite number ``≥ 0``."""
    if not _is_number(value):
        return f"weight must be a number, got {describe(value)}"
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return f"weight must be a finite float64, got an integer of {len(str(abs(value)))} digits"
    if not math.isfinite(number):
        return f"weight must be finite, got {number}"
    if float(value) < 0:
        return f"weight must be ≥ 0, got {float(value):g}"
    return None


def check_weights(weights):
    """Raise :class:`MrcError` (naming the layer) unless ``weights`` is a
    non-empty mapping of layer name to a finite number ``≥ 0``."""
    if not hasattr(weights, "items"):
        raise MrcError(f"sensitivity weights must map layer names to numbers, got {type(weights).__name__}")
    if not weights:
        raise MrcError("sensitivity weights name no layer")
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise MrcError(f"sensitivity layer names must be non-empty strings, got {name!r}")
        problem = check_weight(value)
        if problem:
            raise MrcError(problem, layer=name)
    if not math.isfinite(sum(float(w) for w in weights.values())):  # inf (not an exception) on overflow
        raise MrcError("sensitivity weights sum to more than the largest float64: scale them down (the allocation "
                       "depends only on their ratios)")


def default_weight(weights):
    """The weight of a layer the mapping does not name: the mean of the given
    weights (see the module docstring)."""
    return float(np.mean([float(w) for w in weights.values()]))  # finite: check_weights bounds the sum


def layer_weights(names, weights, known=None):
    """The weight of each selected layer.

    Parameters
    ----------
    names : sequence of str
        The selected layers, in order.
    weights : mapping of str -> float
        Sensitivity weights (checked by :func:`check_weights`).
    known : collection of str, optional
        Every linear layer of the model; a weight for a name outside it is a
        user error. (A known layer that is not selected is ignored.)

    Returns
    -------
    per_layer : list of float
        ``w_l`` for each of ``names``.
    default : float
        The weight given to the names the mapping lacks (:func:`default_weight`).
    defaulted : list of str
        Those names.
    """
    check_weights(weights)
    if known is not None:
        known = set(known)
        for name in weights:
            if name not in known:
                raise MrcError("named in the sensitivity weights, but the model has no such linear layer",
                               layer=name)
    default = default_weight(weights)
    defaulted = [n for n in names if n not in weights]
    return [float(weights.get(n, default)) for n in names], default, defaulted


def fit(points):
    """Least-squares weight through the origin of ``(nmse, error)`` points.

    ``w = Σ_i x_i y_i / Σ_i x_i²`` minimises ``Σ_i (y_i − w x_i)²``; the
    relative residual is ``ρ = ‖y − w x‖ / ‖y‖`` (0 when ``y = 0``): 0 when
    the end-to-end error is exactly proportional to the layer's NMSE.

    Parameters
    ----------
    points : array-like (k, 2)
        ``[nmse, error]`` pairs, ``k ≥ 1``, with some ``nmse > 0``.

    Returns
    -------
    weight : float
        ``≥ 0`` when every error is ``≥ 0``.
    residual : float
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    sxx = float(x @ x)
    if not (len(p) and sxx > 0 and np.isfinite(p).all()):
        raise MrcError("a sensitivity fit needs finite points with some nmse > 0")
    w = float(x @ y) / sxx
    norm = float(np.linalg.norm(y))
    return w, (float(np.linalg.norm(y - w * x)) / norm if norm > 0 else 0.0)


def per_layer(document, names):
    """What a report shows per layer: ``[{"name", "weight", "defaulted",
    "points"}]`` for each of ``names``, from a document returned by
    :func:`mrc_ref.formats.read_sensitivity` (points ``[]`` where none)."""
    layers = document["layers"]
    weights, _, defaulted = layer_weights(names, {k: v["weight"] for k, v in layers.items()})
    return [{"name": n, "weight": w, "defaulted": n in defaulted,
             "points": [list(p) for p in layers.get(n, {}).get("points", [])]}
            for n, w in zip(names, weights)]
