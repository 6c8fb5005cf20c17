"""``python -m mrc_ref.report WEIGHTS ACTS IMAGES -o DIR``

The audit report: the paper's figures regenerated on a model, its claims
held against measurements (main grid of methods × reductions, int8
post-training quantization, per-layer certificates), written as
``DIR/report.md`` with PNG figures beside it, one self-contained
``DIR/report.html`` and the data of every table and figure in
``DIR/report.json``. ``--example`` runs it on the embedded example. Every
number comes from the code paths of ``compress`` and ``evaluate``. See
docs/report.md.
"""

import sys

from .. import cli, example, pipeline
from ..errors import MrcError
from .orchestration import report_files
from .grid import AT, PROG, REDUCTIONS


def build_parser():
    p = cli.parser(PROG, __doc__)
    p.add_argument("weights", nargs="?", help="model weights (safetensors, timm-layout ViT)")
    p.add_argument("acts", nargs="?", help="its activation statistics (acts.h5; proxy tokens for sequential Stage 3)")
    p.add_argument("images", nargs="?", metavar="IMAGES", help="labelled image folder (one sub-folder per class)")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="report folder: created if missing (its parent must exist); report.md, report.html, "
                        "report.json and the figures are replaced, nothing else in it is touched")
    p.add_argument("--example", action="store_true",
                   help="run on the embedded example (its model, statistics and held-out test digits)")
    p.add_argument("--reductions", type=float, nargs="+", default=list(REDUCTIONS),
                   help="reductions of the main grid (default: %(default)s)")
    p.add_argument("--at", type=float, default=AT,
                   help="reduction of the allocation map, Fig. 3 and the certificates; added to the grid if "
                        "missing (default: %(default)s)")
    p.add_argument("--layers", default=",".join(pipeline.DEFAULT_LAYERS),
                   help="comma-separated glob patterns of the layers every run compresses (default: %(default)s)")
    p.add_argument("--block", type=int, default=0, help="block of Fig. 1 (default: %(default)s, the first)")
    p.add_argument("--images", dest="limit", type=cli.positive_int, metavar="N",
                   help="use the first N images (default: all)")
    cli.add_batch_size(p, 64)
    p.add_argument("--sensitivity", metavar="FILE",
                   help="sensitivity weights (compress --sensitivity): adds the calibrated rows and their figure")
    p.add_argument("--no-adam", action="store_true", help="leave out the optimal + Adam rows (the slowest)")
    cli.add_device(p)
    p.add_argument("--blas-threads", type=int, metavar="N",
                   help="BLAS threads during the runs (default: as configured; 1 with --example, whose small "
                        "matrices run faster on one thread)")
    cli.add_quiet(p, "no progress bar")
    return p


def main(argv=None):
    parser = build_parser()

    def body(args):
        if args.example:
            if args.weights or args.acts or args.images:
                raise MrcError("--example takes no input files")
            args.weights, args.acts, args.images = example.WEIGHTS, example.ACTS, example.TEST_IMAGES
            args.sensitivity = args.sensitivity or example.SENSITIVITY
            if args.blas_threads is None:
                args.blas_threads = 1  # the example's 64-wide matrices are too small for BLAS threads to pay
        elif not (args.weights and args.acts and args.images):
            parser.error("WEIGHTS, ACTS and IMAGES are required (or --example)")
        written, timings = report_files(
            args.weights, args.acts, args.images, args.output, reductions=args.reductions, at=args.at,
            block=args.block, limit=args.limit, batch_size=args.batch_size, device=args.device,
            sensitivity=args.sensitivity, adam=not args.no_adam, blas_threads=args.blas_threads, quiet=args.quiet,
            layers=tuple(p.strip() for p in args.layers.split(",") if p.strip()),
            command=" ".join([PROG, *(argv if argv is not None else sys.argv[1:])]))
        print(f"wrote {', '.join(written)} in {args.output}")
        print("timings:")
        for key, seconds in timings.items():
            print(f"  {key:<45} {seconds:8.1f} s")
        print(f"  {'total':<45} {sum(timings.values()):8.1f} s")

    return cli.run(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
