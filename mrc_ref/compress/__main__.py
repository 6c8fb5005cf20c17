"""``python -m mrc_ref.compress weights.safetensors acts.h5 [-o OUT]``

Compress the linear layers of a model: activation-aware SVD (Stage 1),
mixed-rank allocation under a parameter budget (Stage 2) and residual error
compensation (Stage 3). See docs/cli.md.
"""

import os
import sys

from .. import allocate, cli, compensate, example, pipeline, stats
from ..compress import QUANTIZATIONS, compress_files, summary
from ..errors import MrcError


def build_parser():
    d = pipeline.Config()
    p = cli.parser("python -m mrc_ref.compress", __doc__)
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
    cli.add_device(p, d.device)
    cli.add_dtype(p, d.dtype, "internal math")
    p.add_argument("--quantize", choices=QUANTIZATIONS,
                   help="after compression, store the linear layers' matrices (factors and dense weights) as "
                        "symmetric per-output-channel int8 with float32 scales (docs/formats.md)")
    cli.add_quiet(p)
    return p


def main(argv=None):
    parser = build_parser()

    def body(args):
        if args.example:
            if args.weights or args.acts:
                raise MrcError("--example takes no input files")
            args.weights, args.acts = example.WEIGHTS, example.ACTS
            args.output = args.output or "example.compressed.safetensors"
        elif not (args.weights and args.acts):
            parser.error("the weights and acts files are required (or --example)")
        output = args.output or os.path.splitext(args.weights)[0] + ".compressed.safetensors"
        config = pipeline.Config(layers=tuple(p.strip() for p in args.layers.split(",") if p.strip()),
                                 statistic=args.statistic, allocation=args.allocation, reduction=args.reduction,
                                 rank=args.rank, rank_step=args.rank_step, local_search=args.local_search,
                                 residual_rank=args.residual_rank, compensation=args.compensation,
                                 solver=args.solver, damping=args.damping, steps=args.steps, lr=args.lr,
                                 seed=args.seed, dtype=args.dtype, device=args.device)
        report = compress_files(args.weights, args.acts, output, config, report_path=args.report, quiet=args.quiet,
                                sensitivity=args.sensitivity, quantize=args.quantize)
        print(summary(report))
        print(f"wrote {output}" + (f" and {args.report}" if args.report else ""))
        if args.example:
            print(example.accuracy_line(output, quiet=args.quiet))

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
