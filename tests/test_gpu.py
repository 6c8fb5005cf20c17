"""CPU (NumPy) against GPU (CuPy): every stage, the forward pass, the
capture, and a full ``python -m mrc_ref.compress --device cuda`` run.

Skipped, with the reason, unless CuPy imports and a GPU is usable
(:func:`mrc_ref.backend.get_xp` ``("cuda")`` succeeds). All math is float64.

Tolerances (GPU result against the NumPy result on the same inputs):

* ``GRAM_RTOL = 1e-12`` (of the largest entry): Grams, sums and metrics are
  the same float64 products summed in another order (cuBLAS vs OpenBLAS
  blocking), a few ulps per entry.
* ``SPECTRUM_RTOL = 1e-10`` (of ``σ²_1``): cuSOLVER and LAPACK eigen/SVD
  solvers are backward stable, each eigenvalue is within ~``n ε σ²_1``.
  NMSE curves, computed from the spectra, are compared with the same
  absolute tolerance (they are normalized, ``≤ 1``).
* Bases: eigenvectors and singular vectors come back with arbitrary signs;
  :func:`mrc_ref.svd.canonical_signs` fixes them, so the factors ``A``
  (and ``P``) themselves are compared, as is the product
  ``A B = U_r U_rᵀ W``, with ``PROJ_RTOL = 1e-8`` (of ``max|W|``): the error
  is ~``ε ‖W C Wᵀ‖ / gap_r``, and the synthetic spectra have gaps of a few
  percent.
* Stage 3, exact solver: one LU solve and one Stage-1 decomposition; the
  densified weights ``A B + P Q`` are compared in relative Frobenius norm
  with ``DENSE_RTOL = 1e-9`` (the contract of docs/cli.md, "Determinism").
  Adam depends on the factors only through ``A B`` and the same host
  ``Q₀`` (``init_residual`` draws it on the host): float64 trajectories
  agree to ~1e-9; losses are compared with ``LOSS_RTOL = 1e-9`` relative,
  ``P`` and ``Q`` with ``ADAM_RTOL = 1e-8`` (of their largest entry).
* Forward pass and captured statistics: ``FORWARD_RTOL = 1e-10`` (of the
  largest entry): a few matmuls, LayerNorms and a softmax per block, with
  ``cupyx.scipy.special.erf`` against SciPy's (both within an ulp or two).
* The full command line: the same ranks, Stage-1 NMSE within
  ``SPECTRUM_RTOL``, Stage-3 NMSE within ``LOSS_RTOL``, the stored factors
  within ``PROJ_RTOL`` and ``A B + P Q`` of every layer within
  ``DENSE_RTOL`` (the model is stored in float64, so the output files add
  no rounding).
"""

import json
import math

import numpy as np
import pytest
from helpers import stage_one

from data_tools import synthetic
from mrc_ref import backend, compensate, example, formats, layout, pipeline, stats, svd, vit
from data_tools.capture import capture_statistics
from mrc_ref.errors import MrcError
from mrc_ref.sequential import make_sequential

pytestmark = pytest.mark.gpu

try:
    cp = backend.get_xp("cuda")
except MrcError as err:
    pytest.skip(f"needs CuPy and a usable GPU ({err})", allow_module_level=True)

GRAM_RTOL = 1e-12
SPECTRUM_RTOL = 1e-10
PROJ_RTOL = 1e-8
LOSS_RTOL = 1e-9
ADAM_RTOL = 1e-8
DENSE_RTOL = 1e-9
FORWARD_RTOL = 1e-10


def on_gpu(a):
    """The host copy of a GPU result; fails if it is not a CuPy array."""
    assert isinstance(a, cp.ndarray), f"expected a CuPy array, got {type(a)}"
    return backend.to_host(a)


def close(expected, actual, rtol, scale=None):
    """``max|expected - actual| <= rtol * scale`` (default: ``max|expected|``)."""
    expected, actual = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    assert expected.shape == actual.shape
    scale = float(np.abs(expected).max(initial=0.0)) if scale is None else scale
    err = float(np.abs(expected - actual).max(initial=0.0))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x {scale:.3g}"


# ---------------------------------------------------------------- statistics and Stage 1
def test_accumulate_gram():
    X = synthetic.make_tokens(64, 5000, seed=1)
    ref = stats.accumulate_gram((X[i : i + 512] for i in range(0, 5000, 512)), np)
    for chunks in ((X[i : i + 512] for i in range(0, 5000, 512)),  # host chunks, copied in
                   (cp.asarray(X[i : i + 512]) for i in range(0, 5000, 512))):  # device chunks
        got = stats.accumulate_gram(chunks, cp)
        close(ref["gram"], on_gpu(got["gram"]), GRAM_RTOL)
        close(ref["sum"], on_gpu(got["sum"]), GRAM_RTOL)
        assert got["rows"] == 5000


@pytest.mark.parametrize("statistic", list(stats.STATISTICS))
@pytest.mark.parametrize("shape", [(192, 64), (64, 64), (64, 256)], ids=["m>n", "m=n", "m<n"])
def test_stage1(statistic, shape):
    m, n = shape
    rng = np.random.default_rng(2)
    W = rng.standard_normal(shape) * np.exp(-np.arange(n) / n)  # decaying input scales
    raw = synthetic.statistics_from_tokens(synthetic.make_tokens(n, 16 * 17, seed=3), W, 17)
    rank = 1 if statistic == "mean-input" else min(m, n) // 4
    out = {xp: stage_one(xp, raw, W, statistic, rank) for xp in (np, cp)}
    ref, got = out[np], out[cp]
    close(ref["C"], on_gpu(got["C"]), GRAM_RTOL)
    close(ref["s2"], on_gpu(got["s2"]), SPECTRUM_RTOL, scale=float(ref["s2"][0]))
    close(ref["curve"], on_gpu(got["curve"]), SPECTRUM_RTOL, scale=1.0)
    close(ref["AB"], on_gpu(got["AB"]), PROJ_RTOL, scale=float(np.abs(W).max()))
    U = on_gpu(got["U"])
    close(ref["U"][:, :rank], U[:, :rank], PROJ_RTOL, scale=1.0)  # canonical signs
    close(np.eye(U.shape[1]), U.T @ U, 1e-12, scale=1.0)  # orthonormal basis
    assert abs(ref["nmse"] - got["nmse"]) <= SPECTRUM_RTOL


# ---------------------------------------------------------------- Stage 3
def stage3_problem(seed, xp, r=12):
    """A 256×64 weight, sequential-style Grams ``C, K, C̃`` and its Stage-1
    factors at rank ``r``, on ``xp``."""
    rng = np.random.default_rng(seed)
    m, n = 256, 64
    W = rng.standard_normal((m, n)) * np.exp(-np.arange(n) / n)
    X = synthetic.make_tokens(n, 2000, seed=seed + 1)
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    W, C, K, Ct = (xp.asarray(v) for v in (W, X.T @ X, Xt.T @ X, Xt.T @ Xt))
    A, B = svd.factors(W, svd.output_basis(W, C, xp)[0], r)
    return W, A, B, {"C": C, "K": K, "Ct": Ct}


@pytest.mark.parametrize("mode", ["local", "sequential-grams"])
def test_compensate(mode):
    m, n, q = 256, 64, 8
    runs = {}
    for xp in (np, cp):
        Wx, A, B, g = stage3_problem(4, xp)
        P0, Q0 = compensate.init_residual(m, n, q, 0, 5, xp, np.float64)
        extra = {} if mode == "local" else {"K": g["K"], "Ct": g["Ct"]}
        runs[xp] = compensate.adam(Wx, A, B, P0, Q0, g["C"], steps=100, lr=1e-2, xp=xp, **extra)
    (P1, Q1, h1), (P2, Q2, h2) = runs[np], runs[cp]
    assert isinstance(h2, np.ndarray) and h2.min() < h2[0]
    close(h1, h2, LOSS_RTOL)
    close(P1, on_gpu(P2), ADAM_RTOL)
    close(Q1, on_gpu(Q2), ADAM_RTOL)


@pytest.mark.parametrize("damp", [0.0, 1e-3])
def test_exact_residual(damp):
    out = {}
    for xp in (np, cp):
        Wx, A, B, g = stage3_problem(6, xp)
        out[xp] = compensate.solve(Wx, A, B, 8, g["C"], K=g["K"], Ct=g["Ct"], damp=damp, xp=xp)
    (P1, Q1, i1), (P2, Q2, i2) = out[np], out[cp]
    assert abs(i1["loss_stage3"] - i2["loss_stage3"]) <= LOSS_RTOL * i1["loss_stage3"]
    close(P1, on_gpu(P2), PROJ_RTOL, scale=1.0)  # canonical signs
    M1, M2 = P1 @ Q1, on_gpu(P2 @ Q2)
    assert np.linalg.norm(M1 - M2) <= DENSE_RTOL * np.linalg.norm(M1)


# ---------------------------------------------------------------- the pipeline (embedded example)
def _example_float64():
    tensors, metadata = formats.read_safetensors(example.WEIGHTS)
    return {k: v.astype(np.float64) for k, v in tensors.items()}, metadata


def dense(tensors, name):
    """``W`` of layer ``name`` in a host state dict: the weight, or ``A B + P Q``."""
    return layout.dense_weight(tensors, name, np)


def _run(xp, compensation):
    tensors, metadata = _example_float64()
    config = pipeline.Config(reduction=0.5, compensation=compensation)
    with formats.open_activations(example.ACTS) as f:
        proxy = formats.read_proxy_tokens(f)[:64]
        sequential = make_sequential(tensors, metadata, proxy) if compensation == "sequential" else None
        return pipeline.run(tensors, lambda name: formats.read_layer_stats(f, name), config, xp=xp,
                            sequential=sequential)


def compare_runs(ref_out, ref_report, out, report):
    assert [e["rank"] for e in ref_report["layers"]] == [e["rank"] for e in report["layers"]]
    assert ref_report["totals"] == report["totals"]
    for a, b in zip(ref_report["layers"], report["layers"]):
        assert abs(a["nmse_stage1"] - b["nmse_stage1"]) <= SPECTRUM_RTOL, a["name"]
        assert abs(a["nmse_stage3"] - b["nmse_stage3"]) <= LOSS_RTOL * a["nmse_stage3"] + SPECTRUM_RTOL, a["name"]
        name = a["name"]
        if name + ".weight" in ref_out:  # left dense: untouched
            assert np.array_equal(ref_out[name + ".weight"], out[name + ".weight"])
        else:
            close(ref_out[name + ".lowrank_a"], out[name + ".lowrank_a"], PROJ_RTOL, scale=1.0)
            W1, W2 = dense(ref_out, name), dense(out, name)
            assert np.linalg.norm(W1 - W2) <= DENSE_RTOL * np.linalg.norm(W1), name


@pytest.fixture(scope="module")
def runs():
    return {(xp, c): _run(xp, c) for xp in (np, cp) for c in ("sequential", "local")}


@pytest.mark.parametrize("compensation", ["sequential", "local"])
def test_pipeline(runs, compensation):
    (ref_out, ref_report), (out, report) = runs[np, compensation], runs[cp, compensation]
    assert all(isinstance(v, np.ndarray) for v in out.values())
    compare_runs(ref_out, ref_report, out, report)


# ---------------------------------------------------------------- forward pass and capture
def _images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("model", ["dense", "compressed"])
def test_forward(runs, model):
    params = _example_float64()[0] if model == "dense" else runs[np, "sequential"][0]
    x = _images(32)
    ref = vit.forward(params, x, num_heads=4, xp=np)
    import cupyx.scipy.special

    assert vit.erf_function(cp) is cupyx.scipy.special.erf
    close(ref, on_gpu(vit.forward(params, x, num_heads=4, xp=cp)), FORWARD_RTOL)
    close(ref, on_gpu(vit.forward(vit.prepare(params, cp), cp.asarray(x), num_heads=4)), FORWARD_RTOL)


def test_prepare_stacks_factors_on_the_gpu(runs):
    """vit.prepare lays each factored layer with a residual out as views of
    L = [A P] and R = [B; Q] on CuPy too."""
    params = runs[np, "sequential"][0]
    prepared = vit.prepare(params, cp)
    names = [n for n in layout.factored_layers(prepared) if f"{n}.residual_p" in prepared]
    assert names
    for name in names:
        pair = vit.stacked_factors(*(prepared[layout.factor_key(name, s)] for s in layout.FACTOR_SUFFIXES))
        assert pair is not None and isinstance(pair[0], cp.ndarray), name
        own = {k: np.asarray(v, dtype=np.float64) for k, v in params.items() if k.startswith(name + ".")}
        close(layout.dense_weight(own, name, np), on_gpu(pair[0] @ pair[1]), 1e-12)


def test_evaluate_logits():
    from mrc_ref.evaluate import model_logits

    (ref, labels), (got, labels2) = (model_logits(example.WEIGHTS, example.TEST_IMAGES, limit=64,
                                                  batch_size=32, device=d) for d in ("cpu", "cuda"))
    assert isinstance(got, np.ndarray) and np.array_equal(labels, labels2)
    close(ref, got, FORWARD_RTOL)


def test_capture_statistics(runs):
    params = runs[np, "sequential"][0]  # compressed: gram_normalized through the factors
    x = _images(24, seed=1)
    ref_layers, ref_proxy = capture_statistics(params, [x[:10], x[10:20], x[20:]], num_heads=4, proxy_images=12,
                                               xp=np)
    layers, proxy = capture_statistics(params, [x[:10], x[10:20], x[20:]], num_heads=4, proxy_images=12, xp=cp)
    assert isinstance(proxy, np.ndarray)
    close(ref_proxy, proxy, FORWARD_RTOL)
    for name, st in layers.items():
        assert st["rows"] == ref_layers[name]["rows"]
        for key in ("gram", "sum", "gram_normalized"):
            assert isinstance(st[key], np.ndarray)
            close(ref_layers[name][key], st[key], FORWARD_RTOL)


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def float64_model(tmp_path_factory):
    """A synthetic float64 ViT with captured statistics and proxy tokens."""
    d = tmp_path_factory.mktemp("gpu_model")
    tensors = synthetic.make_model(0, dtype=np.float64)
    layers, proxy = capture_statistics(tensors, [_images(16, seed=2)], num_heads=4, proxy_images=16, xp=np)
    weights, acts = str(d / "weights.safetensors"), str(d / "acts.h5")
    formats.write_safetensors(weights, tensors, {"num_heads": "4"})
    formats.write_activations(acts, layers, proxy_tokens=proxy)
    return weights, acts


def test_compress_command_line(float64_model, run_cli, tmp_path):
    weights, acts = float64_model
    results = {}
    for device in ("cpu", "cuda"):
        out, report = str(tmp_path / f"{device}.safetensors"), str(tmp_path / f"{device}.json")
        proc = run_cli(weights, acts, "-o", out, "--report", report, "--steps", "100", "--quiet",
                       "--device", device)
        assert proc.returncode == 0, proc.stderr
        with open(report) as fh:
            results[device] = (formats.read_safetensors(out)[0], json.load(fh))
    assert results["cuda"][1]["config"]["device"] == "cuda"
    assert results["cuda"][1]["config"]["compensation"] == "sequential"
    assert all(v.dtype == np.float64 for v in results["cuda"][0].values())
    assert not math.isnan(results["cuda"][1]["totals"]["reduction_achieved"])
    compare_runs(*results["cpu"], *results["cuda"])
