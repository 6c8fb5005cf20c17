"""Compress a model's files: read the weights and statistics, run the three
stages (:func:`mrc_ref.pipeline.run`), write the compressed model and the
report atomically. The command line is ``python -m mrc_ref.compress``
(docs/cli.md).
"""

import dataclasses
import os

from .. import formats, pipeline, quantize
from ..sequential import make_sequential
from ..backend import get_xp
from ..errors import ConfigError
from ..progress import progress_bar

__all__ = ["QUANTIZATIONS", "compress_files", "summary", "quantize_output"]

#: Values of ``--quantize``: the post-training quantization of the output (:mod:`mrc_ref.quantize`).
QUANTIZATIONS = ("int8",)


def summary(report):
    """The readable summary table of a report."""
    rows = [("layer", "shape", "rank", "q", "params", "NMSE stage 1", "NMSE stage 3", "damped loss", "|PQ|/|W|")]
    for e in report["layers"]:
        rows.append((e["name"], "{}x{}".format(*e["shape"]), "dense" if e["rank"] is None else str(e["rank"]),
                     str(e["residual_rank"]), f"{e['params_before']} -> {e['params_after']}",
                     f"{e['nmse_stage1']:.3e}", f"{e['nmse_stage3']:.3e}", f"{e['loss_stage3']:.3e}",
                     f"{e['residual_norm']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    t, c = report["totals"], report["config"]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"statistic {c['statistic']}, allocation {c['allocation']}, compensation {c['compensation']} "
                 f"({c['solver']}, damping {c['damping']:g}), residual rank {c['residual_rank']}")
    a = report["allocation"]
    if a["lower_bound"] is not None:
        gap = "n/a" if a["relative_gap"] is None else f"{a['relative_gap']:.2%}"
        label = "Σ NMSE" if a.get("weights", "uniform") == "uniform" else "Σ w·NMSE"
        lines.append(f"stage 2 objective {label} {a['objective']:.6g}; lower bound {a['lower_bound']:.6g} "
                     f"({a['bound']}); relative gap {gap}")
    lines.append(f"parameters {t['params_before']} -> {t['params_after']} "
                 f"(reduction {t['reduction_achieved']:.2%}"
                 + (f", target {t['reduction_target']:.2%})" if t["reduction_target"] is not None else ")")
                 + f"; {t['layers_factored']} of {t['layers_selected']} selected layers factored")
    return "\n".join(lines)


def quantize_output(out, report, scheme="int8"):
    """Quantize a compressed model's linear layers (:func:`mrc_ref.quantize.quantize_tensors`)
    and record it in ``report["quantization"]``: ``scheme``, ``tensors`` (the
    int8 keys), ``scale_elements`` and the data bytes before and after.
    Returns the quantized tensors."""
    if scheme not in QUANTIZATIONS:
        raise ConfigError("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, got {scheme!r}")
    quantized = quantize.quantize_tensors(out)
    keys = quantize.quantized_keys(quantized)
    report["quantization"] = {"scheme": quantize.SCHEME, "tensors": keys,
                              "scale_elements": sum(int(quantized[k + quantize.SCALE_SUFFIX].size) for k in keys),
                              "bytes_before": quantize.storage_bytes(out),
                              "bytes_after": quantize.storage_bytes(quantized)}
    return quantized


def compress_files(weights, acts, output, config, *, report_path=None, quiet=True, sensitivity=None, quantize=None,
                   stage1=None):
    """Read the inputs, run the pipeline, write the outputs atomically.

    ``sensitivity``: an optional sensitivity file whose weights replace
    ``config.sensitivity``. ``quantize``: ``"int8"`` stores the output's
    linear layers int8 (:func:`quantize_output`). ``stage1``: a
    :func:`mrc_ref.pipeline.stage1` result of the same inputs, reused instead
    of recomputed. Returns the report (dict).
    """
    inputs = (weights, acts, sensitivity)
    formats.check_outputs((output, report_path), inputs)  # refuse before any work is done
    pipeline.check_config(config)
    xp = get_xp(config.device)
    metric = None
    if sensitivity is not None:
        document = formats.read_sensitivity(sensitivity)
        metric = document["metric"]
        config = dataclasses.replace(config, sensitivity={k: v["weight"] for k, v in document["layers"].items()})
    tensors, metadata = formats.read_original(weights)
    with formats.open_activations(acts) as f, formats.scratch_space() as scratch:
        pos = tensors.get("pos_embed")
        proxy = (formats.read_proxy_tokens(f, pos.shape[1:] if getattr(pos, "ndim", 0) == 3 else None, acts,
                                           lazy=True)  # checked, read a batch at a time by the sequential pass
                 if config.compensation in ("auto", "sequential") else None)
        sequential = None
        if proxy is not None:
            sequential = make_sequential(tensors, metadata, proxy, progress=progress_bar(quiet), source=acts,
                                         scratch=scratch)

        def load_stats(name):  # shapes checked against the weight before any data is read
            return formats.read_layer_stats(f, name, acts, n=int(tensors[name + ".weight"].shape[1]))

        out, report = pipeline.run(tensors, load_stats, config,
                                   xp=xp, progress=progress_bar(quiet), sequential=sequential,
                                   files=(weights, acts, sensitivity), stage1=stage1)
    report["inputs"] = {"weights": os.path.basename(weights), "acts": os.path.basename(acts)}
    if sensitivity is not None:
        report["inputs"].update(sensitivity=os.path.basename(sensitivity), sensitivity_metric=metric)
    if quantize is not None:
        out = quantize_output(out, report, quantize)
    blobs = {output: formats.safetensors_bytes(out, formats.compressed_metadata(report, metadata))}
    if report_path:  # a report JSON cannot hold is refused before anything is written
        blobs[report_path] = formats.json_text(report, report_path).encode("utf-8")
    formats.write_files(blobs, inputs)  # both outputs or neither
    return report
