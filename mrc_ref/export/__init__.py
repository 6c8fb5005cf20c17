"""ONNX export of a ViT / DeiT that :func:`mrc_ref.vit.forward` runs (docs/export.md):
the driver of ``python -m mrc_ref.export`` (its command line is ``__main__``).

One ONNX graph of the forward pass, for a dense timm-layout model, a
compressed model (docs/formats.md, version 1) or an int8 one (version 2)::

    images (N, C, H, W) float32  ->  logits (N, K) float32,   N dynamic

**Layout.** Every tensor of the file becomes an initializer, or a block of
one, and nothing else is an initializer (shapes and scalars are ``Constant``
nodes), so the initializers hold exactly the file's element count: the
``params_after`` of compress's report, plus the int8 scales in version 2.

- dense linear ``y = x Wᵀ + b``: ``MatMul(x, Wᵀ)`` then ``Add(b)``, with
  ``Wᵀ`` (n, m) stored as ``<name>.weight.T``;
- factored linear ``y = (x [B; Q]ᵀ) [A P]ᵀ + b``, two MatMuls at rank
  ``r + q`` (``W = A B + P Q`` is never formed): ``[B; Q]ᵀ`` (n, r + q) as
  ``<name>.lowrank_b+residual_q.T`` and ``[A P]ᵀ`` (r + q, m) as
  ``<name>.lowrank_a+residual_p.T`` (``<name>.lowrank_b.T``, ``<name>.lowrank_a.T``
  without a residual);
- int8 matrices stay int8 with their per-output-channel scales,
  ``DequantizeLinear(codes, scale, axis=1)`` (per-axis, opset 13), then the
  float MatMul (weight-only int8: the activations stay float32, so the
  logits are those of the dequantized model). ``[B; Q]ᵀ`` stays one int8
  initializer: B and Q are quantized per row and their rows are the stacked
  axis, so the scales simply concatenate. A and P have one scale per row
  *each* for the same output rows, which no single per-axis scale of
  ``[A P]ᵀ`` can hold: ``Aᵀ`` and ``Pᵀ`` are dequantized apart and
  joined by a ``Concat`` (a copy of (r + q) m floats per run), so the layer
  still runs one MatMul at rank r + q rather than two small ones and an Add.

**Opset 13** **[choice]**, the lowest with per-axis ``DequantizeLinear``.
LayerNorm is written out (``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
Div, Mul, Add``; the ``LayerNormalization`` op is opset 17) and the exact GELU
as ``x · (1 + Erf(x / √2)) · 0.5`` (the ``Gelu`` op is opset 20):
onnxruntime fuses both patterns into its LayerNormalization and Gelu kernels
when it loads the model (graph optimizations at their default level).

``onnx`` is imported inside the functions: the core never needs it
(``pip install 'mrc_ref[onnx]'``).
"""

import math
import os

import numpy as np

from .. import formats, layout, vit
from ..errors import MrcError
from ..images import model_input_size
from ..quantize import SCALE_SUFFIX

__all__ = ["OPSET", "IR_VERSION", "require_onnx", "check_vit", "build_model", "read_model", "count_initializers",
           "export_file"]

#: The opset of the exported graph: the lowest with per-axis DequantizeLinear.
OPSET = 13
#: The ONNX IR version of opset 13 (ONNX 1.8): the oldest that can hold the graph,
#: so that older runtimes load it too.
IR_VERSION = 7
#: Input and output names of the graph.
INPUT, OUTPUT = "images", "logits"
#: The factor tensors of a compressed linear layer (:mod:`mrc_ref.layout`).
FACTORS = layout.FACTOR_SUFFIXES
#: protobuf's limit on a serialized message (the whole model without external data).
PROTOBUF_LIMIT = 2**31 - 1


def require_onnx():
    """The ``onnx`` module, or :class:`MrcError` saying to install the extra."""
    try:
        import onnx
    except ImportError as exc:
        raise MrcError(f"{exc.name or 'onnx'} is not installed; install the onnx extra: "
                       "pip install 'mrc_ref[onnx]' (from a checkout: pip install -e '.[onnx]')") from None
    return onnx


# ----------------------------------------------------------------- the model's description
def _float_tensor(tensors, key, shape, used, layer=None):
    """Check that ``key`` is a finite float tensor of ``shape``; mark it used."""
    layer = layer or key
    if key not in tensors:
        raise MrcError(f"missing tensor {key}", layer=layer)
    a = tensors[key]
    if not np.issubdtype(a.dtype, np.floating):
        raise MrcError(f"{key} has dtype {a.dtype}, expected a float tensor", layer=layer)
    if tuple(a.shape) != tuple(shape):
        raise MrcError(f"{key} has shape {tuple(a.shape)}, expected {tuple(shape)}", layer=layer)
    if not np.isfinite(a).all():
        raise MrcError(f"{key} holds NaN or Inf", layer=layer)
    used.add(key)


def _matrix(tensors, key, used, layer):
    """Shape ``(rows, cols)`` of the 2-D float or int8 matrix ``key``; an int8
    matrix needs its ``<key>.scale`` (one finite, non-negative float per row)."""
    a = tensors[key]
    if a.ndim != 2:
        raise MrcError(f"{key} has shape {tuple(a.shape)}, expected a 2-D matrix", layer=layer)
    if a.dtype == np.int8:
        scale = tensors.get(key + SCALE_SUFFIX)
        if scale is None:
            raise MrcError(f"{key} is int8 but has no {key}{SCALE_SUFFIX} (one float scale per row)", layer=layer)
        if not np.issubdtype(scale.dtype, np.floating) or tuple(scale.shape) != (a.shape[0],):
            raise MrcError(f"{key}{SCALE_SUFFIX} has shape {tuple(scale.shape)} and dtype {scale.dtype}, "
                           f"expected float ({a.shape[0]},): one scale per row of {key}", layer=layer)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise MrcError(f"{key}{SCALE_SUFFIX} holds a negative or non-finite scale", layer=layer)
        used.add(key + SCALE_SUFFIX)
    elif not np.issubdtype(a.dtype, np.floating):
        raise MrcError(f"{key} has dtype {a.dtype}, expected float, or int8 with a {key}{SCALE_SUFFIX}",
                       layer=layer)
    elif not np.isfinite(a).all():
        raise MrcError(f"{key} holds NaN or Inf", layer=layer)
    used.add(key)
    return tuple(int(d) for d in a.shape)


def _linear(tensors, name, n, used, m=None):
    """Check linear layer ``name`` (dense or factored) for ``n`` input features
    (and ``m`` outputs when given); return its description."""
    keys = {s: layout.factor_key(name, s) for s in ("weight", *FACTORS)}
    if layout.layer_form(tensors, name) == "dense":  # the factored-layer rule, or missing
        rows, cols = _matrix(tensors, keys["weight"], used, name)
        if cols != n:
            raise MrcError(f"weight has shape {(rows, cols)}, the layer's input has {n} features", layer=name)
        layer = {"kind": "dense", "m": rows, "n": n, "rank": None, "residual": 0}
    else:
        shapes = [_matrix(tensors, keys[s], used, name) if keys[s] in tensors else None for s in FACTORS]
        layout.check_factor_shapes(name, *shapes, n=n)
        a, _, p, _ = shapes
        layer = {"kind": "factored", "m": a[0], "n": n, "rank": a[1], "residual": 0 if p is None else p[1]}
    if m is not None and layer["m"] != m:
        raise MrcError(f"has {layer['m']} outputs, expected {m}", layer=name)
    layer["bias"] = f"{name}.bias" in tensors
    if layer["bias"]:
        _float_tensor(tensors, f"{name}.bias", (layer["m"],), used, layer=name)
    return layer


def check_vit(tensors, metadata=None, *, num_heads=None):
    """Check that ``tensors`` are a timm ViT / DeiT that :func:`mrc_ref.vit.forward`
    runs, every tensor used, and describe it.

    Parameters
    ----------
    tensors : mapping of str -> ndarray
        Dense, compressed or int8 (``<key>`` int8 with ``<key>.scale``).
    metadata : mapping of str -> str, optional
        The file's metadata (``num_heads``).
    num_heads : int, optional
        Overrides the metadata (:func:`mrc_ref.vit.resolve_num_heads`).

    Returns
    -------
    dict
        ``dim`` D, ``heads`` h, ``depth`` L, ``channels`` C, ``patch`` p,
        ``size`` (the input side), ``prefix`` (1, or 2 with a distillation
        token), ``tokens`` T, ``classes`` K, ``distilled`` (a ``head_dist``),
        ``linears`` ({name: {kind, m, n, rank, residual, bias}} in forward
        order), ``int8`` (the int8 keys).

    Raises
    ------
    MrcError
        One line naming the layer and the problem: a missing or misshapen
        tensor, a half-factored layer, an int8 matrix without its scale, a
        NaN, or a tensor the forward does not use.
    """
    used = set()
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        if key not in tensors:
            raise MrcError("missing tensor; not a timm ViT/DeiT", layer=key)
    w = tensors["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3] or not np.issubdtype(w.dtype, np.floating):
        raise MrcError(f"has shape {tuple(w.shape)} and dtype {w.dtype}, expected float (dim, channels, p, p)",
                       layer="patch_embed.proj.weight")
    dim, channels, patch = (int(d) for d in w.shape[:3])
    _float_tensor(tensors, "patch_embed.proj.weight", w.shape, used)
    if "patch_embed.proj.bias" in tensors:
        _float_tensor(tensors, "patch_embed.proj.bias", (dim,), used)
    prefix = 1 + ("dist_token" in tensors)
    for key in ("cls_token", "dist_token")[:prefix]:
        _float_tensor(tensors, key, (1, 1, dim), used)
    size = model_input_size(tensors)
    tokens = prefix + (size // patch) ** 2
    _float_tensor(tensors, "pos_embed", (1, tokens, dim), used)
    heads = vit.resolve_num_heads(tensors, num_heads, metadata)
    depth = vit.depth(tensors)
    if depth == 0:
        raise MrcError("no transformer blocks (blocks.0.*); not a timm ViT/DeiT")
    linears = {}
    for i in range(depth):
        p = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                _float_tensor(tensors, f"{p}.{norm}.{kind}", (dim,), used, layer=f"{p}.{norm}")
        qkv = linears[f"{p}.attn.qkv"] = _linear(tensors, f"{p}.attn.qkv", dim, used)
        if qkv["m"] % 3 or (qkv["m"] // 3) % heads:
            raise MrcError(f"output width {qkv['m']} is not 3 x a multiple of {heads} heads", layer=f"{p}.attn.qkv")
        linears[f"{p}.attn.proj"] = _linear(tensors, f"{p}.attn.proj", qkv["m"] // 3, used, m=dim)
        fc1 = linears[f"{p}.mlp.fc1"] = _linear(tensors, f"{p}.mlp.fc1", dim, used)
        linears[f"{p}.mlp.fc2"] = _linear(tensors, f"{p}.mlp.fc2", fc1["m"], used, m=dim)
    for kind in ("weight", "bias"):
        _float_tensor(tensors, f"norm.{kind}", (dim,), used, layer="norm")
    if not vit.has_linear(tensors, "head"):
        raise MrcError("missing: the model has no classifier head", layer="head")
    head = linears["head"] = _linear(tensors, "head", dim, used)
    distilled = vit.has_linear(tensors, "head_dist")
    if distilled:
        if prefix != 2:
            raise MrcError("head_dist needs a dist_token", layer="head_dist")
        linears["head_dist"] = _linear(tensors, "head_dist", dim, used, m=head["m"])
    unused = [k for k in tensors if k not in used]
    if unused:
        shown = ", ".join(unused[:4]) + (f", ... ({len(unused)} in all)" if len(unused) > 4 else "")
        raise MrcError(f"tensors the ViT forward does not use: {shown}; not a plain timm ViT/DeiT")
    int8 = [k for k in tensors if tensors[k].dtype == np.int8]
    return {"dim": dim, "heads": heads, "depth": depth, "channels": channels, "patch": patch, "size": size,
            "prefix": prefix, "tokens": tokens, "classes": head["m"], "distilled": distilled,
            "linears": linears, "int8": int8}


# ----------------------------------------------------------------- the graph
class _Graph:
    """Nodes and initializers of the graph being built; unique value names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers, self.count = [], [], 0

    def op(self, op_type, inputs, scope, **attrs):
        self.count += 1
        out = f"{scope}/{op_type}_{self.count}"
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, dtype):
        """A ``Constant`` node (shapes, axes, scalars: not parameters)."""
        self.count += 1
        out = f"const_{self.count}"
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(self.onnx.helper.make_node("Constant", [], [out], name=out, value=tensor))
        return out

    def param(self, name, array):
        """An initializer (a parameter): float tensors as float32, int8 as is."""
        array = np.asarray(array)
        array = np.ascontiguousarray(array if array.dtype == np.int8 else array.astype(np.float32))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name


def _transposed(g, tensors, keys, axis, scope):
    """The value ``concat([Kᵀ for K in keys], axis)`` as float32.

    Float matrices become one float32 initializer. int8 matrices (per-row
    scales of K, i.e. per column of Kᵀ) stay int8 and are dequantized per
    axis 1; they share one initializer with concatenated scales when they are
    stacked along axis 1 (the scales' axis), else each is dequantized and the
    parts joined by ``Concat``.
    """
    suffix = "+".join(k.rsplit(".", 1)[1] for k in keys)
    name = f"{keys[0].rsplit('.', 1)[0]}.{suffix}.T"
    parts = [tensors[k].T for k in keys]
    int8 = [tensors[k].dtype == np.int8 for k in keys]
    if not any(int8):
        return g.param(name, np.concatenate(parts, axis=axis))
    if all(int8) and (axis == 1 or len(keys) == 1):
        scale = np.concatenate([tensors[k + SCALE_SUFFIX] for k in keys]).astype(np.float32)
        return g.op("DequantizeLinear", [g.param(name, np.concatenate(parts, axis=1)),
                                         g.param(name + SCALE_SUFFIX, scale)], scope, axis=1)
    values = []
    for key, part, is_int8 in zip(keys, parts, int8):
        if is_int8:
            values.append(g.op("DequantizeLinear", [g.param(key + ".T", part),
                                                    g.param(key + ".T" + SCALE_SUFFIX,
                                                            tensors[key + SCALE_SUFFIX].astype(np.float32))],
                               scope, axis=1))
        else:
            values.append(g.param(key + ".T", part))
    return g.op("Concat", values, scope, axis=axis)


def _apply_linear(g, tensors, name, layer, x):
    """``x Wᵀ + b`` (dense) or ``(x [B; Q]ᵀ) [A P]ᵀ + b`` (factored), x (..., n)."""
    if layer["kind"] == "dense":
        y = g.op("MatMul", [x, _transposed(g, tensors, [f"{name}.weight"], 1, name)], name)
    else:
        q = ("residual_q",) if layer["residual"] else ()
        p = ("residual_p",) if layer["residual"] else ()
        inner = _transposed(g, tensors, [f"{name}.{s}" for s in ("lowrank_b", *q)], 1, name)  # (n, r + q)
        outer = _transposed(g, tensors, [f"{name}.{s}" for s in ("lowrank_a", *p)], 0, name)  # (r + q, m)
        y = g.op("MatMul", [g.op("MatMul", [x, inner], name), outer], name)
    if layer["bias"]:
        y = g.op("Add", [y, g.param(f"{name}.bias", tensors[f"{name}.bias"])], name)
    return y


def _layer_norm(g, tensors, name, x):
    """``(x - mean) / sqrt(var + eps) * w + b`` over the last axis (biased var, eps 1e-6),
    in the pattern onnxruntime fuses into LayerNormalization."""
    mean = g.op("ReduceMean", [x], name, axes=[-1], keepdims=1)
    xc = g.op("Sub", [x, mean], name)
    var = g.op("ReduceMean", [g.op("Pow", [xc, g.const(2.0, np.float32)], name)], name, axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(vit.LN_EPS, np.float32)], name)], name)
    y = g.op("Mul", [g.op("Div", [xc, std], name), g.param(f"{name}.weight", tensors[f"{name}.weight"])], name)
    return g.op("Add", [y, g.param(f"{name}.bias", tensors[f"{name}.bias"])], name)


def _gelu(g, x, scope):
    """Exact GELU ``x (1 + erf(x / √2)) / 2``, the pattern onnxruntime fuses into Gelu."""
    e = g.op("Erf", [g.op("Div", [x, g.const(math.sqrt(2.0), np.float32)], scope)], scope)
    y = g.op("Mul", [x, g.op("Add", [e, g.const(1.0, np.float32)], scope)], scope)
    return g.op("Mul", [y, g.const(0.5, np.float32)], scope)


def _attention(g, tensors, spec, p, x):
    """timm ``Attention`` on x (N, T, D): per head softmax(Q Kᵀ / √d_h) V, then proj."""
    qkv_layer = spec["linears"][f"{p}.qkv"]
    inner, heads = qkv_layer["m"] // 3, spec["heads"]
    hd = inner // heads
    qkv = _apply_linear(g, tensors, f"{p}.qkv", qkv_layer, x)  # (N, T, 3 inner)
    qkv = g.op("Reshape", [qkv, g.const([0, 0, 3, heads, hd], np.int64)], p)
    qkv = g.op("Transpose", [qkv], p, perm=[2, 0, 3, 1, 4])  # (3, N, h, T, hd)
    q, k, v = (g.op("Gather", [qkv, g.const(i, np.int64)], p, axis=0) for i in range(3))
    s = g.op("MatMul", [q, g.op("Transpose", [k], p, perm=[0, 1, 3, 2])], p)
    a = g.op("Softmax", [g.op("Mul", [s, g.const(hd**-0.5, np.float32)], p)], p, axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [a, v], p)], p, perm=[0, 2, 1, 3])  # (N, T, h, hd)
    o = g.op("Reshape", [o, g.const([0, 0, inner], np.int64)], p)
    return _apply_linear(g, tensors, f"{p}.proj", spec["linears"][f"{p}.proj"], o)


def _embed(g, tensors, spec):
    """Block-0 tokens ``concat(cls, [dist,] conv(images)) + pos_embed``, (N, T, D)."""
    d, p = spec["dim"], spec["patch"]
    conv_in = [INPUT, g.param("patch_embed.proj.weight", tensors["patch_embed.proj.weight"])]
    if "patch_embed.proj.bias" in tensors:
        conv_in.append(g.param("patch_embed.proj.bias", tensors["patch_embed.proj.bias"]))
    x = g.op("Conv", conv_in, "patch_embed", kernel_shape=[p, p], strides=[p, p])  # (N, D, H/p, W/p)
    x = g.op("Reshape", [x, g.const([0, d, -1], np.int64)], "patch_embed")
    x = g.op("Transpose", [x], "patch_embed", perm=[0, 2, 1])  # (N, patches, D) in row-major grid order
    batch = g.op("Gather", [g.op("Shape", [INPUT], "embed"), g.const([0], np.int64)], "embed", axis=0)
    shape = g.op("Concat", [batch, g.const([1, d], np.int64)], "embed", axis=0)  # [N, 1, D]
    prefix = [g.op("Expand", [g.param(key, tensors[key]), shape], "embed")
              for key in ("cls_token", "dist_token")[: spec["prefix"]]]
    h = g.op("Concat", [*prefix, x], "embed", axis=1)
    return g.op("Add", [h, g.param("pos_embed", tensors["pos_embed"])], "embed")


def _head(g, tensors, spec, h):
    """``head(LN(h)[:, 0])``, or ``(head(LN(h)[:, 0]) + head_dist(LN(h)[:, 1])) / 2``."""
    z = g.op("Slice", [h, g.const([0], np.int64), g.const([spec["prefix"]], np.int64), g.const([1], np.int64)],
             "head")
    z = _layer_norm(g, tensors, "norm", z)
    cls = g.op("Gather", [z, g.const(0, np.int64)], "head", axis=1)
    logits = _apply_linear(g, tensors, "head", spec["linears"]["head"], cls)
    if spec["distilled"]:
        dist = g.op("Gather", [z, g.const(1, np.int64)], "head_dist", axis=1)
        logits = g.op("Add", [logits, _apply_linear(g, tensors, "head_dist", spec["linears"]["head_dist"], dist)],
                      "head_dist")
        logits = g.op("Mul", [logits, g.const(0.5, np.float32)], "head_dist")
    return logits


def build_model(tensors, metadata=None, *, num_heads=None, doc=None):
    """The ONNX model of :func:`mrc_ref.vit.forward` for ``tensors``.

    ``logits = head(blocks(embed(images)))`` with pre-norm blocks
    ``h = h + Attn(LN1(h))``, ``h = h + MLP(LN2(h))`` (see the module
    docstring for the layout of each linear layer).

    Parameters
    ----------
    tensors : mapping of str -> ndarray
        A dense, compressed or int8 timm-layout ViT / DeiT (host arrays).
    metadata : mapping of str -> str, optional
        Its metadata (``num_heads``).
    num_heads : int, optional
        Overrides the metadata.
    doc : str, optional
        The model's ``doc_string``.

    Returns
    -------
    onnx.ModelProto
        Opset :data:`OPSET`; input ``images`` (N, C, H, W) float32 with a
        dynamic N, output ``logits`` (N, K) float32.

    Raises
    ------
    MrcError
        Not a ViT the forward runs (:func:`check_vit`), or onnx missing.
    """
    onnx = require_onnx()
    import onnx.numpy_helper  # noqa: F401  (a submodule, for _Graph)

    spec = check_vit(tensors, metadata, num_heads=num_heads)
    g = _Graph(onnx)
    h = _embed(g, tensors, spec)
    for i in range(spec["depth"]):
        p = f"blocks.{i}"
        h = g.op("Add", [h, _attention(g, tensors, spec, f"{p}.attn", _layer_norm(g, tensors, f"{p}.norm1", h))], p)
        z = _layer_norm(g, tensors, f"{p}.norm2", h)
        z = _apply_linear(g, tensors, f"{p}.mlp.fc1", spec["linears"][f"{p}.mlp.fc1"], z)
        z = _apply_linear(g, tensors, f"{p}.mlp.fc2", spec["linears"][f"{p}.mlp.fc2"], _gelu(g, z, f"{p}.mlp"))
        h = g.op("Add", [h, z], p)
    logits = _head(g, tensors, spec, h)
    g.nodes.append(onnx.helper.make_node("Identity", [logits], [OUTPUT], name=OUTPUT))
    T = onnx.TensorProto
    graph = onnx.helper.make_graph(
        g.nodes, "mrc_ref_vit",
        [onnx.helper.make_tensor_value_info(INPUT, T.FLOAT, ["N", spec["channels"], spec["size"], spec["size"]])],
        [onnx.helper.make_tensor_value_info(OUTPUT, T.FLOAT, ["N", spec["classes"]])],
        initializer=g.initializers)
    from .. import __version__

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="mrc_ref", producer_version=__version__,
                                   doc_string=doc or "timm ViT/DeiT forward of mrc_ref.vit")
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {"num_heads": str(spec["heads"]), "image_size": str(spec["size"]),
                                        "factored_layers": str(sum(v["kind"] == "factored"
                                                                   for v in spec["linears"].values())),
                                        "int8_tensors": str(len(spec["int8"]))})
    return model


def count_initializers(model):
    """``(elements, scale_elements)``: the element count of every initializer,
    and of the int8 scales among them (names ending in ``.scale``)."""
    total = scales = 0
    for init in model.graph.initializer:
        size = math.prod(init.dims)
        total += size
        scales += size if init.name.endswith(SCALE_SUFFIX) else 0
    return total, scales


# ----------------------------------------------------------------- files
def read_model(path):
    """``(tensors, metadata, kind)`` of a model file, read by the one reader of
    model files (:func:`mrc_ref.formats.read_model`: a compressed file's
    version and int8 layout checked). ``kind`` is ``"dense"``,
    ``"compressed v1"`` or ``"compressed v2"``."""
    tensors, metadata = formats.read_model(path)
    if metadata.get("format") != formats.COMPRESSED_FORMAT:
        return tensors, metadata, "dense"
    return tensors, metadata, f"compressed v{metadata['version']}"


def export_file(src, dst, *, num_heads=None):
    """Export the model in ``src`` (safetensors) to the ONNX file ``dst``.

    ``dst`` is checked before any work (never ``src``, through any path or
    link) and written atomically; on any error nothing is written.

    Parameters
    ----------
    src : str or path
        A dense, compressed (version 1) or int8 (version 2) ViT / DeiT.
    dst : str or path
    num_heads : int, optional
        Overrides the file's ``num_heads`` metadata.

    Returns
    -------
    dict
        ``source`` (kind of input), ``opset``, ``params`` (initializer
        elements), ``scale_elements`` (of them, int8 scales), ``bytes``
        (file size), ``factored_layers``, ``int8_tensors``.

    Raises
    ------
    MrcError
        One line naming the file and the layer: onnx missing, a bad
        output path, an unreadable file or one that is not a ViT the forward
        runs.
    """
    require_onnx()
    formats.check_outputs([dst], [src])
    tensors, metadata, kind = read_model(src)
    try:
        model = build_model(tensors, metadata, num_heads=num_heads,
                            doc=f"mrc_ref export of {os.path.basename(os.fspath(src))} ({kind})")
    except MrcError as err:
        raise err.at(file=src) from None
    size = model.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise MrcError(f"the ONNX model would take {size} bytes, over protobuf's 2 GiB limit for one file",
                       file=src)
    blob = model.SerializeToString()
    with formats.atomic_path(dst, (src,)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
    params, scales = count_initializers(model)
    props = {p.key: p.value for p in model.metadata_props}
    return {"source": kind, "opset": OPSET, "params": params, "scale_elements": scales, "bytes": len(blob),
            "factored_layers": int(props["factored_layers"]), "int8_tensors": int(props["int8_tensors"])}
