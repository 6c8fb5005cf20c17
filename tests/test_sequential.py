"""Sequential Stage 3 against an independent recomputation of its inputs."""

import numpy as np
import pytest

from data_tools import synthetic
from mrc_ref import compensate, formats, layout, pipeline, vit
from mrc_ref.sequential import make_sequential


@pytest.fixture(scope="module")
def run():
    tensors = synthetic.make_model(3, depth=2, dim=64, num_heads=4)
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    stats = synthetic.make_statistics(tensors, names, seed=3)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 16, 16))
    tokens = vit.embed(vit.prepare(tensors, np), images, np).astype(np.float32)
    config = pipeline.Config(reduction=0.55, compensation="sequential", steps=40)
    out, report = pipeline.run(tensors, stats.__getitem__, config, xp=np,
                               sequential=make_sequential(tensors, {"num_heads": "4"}, tokens))
    return tensors, tokens, out, report


def test_loss_at_start_and_end_match_the_definition(run):
    """For each layer, rebuild X (original model) and X̃ (earlier layers taken
    from the output file, this and later layers original) with a plain hook
    on the full forward pass from the proxy tokens, and evaluate
    ‖X Wᵀ − X̃ Ŵᵀ‖² / ‖X Wᵀ‖² directly."""
    tensors, tokens, out, report = run
    heads = 4
    order = [e["name"] for e in report["layers"] if e["rank"] is not None]
    assert order == [n for n in vit.linear_names(tensors) if n in order]  # forward order

    def inputs(params, name):
        seen = {}
        vit.blocks(vit.prepare(params, np), tokens.astype(np.float64), heads, np,
                   hook=lambda n, x: seen.setdefault(n, x.reshape(-1, x.shape[-1])))
        return seen[name]

    for i, entry in enumerate(e for e in report["layers"] if e["rank"] is not None):
        name = entry["name"]
        mixed = dict(tensors)
        for earlier in order[:i]:
            del mixed[earlier + ".weight"]
            mixed.update({f"{earlier}.{s}": out[f"{earlier}.{s}"] for s in layout.FACTOR_SUFFIXES})
        X, Xt = inputs(tensors, name), inputs(mixed, name)
        W = tensors[name + ".weight"].astype(np.float64)
        A, B, P, Q = (out[f"{name}.{s}"].astype(np.float64) for s in layout.FACTOR_SUFFIXES)
        Y = X @ W.T
        start = np.sum((Y - Xt @ (A @ B).T) ** 2) / np.sum(Y**2)
        end = np.sum((Y - Xt @ (A @ B + P @ Q).T) ** 2) / np.sum(Y**2)
        # stored factors are float32 (the weight's dtype): 1e-4 relative covers the cast
        assert entry["loss_stage1"] == pytest.approx(start, rel=1e-4)
        assert entry["nmse_stage3"] == pytest.approx(end, rel=1e-4)
        assert end < start


def test_first_layer_equals_local_mode_on_the_proxy_gram(run):
    """Nothing upstream is compressed before the first layer, so X̃ = X and
    the sequential residual is the local one trained on the proxy Gram."""
    tensors, tokens, out, report = run
    first = next(e for e in report["layers"] if e["rank"] is not None)
    name = first["name"]
    seen = {}
    vit.block(vit.prepare(tensors, np), 0, tokens.astype(np.float64), 4, np,
              hook=lambda n, x: seen.setdefault(n, x.reshape(-1, x.shape[-1])))
    X = seen[name]
    W = tensors[name + ".weight"].astype(np.float64)
    A = out[name + ".lowrank_a"].astype(np.float64)
    B = out[name + ".lowrank_b"].astype(np.float64)
    P, Q, _ = compensate.solve(W, A, B, 8, X.T @ X, damp=pipeline.Config().damping, xp=np)
    stored = out[name + ".residual_p"].astype(np.float64) @ out[name + ".residual_q"].astype(np.float64)
    # float32 storage of the factors: 1e-5 relative covers the cast
    assert np.linalg.norm(stored - P @ Q) <= 1e-5 * np.linalg.norm(P @ Q)


def test_batches_and_disk_scratch_change_nothing(run, tmp_path):
    """The forward pass in batches of 4 images (6 proxy images: a batch of 4
    and one of 2) with the token streams in disk-backed scratch arrays gives
    the one-batch, in-memory result to round-off: the Grams are summed in
    another order (~1e-14 relative in float64), and the factors are stored
    in float32, the weights' dtype, so 1e-6 relative allows a few ulps."""
    from mrc_ref import sequential

    tensors, tokens, out, report = run
    config = pipeline.Config(reduction=0.55, compensation="sequential")
    names = pipeline.select_layers(tensors, pipeline.DEFAULT_LAYERS)
    stats = synthetic.make_statistics(tensors, names, seed=3)
    with formats.scratch_space(str(tmp_path)) as scratch:
        def batched(factors, cfg, xp):
            return sequential.compensate_sequential(vit.prepare(tensors, xp), factors, tokens, cfg, num_heads=4,
                                                    xp=xp, scratch=scratch, batch=4)

        small, _ = pipeline.run(tensors, stats.__getitem__, config, xp=np, sequential=batched)
        assert len(list(tmp_path.iterdir())) == 1  # the scratch directory, removed on exit
    assert not list(tmp_path.iterdir())
    whole, _ = pipeline.run(tensors, stats.__getitem__, config, xp=np,
                            sequential=make_sequential(tensors, {"num_heads": "4"}, tokens))
    for a, b in zip(formats.densify(small).values(), formats.densify(whole).values()):
        assert np.linalg.norm(a.astype(np.float64) - b) <= 1e-6 * max(np.linalg.norm(b), 1e-30)
