"""Write the reference cases (``python -m mrc_ref.cases regenerate``).

Each case is built from a small deterministic model (NumPy only) or, for
the end-to-end case, derived from the embedded example's files; its expected
values come from :func:`mrc_ref.cases.reference.expected_values` on the
inputs as stored (read back from the written files), after two robustness
checks that refuse a case whose expected values round-off could decide:

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

from .. import __version__, allocate, formats, pipeline, svd
from ..errors import MrcError
from ..example import EXAMPLE_DIR
from . import CASE_FILES, MANIFEST, ROOT, SCHEMA_VERSION, normalize, read_inputs, resolve, sha256
from .compare import compare, items
from .reference import GAP_MIN, expected_values

__all__ = ["VERSION", "TOLERANCES", "specs", "write_case", "regenerate"]

#: The version directory this generator writes.
VERSION = "v1"
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
                  "it, whichever of tied directions it keeps; round-off as nmse_curve"},
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
            "tensors": tensors, "metadata": {"source": f"mrc_ref.cases.generate {VERSION}/{case_id}"},
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


def vit_example(example_dir):
    """The embedded example ViT end to end: its weights as they are, its
    Grams as stored (float32), and the first proxy images' tokens."""
    model, acts = os.path.join(example_dir, "model.safetensors"), os.path.join(example_dir, "acts.h5")
    for path in (model, acts):
        if not os.path.isfile(path):
            raise MrcError("the embedded example's file is missing (pass --example DIR)", file=path)
    tensors, metadata = formats.read_safetensors(model)
    config = pipeline.Config(compensation="sequential", allocation="optimal", reduction=0.6, residual_rank=8)
    names = pipeline.select_layers(tensors, config.layers)
    with formats.open_activations(acts) as f:
        raw = {name: formats.read_layer_stats(f, name, acts) for name in names}
        tokens = formats.read_proxy_tokens(f)[:VIT_PROXY_IMAGES]
        num_images = int(f.attrs.get("num_images", 0))
    for st in raw.values():
        st.pop("gram_normalized", None)
    return {"id": "vit-example", "tags": ["vit", "end-to-end", "float32-stats"], "difficulty": "average",
            "description": "The embedded example (a 4-block timm ViT, width 64, trained on scikit-learn's digits) "
                           "compressed end to end by 60 % with the default options: optimal allocation, "
                           "sequential exact Stage 3, residual rank 8.",
            "tensors": tensors, "metadata": metadata, "weights_file": model, "stats": raw, "tokens": tokens,
            "probes": {}, "config": config,
            "tolerances": {**TOLERANCES, **FLOAT32_FACTORS},
            "notes": [f"acts.h5 keeps the example's Grams of {num_images} calibration images as stored (float32) "
                      f"and the block-0 tokens of its first {VIT_PROXY_IMAGES} proxy images; gram_normalized is "
                      "dropped. The logits are those of the original and the compressed model on these tokens.",
                      "Sequential Stage 3: each layer's residual depends on the compressed layers before it."],
            "provenance": {"model.safetensors": sha256(model), "acts.h5": sha256(acts)}}


def specs(example_dir):
    """Every case of :data:`VERSION`."""
    return [well_conditioned(), rank_deficient(), dead_channels(), near_tie(), float32_stats(), tiny(),
            vit_example(example_dir)]


# ----------------------------------------------------------------- checks
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


def write_case(spec, directory):
    """Write one case into ``directory`` (which must not exist)."""
    os.makedirs(directory)
    weights = os.path.join(directory, "weights.safetensors")
    if "weights_file" in spec:
        shutil.copyfile(spec["weights_file"], weights)
    else:
        formats.write_safetensors(weights, spec["tensors"], spec["metadata"])
    formats.write_activations(os.path.join(directory, "acts.h5"), spec["stats"], proxy_tokens=spec["tokens"],
                              attrs={"source": f"mrc_ref.cases.generate {VERSION}/{spec['id']}"})
    _write_json(os.path.join(directory, "config.json"), spec["config"].to_json())
    tensors, metadata, raw, tokens, config = read_inputs(directory)  # the inputs as stored
    doc, arrays = expected_values(tensors, metadata, raw, config, probes=spec["probes"], tokens=tokens)
    layers = {}
    for name, st in raw.items():
        W = np.asarray(tensors[name + ".weight"], dtype=np.float64)
        layers[name] = {"C": np.asarray(st["gram"], dtype=np.float64), "W": W}
    case = {"id": spec["id"], "version": VERSION, "tolerances": spec["tolerances"], "layers": layers}
    missing = {quantity for quantity, *_ in items(normalize(doc))} - set(spec["tolerances"])
    if missing:
        raise MrcError(f"case {spec['id']}: no tolerance for {', '.join(sorted(missing))}")
    check_allocation(spec, doc)
    check_inputs(spec, case, doc, arrays, tensors, metadata, raw, tokens, config)
    _write_json(os.path.join(directory, "expected.json"),
                       {"schema_version": SCHEMA_VERSION, "id": spec["id"], "version": VERSION, **doc})
    formats.write_safetensors(os.path.join(directory, "expected.safetensors"), arrays,
                              {"source": f"mrc_ref.cases.generate {VERSION}/{spec['id']}"})
    manifest = {
        "schema_version": SCHEMA_VERSION, "id": spec["id"], "version": VERSION,
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
    ``into/version/<id>``; refuses an existing version directory, since
    released cases are immutable. Returns the case directories."""
    target = os.path.join(into, version)
    if os.path.exists(target):
        raise MrcError("exists: released cases are immutable; write a new version or pass --into", file=target)
    if example_dir is None:
        example_dir = EXAMPLE_DIR
    chosen = [s for s in specs(example_dir) if only is None or s["id"] in only]
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for spec in chosen:
            write_case(spec, os.path.join(staging, spec["id"]))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(target, s["id"]) for s in chosen]
