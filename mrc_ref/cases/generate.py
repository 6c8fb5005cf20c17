"""Write the reference cases (``python -m mrc_ref.cases regenerate``).

Each case is built from a small deterministic model (NumPy only) or, for
the end-to-end case, derived from the embedded example's files; its expected
values come from :func:`mrc_ref.cases.reference.expected_values` on the
inputs as stored (read back from the written files), after checks that
refuse a case a correct implementation could not meet:

- every stored Gram is exactly symmetric and positive semi-definite to
  float64 round-off, ``λ_min ≥ −n ε λ_max`` (:func:`check_grams`);
- every expected Stage-1 NMSE is attained, within a tenth of its tolerance,
  by the expected product itself, measured by the independent certificate
  (:func:`mrc_ref.certificates.certify_stage1`), and equals the
  certificate's optimum (:func:`check_attainable`);

and two robustness checks that refuse a case whose expected values
round-off could decide:

- every allocation rule returns the same ranks when the spectra are
  perturbed by a relative ``ALLOCATION_JITTER``;
- every expected value stays within a tenth of its tolerance when each Gram
  gets a positive semi-definite perturbation of relative size ``INPUT_JITTER``
  (a thousand times float64 round-off).
"""

import json
import os
import platform
import shutil

import h5py
import numpy as np
import scipy

from .. import __version__, allocate, certificates, formats, pipeline, stats, svd, vit
from ..errors import MrcError
from ..example import EXAMPLE_DIR
from . import _VERSION, CASE_FILES, MANIFEST, ROOT, SCHEMA_VERSION, normalize, read_inputs, resolve, sha256
from .compare import compare, items
from .reference import GAP_MIN, expected_values

__all__ = ["VERSION", "TOLERANCES", "specs", "check_grams", "check_attainable", "write_case", "regenerate"]

#: The version directory this generator writes by default: the latest
#: release (v1 was written by the generator of mrc_ref 0.1.0; CHANGELOG.md).
VERSION = "v2"
ALLOCATION_JITTER = 1e-8
INPUT_JITTER = 1e-13
#: Proxy images of the embedded example kept in the end-to-end case.
VIT_PROXY_IMAGES = 64

TOLERANCES = {
    "shape": {"kind": "exact", "reason": "the layer's shape [m, n] (out × in): integers"},
    "spectrum": {
        "kind": "array", "rtol": 1e-10, "atol": 0.0,
        "reason": "eigenvalues σ_i² of W C Wᵀ, compared on the scale of the largest (|Δσ_i²| ≤ 1e-10 σ_1²): "
                  "round-off in forming and decomposing the output Gram moves every eigenvalue by about "
                  "n ε ‖W C Wᵀ‖ (Weyl), ~1e-14 here; small eigenvalues have no relative accuracy"},
    "nmse_curve": {
        "kind": "array", "rtol": 0.0, "atol": 1e-10,
        "reason": "NMSE(r) = Σ_{i>r} σ_i² / Σ_i σ_i² at every rank, in [0, 1]: tail sums of the spectrum, "
                  "with the spectrum's round-off"},
    "stage1_nmse": {
        "kind": "scalar", "rtol": 0.0, "atol": 1e-10,
        "reason": "the optimal Stage-1 NMSE at a probe rank; tie-robust: every optimal rank-r product attains "
                  "it, whichever of tied directions it keeps, measured as tr(ΔW C ΔWᵀ)/tr(W C Wᵀ) (at generation "
                  "the expected product and the certificate's optimum met it within a tenth of atol); round-off "
                  "as nmse_curve"},
    "stage1_gap": {
        "kind": "scalar", "rtol": 0.0, "atol": 1e-10,
        "reason": "relative eigen-gap (σ_r² − σ_{r+1}²) / σ_1² at a probe rank: a difference of eigenvalues "
                  "on σ_1²'s scale, with the spectrum's round-off"},
    "stage1_product": {
        "kind": "product", "metric": "C", "rtol": 1e-8, "atol": 0.0,
        "reason": "A B = U_r U_rᵀ W, compared under the layer's metric C (‖D‖_C = tr(D C Dᵀ)^½): where C is "
                  "singular the optimal product is unique only on the range of C. Stored only where the "
                  f"relative eigen-gap is ≥ {GAP_MIN:g}, so round-off ε moves the subspace by ε / gap ≤ 1e-10"},
    "ranks": {
        "kind": "exact",
        "reason": "integers (null = dense); at generation every allocation rule returned the same ranks with "
                  f"the spectra perturbed by a relative {ALLOCATION_JITTER:g}, so no rank is decided by round-off"},
    "counts": {"kind": "exact", "reason": "parameter counts, the budget, flags: integers"},
    "objective": {
        "kind": "scalar", "rtol": 1e-9, "atol": 1e-12,
        "reason": "Σ_l NMSE_l(r_l): sums of NMSE values, each with nmse_curve's round-off"},
    "losses": {
        "kind": "scalar", "rtol": 1e-8, "atol": 1e-11,
        "reason": "per-layer Stage-1 and Stage-3 NMSE, damped loss and ‖P Q‖/‖W‖: differences of traces of "
                  "products of Grams, where cancellation costs a few digits"},
    "residual_product": {
        "kind": "product", "metric": "identity", "rtol": 1e-8, "atol": 0.0,
        "reason": "P Q of the exact damped Stage-3 solver (unique away from ties in the residual problem), "
                  "Frobenius: float64 round-off amplified by the condition of C̃ + δ I and the eigen-gap at q"},
    "logits": {
        "kind": "array", "rtol": 1e-6, "atol": 0.0,
        "reason": "logits of the original and the compressed model on the proxy tokens (float64 forward "
                  "pass), on the scale of the largest logit: the factors are stored in the weights' float32, "
                  "and a rounding flip (6e-8 relative) propagates through four blocks"},
}

#: Tolerance changes for cases whose weights (and so whose stored factors) are float32.
FLOAT32_FACTORS = {
    "residual_product": dict(
        TOLERANCES["residual_product"], rtol=1e-6,
        reason="P Q as mrc_ref writes it, in the weights' float32: rounding to float32 (6e-8 relative) may "
               "flip between platforms; otherwise as for float64"),
}

SYNTHETIC = dict(layers=("layers.*",), statistic="gram", allocation="optimal", reduction=0.5,
                 residual_rank=2, compensation="local", solver="exact")


# ----------------------------------------------------------------- building blocks
def _orth(rng, m, k):
    return np.linalg.qr(rng.standard_normal((m, k)))[0]


def _weight(rng, m, n, decay=0.25, noise=0.05):
    """``U diag(e^{−i/(k·decay)}) Vᵀ`` plus a little full-rank noise."""
    k = min(m, n)
    W = (_orth(rng, m, k) * np.exp(-np.arange(k) / (k * decay))) @ _orth(rng, n, k).T
    return W + noise * rng.standard_normal((m, n)) / np.sqrt(n)


def _tokens(rng, rows, n, decay=1 / 6):
    """Correlated token rows: covariance spectrum ``e^{−i/(n·decay)}`` in a random basis, plus a mean."""
    X = (rng.standard_normal((rows, n)) * np.exp(-np.arange(n) / (n * decay))) @ _orth(rng, n, n).T
    return X + 0.3 * rng.standard_normal(n)


def _stats(X, dtype=np.float64):
    return {"gram": (X.T @ X).astype(dtype), "sum": X.sum(axis=0).astype(dtype), "rows": int(X.shape[0])}


def _layers(rng, shapes, rows, dead=(), dtype=np.float64, stats_dtype=np.float64):
    """Tensors ``layers.<i>.weight``/``.bias`` and per-layer statistics of fresh token rows."""
    tensors, raw = {}, {}
    for i, (m, n) in enumerate(shapes):
        name = f"layers.{i}"
        tensors[name + ".weight"] = _weight(rng, m, n).astype(dtype)
        tensors[name + ".bias"] = (0.1 * rng.standard_normal(m)).astype(dtype)
        X = _tokens(rng, rows, n)
        X[:, [d for d in dead if d < n]] = 0.0
        raw[name] = _stats(X, stats_dtype)
    return tensors, raw


def _spec(case_id, description, tags, difficulty, tensors, raw, probes, notes=(), config=None, tolerances=None):
    return {"id": case_id, "description": description, "tags": list(tags), "difficulty": difficulty,
            "tensors": tensors, "metadata": None,
            "stats": raw, "tokens": None, "probes": probes, "notes": list(notes),
            "config": pipeline.Config(**{**SYNTHETIC, **(config or {})}),
            "tolerances": {**TOLERANCES, **(tolerances or {})}}


# ----------------------------------------------------------------- the cases
def well_conditioned():
    rng = np.random.default_rng(101)
    tensors, raw = _layers(rng, [(48, 32), (32, 48), (40, 40)], rows=400)
    return _spec("well-conditioned", "Three layers (tall, wide, square) with positive-definite Grams of 400 "
                 "token rows and well-separated spectra: the baseline every implementation should pass.",
                 ["well-conditioned", "tall", "wide"], "lower", tensors, raw,
                 {name: [1, 5] for name in raw})


def rank_deficient():
    rng = np.random.default_rng(202)
    tensors, raw = _layers(rng, [(40, 48), (56, 48)], rows=20)
    return _spec("rank-deficient-c", "Fewer token rows (20) than input features (48): C is singular, "
                 "W C Wᵀ has rank 20, and the optimum needs no inverse of C.",
                 ["rank-deficient-c", "tall", "wide"], "average", tensors, raw,
                 {name: [5, 20, 24] for name in raw},
                 notes=["C has rank 20: NMSE(r) = 0 for r ≥ 20, and at rank 24 the optimal subspace is any "
                        "completion of the 20 directions of nonzero output energy, so no product is expected "
                        "there (the NMSE, 0, is).",
                        "Optimal products are unique only on the range of C; stage1_product is compared in the "
                        "metric C, so an implementation that differs on the null space of C (e.g. SVD-LLM with a "
                        "pseudo-inverse) still matches."],
                 config={"reduction": 0.6})


def dead_channels():
    rng = np.random.default_rng(303)
    dead = (3, 17, 18, 39)
    tensors, raw = _layers(rng, [(32, 40), (48, 40)], rows=300, dead=dead)
    return _spec("dead-channels", f"Input channels {', '.join(map(str, dead))} are always zero: C has zero rows "
                 "and columns there while the weights' columns do not vanish.",
                 ["dead-input-channels", "rank-deficient-c", "tall", "wide"], "average", tensors, raw,
                 {name: [1, 6] for name in raw},
                 notes=["The weights' columns at the dead channels never reach the outputs: every product is "
                        "compared in the metric C, which ignores them."])


def near_tie():
    rng = np.random.default_rng(404)
    m, n, r = 24, 40, 6
    X = _tokens(rng, 200, n, decay=1.0)  # a well-conditioned C, so that W = (U Σ Vᵀ) S⁻¹ is too
    S = np.linalg.cholesky(X.T @ X)  # C = S Sᵀ
    s2 = np.exp(-np.arange(m) / 4.0)
    s2[r] = s2[r - 1] * (1 - 1e-12)  # σ_7² ties σ_6² to a relative 1e-12
    s2[r + 1 :] = np.minimum(s2[r + 1 :], s2[r] * 0.8)
    target = (_orth(rng, m, m) * np.sqrt(s2)) @ _orth(rng, n, m).T  # W S = U Σ Vᵀ, so W C Wᵀ = U Σ² Uᵀ
    W = np.linalg.solve(S.T, target.T).T
    tensors, raw = _layers(rng, [(40, 24)], rows=200)
    tensors = {"layers.0.weight": W, "layers.0.bias": 0.1 * rng.standard_normal(m),
               "layers.1.weight": tensors.pop("layers.0.weight"), "layers.1.bias": tensors.pop("layers.0.bias")}
    raw = {"layers.0": _stats(X), "layers.1": raw["layers.0"]}
    return _spec("near-tie", f"Layer layers.0 has σ_{r}² and σ_{r + 1}² of W C Wᵀ equal to a relative 1e-12, and "
                 f"every layer is factored at rank {r}: the cut falls inside the tie.",
                 ["near-tie", "tall", "wide"], "higher", tensors, raw,
                 {"layers.0": [r - 1, r, r + 1], "layers.1": [r]},
                 notes=[f"At rank {r} the optimal subspace of layers.0 is any rank-{r} subspace between the "
                        f"first {r - 1} directions and the first {r + 1}: which tied vector an implementation "
                        "keeps is decided by round-off. Tie-robust expectations: the spectrum, the NMSE curve "
                        f"and the NMSE at rank {r} (any choice attains it, to 1e-12 relative); the products at "
                        f"ranks {r - 1} and {r + 1}, where the tied pair is wholly out or in. Not expected: the "
                        f"product at rank {r}, and the Stage-3 figures of layers.0, which depend on the tied "
                        "vector A B kept; certify those against your own A B with assert_stage1_optimal and "
                        "assert_residual_optimal.",
                        "The allocation section uses the budget of config.reduction even though the compressed "
                        f"figures use the fixed rank {r} (config.rank)."],
                 config={"rank": r})


def float32_stats():
    rng = np.random.default_rng(505)
    tensors, raw = _layers(rng, [(48, 64), (64, 32)], rows=300, dtype=np.float32, stats_dtype=np.float32)
    return _spec("float32-stats", "Weights and statistics stored in float32, as captures usually store them.",
                 ["float32-stats", "tall", "wide"], "average", tensors, raw, {name: [1, 6] for name in raw},
                 notes=["The expected values are exact float64 computations on the stored float32 numbers "
                        "(widened without loss). An implementation computing in float32 must loosen the "
                        "tolerances to its own precision (about 1e-6 relative for NMSE values).",
                        "The factors are stored in float32, like the weights."],
                 tolerances=FLOAT32_FACTORS)


def tiny():
    rng = np.random.default_rng(606)
    tensors, raw = _layers(rng, [(1, 32), (24, 1), (32, 32)], rows=100)
    return _spec("tiny-1xn", "Degenerate shapes: a 1×32 layer (one output) and a 24×1 layer (one input) beside "
                 "a square one. Both tiny layers have one output eigenvalue and stay dense (break-even rank ≤ 0).",
                 ["tiny", "tall", "wide"], "average", tensors, raw,
                 {"layers.0": [1], "layers.1": [1], "layers.2": [4]},
                 notes=["At rank 1 = min(m, n) the tiny layers are reproduced exactly (NMSE 0)."])


def _float64_grams(tensors, metadata, tokens, names):
    """Per layer, ``gram`` ``Σ x xᵀ``, ``sum`` ``Σ x`` and ``rows`` of its
    inputs ``x`` over every token of ``tokens`` (block-0 inputs), through
    mrc_ref's float64 forward pass; each Gram is symmetrized exactly."""
    params = vit.prepare(tensors, np)
    heads = vit.resolve_num_heads(tensors, None, metadata)
    raw = {}

    def hook(name, x):
        if name in names:
            X = x.reshape(-1, x.shape[-1])
            gram = X.T @ X
            raw[name] = {"gram": (gram + gram.T) / 2, "sum": X.sum(axis=0), "rows": int(X.shape[0])}

    vit.blocks(params, np.asarray(tokens, dtype=np.float64), heads, np, hook=hook)
    return {name: raw[name] for name in names}


def vit_example(example_dir):
    """The embedded example ViT end to end: its weights as they are, the
    Grams of its calibration images recomputed in float64 from their stored
    block-0 tokens, and the first proxy images' tokens."""
    model, acts = os.path.join(example_dir, "model.safetensors"), os.path.join(example_dir, "acts.h5")
    for path in (model, acts):
        if not os.path.isfile(path):
            raise MrcError("the embedded example's file is missing (pass --example DIR)", file=path)
    tensors, metadata = formats.read_safetensors(model)
    config = pipeline.Config(compensation="sequential", allocation="optimal", reduction=0.6, residual_rank=8)
    names = pipeline.select_layers(tensors, config.layers)
    with formats.open_activations(acts) as f:
        stored = {name: formats.read_layer_stats(f, name, acts) for name in names}
        all_tokens = formats.read_proxy_tokens(f)
        num_images = int(f.attrs.get("num_images", 0))
    if all_tokens is None or all_tokens.shape[0] != num_images:
        raise MrcError(f"expected the proxy tokens of all {num_images} calibration images", file=acts)
    raw = _float64_grams(tensors, metadata, all_tokens, names)
    drift = max(float(np.max(np.abs(raw[k]["gram"] - stored[k]["gram"])) / np.max(np.abs(raw[k]["gram"])))
                for k in names)
    if not drift < 1e-6:  # the example stores float32 Grams of the same tokens: they must agree to float32
        raise MrcError(f"the float64 Grams of the proxy tokens differ from the stored ones by {drift:.3g}", file=acts)
    tokens = all_tokens[:VIT_PROXY_IMAGES]
    rows = raw[names[0]]["rows"]
    return {"id": "vit-example", "tags": ["vit", "end-to-end", "rank-deficient-c"], "difficulty": "average",
            "description": "The embedded example (a 4-block timm ViT, width 64, trained on scikit-learn's digits) "
                           "compressed end to end by 60 % with the default options: optimal allocation, "
                           "sequential exact Stage 3, residual rank 8.",
            "tensors": tensors, "metadata": metadata, "weights_file": model, "stats": raw, "tokens": tokens,
            "probes": {}, "config": config,
            "tolerances": {**TOLERANCES, **FLOAT32_FACTORS},
            "notes": [f"acts.h5 holds the Grams of the example's {num_images} calibration images ({rows} token "
                      "rows), computed in float64 by mrc_ref's forward pass from their block-0 tokens as the "
                      "example stores them (float32), and symmetrized exactly; they agree with the example's "
                      f"own float32 Grams to {drift:.1e} of the largest entry. Every Gram is positive "
                      "semi-definite to float64 round-off. The block-0 tokens of the first "
                      f"{VIT_PROXY_IMAGES} proxy images are kept; the logits are those of the original and "
                      "the compressed model on them.",
                      "blocks.0.attn.qkv's Gram has rank 34 of 64: its inputs are LayerNorm outputs of block-0 "
                      "tokens spanned by the greyscale 4×4 patches and the position embeddings. Its C is "
                      "singular: a Cholesky factorization fails; compare products under C (gram=C).",
                      "Sequential Stage 3: each layer's residual depends on the compressed layers before it.",
                      "The weights, and so the stored residual factors, are float32."],
            "provenance": {"model.safetensors": sha256(model), "acts.h5": sha256(acts)}}


def specs(example_dir):
    """Every case the generator writes (the recipe of :data:`VERSION`)."""
    return [well_conditioned(), rank_deficient(), dead_channels(), near_tie(), float32_stats(), tiny(),
            vit_example(example_dir)]


# ----------------------------------------------------------------- checks
def check_grams(case_id, raw):
    """Refuse a stored Gram (as widened to float64) that is not exactly
    symmetric, or not positive semi-definite to float64 round-off:
    ``λ_min ≥ −n ε λ_max`` (a backward-stable eigensolver's own error; the
    float32 Grams of case v1 vit-example reached −4·10⁵ times that)."""
    for name, st in raw.items():
        C = np.asarray(st["gram"], dtype=np.float64)
        if not np.array_equal(C, C.T):
            raise MrcError(f"case {case_id}: layer {name}: the stored Gram is not exactly symmetric")
        lam = np.linalg.eigvalsh(C)
        floor = -C.shape[0] * np.finfo(np.float64).eps * max(float(lam[-1]), 0.0)
        if not lam[0] >= floor:
            raise MrcError(f"case {case_id}: layer {name}: the stored Gram is indefinite (smallest eigenvalue "
                           f"{lam[0]:.3g}, largest {lam[-1]:.3g}): store it so that it is positive semi-definite")


def check_attainable(case_id, doc, tensors, raw, config, tolerances):
    """Refuse an expected Stage-1 NMSE that a correct implementation could
    miss: the expected product, measured by the independent certificate
    (:func:`mrc_ref.certificates.certify_stage1`, ``tr(ΔW C ΔWᵀ)/tr(W C Wᵀ)``),
    and the certificate's own optimum must both lie within a tenth of the
    tolerance of the expected value."""
    atol = tolerances["stage1_nmse"].get("atol", 0.0) / 10
    for name, layer in doc["layers"].items():
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        n = W.shape[1]
        C = stats.metric(config.statistic, stats.validate(raw[name], n, np, statistic=config.statistic), n, np)
        curve = certificates.optimal_nmse_curve(W, C)
        for r, item in layer["stage1"].items():
            off = abs(float(curve[min(r, len(curve) - 1)]) - item["nmse"])
            if item.get("product") is not None:
                off = max(off, abs(certificates.certify_stage1(W, C, *item["product"])["nmse"] - item["nmse"]))
            if not off <= atol:
                raise MrcError(f"case {case_id}: layer {name}: rank {r}: the expected NMSE {item['nmse']!r} is "
                               f"missed by {off:.3g} by the certificate (> a tenth of atol)")


def check_allocation(spec, doc):
    """Refuse a case whose ranks round-off could decide (module docstring)."""
    a = doc["allocation"]
    names = list(doc["layers"])
    shapes = [tuple(doc["layers"][k]["shape"]) for k in names]
    rng = np.random.default_rng(0)
    for _ in range(5):
        curves = []
        for k in names:
            s2 = np.asarray(doc["layers"][k]["spectrum"])
            s2 = s2 * (1 + ALLOCATION_JITTER * rng.uniform(-1, 1, s2.shape))
            curves.append(svd.nmse_curve(np.sort(s2)[::-1], np))
        for rule, entry in a["rules"].items():
            got = dict(zip(names, allocate.allocate(rule, curves, shapes, a["residual_rank"], a["fixed"], a["budget"],
                                                    spec["config"].rank_step)))
            if got != entry["ranks"]:
                raise MrcError(f"case {spec['id']}: rule {rule} gives other ranks under a relative "
                               f"{ALLOCATION_JITTER:g} perturbation of the spectra ({entry['ranks']} vs {got})")


def check_inputs(spec, case, doc, arrays, tensors, metadata, raw, tokens, config):
    """Refuse a case with an expected value that moves by more than a tenth
    of its tolerance under a PSD perturbation of the Grams of relative size
    :data:`INPUT_JITTER`."""
    rng = np.random.default_rng(1)
    jittered = {}
    for name, st in raw.items():
        C = np.asarray(st["gram"], dtype=np.float64)
        G = rng.standard_normal(C.shape)
        jittered[name] = dict(st, gram=C + INPUT_JITTER * np.abs(C).max() * (G @ G.T) / C.shape[0])
    other, other_arrays = expected_values(tensors, metadata, jittered, config, probes=spec["probes"], tokens=tokens)
    tight = dict(case, tolerances={k: dict(v, rtol=v.get("rtol", 0) / 10, atol=v.get("atol", 0) / 10)
                                   for k, v in case["tolerances"].items()})
    failures = compare(normalize(resolve(other, other_arrays)), normalize(resolve(doc, arrays)), tight)
    if failures:
        raise MrcError(f"case {spec['id']}: expected values not robust to a relative {INPUT_JITTER:g} perturbation "
                       f"of the Grams: {failures[0]} (and {len(failures) - 1} more)")


# ----------------------------------------------------------------- writing
def _write_json(path, obj):
    """Indented JSON, non-ASCII kept readable (the reasons use σ, Σ, ‖·‖), atomically."""
    with formats.atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_case(spec, directory, version=VERSION):
    """Write one case into ``directory`` (which must not exist), labelled
    ``version``."""
    os.makedirs(directory)
    source = f"mrc_ref.cases.generate {version}/{spec['id']}"
    check_grams(spec["id"], spec["stats"])
    weights = os.path.join(directory, "weights.safetensors")
    if "weights_file" in spec:
        shutil.copyfile(spec["weights_file"], weights)
    else:
        formats.write_safetensors(weights, spec["tensors"], spec["metadata"] or {"source": source})
    formats.write_activations(os.path.join(directory, "acts.h5"), spec["stats"], proxy_tokens=spec["tokens"],
                              attrs={"source": source})
    _write_json(os.path.join(directory, "config.json"), spec["config"].to_json())
    tensors, metadata, raw, tokens, config = read_inputs(directory)  # the inputs as stored
    check_grams(spec["id"], raw)
    doc, arrays = expected_values(tensors, metadata, raw, config, probes=spec["probes"], tokens=tokens)
    layers = {}
    for name, st in raw.items():
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        layers[name] = {"C": np.asarray(st["gram"], dtype=np.float64), "W": W}
    case = {"id": spec["id"], "version": version, "tolerances": spec["tolerances"], "layers": layers}
    resolved = normalize(resolve(doc, arrays))
    missing = {quantity for quantity, *_ in items(resolved)} - set(spec["tolerances"])
    if missing:
        raise MrcError(f"case {spec['id']}: no tolerance for {', '.join(sorted(missing))}")
    check_attainable(spec["id"], resolved, tensors, raw, config, spec["tolerances"])
    check_allocation(spec, doc)
    check_inputs(spec, case, doc, arrays, tensors, metadata, raw, tokens, config)
    _write_json(os.path.join(directory, "expected.json"),
                {"schema_version": SCHEMA_VERSION, "id": spec["id"], "version": version, **doc})
    formats.write_safetensors(os.path.join(directory, "expected.safetensors"), arrays, {"source": source})
    manifest = {
        "schema_version": SCHEMA_VERSION, "id": spec["id"], "version": version,
        "description": spec["description"], "tags": spec["tags"], "difficulty": spec["difficulty"],
        "notes": spec["notes"],
        "generated_by": {"mrc_ref": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                         "h5py": h5py.__version__, "python": platform.python_version()},
        "files": {name: {"sha256": sha256(os.path.join(directory, name)),
                         "bytes": os.path.getsize(os.path.join(directory, name))} for name in CASE_FILES},
        "tolerances": spec["tolerances"],
    }
    if "provenance" in spec:
        manifest["derived_from"] = spec["provenance"]
    _write_json(os.path.join(directory, MANIFEST), manifest)


def regenerate(version=VERSION, into=ROOT, example_dir=None, only=None):
    """Write every case (or those in ``only``) of the generator into
    ``into/version/<id>``, labelled ``version`` (``"v<number>"``); refuses an
    existing version directory, since released cases are immutable. Returns
    the case directories."""
    if not _VERSION.match(str(version)):
        raise MrcError(f"case version {version!r}: expected 'v' and a number, e.g. {VERSION}")
    target = os.path.join(into, version)
    if os.path.exists(target):
        raise MrcError("exists: released cases are immutable; write a new version or pass --into", file=target)
    if example_dir is None:
        example_dir = EXAMPLE_DIR
    chosen = [s for s in specs(example_dir) if only is None or s["id"] in only]
    unknown = set(only or ()) - {s["id"] for s in chosen}
    if unknown:
        raise MrcError(f"no case {', '.join(sorted(unknown))} in the generator")
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for spec in chosen:
            write_case(spec, os.path.join(staging, spec["id"]), version)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(target, s["id"]) for s in chosen]
