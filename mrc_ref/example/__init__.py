"""The embedded example: a small ViT trained on scikit-learn's digits
(``README.md`` in this folder), shipped as package data so that
``python -m mrc_ref.compress --example`` and ``python -m mrc_ref.report
--example`` run from any install.

Attributes
----------
EXAMPLE_DIR : str
    This folder.
WEIGHTS, ACTS : str
    ``model.safetensors`` (canonical layout, ``num_heads`` metadata) and its
    ``acts.h5`` captured on ``CALIB_IMAGES``.
CALIB_IMAGES, TEST_IMAGES : str
    Image folders with one sub-folder per class (300 calibration and 497
    held-out test digits).
SENSITIVITY : str
    ``sensitivity.json``: per-layer sensitivity weights measured on the
    calibration digits' proxy tokens by ``python -m data_tools.sensitivity``
    (for ``compress --sensitivity``; the report's calibrated rows).
"""

import os

from .. import metrics
from ..evaluate import model_logits

__all__ = ["EXAMPLE_DIR", "WEIGHTS", "ACTS", "CALIB_IMAGES", "TEST_IMAGES", "SENSITIVITY", "example_paths",
           "accuracy_line"]

EXAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(EXAMPLE_DIR, "model.safetensors")
ACTS = os.path.join(EXAMPLE_DIR, "acts.h5")
CALIB_IMAGES = os.path.join(EXAMPLE_DIR, "images", "calib")
TEST_IMAGES = os.path.join(EXAMPLE_DIR, "images", "test")
SENSITIVITY = os.path.join(EXAMPLE_DIR, "sensitivity.json")


def example_paths():
    """Paths ``(weights, acts)`` of the embedded example."""
    return WEIGHTS, ACTS


def accuracy_line(compressed, quiet=True):
    """The example's test accuracy before and after compression and the
    agreement of the two models, as one line of text."""
    before, labels = model_logits(WEIGHTS, TEST_IMAGES, quiet=quiet)
    after, _ = model_logits(compressed, TEST_IMAGES, quiet=quiet)
    return (f"test accuracy on {len(labels)} held-out digits: original {metrics.topk_accuracy(before, labels):.2%}, "
            f"compressed {metrics.topk_accuracy(after, labels):.2%} "
            f"(top-1 agreement {metrics.agreement(after, before):.2%}, mean KL {metrics.mean_kl(after, before):.4f})")
