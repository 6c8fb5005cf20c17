"""Tests of mrc_ref.vit: the ViT/DeiT forward pass.

Oracles: Hugging Face ``transformers`` ViT/DeiT models (an independent
implementation, float32), the dense weight ``A B + P Q`` for the compressed
path, and explicit loops for the patch embedding and GELU.
"""

import math
import threading

import numpy as np
import pytest

from data_tools.synthetic import random_vit
from mrc_ref import threads as threads_mod
from mrc_ref import vit
from mrc_ref.errors import MrcError

#: HF runs in float32, we in float64. Each float32 op has relative error
#: <= 2**-24 ~ 6e-8; accumulated over a few blocks (sums of up to 4 D terms,
#: softmax, LayerNorm) the observed error is ~1e-7 of the logit scale. We
#: allow 2e-5 of the logit scale (max |logit|, at least 1): ~100x margin,
#: still far below any real mistake (a wrong eps, tanh-GELU, head order,
#: q/k/v order or token order gives errors > 1e-3 of the scale).
HF_RTOL = 2e-5
#: float64 compressed vs dense: only the association of the matmuls
#: differs, so agreement is to a few float64 ulps times the depth.
FACTOR_RTOL = 1e-10


# ----------------------------------------------------------------- fixtures
random_params = random_vit


def compress(params, rng, names, rank=3, residual=2):
    """Replace the weight of each layer in ``names`` by random factors.

    Returns (compressed params, dense params with ``W = A B [+ P Q]``).
    """
    comp, dense = dict(params), dict(params)
    for k, name in enumerate(names):
        m, n = params[f"{name}.weight"].shape
        a = rng.standard_normal((m, rank))
        b = rng.standard_normal((rank, n)) / math.sqrt(n * rank)
        w = a @ b
        del comp[f"{name}.weight"]
        comp[f"{name}.lowrank_a"], comp[f"{name}.lowrank_b"] = a, b
        if residual and k % 2 == 0:  # every other layer also gets a residual
            pp = rng.standard_normal((m, residual))
            qq = rng.standard_normal((residual, n)) / math.sqrt(n * residual)
            comp[f"{name}.residual_p"], comp[f"{name}.residual_q"] = pp, qq
            w = w + pp @ qq
        dense[f"{name}.weight"] = w
    return comp, dense


def images_for(params, n, rng):
    p = params["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(params["pos_embed"].shape[1] - 1 - ("dist_token" in params))
    return rng.standard_normal((n, 3, grid * p, grid * p)).astype(np.float32)


# ----------------------------------------------------------------- HF oracle
def _hf():
    pytest.importorskip("torch", reason="torch is the independent oracle for the ViT forward")
    pytest.importorskip("transformers", reason="transformers ViT/DeiT are the oracle for the forward")
    import torch
    import transformers

    return torch, transformers


def _randomize(model, torch, seed):
    """Random O(1) parameters (HF's own init, std 0.02, gives near-uniform
    attention and near-zero logits: a weak test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token" in name or "position" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(kind, *, image=32, patch=8, hidden=64, layers=2, heads=4, inter=128, labels=10, seed=0):
    torch, tf = _hf()
    common = dict(
        image_size=image, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, num_labels=labels, hidden_act="gelu",
        layer_norm_eps=1e-6, qkv_bias=True,
    )
    if kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(**common))
    elif kind == "deit-distilled":
        model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**common))
    elif kind == "deit":
        model = tf.DeiTForImageClassification(tf.DeiTConfig(**common))
    else:
        raise ValueError(kind)
    return _randomize(model, torch, seed), torch


def _convert(model, num_heads=None):
    from data_tools.convert import convert_state_dict

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return convert_state_dict(state, num_heads=num_heads)


HF_CASES = {
    "vit-tiny": dict(kind="vit"),
    "vit-small": dict(kind="vit", image=64, patch=16, hidden=96, layers=4, heads=3, inter=384, labels=7, seed=1),
    "deit-distilled": dict(kind="deit-distilled", layers=3, seed=2),
    "deit-dist-token-only": dict(kind="deit", seed=3),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(case):
    model, torch = _hf_model(**HF_CASES[case])
    heads = model.config.num_attention_heads
    tensors, metadata = _convert(model, heads)
    assert metadata["num_heads"] == str(heads)
    size = model.config.image_size
    x = np.random.default_rng(10).standard_normal((6, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)).logits.numpy().astype(np.float64)
    ours = vit.forward(tensors, x, metadata=metadata)
    print(f"{case}: max |ours - HF| = {np.abs(ours - ref).max():.3g}, max |logit| = {np.abs(ref).max():.3g}")
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= HF_RTOL * scale, f"{case}: max |diff| {err:.3g} vs scale {scale:.3g}"
    # the head count matters: a wrong one changes the logits far beyond the tolerance
    wrong = vit.forward(tensors, x, num_heads=1)
    assert np.abs(wrong - ref).max() > 1e3 * HF_RTOL * scale


@pytest.mark.oracle
def test_hook_inputs_match_transformers_module_inputs():
    model, torch = _hf_model("deit-distilled", seed=4)
    tensors, _ = _convert(model, 4)
    x = np.random.default_rng(11).standard_normal((3, 3, 32, 32)).astype(np.float32)
    seen = {}
    modules = {"cls_classifier": "head", "distillation_classifier": "head_dist"}
    for i in range(model.config.num_hidden_layers):
        prefix = f"deit.layers.{i}"
        modules[f"{prefix}.attention.q_proj"] = f"blocks.{i}.attn.qkv"
        modules[f"{prefix}.attention.o_proj"] = f"blocks.{i}.attn.proj"
        modules[f"{prefix}.mlp.fc1"] = f"blocks.{i}.mlp.fc1"
        modules[f"{prefix}.mlp.fc2"] = f"blocks.{i}.mlp.fc2"
    handles = []
    for hf_name, name in modules.items():
        def pre(module, args, name=name):
            seen[name] = args[0].detach().numpy().astype(np.float64)
        handles.append(model.get_submodule(hf_name).register_forward_pre_hook(pre))
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(x))
    for h in handles:
        h.remove()
    ours = {}
    vit.forward(tensors, x, num_heads=4, hook=lambda name, a: ours.__setitem__(name, a.copy()))
    assert set(ours) == set(seen)
    for name, ref in seen.items():
        scale = max(1.0, float(np.abs(ref).max()))
        assert ours[name].shape == ref.shape, name
        assert np.abs(ours[name] - ref).max() <= HF_RTOL * scale, name


# ----------------------------------------------------------------- compressed path
def test_compressed_layers_equal_dense_product():
    rng = np.random.default_rng(0)
    params = random_params(rng, dist=True, depth=2)
    names = [n for n in vit.linear_names(params)]  # every linear, heads included
    comp, dense = compress(params, rng, names)
    x = images_for(params, 4, rng)
    ref = vit.forward(dense, x, num_heads=4)
    out = vit.forward(comp, x, num_heads=4)
    np.testing.assert_allclose(out, ref, rtol=FACTOR_RTOL, atol=FACTOR_RTOL * np.abs(ref).max())
    assert vit.linear_names(comp) == vit.linear_names(dense) == names


def test_compressed_layer_is_never_densified():
    rng = np.random.default_rng(1)
    params = random_params(rng)
    comp, _ = compress(params, rng, ["blocks.0.mlp.fc1"], rank=2, residual=1)
    shapes = []

    class Spy(np.ndarray):
        def __matmul__(self, other):
            out = np.ndarray.__matmul__(np.asarray(self), np.asarray(other))
            shapes.append((np.shape(self), np.shape(other)))
            return out.view(Spy)

        def __rmatmul__(self, other):
            out = np.ndarray.__matmul__(np.asarray(other), np.asarray(self))
            shapes.append((np.shape(other), np.shape(self)))
            return out.view(Spy)

    x = np.random.default_rng(2).standard_normal((2, 10, 32))
    prepared = vit.prepare(comp, np)
    # unstacked factors (each its own array: copies, as a hand-built dict has them)
    spied = {k: (v.copy().view(Spy) if ".mlp.fc1." in k else v) for k, v in prepared.items()}
    y = vit.linear(spied, "blocks.0.mlp.fc1", x, np)
    # exactly (x B^T) A^T and (x Q^T) P^T: four products, each of the 20
    # token rows (any leading shape) with one factor; no factor-by-factor
    # product (no dense W)
    assert len(shapes) == 4 and all(math.prod(left[:-1]) == 20 and len(right) == 2 for left, right in shapes), shapes
    a, b = comp["blocks.0.mlp.fc1.lowrank_a"], comp["blocks.0.mlp.fc1.lowrank_b"]
    p, q = comp["blocks.0.mlp.fc1.residual_p"], comp["blocks.0.mlp.fc1.residual_q"]
    ref = x @ (a @ b + p @ q).T + comp["blocks.0.mlp.fc1.bias"]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)
    # the stacked pair of prepare: two products, (x R^T) with R (r + q, n), then L (m, r + q)
    shapes.clear()
    y2 = vit.linear(prepared, "blocks.0.mlp.fc1", x.view(Spy), np)
    assert shapes == [((20, 32), (32, 3)), ((20, 3), (3, 64))], shapes  # fc1: m = 64
    np.testing.assert_allclose(np.asarray(y2), ref, rtol=1e-12, atol=1e-12)


def test_linear_errors_name_the_layer():
    rng = np.random.default_rng(3)
    params = random_params(rng)
    x = np.zeros((1, 2, 32))
    with pytest.raises(MrcError, match="layer blocks.9.attn.qkv: missing"):
        vit.linear(params, "blocks.9.attn.qkv", x, np)
    broken = dict(params)
    broken["blocks.0.attn.proj.lowrank_a"] = broken.pop("blocks.0.attn.proj.weight")
    with pytest.raises(MrcError, match="blocks.0.attn.proj.*lowrank_b"):
        vit.linear(broken, "blocks.0.attn.proj", x, np)
    broken["blocks.0.attn.proj.lowrank_b"] = np.zeros((5, 32))  # (32, 32) @ (5, 32) does not chain
    with pytest.raises(MrcError, match="blocks.0.attn.proj.*do not chain"):
        vit.linear(broken, "blocks.0.attn.proj", x, np)
    missing = {k: v for k, v in params.items() if not k.startswith("blocks.1.mlp.fc2")}
    with pytest.raises(MrcError, match="layer blocks.1.mlp.fc2"):
        vit.forward(missing, images_for(params, 1, rng), num_heads=2)


# ----------------------------------------------------------------- structure
def test_hook_reports_every_linear_in_forward_order():
    rng = np.random.default_rng(4)
    dim, mlp, depth = 32, 48, 3
    params = random_params(rng, dim=dim, mlp=mlp, depth=depth, dist=True, grid=2)
    comp, _ = compress(params, rng, ["blocks.1.mlp.fc1", "head"])
    x = images_for(params, 5, rng)
    for p in (params, comp):
        calls = []
        vit.forward(p, x, num_heads=4, hook=lambda name, a: calls.append((name, a.shape)))
        tokens = 2 + 4
        expected = []
        for i in range(depth):
            expected += [
                (f"blocks.{i}.attn.qkv", (5, tokens, dim)),
                (f"blocks.{i}.attn.proj", (5, tokens, dim)),
                (f"blocks.{i}.mlp.fc1", (5, tokens, dim)),
                (f"blocks.{i}.mlp.fc2", (5, tokens, mlp)),
            ]
        expected += [("head", (5, dim)), ("head_dist", (5, dim))]
        assert calls == expected
        assert [name for name, _ in calls] == vit.linear_names(p)
    assert vit.depth(params) == depth


def test_blocks_compose_to_forward():
    rng = np.random.default_rng(5)
    params = vit.prepare(random_params(rng, depth=3), np)
    x = images_for(params, 3, rng).astype(np.float64)
    h = vit.embed(params, x, np)
    h1 = vit.blocks(params, h, 2, np, stop=1)
    h2 = vit.block(params, 1, h1, 2, np)
    h3 = vit.blocks(params, h2, 2, np, start=2)
    np.testing.assert_array_equal(vit.head(params, h3, np), vit.forward(params, x, num_heads=2))


def test_patch_embedding_matches_explicit_convolution():
    rng = np.random.default_rng(6)
    params = random_params(rng, dim=8, patch=3, grid=2, dist=True)
    x = rng.standard_normal((2, 3, 6, 6))
    h = vit.embed(params, x, np)
    w, b = params["patch_embed.proj.weight"], params["patch_embed.proj.bias"]
    ref = np.empty((2, 2 + 4, 8))
    ref[:, 0] = params["cls_token"][0, 0]
    ref[:, 1] = params["dist_token"][0, 0]
    for n in range(2):
        for gi in range(2):
            for gj in range(2):
                patch = x[n, :, 3 * gi : 3 * gi + 3, 3 * gj : 3 * gj + 3]
                for d in range(8):
                    ref[n, 2 + 2 * gi + gj, d] = np.sum(w[d] * patch) + b[d]
    np.testing.assert_allclose(h, ref + params["pos_embed"], rtol=1e-12, atol=1e-12)


def test_gelu_is_exact_erf_gelu():
    x = np.linspace(-5, 5, 41)
    ref = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    np.testing.assert_allclose(vit.gelu(x, np), ref, rtol=1e-14, atol=1e-15)


def test_image_size_must_match_pos_embed():
    rng = np.random.default_rng(7)
    params = random_params(rng, patch=4, grid=3)
    with pytest.raises(MrcError, match="pos_embed"):
        vit.forward(params, np.zeros((1, 3, 16, 16)), num_heads=2)
    with pytest.raises(MrcError, match="not a multiple of the patch size"):
        vit.forward(params, np.zeros((1, 3, 13, 12)), num_heads=2)
    with pytest.raises(MrcError, match="expected"):
        vit.forward(params, np.zeros((1, 1, 12, 12)), num_heads=2)


def test_prepare_converts_once_and_keeps_prepared_arrays():
    rng = np.random.default_rng(8)
    params = {k: v.astype(np.float32) for k, v in random_params(rng).items()}
    prepared = vit.prepare(params, np)
    assert all(v.dtype == np.float64 for v in prepared.values())
    again = vit.prepare(prepared, np)
    assert all(again[k] is prepared[k] for k in prepared)
    x = images_for(params, 2, rng)
    np.testing.assert_array_equal(vit.forward(params, x, num_heads=2), vit.forward(prepared, x, num_heads=2))
    out32 = vit.forward(params, x, num_heads=2, dtype=np.float32)
    assert out32.dtype == np.float32
    ref = vit.forward(prepared, x, num_heads=2)
    assert np.abs(out32 - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    half = {k: v.astype(np.float16) for k, v in params.items()}
    assert vit.forward(half, x, num_heads=2).dtype == np.float64


# ----------------------------------------------------------------- num_heads
def test_resolve_num_heads():
    rng = np.random.default_rng(9)
    p128 = random_params(rng, dim=128, mlp=8, depth=1)
    assert vit.resolve_num_heads(p128) == 2  # head size 64
    assert vit.resolve_num_heads(p128, metadata={"num_heads": "4"}) == 4
    assert vit.resolve_num_heads(p128, 8, metadata={"num_heads": "4"}) == 8  # argument wins
    assert vit.resolve_num_heads(p128, metadata={"other": "x"}) == 2
    with pytest.raises(MrcError, match="does not divide"):
        vit.resolve_num_heads(p128, 3)
    with pytest.raises(MrcError, match="must be an integer"):
        vit.resolve_num_heads(p128, metadata={"num_heads": "four"})
    with pytest.raises(MrcError, match="must be positive"):
        vit.resolve_num_heads(p128, 0)
    p32 = random_params(rng, dim=32, mlp=8, depth=1)
    with pytest.raises(MrcError, match="num_heads cannot be inferred"):
        vit.resolve_num_heads(p32)
    with pytest.raises(MrcError, match="does not divide"):
        vit.forward(p32, images_for(p32, 1, rng), metadata={"num_heads": "5"})


def test_heads_split_the_width_as_in_an_explicit_attention():
    """One block, attention written per head with explicit loops."""
    rng = np.random.default_rng(12)
    params = random_params(rng, dim=16, depth=1)
    x = rng.standard_normal((2, 5, 16))
    w, b = params["blocks.0.attn.qkv.weight"], params["blocks.0.attn.qkv.bias"]
    heads, hd = 4, 4
    ref = np.empty((2, 5, 16))
    for n in range(2):
        qkv = x[n] @ w.T + b
        for h in range(heads):
            q = qkv[:, h * hd : (h + 1) * hd]
            k = qkv[:, 16 + h * hd : 16 + (h + 1) * hd]
            v = qkv[:, 32 + h * hd : 32 + (h + 1) * hd]
            s = q @ k.T / math.sqrt(hd)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            ref[n, :, h * hd : (h + 1) * hd] = (a / a.sum(axis=1, keepdims=True)) @ v
    ref = ref @ params["blocks.0.attn.proj.weight"].T + params["blocks.0.attn.proj.bias"]
    out = vit.attention(params, "blocks.0.attn", x, heads, np)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_depth_rejects_gaps():
    rng = np.random.default_rng(13)
    params = random_params(rng, depth=3)
    gap = {k: v for k, v in params.items() if not k.startswith("blocks.1.")}
    with pytest.raises(MrcError, match="blocks.1"):
        vit.depth(gap)


# ----------------------------------------------------------------- stacked factors
#: Stacked vs unstacked: the same products summed in another order. Measured
#: in the issue's prototype: 5e-7 (float32) and 9e-16 (float64) of the scale.
STACK_RTOL = {np.float32: 5e-7, np.float64: 9e-16}


def _unstacked(prepared):
    """The prepared dict with every factor its own contiguous array (no stacked pair)."""
    return {k: (v.copy() if k.endswith(("lowrank_a", "lowrank_b", "residual_p", "residual_q")) else v)
            for k, v in prepared.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prepare_stacks_factors_into_one_pair(dtype):
    rng = np.random.default_rng(30)
    params = random_params(rng, dim=64, mlp=128, depth=2, grid=3)
    names = vit.linear_names(params)
    comp, dense = compress(params, rng, names, rank=6, residual=3)
    prepared = vit.prepare(comp, np, dtype)
    for k, name in enumerate(names):
        a, b = prepared[f"{name}.lowrank_a"], prepared[f"{name}.lowrank_b"]
        if k % 2:  # no residual: nothing to stack
            assert f"{name}.residual_p" not in prepared and a.base is None
            continue
        p, q = prepared[f"{name}.residual_p"], prepared[f"{name}.residual_q"]
        left, right = vit.stacked_factors(a, b, p, q)
        assert left.shape == (a.shape[0], 9) and right.shape == (9, b.shape[1])
        np.testing.assert_array_equal(left, np.concatenate([comp[f"{name}.lowrank_a"], comp[f"{name}.residual_p"]], 1)
                                      .astype(dtype))
        np.testing.assert_array_equal(right, np.concatenate([comp[f"{name}.lowrank_b"], comp[f"{name}.residual_q"]])
                                      .astype(dtype))
        assert vit.stacked_factors(a.copy(), b, p, q) is None and vit.stacked_factors(a, b, None, None) is None
    # a prepared dict passes through prepare unchanged (same arrays)
    again = vit.prepare(prepared, np, dtype)
    assert all(again[k] is prepared[k] for k in prepared)
    # the stored tensors are untouched (the format is not the forward's)
    assert all(comp[k].base is None for k in comp if k.endswith("residual_p"))
    x = images_for(params, 3, rng)
    stacked = vit.forward(prepared, x, num_heads=4, dtype=dtype)
    plain = vit.forward(_unstacked(prepared), x, num_heads=4, dtype=dtype)
    ref = vit.forward(dense, x, num_heads=4)  # float64, dense W = A B + P Q: the independent oracle
    scale = np.abs(plain).max()
    assert np.abs(stacked - plain).max() <= STACK_RTOL[dtype] * scale
    tol = 1e-10 if dtype == np.float64 else 1e-4
    assert np.abs(stacked - ref).max() <= tol * np.abs(ref).max()


def test_stacked_pair_never_goes_stale():
    rng = np.random.default_rng(31)
    params = random_params(rng)
    comp, _ = compress(params, rng, ["blocks.0.mlp.fc1"], rank=3, residual=2)
    prepared = vit.prepare(comp, np)
    name = "blocks.0.mlp.fc1"
    x = rng.standard_normal((2, 5, 32))
    # writing into a view writes into the pair
    prepared[f"{name}.residual_p"][...] *= 2.0
    a, b, p, q = (prepared[f"{name}.{s}"] for s in ("lowrank_a", "lowrank_b", "residual_p", "residual_q"))
    ref = x @ (a @ b + p @ q).T + prepared[f"{name}.bias"]
    np.testing.assert_allclose(vit.linear(prepared, name, x, np), ref, rtol=1e-12, atol=1e-12)
    # replacing a key (as sequential Stage 3 does) leaves the pair behind: factor by factor
    new_p = rng.standard_normal(p.shape)
    prepared[f"{name}.residual_p"] = new_p
    assert vit.stacked_factors(a, b, new_p, q) is None
    ref = x @ (a @ b + new_p @ q).T + prepared[f"{name}.bias"]
    np.testing.assert_allclose(vit.linear(prepared, name, x, np), ref, rtol=1e-12, atol=1e-12)


def test_int8_factors_are_stacked_after_dequantization():
    from mrc_ref import quantize

    rng = np.random.default_rng(32)
    params = random_params(rng, depth=1)
    comp, _ = compress(params, rng, ["blocks.0.mlp.fc1", "blocks.0.attn.qkv"], rank=4, residual=2)
    q8 = quantize.quantize_tensors({k: v.astype(np.float32) for k, v in comp.items()})
    assert q8["blocks.0.mlp.fc1.residual_p"].dtype == np.int8
    prepared = vit.prepare(q8, np)
    name = "blocks.0.mlp.fc1"
    factors = [prepared[f"{name}.{s}"] for s in ("lowrank_a", "lowrank_b", "residual_p", "residual_q")]
    assert vit.stacked_factors(*factors) is not None
    deq = quantize.dequantize_tensors(q8, np)
    for s, f in zip(("lowrank_a", "lowrank_b", "residual_p", "residual_q"), factors):
        np.testing.assert_array_equal(f, deq[f"{name}.{s}"])
    x = images_for(params, 2, rng)
    out = vit.forward(prepared, x, num_heads=2)
    ref = vit.forward(_unstacked(prepared), x, num_heads=2)
    assert np.abs(out - ref).max() <= STACK_RTOL[np.float64] * np.abs(ref).max()


def test_malformed_factors_are_left_to_linear():
    rng = np.random.default_rng(33)
    params = random_params(rng)
    comp, _ = compress(params, rng, ["blocks.0.attn.proj"], rank=2, residual=1)
    comp["blocks.0.attn.proj.residual_q"] = np.zeros((1, 5))  # does not chain
    prepared = vit.prepare(comp, np)  # no error here
    assert prepared["blocks.0.attn.proj.residual_p"].base is None
    with pytest.raises(MrcError, match="blocks.0.attn.proj.*do not match"):
        vit.forward(prepared, images_for(params, 1, rng), num_heads=2)


# ----------------------------------------------------------------- the NumPy engine
#: Engine vs plain route: identical but for q scaled before q kᵀ (exact when
#: d_h^{-1/2} is a power of two) and the attention products at one BLAS thread
#: (OpenBLAS float64 products with k = 64 differ in the last bit between 1 and
#: 2 threads). Measured: 3.6e-7 (float32), 8.4e-16 (float64) of the scale.
ENGINE_RTOL = {np.float32: 1e-6, np.float64: 1e-14}
def _engine(**kw):
    """An engine that splits even the tiny test models (no work or row minimum)."""
    return vit.Engine(min_work=0, min_rows=2, **kw)


ENGINES = [_engine(threads=1), _engine(threads=2),
           _engine(threads=3, chunk=100), _engine(threads=2, chunk=1)]


def _forward(params, x, heads, dtype, engine, **kw):
    return vit.forward(params, x, num_heads=heads, dtype=dtype, engine=engine, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("width,heads", [(128, 2), (96, 4)])  # head size 64, and 24 (scale not a power of 2)
def test_engine_matches_plain_route(dtype, batch, width, heads):
    rng = np.random.default_rng(40 + batch)
    params = random_params(rng, dim=width, mlp=2 * width, depth=2, grid=4, dist=batch == 3)
    comp, _ = compress(params, rng, ["blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"], rank=5, residual=3)
    x = images_for(params, batch, rng)
    for model in (params, comp):
        ref = _forward(model, x, heads, dtype, "plain")
        scale = np.abs(ref).max()
        for engine in ENGINES:
            out = _forward(model, x, heads, dtype, engine)
            assert out.dtype == dtype and out.shape == ref.shape
            assert np.abs(out - ref).max() <= ENGINE_RTOL[dtype] * scale, (engine, np.abs(out - ref).max() / scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_engine_numbers_do_not_depend_on_threads_or_chunks(dtype):
    """Bit for bit: head size 64 and parts of >= 50 rows (OpenBLAS gives a
    row of a product the same bits whatever the number of rows)."""
    rng = np.random.default_rng(41)
    params = random_params(rng, dim=192, mlp=384, depth=2, grid=7)
    x = images_for(params, 3, rng)
    outs = [_forward(params, x, 3, dtype, e) for e in ENGINES + [_engine(threads=1, chunk=10**9)]]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    if dtype == np.float32:  # float32 products do not depend on the BLAS thread count either: same as plain
        np.testing.assert_array_equal(outs[0], _forward(params, x, 3, dtype, "plain"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_engine_hooks_see_the_plain_inputs_and_outputs(dtype):
    rng = np.random.default_rng(42)
    params = vit.prepare(random_params(rng, dim=64, mlp=96, depth=2, grid=3, dist=True), np, dtype)
    x = images_for(params, 3, rng).astype(dtype)
    h = vit.embed(params, x, np)
    runs = {}
    for label, engine in (("plain", "plain"), ("engine", _engine(threads=2))):
        calls, kept = [], []

        def hook(name, a, calls=calls, kept=kept):
            assert threading.current_thread() is threading.main_thread()
            calls.append(("in", name, a.copy()))
            kept.append((a, a.copy()))

        def out_hook(name, y, calls=calls, kept=kept):
            calls.append(("out", name, y.copy()))
            kept.append((y, y.copy()))

        out = vit.blocks(params, h, 4, np, hook=hook, out_hook=out_hook, engine=engine)
        for arr, copy in kept:  # never written after the hook saw it
            np.testing.assert_array_equal(arr, copy)
        runs[label] = (calls, out)
    (plain, ref), (eng, out) = runs["plain"], runs["engine"]
    assert [c[:2] for c in eng] == [c[:2] for c in plain] and len(plain) == 16
    for (_, name, a), (_, _, b) in zip(plain, eng):
        assert a.shape == b.shape and a.shape[0] == 3, name
        assert np.abs(a - b).max() <= ENGINE_RTOL[dtype] * max(1.0, np.abs(a).max()), name
    assert np.abs(out - ref).max() <= ENGINE_RTOL[dtype] * np.abs(ref).max()
    # only hook (no out_hook), and only out_hook: same inputs again (the buffers reused otherwise)
    seen = {}
    vit.blocks(params, h, 4, np, hook=lambda n, a: seen.__setitem__(n, a), engine=_engine(threads=2))
    for _, name, a in (c for c in eng if c[0] == "in"):
        np.testing.assert_array_equal(seen[name], a)
    seen.clear()
    vit.blocks(params, h, 4, np, out_hook=lambda n, a: seen.__setitem__(n, a), engine=_engine(threads=2))
    for _, name, a in (c for c in eng if c[0] == "out"):
        np.testing.assert_array_equal(seen[name], a)


def test_engine_leaves_the_input_and_blas_threads_alone():
    rng = np.random.default_rng(43)
    params = vit.prepare(random_params(rng, dim=64, mlp=96, depth=1, grid=3), np)
    h = vit.embed(params, images_for(params, 4, rng).astype(np.float64), np)
    before = h.copy()
    from threadpoolctl import threadpool_info

    def counts():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    threads, libs = threads_mod.blas_threads(), counts()
    during = []
    vit.block(params, 0, h, 4, np, hook=lambda n, a: during.append(counts()), engine=_engine(threads=2))
    np.testing.assert_array_equal(h, before)
    assert threads_mod.blas_threads() == threads and counts() == libs  # restored
    assert all(c == libs for c in during)  # hooks run at the full BLAS count


def test_engine_steps_aside_where_it_cannot_run(monkeypatch):
    """Without BLAS thread control: one thread (never the pool); unusual
    inputs (mixed dtypes, a missing layer): the plain route, with its errors."""
    rng = np.random.default_rng(44)
    params = vit.prepare(random_params(rng, dim=64, mlp=96, depth=1, grid=3), np)
    x = images_for(params, 4, rng).astype(np.float64)
    ref = vit.forward(params, x, num_heads=4, engine="plain")
    used = []
    real_pool = threads_mod._pool
    monkeypatch.setattr(threads_mod, "_pool", lambda n: used.append(n) or real_pool(n))
    vit.forward(params, x, num_heads=4, engine=_engine(threads=2))
    assert used == ([1] * 3 if threads_mod.blas_controlled() else [])  # no hooks: three hand-offs (rows, heads, rows)
    used.clear()
    monkeypatch.setitem(threads_mod._STATE, "controls", [])
    out = vit.forward(params, x, num_heads=4, engine=_engine(threads=2))
    assert used == [] and np.abs(out - ref).max() <= 1e-14 * np.abs(ref).max()
    monkeypatch.undo()
    # below min_work, or fewer than 2 x min_rows rows (here 40): one thread
    used.clear()
    monkeypatch.setattr(threads_mod, "_pool", lambda n: used.append(n) or real_pool(n))
    vit.forward(params, x, num_heads=4, engine=vit.Engine(threads=2, min_rows=2))
    vit.forward(params, x, num_heads=4, engine=vit.Engine(threads=2, min_work=0, min_rows=21))
    assert used == []
    vit.forward(params, x, num_heads=4, engine=vit.Engine(threads=2, min_work=0, min_rows=20))
    assert used == [1] * 3
    mixed = dict(params, **{"blocks.0.mlp.fc1.weight": params["blocks.0.mlp.fc1.weight"].astype(np.float32)})
    np.testing.assert_array_equal(vit.forward(mixed, x, num_heads=4, engine=_engine(threads=2)),
                                  vit.forward(mixed, x, num_heads=4, engine="plain"))
    missing = {k: v for k, v in params.items() if not k.startswith("blocks.0.mlp.fc2")}
    with pytest.raises(MrcError, match="layer blocks.0.mlp.fc2"):
        vit.forward(missing, x, num_heads=4, engine=_engine(threads=2))


def test_engine_settings(monkeypatch):
    from mrc_ref.errors import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        vit.block({}, 0, np.zeros((1, 2, 4)), 1, np, engine="fast")
    for bad in (0, -1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="threads"):
            vit.Engine(threads=bad)
    with pytest.raises(ConfigError, match="min_rows"):
        vit.Engine(min_rows=1)
    with pytest.raises(ConfigError, match="chunk"):
        vit.Engine(chunk=0)
    monkeypatch.setenv("MRC_THREADS", "3")
    monkeypatch.setenv("MRC_CHUNK", "4096")
    assert vit.Engine().resolved_threads() == 3 and vit.Engine(threads=1).resolved_threads() == 1
    assert vit.Engine().resolved_chunk() == 4096 and vit.Engine(chunk=8).resolved_chunk() == 8
    monkeypatch.setenv("MRC_THREADS", "two")
    with pytest.raises(ConfigError, match="MRC_THREADS"):
        vit.Engine().resolved_threads()
    monkeypatch.delenv("MRC_THREADS")
    monkeypatch.delenv("MRC_CHUNK")
    assert vit.Engine().resolved_threads() == threads_mod.blas_threads() >= 1
    assert vit.Engine().resolved_chunk() == vit.DEFAULT_CHUNK


def test_parallel_raises_a_worker_error_after_all_parts_finish():
    done = []

    def fn(part):
        if part == 1:
            raise ValueError("part 1")
        done.append(part)

    with pytest.raises(ValueError, match="part 1"):
        threads_mod.parallel(fn, [0, 1, 2], limit=True)
    assert sorted(done) == [0, 2]
    assert threads_mod._STATE["depth"] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_elementwise_steps_equal_the_plain_functions(dtype):
    rng = np.random.default_rng(45)
    z = (3 * rng.standard_normal((37, 50))).astype(dtype)
    z[0, :5] = [0.0, -0.0, 40.0, -40.0, 1e-30]
    erf = vit.erf_function(np)
    params = {"n.weight": rng.standard_normal(50).astype(dtype), "n.bias": rng.standard_normal(50).astype(dtype)}
    for chunk in (1, 50, 77, 10**6):
        out = np.empty_like(z)
        vit._gelu_rows(z, out, chunk, erf)
        np.testing.assert_array_equal(out, vit.gelu(z, np))
        inplace = z.copy()
        vit._gelu_rows(inplace, inplace, chunk, erf)
        np.testing.assert_array_equal(inplace, out)
        vit._layer_norm_rows(z, params["n.weight"], params["n.bias"], out, chunk)
        np.testing.assert_array_equal(out, vit.layer_norm(params, "n", z, np))
        s = z.copy()
        vit._softmax_rows(s, chunk)
        np.testing.assert_array_equal(s, vit.softmax(z, np))


def test_erf_float32_is_float64_erf_rounded():
    """SciPy's float32 erf computes in float64 and rounds (<= 0.5 ulp), the
    bar an approximation would have to meet (docs/performance.md)."""
    pos = np.arange(0, np.float32(6.0).view(np.int32) + 1, 997, dtype=np.int32).view(np.float32)
    x = np.concatenate([-pos, pos])
    erf = vit.erf_function(np)
    assert erf(x).dtype == np.float32
    np.testing.assert_array_equal(erf(x), erf(x.astype(np.float64)).astype(np.float32))


@pytest.mark.oracle
def test_threaded_engine_matches_transformers():
    model, torch = _hf_model(**HF_CASES["vit-small"])
    heads = model.config.num_attention_heads
    tensors, metadata = _convert(model, heads)
    size = model.config.image_size
    x = np.random.default_rng(14).standard_normal((5, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)).logits.numpy().astype(np.float64)
    for engine in ENGINES:
        ours = vit.forward(tensors, x, metadata=metadata, engine=engine)
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(ours - ref).max() <= HF_RTOL * scale, engine


def test_capture_through_the_engine_matches_the_plain_route(monkeypatch):
    """data_tools.capture (hook + out_hook) on the threaded engine against
    the plain route (the engine switched off): the statistics agree to
    round-off, float64."""
    from data_tools.capture import capture_statistics

    rng = np.random.default_rng(46)
    params = random_params(rng, dim=64, mlp=96, depth=2, grid=3)
    comp, _ = compress(params, rng, ["blocks.0.mlp.fc1", "blocks.1.attn.proj"], rank=4, residual=2)
    x = images_for(params, 7, rng)
    batches = [x[:3], x[3:]]
    monkeypatch.setattr(vit, "MIN_WORK", 0)
    monkeypatch.setattr(vit, "MIN_ROWS", 2)
    monkeypatch.setenv("MRC_THREADS", "2")
    for model in (params, comp):
        got, proxy = capture_statistics(model, batches, num_heads=4, proxy_images=5, xp=np)
        with monkeypatch.context() as m:
            m.setattr(vit, "_engine_block", lambda *a, **k: None)  # the plain route
            ref, proxy_ref = capture_statistics(model, batches, num_heads=4, proxy_images=5, xp=np)
        np.testing.assert_array_equal(proxy, proxy_ref)
        assert sorted(got) == sorted(ref)
        for name, st in ref.items():
            assert got[name]["rows"] == st["rows"]
            for key in ("gram", "sum", "gram_normalized"):
                scale = np.abs(st[key]).max()
                assert np.abs(got[name][key] - st[key]).max() <= 1e-13 * scale, (name, key)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_engine_runs_in_a_forked_child():
    """A child forked after the pool started has none of its threads: the
    engine starts a new pool there instead of waiting on dead workers."""
    import os

    rng = np.random.default_rng(47)
    params = vit.prepare(random_params(rng, dim=64, mlp=96, depth=1, grid=3), np)
    x = images_for(params, 4, rng).astype(np.float64)
    engine = _engine(threads=2)
    ref = vit.forward(params, x, num_heads=4, engine=engine)  # the pool exists now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must finish, and with the same numbers
        try:
            ok = np.array_equal(vit.forward(params, x, num_heads=4, engine=engine), ref)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    import time

    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish its forward pass (waiting on dead workers?)")
    assert os.read(read, 1) == b"1" and done[1] == 0
