"""``python -m mrc_ref.verify COMPRESSED WEIGHTS ACTS [--reduction F | --budget N] [--layers …] [--report R]``

Certify a compressed model, whichever implementation produced it, against
the original weights and their activation statistics: every selected layer's
low-rank part must attain the Stage-1 optimum at its rank (its normalized
output error no more than the optimum's, within the tolerances), and the
model must meet the parameter budget. The allocation's gap to the exact
Stage-2 optimum for the same budget is reported. See docs/cli.md.
"""

import sys

from .. import cli, stats
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL, table, verify_files


def build_parser():
    p = cli.parser("python -m mrc_ref.verify", __doc__)
    p.add_argument("compressed", help="the compressed model: safetensors (mrc_ref, int8 included; a PEFT lora_A/lora_B state dict; dense) or a PEFT save_pretrained directory")
    p.add_argument("weights", help="the original model (safetensors)")
    p.add_argument("acts", help="the original model's statistics (acts.h5, version 1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--reduction", type=float,
                        help="budget ⌊(1 − F) · P_total⌋ of the original's stored parameters (default: the "
                             "compressed file's own, when mrc_ref wrote it; else no budget check)")
    budget.add_argument("--budget", type=int, help="budget in parameters")
    p.add_argument("--layers", help="comma-separated glob patterns of the layers to certify (default: the "
                                    "compressed file's own, when mrc_ref wrote it; else the ViT block linears)")
    p.add_argument("--statistic", choices=list(stats.STATISTICS),
                   help="metric of the certificate (default: the compressed file's own, else gram)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="allowed relative excess of a layer's NMSE over the optimum (default: %(default)g)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help="allowed absolute excess of a layer's NMSE (default: %(default)g)")
    p.add_argument("--rank-rtol", type=float,
                   help="numerical rank of a dense layer: singular values above this times the largest "
                        "(default: max(m, n) times the machine epsilon of the stored dtype)")
    p.add_argument("--lora-scaling", type=float,
                   help="scaling s > 0 of the pairs of a bare PEFT state dict, W = s · lora_B lora_A (default: 1; "
                        "a PEFT save_pretrained directory gives each pair's own, lora_alpha / r)")
    p.add_argument("--max-gap", type=float,
                   help="also fail when the allocation's relative gap to the exact optimum exceeds this")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="print only the verdict")
    return p


def main(argv=None):
    parser = build_parser()

    def body(args):
        report = verify_files(args.compressed, args.weights, args.acts, reduction=args.reduction,
                              budget=args.budget, layers=args.layers, statistic=args.statistic, rtol=args.rtol,
                              atol=args.atol, rank_rtol=args.rank_rtol, lora_scaling=args.lora_scaling,
                              max_gap=args.max_gap, report_path=args.report)
        if not args.quiet:
            print(table(report))
        for message in report["failures"]:
            print(f"{parser.prog}: certificate failed: {message}", file=sys.stderr)
        n = len(report["layers"])
        print(f"PASS: {n} layers certified" if report["passed"] else
              f"FAIL: {len(report['failures'])} certificate(s) failed")
        if args.report:
            print(f"wrote {args.report}")
        return 0 if report["passed"] else 1

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
