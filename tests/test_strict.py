"""The whole pipeline under a strict CPU double of CuPy (tests/strict_xp.py),
against the same pipeline under NumPy; and ``--device cuda`` without a GPU.

The double's arrays are not NumPy arrays and refuse every implicit conversion
(``np.asarray``, NumPy ufuncs and functions, mixing with host arrays), so any
place that silently calls NumPy on device data fails here, GPU or not.

Tolerance: the double runs the very same NumPy/SciPy routines underneath, in
the same order, so results are bit-identical in practice; every comparison
allows ``TOL = 1e-12`` relative to the largest entry of the NumPy result
(room for BLAS kernels whose blocking depends on buffer alignment, since
the double copies every host array it receives).
"""

import os
import re
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest
import scipy.special
from helpers import stage_one
from strict_xp import StrictArray
from strict_xp import xp as sx

from data_tools import synthetic
from mrc_ref import backend, compensate, example, formats, pipeline, stats, svd, vit
from data_tools.capture import capture_statistics
from mrc_ref.errors import MrcError
from mrc_ref.sequential import make_sequential

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-12
STEPS = 5  # Adam steps per layer: enough to move P, Q
PROXY = 16  # proxy images used by the sequential runs


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Tiny matrices: BLAS threads only spin on a loaded machine (30x slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional
        yield
        return
    with threadpool_limits(1):
        yield


def host(a):
    """A strict result on the host; fails if it is not a device array."""
    assert isinstance(a, StrictArray), f"expected a device (strict) array, got {type(a)}"
    return a.get()


def close(expected, actual, tol=TOL):
    """``max|expected - actual| <= tol * max|expected|`` (NumPy run first)."""
    expected, actual = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    assert expected.shape == actual.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(expected - actual).max(initial=0.0))
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


# ---------------------------------------------------------------- the double itself
def test_double_refuses_implicit_conversion():
    a = sx.asarray(np.arange(6.0).reshape(2, 3))
    assert not isinstance(a, np.ndarray)
    for convert in (np.asarray, np.array, lambda x: np.asarray(x, dtype=np.float64), lambda x: np.array([x, x]),
                    np.sqrt, scipy.special.erf, np.mean, lambda x: np.concatenate([x]), lambda x: x + np.ones(3),
                    lambda x: np.ones(3) * x, lambda x: x[np.array([0])], lambda x: memoryview(x)):
        with pytest.raises(TypeError):
            convert(a)
    with pytest.raises(TypeError):
        np.asarray(a[0, 0])  # 0-d too
    with pytest.raises(TypeError):
        iter(a[0, 0])
    assert not hasattr(a, "__array_interface__")
    assert isinstance(a.get(), np.ndarray) and isinstance(backend.to_host(a), np.ndarray)
    assert float(a[1, 2]) == 5.0 and int(a[1, 2]) == 5 and bool(a[1, 2]) and a[1, 2].item() == 5.0
    assert isinstance(a[0, 0], StrictArray) and isinstance(a.sum(), StrictArray)  # never a host scalar


def test_double_is_cupy_like_where_the_code_relies_on_it():
    h = np.zeros(3)
    d = sx.asarray(h)
    d += 1
    assert h.tolist() == [0, 0, 0]  # host -> device copies
    assert sx.asarray(d) is d and sx.asarray(d, dtype=np.float32).dtype == np.float32
    v = d[::-1]
    v *= 2  # a slice is a view, as in CuPy
    assert d.get().tolist() == [2, 2, 2]
    assert isinstance(np.float64(2.0) * d, StrictArray)  # NumPy scalars are scalars
    assert (abs(-d) == d).all().item() and sx.abs(-d).get().tolist() == [2, 2, 2]
    assert backend.array_module(d) is sx and sx.__name__ == "strict_xp"
    assert [r.get().tolist() for r in sx.asarray(np.eye(2))] == [[1, 0], [0, 1]]


def test_double_covers_every_xp_call_of_the_library():
    used = set()
    for pkg in ("mrc_ref", "data_tools"):
        for name in os.listdir(os.path.join(REPO, pkg)):
            if name.endswith(".py"):
                with open(os.path.join(REPO, pkg, name), encoding="utf-8") as fh:
                    used |= set(re.findall(r"\bxp\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)", fh.read()))
    missing = []
    for name in sorted(used):
        obj = sx
        for part in name.split("."):
            if part.startswith("__") or part == "split":  # xp.__name__.split
                break
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(name)
    assert not missing, f"strict_xp lacks {missing} (add it only with CuPy's semantics)"


def test_gelu_takes_erf_from_the_module():
    x = sx.asarray(np.linspace(-3, 3, 7))
    assert vit.erf_function(sx) is sx.erf and vit.erf_function(np) is scipy.special.erf
    close(vit.gelu(np.linspace(-3, 3, 7), np), host(vit.gelu(x, sx)))
    # a device module without an erf hook would get SciPy's: the double catches it
    bare = types.ModuleType("strict_xp_without_erf")
    bare.__dict__.update({k: v for k, v in vars(sx).items() if k not in ("erf", "__name__")})
    with pytest.raises(TypeError):
        vit.gelu(x, bare)


# ---------------------------------------------------------------- Stage 1 and statistics
def test_accumulate_gram(tmp_path):
    X = synthetic.make_tokens(24, 300, seed=3)
    path = str(tmp_path / "rows.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=X.astype(np.float32))
    ref = stats.accumulate_gram((X[i : i + 64] for i in range(0, 300, 64)), np)
    with h5py.File(path, "r") as f:
        ds = f["x"]
        ref32 = stats.accumulate_gram((ds[i : i + 64] for i in range(0, 300, 64)), np)
        from_h5 = stats.accumulate_gram((ds[i : i + 64] for i in range(0, 300, 64)), sx)
        whole = stats.accumulate_gram([ds], sx)  # an h5py dataset itself
    for chunks, expected in (((X[i : i + 64] for i in range(0, 300, 64)), ref),  # host chunks
                             ((sx.asarray(X[i : i + 64]) for i in range(0, 300, 64)), ref)):  # device chunks
        got = stats.accumulate_gram(chunks, sx)
        close(expected["gram"], host(got["gram"]))
        close(expected["sum"], host(got["sum"]))
        assert got["rows"] == 300
    close(ref32["gram"], host(from_h5["gram"]))
    close(ref32["gram"], host(whole["gram"]), 1e-12)
    with pytest.raises(MrcError, match="2-D"):
        stats.accumulate_gram([sx.asarray(np.ones(3))], sx)


@pytest.mark.parametrize("statistic", list(stats.STATISTICS))
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["m>n", "m<=n"])
def test_stage1(statistic, shape):
    n = shape[1]
    weight = np.random.default_rng(1).standard_normal(shape)
    raw = synthetic.statistics_from_tokens(synthetic.make_tokens(n, 8 * 17, seed=5), weight, 17)
    results = {xp.__name__: stage_one(xp, raw, weight, statistic, 5) for xp in (np, sx)}
    ref, got = results["numpy"], results["strict_xp"]
    for key in ("gram", "C", "U", "s2", "curve", "energy", "A", "B"):
        close(ref[key], host(got[key]))
    assert abs(ref["nmse"] - got["nmse"]) <= TOL  # a normalized error, at most 1
    assert abs(got["nmse"] - float(ref["curve"][5])) <= 1e-9  # the spectrum's own prediction


def test_validation_errors_are_mrc_errors():
    n = 4
    good = {"gram": np.eye(n), "sum": np.ones(n), "rows": 3}
    for bad in ({"gram": np.full((n, n), np.nan)}, {"gram": np.triu(np.ones((n, n)))}, {"gram": -np.eye(n)},
                {"gram": np.zeros((n, n))}, {"sum": np.full(n, np.inf)}, {"gram": np.eye(3)}):
        with pytest.raises(MrcError) as on_cpu:
            stats.validate({**good, **bad}, n, np)
        with pytest.raises(MrcError) as on_device:
            stats.validate({**good, **bad}, n, sx)
        assert str(on_cpu.value) == str(on_device.value)
    with pytest.raises(MrcError, match="not positive semi-definite"):
        svd.output_basis(sx.asarray(np.ones((6, n))), sx.asarray(np.diag([1.0, 1, 1, -1])), sx)
    with pytest.raises(MrcError, match="zero output energy"):
        svd.output_basis(sx.asarray(np.zeros((2, n))), sx.asarray(np.eye(n)), sx)


# ---------------------------------------------------------------- Stage 3
@pytest.mark.parametrize("mode", ["local", "sequential-grams"])
def test_compensate(mode):
    rng = np.random.default_rng(7)
    m, n, r, q = 40, 24, 6, 4
    W = rng.standard_normal((m, n))
    X = synthetic.make_tokens(n, 200, seed=8)
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    C, K, Ct = X.T @ X, Xt.T @ X, Xt.T @ Xt
    runs = {}
    for xp in (np, sx):
        U, _ = svd.output_basis(xp.asarray(W), xp.asarray(C), xp)
        A, B = svd.factors(xp.asarray(W), U, r)
        P0, Q0 = compensate.init_residual(m, n, q, 0, 3, xp, np.float64)
        extra = {} if mode == "local" else {"K": xp.asarray(K), "Ct": xp.asarray(Ct)}
        P, Q, history = compensate.adam(xp.asarray(W), A, B, P0, Q0, xp.asarray(C), steps=20, lr=1e-2,
                                              xp=xp, **extra)
        runs[xp.__name__] = (P, Q, history)
    (P1, Q1, h1), (P2, Q2, h2) = runs["numpy"], runs["strict_xp"]
    assert isinstance(h2, np.ndarray) and h2.min() < h2[0]  # the history is on the host; it moved
    close(h1, h2)
    close(P1, host(P2))
    close(Q1, host(Q2))


# ---------------------------------------------------------------- the pipeline
def _run_pipeline(xp, compensation, statistic="gram", dtype="float64"):
    tensors, metadata = formats.read_safetensors(example.WEIGHTS)
    config = pipeline.Config(steps=STEPS, reduction=0.5, compensation=compensation, statistic=statistic, dtype=dtype)
    with formats.open_activations(example.ACTS) as f:
        proxy = formats.read_proxy_tokens(f)[:PROXY]
        sequential = make_sequential(tensors, metadata, proxy) if compensation == "sequential" else None
        return pipeline.run(tensors, lambda name: formats.read_layer_stats(f, name), config, xp=xp,
                            sequential=sequential)


def _compare_reports(ref, got):
    assert [e["rank"] for e in ref["layers"]] == [e["rank"] for e in got["layers"]]
    assert ref["config"]["device"] == "cpu" and got["config"]["device"] == "cuda"  # the device that ran
    assert ref["totals"] == got["totals"] and {**ref["config"], "device": None} == {**got["config"], "device": None}
    assert ref["allocation"] == got["allocation"]
    for a, b in zip(ref["layers"], got["layers"]):
        for key in ("nmse_stage1", "nmse_stage3", "loss_stage1", "loss_stage3", "residual_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOL * max(abs(a[key]), 1e-300), (a["name"], key)


@pytest.fixture(scope="module")
def pipeline_runs():
    """``{(module, compensation): (out, report)}`` on the embedded example."""
    return {(xp.__name__, c): _run_pipeline(xp, c) for xp in (np, sx) for c in ("sequential", "local")}


@pytest.mark.parametrize("compensation", ["sequential", "local"])
def test_pipeline(pipeline_runs, compensation):
    ref_out, ref_report = pipeline_runs["numpy", compensation]
    out, report = pipeline_runs["strict_xp", compensation]
    assert report["config"]["compensation"] == compensation
    assert all(e["residual_rank"] == 8 for e in report["layers"] if e["rank"] is not None)
    assert sorted(ref_out) == sorted(out)
    for key in ref_out:
        assert isinstance(out[key], np.ndarray) and out[key].dtype == ref_out[key].dtype  # host, as stored
        close(ref_out[key], out[key])
    ref_dense, dense = formats.densify(ref_out, dtype=np.float64), formats.densify(out, dtype=np.float64)
    for key in ref_dense:  # the densified weights, the quantity the canonical-results contract is about
        close(ref_dense[key], dense[key])
    _compare_reports(ref_report, report)


@pytest.mark.parametrize("statistic,dtype", [("per-image", "float64"), ("mean-input", "float32"),
                                             ("weight", "float64")])
def test_pipeline_statistics_and_dtypes(statistic, dtype):
    (ref_out, ref_report), (out, report) = (_run_pipeline(xp, "none", statistic, dtype) for xp in (np, sx))
    for key in ref_out:
        close(ref_out[key], out[key])
    _compare_reports(ref_report, report)


# ---------------------------------------------------------------- forward pass and capture
def _images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("model", ["dense", "compressed"])
def test_forward(pipeline_runs, model):
    params = formats.read_safetensors(example.WEIGHTS)[0] if model == "dense" else \
        pipeline_runs["strict_xp", "sequential"][0]
    x = _images(6)
    ref = vit.forward(params, x, num_heads=4, xp=np)
    close(ref, host(vit.forward(params, x, num_heads=4, xp=sx)))  # host images, host params
    prepared = vit.prepare(params, sx)
    assert all(isinstance(v, StrictArray) for v in prepared.values())
    assert vit.prepare(prepared, sx)["cls_token"] is prepared["cls_token"]  # prepared once
    close(ref, host(vit.forward(prepared, sx.asarray(x), num_heads=4)))  # xp from the images


def test_capture_statistics(pipeline_runs):
    params = pipeline_runs["numpy", "sequential"][0]  # compressed: gram_normalized through the factors
    x = _images(10, seed=1)

    def batches():  # tuples, as mrc_ref.images.iter_batches yields
        return [(x[:4], None), (x[4:8], None), (x[8:], None)]

    ref_layers, ref_proxy = capture_statistics(params, batches(), num_heads=4, proxy_images=5, xp=np)
    layers, proxy = capture_statistics(params, batches(), num_heads=4, proxy_images=5, xp=sx)
    assert isinstance(proxy, np.ndarray) and proxy.dtype == np.float32 and proxy.shape == (5, 17, 64)
    close(ref_proxy, proxy)
    assert sorted(ref_layers) == sorted(layers)
    for name, st in layers.items():
        assert st["rows"] == ref_layers[name]["rows"] == 10 * 17
        for key in ("gram", "sum", "gram_normalized"):
            assert isinstance(st[key], np.ndarray)  # moved to the host by capture itself
            close(ref_layers[name][key], st[key])


# ---------------------------------------------------------------- the command-line functions on the double
@pytest.fixture
def device_is_strict(monkeypatch):
    """``--device cuda`` gives the strict double in compress, capture and evaluate."""
    import data_tools.capture
    import mrc_ref.compress
    import mrc_ref.evaluate

    def get_xp(device="cpu"):
        return sx if device == "cuda" else backend.get_xp(device)

    for module in (mrc_ref.compress, mrc_ref.evaluate, data_tools.capture):
        monkeypatch.setattr(module, "get_xp", get_xp)


def test_compress_files_on_the_double(device_is_strict, tmp_path):
    from mrc_ref.compress import compress_files

    paths = {}
    for device in ("cpu", "cuda"):
        paths[device] = str(tmp_path / f"{device}.safetensors")
        config = pipeline.Config(steps=STEPS, reduction=0.5, device=device)
        report = compress_files(example.WEIGHTS, example.ACTS, paths[device], config)
        assert report["config"]["compensation"] == "sequential" and report["config"]["device"] == device
    ref, got = (formats.read_safetensors(paths[d])[0] for d in ("cpu", "cuda"))
    assert sorted(ref) == sorted(got)
    for key in ref:
        close(ref[key], got[key])


def test_capture_and_evaluate_on_the_double(device_is_strict, tmp_path):
    from data_tools.capture import run as capture
    from mrc_ref.evaluate import model_logits

    for device in ("cpu", "cuda"):
        capture(example.WEIGHTS, example.CALIB_IMAGES, str(tmp_path / f"{device}.h5"), max_images=12,
                proxy_images=3, batch_size=5, device=device, quiet=True)
    with h5py.File(tmp_path / "cpu.h5") as ref, h5py.File(tmp_path / "cuda.h5") as got:
        for name in ref["layers"]:
            for key in ("gram", "sum", "gram_normalized"):
                close(ref["layers"][name][key][()], got["layers"][name][key][()])
        close(ref["proxy/tokens"][()], got["proxy/tokens"][()])
    (ref, labels), (got, labels2) = (model_logits(example.WEIGHTS, example.TEST_IMAGES, limit=20,
                                                  batch_size=8, device=d) for d in ("cpu", "cuda"))
    assert isinstance(got, np.ndarray) and np.array_equal(labels, labels2)
    close(ref, got)


# ---------------------------------------------------------------- --device cuda without a GPU
def _gpu_usable():
    try:
        backend.get_xp("cuda")
        return True
    except MrcError:
        return False


@pytest.mark.skipif(_gpu_usable(), reason="CuPy and a usable GPU are present: --device cuda is valid here")
@pytest.mark.parametrize("module", ["mrc_ref.compress", "data_tools.capture", "mrc_ref.evaluate"])
def test_device_cuda_without_gpu_fails_before_any_work(module, tmp_path):
    """Exit 2 with one line on stderr, before reading anything: the inputs do
    not even exist (reading them first would give a different error)."""
    weights, images, out = tmp_path / "missing.safetensors", tmp_path / "no_images", tmp_path / "out"
    args = {"mrc_ref.compress": [weights, tmp_path / "missing.h5", "-o", out, "--quiet"],
            "data_tools.capture": [weights, images, "-o", out, "--quiet"],
            "mrc_ref.evaluate": [weights, images, "--quiet"]}[module]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--device cuda" in lines[0] and ("CuPy" in lines[0] or "GPU" in lines[0]), lines[0]
    assert "missing" not in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == "" and sorted(os.listdir(tmp_path)) == []
