"""``python -m mrc_ref.compress weights.safetensors acts.h5 [-o OUT]``

Compress the linear layers of a model: activation-aware SVD (Stage 1),
mixed-rank allocation under a parameter budget (Stage 2) and residual error
compensation (Stage 3). See docs/cli.md.
"""

import argparse
import dataclasses
import os
import sys

from . import allocate, compensate, formats, pipeline, quantize, stats
from .backend import DEVICES, DTYPES, get_xp
from .errors import MrcError


#: Values of ``--quantize``: the post-training quantization of the output (:mod:`mrc_ref.quantize`).
QUANTIZATIONS = ("int8",)


def build_parser():
    d = pipeline.Config()
    description = " ".join(__doc__.split("\n\n")[1].replace("``", "").split())  # the docstring's 2nd paragraph
    p = argparse.ArgumentParser(prog="python -m mrc_ref.compress", description=description)
    p.add_argument("weights", nargs="?", help="model weights (safetensors)")
    p.add_argument("acts", nargs="?", help="activation statistics (acts.h5, version 1)")
    p.add_argument("-o", "--output", help="compressed safetensors (default: <weights>.compressed.safetensors)")
    p.add_argument("--example", action="store_true",
                   help="run on the embedded example model (no input files needed)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--layers", default=",".join(d.layers),
                   help="comma-separated glob patterns of layer names (default: %(default)s)")
    p.add_argument("--statistic", default=d.statistic, choices=list(stats.STATISTICS),
                   help="metric of Stage 1 (default: %(default)s)")
    p.add_argument("--allocation", default=d.allocation, choices=list(allocate.ALLOCATIONS),
                   help="rank allocation rule of Stage 2 (default: %(default)s)")
    p.add_argument("--reduction", type=float, default=d.reduction,
                   help="fraction of the model's stored parameters to remove (default: %(default)s)")
    p.add_argument("--rank", type=int, help="fix every selected layer at this rank instead of a budget")
    p.add_argument("--rank-step", type=int, default=d.rank_step, help="ranks removed per greedy step (default: %(default)s)")
    p.add_argument("--local-search", action="store_true",
                   help="after the allocation, move single ranks between layers while the total NMSE falls")
    p.add_argument("--sensitivity", metavar="FILE",
                   help="per-layer sensitivity weights (JSON, format mrc_ref.sensitivity): Stage 2 minimises "
                        "Σ w_l NMSE_l instead of Σ NMSE_l; layers the file lacks get the mean weight")
    p.add_argument("--residual-rank", type=int, default=d.residual_rank,
                   help="rank q of the residual P Q, counted in the budget (default: %(default)s)")
    p.add_argument("--compensation", default=d.compensation, choices=["auto", *pipeline.COMPENSATIONS],
                   help="Stage 3 mode; auto = sequential when acts.h5 has proxy tokens, else local "
                        "(default: %(default)s)")
    p.add_argument("--solver", default=d.solver, choices=list(compensate.SOLVERS),
                   help="Stage 3 solver: exact (closed form) or adam (the paper's procedure) (default: %(default)s)")
    p.add_argument("--damping", type=float, default=d.damping,
                   help="damp of the Stage 3 loss, δ = damp · tr(C̃)/n, ≥ 0 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per layer (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the residual's initial Q (default: %(default)s)")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="NumPy or CuPy (default: %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="internal math (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZATIONS,
                   help="after compression, store the linear layers' matrices (factors and dense weights) as "
                        "symmetric per-output-channel int8 with float32 scales (docs/formats.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args):
    """The :class:`~mrc_ref.pipeline.Config` of parsed arguments."""
    layers = tuple(p.strip() for p in args.layers.split(",") if p.strip())
    return pipeline.Config(layers=layers, statistic=args.statistic, allocation=args.allocation,
                           reduction=args.reduction, rank=args.rank, rank_step=args.rank_step,
                           local_search=args.local_search,
                           residual_rank=args.residual_rank, compensation=args.compensation,
                           solver=args.solver, damping=args.damping, steps=args.steps, lr=args.lr,
                           seed=args.seed, dtype=args.dtype, device=args.device)


def progress_bar(quiet):
    """A ``progress(iterable, desc)`` wrapper printing tqdm bars on stderr."""
    from tqdm import tqdm

    # disable=None: bars only on a terminal, so a failing run's stderr stays one line
    return lambda it, desc: tqdm(it, desc=desc, disable=True if quiet else None, file=sys.stderr, leave=False)


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
        raise MrcError(f"unknown quantization {scheme!r}; expected one of {', '.join(QUANTIZATIONS)}")
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
    tensors, metadata = formats.read_safetensors(weights)
    with formats.open_activations(acts) as f, formats.scratch_space() as scratch:
        pos = tensors.get("pos_embed")
        proxy = (formats.read_proxy_tokens(f, pos.shape[1:] if getattr(pos, "ndim", 0) == 3 else None, acts,
                                           lazy=True)  # checked, read a batch at a time by the sequential pass
                 if config.compensation in ("auto", "sequential") else None)
        sequential = None
        if proxy is not None:
            from .sequential import make_sequential  # needs the ViT forward pass

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
    formats.json_text(report, report_path)  # a report JSON cannot hold is refused before anything is written
    formats.write_safetensors(output, out, formats.compressed_metadata(report, metadata), inputs=inputs)
    if report_path:
        formats.write_json(report_path, report, inputs=inputs)
    return report


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.example:
            if args.weights or args.acts:
                raise MrcError("--example takes no input files")
            from .example import example_paths

            args.weights, args.acts = example_paths()
            args.output = args.output or "example.compressed.safetensors"
        elif not (args.weights and args.acts):
            parser.error("the weights and acts files are required (or --example)")
        output = args.output or os.path.splitext(args.weights)[0] + ".compressed.safetensors"
        report = compress_files(args.weights, args.acts, output, config_from_args(args),
                                report_path=args.report, quiet=args.quiet, sensitivity=args.sensitivity,
                                quantize=args.quantize)
        print(summary(report))
        print(f"wrote {output}" + (f" and {args.report}" if args.report else ""))
        if args.example:
            from .example import print_accuracy

            print_accuracy(output, quiet=args.quiet)
    except MrcError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
