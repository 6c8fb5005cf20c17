"""Convert a ViT / DeiT checkpoint to the canonical timm safetensors layout.

Usage::

    python -m data_tools.convert CHECKPOINT -o weights.safetensors [--num-heads N]

Inputs: timm state dicts (``.pth``/``.pt``/``.bin``/``.ckpt`` through
``torch.load(weights_only=True)``, or ``.safetensors``), optionally wrapped
in a top-level ``model`` / ``state_dict`` key, and Hugging Face
``transformers`` ViT / DeiT state dicts, in the older
(``encoder.layer.N.attention.attention.query`` ...) or the current
(``layers.N.attention.q_proj`` ...) module names, with or without the
``vit.`` / ``deit.`` prefix. Separate q, k, v projections are fused into
``attn.qkv`` (concatenated along the output axis in the order q, k, v).

The output holds float32 tensors (float64 kept as stored) and the metadata
``num_heads`` (from ``--num-heads``, else ``num_attention_heads`` of a
``config.json`` beside the checkpoint, else the input's metadata, else
``D // 64``) and ``source`` (the original format).
"""

import os
import re

import numpy as np

from mrc_ref import vit
from mrc_ref.errors import ConfigError, MrcError, describe
from mrc_ref.formats import check_input, read_json, read_model, write_safetensors
from mrc_ref.layout import FACTOR_SUFFIXES

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_LINEAR_SUFFIX = "|".join(("weight", "bias") + FACTOR_SUFFIXES)
_CANONICAL = [
    re.compile(p)
    for p in (
        r"^patch_embed\.proj\.(weight|bias)$",
        r"^(cls_token|dist_token|pos_embed)$",
        r"^norm\.(weight|bias)$",
        rf"^(head|head_dist)\.({_LINEAR_SUFFIX})$",
        r"^blocks\.\d+\.norm[12]\.(weight|bias)$",
        rf"^blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.({_LINEAR_SUFFIX})$",
    )
]
# Hugging Face names -> timm names (after removing the vit./deit. prefix).
_HF_RENAMES = [
    (re.compile(p), r)
    for p, r in (
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.distillation_token$", "dist_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
        (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^layers\.(\d+)\.attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
        (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
        (r"^layernorm\.(weight|bias)$", r"norm.\1"),
        (r"^(?:classifier|cls_classifier)\.(weight|bias)$", r"head.\1"),
        (r"^distillation_classifier\.(weight|bias)$", r"head_dist.\1"),
    )
]
_HF_QKV = [
    re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"),
    re.compile(r"^layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$"),
]
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
# Hugging Face tensors that play no part in classification.
_HF_IGNORED = re.compile(r"^(pooler\.dense\.(weight|bias)|embeddings\.mask_token|embeddings\.position_ids)$")


# ----------------------------------------------------------------- pure conversion
def _float_array(name, value):
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise MrcError(f"tensor has dtype {arr.dtype}, expected a float tensor", layer=name)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return arr


def detect_layout(keys):
    """``"timm"`` or ``"transformers"`` from the tensor names, or MrcError."""
    keys = list(keys)
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "timm"
    stripped = [_strip_hf_prefix(k) for k in keys]
    if any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in stripped):
        return "transformers"
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    raise MrcError(f"unknown checkpoint layout (not a timm or transformers ViT/DeiT); tensors: {shown or 'none'}")


def _strip_hf_prefix(key):
    for prefix in ("vit.", "deit."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _from_transformers(state):
    out, qkv, unknown = {}, {}, []
    for key, value in state.items():
        k = _strip_hf_prefix(key)
        if _HF_IGNORED.match(k):
            continue
        for pattern in _HF_QKV:
            m = pattern.match(k)
            if m:
                qkv.setdefault((int(m.group(1)), m.group(3)), [None, None, None])[_QKV_INDEX[m.group(2)]] = value
                break
        else:
            for pattern, repl in _HF_RENAMES:
                if pattern.match(k):
                    new = pattern.sub(repl, k)
                    if new in out:
                        raise MrcError("given twice (old and new transformers names?)", layer=new)
                    out[new] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        _reject_unknown(unknown, "transformers ViT/DeiT")
    for (index, kind), parts in sorted(qkv.items()):
        name = f"blocks.{index}.attn.qkv.{kind}"
        if kind == "weight":
            if any(p is None for p in parts):
                raise MrcError("needs query, key and value weights", layer=f"blocks.{index}.attn.qkv")
        else:  # a missing q/k/v bias is a zero bias
            ref = next(p for p in parts if p is not None)
            parts = [np.zeros_like(ref) if p is None else p for p in parts]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise MrcError("query, key and value shapes differ", layer=f"blocks.{index}.attn.qkv")
        out[name] = np.concatenate(parts, axis=0)
    return out


def _reject_unknown(keys, what):
    shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
    raise MrcError(f"tensors not in a plain {what} layout: {shown}")


def _check_canonical(tensors):
    unknown = [k for k in tensors if not any(p.match(k) for p in _CANONICAL)]
    if unknown:
        _reject_unknown(unknown, "timm VisionTransformer/DeiT")
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight", "norm.bias"):
        if key not in tensors:
            raise MrcError("missing tensor", layer=key)
    n_blocks = vit.depth(tensors)
    if n_blocks == 0:
        raise MrcError("no transformer blocks (blocks.0.*)")
    required = [f"blocks.{i}.{leaf}" for i in range(n_blocks) for leaf in vit.BLOCK_LINEARS]
    for name in required:
        if not vit.has_linear(tensors, name):
            raise MrcError("missing weight", layer=name)
    for i in range(n_blocks):
        for norm in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{norm}.{kind}" not in tensors:
                    raise MrcError("missing tensor", layer=f"blocks.{i}.{norm}.{kind}")
    for key, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise MrcError("contains NaN or Inf", layer=key)
    if "head_dist.weight" in tensors and "dist_token" not in tensors:
        raise MrcError("head_dist without dist_token", layer="head_dist")
    d = int(tensors["patch_embed.proj.weight"].shape[0])
    for key in ("cls_token", "dist_token", "pos_embed"):
        if key in tensors and (tensors[key].ndim != 3 or tensors[key].shape[-1] != d):
            raise MrcError(f"shape {tuple(tensors[key].shape)} does not match width {d}", layer=key)


def convert_state_dict(state, num_heads=None, metadata=None):
    """Convert a timm or transformers ViT/DeiT state dict to the timm layout.

    Parameters
    ----------
    state : mapping of str -> array-like
        Host arrays (NumPy, or anything ``numpy.asarray`` accepts).
    num_heads : int, optional
        Recorded in the metadata; default ``metadata["num_heads"]``, else
        ``D // 64`` (see :func:`mrc_ref.vit.resolve_num_heads`).
    metadata : mapping of str -> str, optional
        The input's metadata.

    Returns
    -------
    tensors : dict of str -> ndarray
        timm names; float32 (float64 kept), q/k/v fused into ``attn.qkv``.
    metadata : dict of str -> str
        ``num_heads`` and ``source`` (``"timm"`` or ``"transformers"``).

    Raises
    ------
    MrcError
        Unknown or incomplete layout, non-float tensors, bad ``num_heads``.
    """
    if not state:
        raise MrcError("the checkpoint holds no tensors")
    state = {str(k): _float_array(str(k), v) for k, v in state.items()}
    layout = detect_layout(state)
    tensors = dict(state) if layout == "timm" else _from_transformers(state)
    _check_canonical(tensors)
    heads = vit.resolve_num_heads(tensors, num_heads, metadata)
    return tensors, {"num_heads": str(heads), "source": layout}


# ----------------------------------------------------------------- files
def _unwrap(obj, path):
    for _ in range(3):
        if isinstance(obj, dict):
            for key in WRAPPER_KEYS:
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise MrcError(f"checkpoint holds a {type(obj).__name__}, not a state dict", file=path)
    if obj and all(str(k).startswith("module.") for k in obj):  # DistributedDataParallel
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return obj


def _torch_to_numpy(state, path):
    import torch

    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise MrcError(f"entry is a {type(value).__name__}, not a tensor", file=path, layer=str(key))
        t = value.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        out[str(key)] = t.numpy()
    return out


def load_checkpoint(path):
    """Read a checkpoint file into host arrays.

    Returns
    -------
    state : dict of str -> ndarray
    metadata : dict of str -> str
        The safetensors metadata (empty for torch files).
    container : str
        ``"safetensors"`` or ``"pytorch"``.
    """
    path = check_input(path)  # a FIFO or a link loop is refused before anything opens it
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        tensors, metadata = read_model(path)
        return tensors, metadata, "safetensors"
    if suffix not in TORCH_SUFFIXES:
        raise MrcError(
            f"unknown checkpoint extension {suffix or '(none)'!r}; expected .safetensors or "
            + "/".join(TORCH_SUFFIXES),
            file=path,
        )
    try:
        import torch
    except Exception:
        raise MrcError(
            "reading PyTorch checkpoints needs torch (pip install torch), or convert to .safetensors first",
            file=path,
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MrcError(f"not a readable PyTorch checkpoint ({type(exc).__name__}: {reason})", file=path) from None
    return _torch_to_numpy(_unwrap(obj, path), path), {}, "pytorch"


#: The keys of a ``config.json`` that give the head count, in order of preference.
CONFIG_HEADS_KEYS = ("num_attention_heads", "num_heads")


def read_config(path):
    """The one validating reader of the ``config.json`` beside checkpoint
    ``path`` (a transformers or timm model configuration).

    Only the head count is read: ``num_attention_heads`` (else
    ``num_heads``) must be a positive integer (never a boolean, a float or a
    string). The file must be a regular file (a FIFO, a directory or a link
    loop is refused: :func:`mrc_ref.formats.check_input`), strict JSON
    (:func:`mrc_ref.formats.read_json`) and a JSON object.

    Returns
    -------
    config : str
        The path of ``config.json`` (whether it exists or not).
    key : str or None
        The key the head count came from, None when the file or the key is absent.
    heads : int or None

    Raises
    ------
    MrcError
        Naming ``config.json``.
    """
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.lexists(config):
        return config, None, None
    data = read_json(config, "model configuration")
    if not isinstance(data, dict):
        raise MrcError(f"is not a JSON object (got {describe(data)})", file=config)
    for key in CONFIG_HEADS_KEYS:
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MrcError(f"{key} must be a positive integer, got {describe(value)}", file=config)
            return config, key, value
    return config, None, None


def convert_file(src, dst, num_heads=None):
    """Convert checkpoint ``src`` and write ``dst`` atomically; returns the metadata."""
    state, in_meta, container = load_checkpoint(src)
    config, key = None, None
    if num_heads is None:  # config.json is read only when --num-heads is not given
        config, key, num_heads = read_config(src)
    try:
        tensors, metadata = convert_state_dict(state, num_heads=num_heads, metadata=in_meta)
    except ConfigError as err:
        if key is not None and err.field == "num_heads":  # the head count of config.json: blame it
            raise MrcError(f"{key} {err.problem}", file=config) from None
        raise err.at(file=src) from None
    except MrcError as err:
        raise err.at(file=src) from None
    metadata["source"] = f"{metadata['source']}-{container}"
    write_safetensors(dst, tensors, metadata, inputs=(src,))
    return metadata
