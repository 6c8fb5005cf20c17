"""The embedded example: the NumPy forward pass against the logits PyTorch
produced when it trained the model, and end-to-end compression on it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mrc_ref import example
from mrc_ref import formats, metrics, vit
from mrc_ref.evaluate import model_logits


@pytest.fixture(scope="module")
def original_logits():
    return model_logits(example.WEIGHTS, example.TEST_IMAGES)


def test_forward_matches_pytorch_logits(original_logits):
    """test_logits.npy was written by data_tools/train_example.py with the
    torch model (float32); ours runs in float64. Logits are O(10): float32
    accumulation over a 4-block model leaves differences near 1e-5."""
    logits, labels = original_logits
    torch_logits = np.load(example.EXAMPLE_DIR + "/test_logits.npy")
    assert logits.shape == torch_logits.shape == (497, 10)
    assert np.abs(logits - torch_logits).max() < 1e-4
    assert metrics.topk_accuracy(logits, labels) > 0.95


def test_factored_path_equals_densified(tmp_path):
    """A compressed file evaluated through the factored path equals the same
    model with its weights rebuilt dense (float64 throughout: round-off only)."""
    out = tmp_path / "c.safetensors"
    subprocess.run([sys.executable, "-m", "mrc_ref.compress", example.WEIGHTS, example.ACTS, "-o", str(out),
                    "--compensation", "local", "--steps", "20", "--quiet"], check=True, capture_output=True)
    tensors, meta = formats.read_safetensors(out)
    dense = formats.densify(tensors, dtype=np.float64)
    assert not any(k.endswith(".lowrank_a") for k in dense)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, 16, 16))
    np.testing.assert_allclose(vit.forward(tensors, images, metadata=meta), vit.forward(dense, images, metadata=meta),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_sequential_beats_local_and_none_on_held_out_images(tmp_path, original_logits):
    """Same budget (reduction 0.6, q = 8 counted in all three), output error
    of the whole model on the 497 held-out test digits."""
    reference, labels = original_logits
    errors = {}
    for mode in ("sequential", "local", "none"):
        out = tmp_path / f"{mode}.safetensors"
        report = tmp_path / f"{mode}.json"
        subprocess.run([sys.executable, "-m", "mrc_ref.compress", example.WEIGHTS, example.ACTS,
                        "-o", str(out), "--report", str(report), "--compensation", mode, "--quiet"],
                       check=True, capture_output=True)
        assert json.loads(report.read_text())["config"]["compensation"] == mode
        logits, _ = model_logits(str(out), example.TEST_IMAGES)
        errors[mode] = metrics.output_nmse(logits, reference)
    print("output NMSE on held-out images:", errors)
    assert errors["sequential"] < errors["local"] < errors["none"]
