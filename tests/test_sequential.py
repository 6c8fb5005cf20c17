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


# ------------------------------------------------------------------ block passes
def _previous_sequential(original, factors, tokens, config, *, num_heads, xp, batch):
    """The previous implementation, kept as the oracle: every target
    layer re-runs its block's full pass on both streams."""
    from mrc_ref.backend import get_dtype, to_host
    from mrc_ref.sequential import _batches, _stage

    def inputs(params, stage, h, name):
        seen = {}

        def hook(layer, x):
            if layer == name:
                seen["x"] = x

        if stage is None:
            vit.head(params, h, xp, hook=hook)
        else:
            vit.block(params, stage, h, num_heads, xp, hook=hook)
        return seen["x"].reshape(-1, seen["x"].shape[-1])

    dtype = get_dtype(config.dtype)
    stages = {name: _stage(name) for name in factors}
    order = [name for name in vit.linear_names(original) if name in stages]
    compressed = dict(original)
    chunks = _batches(int(tokens.shape[0]), batch)
    streams = {k: np.asarray(tokens, dtype=dtype).copy() for k in ("original", "compressed")}
    models = {"original": original, "compressed": compressed}
    done, current = {}, 0
    for name in order:
        stage = stages[name]
        target = vit.depth(original) if stage is None else stage
        for index in range(current, target):
            for key, h in streams.items():
                for sl in chunks:
                    h[sl] = to_host(vit.block(models[key], index, xp.asarray(h[sl]), num_heads, xp))
        current = max(current, target)
        n = factors[name][1].shape[1]
        C, K, Ct = (xp.zeros((n, n), dtype=dtype) for _ in range(3))
        for sl in chunks:
            X = inputs(original, stage, xp.asarray(streams["original"][sl]), name)
            Xt = inputs(compressed, stage, xp.asarray(streams["compressed"][sl]), name)
            C += X.T @ X
            K += Xt.T @ X
            Ct += Xt.T @ Xt
        index, W, A, B = factors[name]
        P, Q, info = compensate.solve(W, A, B, config.residual_rank, C, K=K, Ct=Ct, solver=config.solver,
                                      damp=config.damping, steps=config.steps, lr=config.lr, seed=config.seed,
                                      layer_index=index, xp=xp)
        done[name] = (P, Q, info)
        del compressed[name + ".weight"]
        compressed.update({name + ".lowrank_a": A, name + ".lowrank_b": B,
                           name + ".residual_p": P, name + ".residual_q": Q})
    return done


@pytest.fixture(scope="module")
def factored():
    """A 3-block model with every block linear and the head factored at rank 3
    (float64 Stage-1 factors of the identity metric: any factors will do)."""
    from mrc_ref import svd

    tensors = synthetic.make_model(5, depth=3, dim=32, num_heads=4)
    params = vit.prepare(tensors, np)
    names = [n for n in vit.linear_names(params)]
    factors = {}
    for index, name in enumerate(names):
        W = params[name + ".weight"]
        A, B = svd.factors(W, svd.output_basis(W, np.eye(W.shape[1]), np)[0], 3)
        factors[name] = (index, W, A, B)
    images = np.random.default_rng(2).standard_normal((7, 3, 16, 16))
    tokens = vit.embed(params, images, np).astype(np.float32)
    return params, factors, tokens


@pytest.mark.parametrize("solver", ["exact", "adam"])
@pytest.mark.parametrize("batch", [3, 64])
def test_same_numbers_as_the_previous_implementation(factored, solver, batch, tmp_path):
    """Bitwise: one original pass per block and stopped compressed passes give
    the very Grams, hence the very residuals, of the full passes before."""
    from mrc_ref import sequential

    params, factors, tokens = factored
    config = pipeline.Config(residual_rank=2, solver=solver, steps=5)
    old = _previous_sequential(params, factors, tokens, config, num_heads=4, xp=np, batch=batch)
    with formats.scratch_space(str(tmp_path)) as scratch:
        for scr in (None, scratch):
            new = sequential.compensate_sequential(params, factors, tokens, config, num_heads=4, xp=np,
                                                   batch=batch, scratch=scr)
            assert list(new) == list(old)
            for name in old:
                np.testing.assert_array_equal(new[name][0], old[name][0])
                np.testing.assert_array_equal(new[name][1], old[name][1])
                assert new[name][2] == old[name][2]


def test_fewer_than_half_the_block_passes(factored, monkeypatch):
    """Count the passes of vit.block (finished or stopped by the capture) and
    the linear layers applied, against the previous implementation."""
    from mrc_ref import sequential

    params, factors, tokens = factored
    config = pipeline.Config(residual_rank=2, steps=0)
    real_block, real_linear = vit.block, vit.linear
    counts = {}

    def block(*args, **kwargs):  # on the plain route, whose layers go through vit.linear
        counts["started"] = counts.get("started", 0) + 1
        out = real_block(*args, **{**kwargs, "engine": vit.PLAIN})
        counts["finished"] = counts.get("finished", 0) + 1
        return out

    def linear(*args, **kwargs):
        counts["linears"] = counts.get("linears", 0) + 1
        return real_linear(*args, **kwargs)

    monkeypatch.setattr(vit, "block", block)
    monkeypatch.setattr(vit, "linear", linear)
    _previous_sequential(params, factors, tokens, config, num_heads=4, xp=np, batch=64)
    before, counts = counts, {}
    sequential.compensate_sequential(params, factors, tokens, config, num_heads=4, xp=np, batch=64)
    depth, per_block = 3, len(vit.BLOCK_LINEARS)
    # before: 2 streams x (a pass per target layer + advances to each later block)
    assert before["started"] == before["finished"] == 2 * (depth * per_block + depth)
    # now: one original pass per block; per compressed block one stopped pass per layer and one advance
    assert counts["finished"] == depth + depth
    assert counts["started"] == depth + depth * per_block + depth
    assert counts["finished"] < before["finished"] / 2
    # the linear work (layers applied, head included): well under half
    assert counts["linears"] < before["linears"] / 2
