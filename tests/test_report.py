"""The audit report (python -m mrc_ref.report) end to end on a small
synthetic ViT: its numbers are those of compress + evaluate, Stage 1 is
computed once, the figures hold data, and bad input follows the CLI
contract. Also the pipeline seam it uses (pipeline.stage1)."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools import capture
from data_tools.synthetic import make_model
from mrc_ref import formats, pipeline, svd
from mrc_ref.compress import __main__ as compress
from mrc_ref.evaluate import __main__ as evaluate
from mrc_ref.report import __main__ as report_cli
from mrc_ref.report import grid, orchestration
from mrc_ref.errors import MrcError

import threadpoolctl

try:
    import matplotlib  # noqa: F401
except ImportError:
    matplotlib = None
#: The tests that run the command need the report extra; the seam, the
#: measurement and the missing-extra message do not.
needs_extra = pytest.mark.skipif(matplotlib is None,
                                 reason="the report needs the report extra (pip install -e '.[report]')")

ARGS = ["--reductions", "0.3", "--at", "0.6", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """One BLAS thread: these matrices are far too small for threads to pay,
    and on a busy machine OpenBLAS's threads make them many times slower."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def _images(folder, per_class, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(3):
        os.makedirs(folder / str(c), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            pixels[..., c] = np.clip(pixels[..., c].astype(int) + 90, 0, 255)  # a class signal in one channel
            Image.fromarray(pixels).save(folder / str(c) / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 2-block ViT (width 64, 8×8 images, 3 classes), acts.h5 captured with
    proxy tokens (so Stage 3 is sequential), and labelled test images."""
    root = tmp_path_factory.mktemp("report_inputs")
    weights = root / "weights.safetensors"
    formats.write_safetensors(weights, make_model(seed=3, depth=2, dim=64, num_heads=2, img_size=8, classes=3),
                              {"num_heads": "2"})
    calib = _images(root / "calib", 6, seed=1)
    acts = root / "acts.h5"
    capture.run(str(weights), str(calib), str(acts), proxy_images=18, quiet=True)
    images = _images(root / "test", 7, seed=2)
    sens = root / "sens.json"  # made-up weights: the report only reads them through compress --sensitivity
    formats.write_sensitivity(sens, "made up for the test", {f"blocks.{b}.{leaf}": {"weight": 0.1 + b + 0.5 * i}
                                                          for b in range(2) for i, leaf in
                                                          enumerate(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))})
    return {"weights": str(weights), "acts": str(acts), "images": str(images), "sensitivity": str(sens),
            "root": root}


def _digest(paths):
    h = hashlib.sha256()
    for path in paths:
        for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
            for f in sorted(files):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def made(inputs, tmp_path_factory):
    """The report written once (in-process), with a count of Stage-1 runs."""
    out = tmp_path_factory.mktemp("report_out") / "rep"
    before = _digest([inputs["weights"], inputs["acts"], inputs["images"], inputs["sensitivity"]])
    calls = []
    original = pipeline._stage1

    def counting(*args, **kw):
        calls.append(args[2])  # the layer names
        return original(*args, **kw)

    pipeline._stage1 = counting
    try:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = report_cli.main([inputs["weights"], inputs["acts"], inputs["images"], "-o", str(out), *ARGS,
                                "--sensitivity", inputs["sensitivity"]])
    finally:
        pipeline._stage1 = original
    assert code == 0
    assert _digest([inputs["weights"], inputs["acts"], inputs["images"], inputs["sensitivity"]]) == before
    data = json.loads((out / "report.json").read_text())
    return {"dir": out, "data": data, "stage1_calls": calls, "stdout": stdout.getvalue()}


# ----------------------------------------------------------------- the pipeline seam
@pytest.mark.parametrize("overrides", [{}, {"statistic": "weight", "allocation": "greedy", "compensation": "none"},
                                       {"rank": 5, "layers": ("blocks.*.mlp.fc1",), "solver": "adam", "steps": 20}])
def test_stage1_reuse_gives_identical_results(inputs, overrides):
    tensors, _ = formats.read_safetensors(inputs["weights"])
    config = pipeline.Config(**{"compensation": "local", **overrides})
    with formats.open_activations(inputs["acts"]) as f:
        def load(name):
            return formats.read_layer_stats(f, name, n=int(tensors[name + ".weight"].shape[1]))

        cache = pipeline.stage1(tensors, load, pipeline.Config(statistic=config.statistic), xp=np, full=True)
        out1, rep1 = pipeline.run(tensors, load, config, xp=np)
        out2, rep2 = pipeline.run(tensors, load, config, xp=np, stage1=cache)
    assert rep1 == rep2
    assert out1.keys() == out2.keys()
    for key in out1:
        np.testing.assert_array_equal(out1[key], out2[key])


def test_stage1_cache_must_match_the_config(inputs):
    tensors, _ = formats.read_safetensors(inputs["weights"])
    with formats.open_activations(inputs["acts"]) as f:
        def load(name):
            return formats.read_layer_stats(f, name, n=int(tensors[name + ".weight"].shape[1]))

        cache = pipeline.stage1(tensors, load, pipeline.Config(), xp=np)  # up to the break-even rank only
        with pytest.raises(ValueError, match="statistic"):
            pipeline.run(tensors, load, pipeline.Config(statistic="weight", compensation="none"), xp=np, stage1=cache)
        with pytest.raises(ValueError, match="full=True"):
            pipeline.run(tensors, load, pipeline.Config(rank=40, compensation="none"), xp=np, stage1=cache)


def test_projected_energy_is_the_output_nmse_of_the_projection():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 7))
    X = rng.standard_normal((40, 7)) @ rng.standard_normal((7, 7))
    C = X.T @ X
    U, _ = svd.output_basis(W, np.eye(7), np)  # plain weight SVD basis
    energy = orchestration.projected_energy(W, C, U, np)
    for r in range(U.shape[1] + 1):
        assert energy[r] == pytest.approx(1 - svd.nmse(W, U[:, :r] @ U[:, :r].T @ W, C, np), abs=1e-12)


# ----------------------------------------------------------------- end to end
@needs_extra
def test_report_files(made):
    names = sorted(os.listdir(made["dir"]))
    assert names == sorted(["report.md", "report.html", "report.json", "fig1_energy.png", "fig2_layer_types.png",
                            "fig3_proj_error.png", "fig4_allocation.png", "fig5_accuracy_size.png",
                            "fig6_sensitivity.png"])
    md = (made["dir"] / "report.md").read_text()
    for f in made["data"]["figures"].values():
        assert f"]({f['file']})" in md
    page = (made["dir"] / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(made["data"]["figures"])
    assert "src=\"http" not in page and "<script" not in page  # readable offline
    from html.parser import HTMLParser

    HTMLParser().feed(page)
    assert "timings" in made["stdout"] and "main grid" in made["stdout"]


@needs_extra
def test_stage1_is_computed_once_per_statistic(made):
    """Every run of the grid and of Fig. 2 reuses one decomposition per layer
    and statistic: pipeline's Stage 1 ran twice (gram, weight), no more."""
    assert len(made["stage1_calls"]) == 2
    assert all(len(names) == 8 for names in made["stage1_calls"])


EXPECTED_SERIES = {"fig1_energy": 12,  # 4 matrices × 3 curves
                   "fig2_layer_types": 8,  # 4 layer types in each of two panels
                   "fig3_proj_error": 3,  # bar groups: none, exact, Adam
                   "fig4_allocation": 5,  # rows: uniform, threshold, greedy, optimal, optimal calibrated
                   "fig5_accuracy_size": 22,  # 11 methods in each of two panels
                   "fig6_sensitivity": 1}  # one bar group


@needs_extra
@pytest.mark.parametrize("key", list(EXPECTED_SERIES))
def test_figures_show_data(made, key):
    from PIL import Image

    fig = made["data"]["figures"][key]
    assert fig["series"] == EXPECTED_SERIES[key]
    pixels = np.asarray(Image.open(made["dir"] / fig["file"]).convert("L"), dtype=float)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 10  # not blank
    assert (pixels < 128).mean() > 0.01  # something is drawn in dark ink


def _cli_numbers(inputs, tmp_path, flags, quantize=False):
    """top-1, agreement and output NMSE of ``compress <flags>`` then
    ``evaluate --reference``, both as the command lines."""
    out = tmp_path / "c.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert compress.main([inputs["weights"], inputs["acts"], "-o", str(out), "--quiet", *flags,
                              *(["--quantize", "int8"] if quantize else [])]) == 0
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert evaluate.main([str(out), inputs["images"], "--reference", inputs["weights"], "--json", "--quiet"]) == 0
    return json.loads(stdout.getvalue())


def _flags(text):
    return text.split()


@needs_extra
@pytest.mark.parametrize("method", ["weight SVD", "greedy", "optimal + exact", "optimal + Adam", "uniform + exact",
                                    "optimal, calibrated + exact"])
def test_grid_numbers_equal_compress_and_evaluate(made, inputs, tmp_path, method):
    row = next(r for r in made["data"]["grid"] if r["method"] == method and r["reduction"] == 0.6)
    assert "infeasible" not in row
    flags = _flags(row["flags"].replace("--sensitivity sens.json", f"--sensitivity {inputs['sensitivity']}"))
    got = _cli_numbers(inputs, tmp_path, flags)
    for key in ("top1", "top1_agreement", "output_nmse"):
        assert row[key] == got[key], key
    md = (made["dir"] / "report.md").read_text()
    cells = f"| 0.6 | {method} | {100 * got['top1']:.2f} % | {100 * got['top1_agreement']:.2f} % | " \
            f"{got['output_nmse']:.2e} |"
    assert cells in md
    q = _cli_numbers(inputs, tmp_path, flags, quantize=True)
    assert row["int8"]["top1"] == q["top1"] and row["int8"]["top1_agreement"] == q["top1_agreement"]
    assert row["int8"]["output_nmse"] == q["output_nmse"]


@needs_extra
def test_layer_type_numbers_equal_compress_and_evaluate(made, inputs, tmp_path):
    point = made["data"]["layer_types"]["mlp.fc1"][-1]
    got = _cli_numbers(inputs, tmp_path, _flags(point["flags"]))
    assert (point["top1"], point["output_nmse"]) == (got["top1"], got["output_nmse"])


@needs_extra
def test_original_int8_equals_evaluate_of_the_quantized_file(made, inputs, tmp_path):
    from mrc_ref import quantize

    tensors, meta = formats.read_safetensors(inputs["weights"])
    path = tmp_path / "q.safetensors"
    formats.write_safetensors(path, quantize.quantize_tensors(tensors), meta)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert evaluate.main([str(path), inputs["images"], "--reference", inputs["weights"], "--json", "--quiet"]) == 0
    got = json.loads(stdout.getvalue())
    assert made["data"]["original"]["int8"]["top1"] == got["top1"]
    assert made["data"]["original"]["int8"]["output_nmse"] == got["output_nmse"]


@needs_extra
def test_tables_and_certificates(made):
    data = made["data"]
    methods = {r["method"] for r in data["grid"]}
    assert set(grid.METHODS) | set(grid.CURVE_METHODS) | set(grid.SENSITIVITY_METHODS) == methods
    assert data["sensitivity"]["weights"]["blocks.1.mlp.fc2"] == pytest.approx(2.6)
    assert {r["reduction"] for r in data["grid"]} == {0.3, 0.6}
    for cert in data["certificates"]:
        if cert["rank"] is not None:
            assert cert["excess"] == pytest.approx(1, abs=1e-5)  # factors stored in float32
    for r in data["grid"]:
        if "infeasible" not in r and r["method"] in ("optimal", "optimal + exact"):
            assert r["allocation"]["relative_gap"] == pytest.approx(0, abs=1e-12)
    claims = [v["claim"] for v in data["verdicts"]]
    assert any("60 %" in c for c in claims) and any("1.8" in c for c in claims) and any("int8" in c for c in claims)
    md = (made["dir"] / "report.md").read_text()
    assert "**Reported**" in md and "not testable here" in md


# ----------------------------------------------------------------- bad input
def _run_main(argv, capsys):
    code = report_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_without_matplotlib_one_line(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, err = _run_main([inputs["weights"], inputs["acts"], inputs["images"], "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("python -m mrc_ref.report: error: matplotlib is not installed")
    assert "pip install" in err[0] and "[report]" in err[0]
    assert not (tmp_path / "r").exists()


@needs_extra
@pytest.mark.parametrize("case", ["dir-is-a-file", "parent-missing", "inside-images", "missing-weights",
                                  "flat-images", "example-with-files", "bad-reduction", "bad-acts", "bad-block"])
def test_bad_input_one_line(inputs, tmp_path, capsys, case):
    w, a, i = inputs["weights"], inputs["acts"], inputs["images"]
    out = tmp_path / "rep"
    argv = [w, a, i, "-o", str(out), *ARGS]
    expect = {"dir-is-a-file": "output is not a directory", "parent-missing": "parent of the output directory",
              "inside-images": "inside the image folder", "missing-weights": "no such file",
              "flat-images": "labelled images", "example-with-files": "--example takes no input files",
              "bad-reduction": "must be in (0, 1)", "bad-acts": "", "bad-block": "the model has 2 blocks"}[case]
    if case == "dir-is-a-file":
        out.write_text("keep me")
    elif case == "parent-missing":
        argv[4] = str(tmp_path / "no" / "rep")
    elif case == "inside-images":
        argv[4] = os.path.join(i, "0", "rep")
    elif case == "missing-weights":
        argv[0] = str(tmp_path / "none.safetensors")
    elif case == "flat-images":
        flat = tmp_path / "flat"
        flat.mkdir()
        for f in os.listdir(os.path.join(i, "0")):
            with open(os.path.join(i, "0", f), "rb") as src, open(flat / f, "wb") as dst:
                dst.write(src.read())
        argv[2] = str(flat)
    elif case == "example-with-files":
        argv = ["--example", w, "-o", str(out)]
    elif case == "bad-reduction":
        argv += ["--reductions", "1.5"]
    elif case == "bad-acts":
        bad = tmp_path / "bad.h5"
        bad.write_bytes(b"not an hdf5 file")
        argv[1] = expect = str(bad)
    elif case == "bad-block":
        argv += ["--block", "2"]
    code, err = _run_main(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m mrc_ref.report: error: ") and expect in err[0], err[0]
    if case == "dir-is-a-file":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


@needs_extra
def test_bad_input_from_the_shell_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mrc_ref.report", str(tmp_path / "w.safetensors"),
                          str(tmp_path / "a.h5"), str(tmp_path), "-o", str(tmp_path / "rep")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"python -m mrc_ref.report: error: {tmp_path / 'w.safetensors'}: "
                                               "no such file"]
    assert not (tmp_path / "rep").exists()


def test_measure_reports_infeasible_budgets(inputs, tmp_path):
    ev = orchestration.evaluation(inputs["weights"], inputs["images"])
    row, tensors = orchestration.measure(inputs["weights"], inputs["acts"], pipeline.Config(reduction=0.99), ev, str(tmp_path))
    assert "is infeasible" in row["infeasible"] and tensors is None
    with pytest.raises(MrcError, match="compensation must be one of"):  # other errors are not swallowed
        orchestration.measure(inputs["weights"], inputs["acts"], pipeline.Config(statistic="mean-input", reduction=0.3,
                                                                          compensation="bogus"), ev, str(tmp_path))
