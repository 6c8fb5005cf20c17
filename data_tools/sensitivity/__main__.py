"""``python -m data_tools.sensitivity WEIGHTS ACTS -o sens.json [--images DIR] [--layers …]``

Measure the end-to-end sensitivity of each selected layer of a timm-layout
ViT and write it as a ``mrc_ref.sensitivity`` file (docs/formats.md) for
``python -m mrc_ref.compress --sensitivity``. See docs/sensitivity.md.
"""

import sys

from mrc_ref import cli, pipeline, stats

from . import BATCH_IMAGES, NMSE_RANGE, POINTS, PROG, run


def build_parser():
    p = cli.parser(PROG, __doc__)
    p.add_argument("weights", metavar="WEIGHTS", help="timm-layout ViT (.safetensors)")
    p.add_argument("acts", metavar="ACTS", help="acts.h5: the Stage-1 statistics (and proxy/tokens)")
    p.add_argument("-o", "--output", required=True, help="output sensitivity file (JSON)")
    p.add_argument("--images", metavar="DIR", help="run these images instead of the proxy tokens of ACTS")
    p.add_argument("--max-images", type=cli.positive_int, metavar="N",
                   help="use the first N images or proxy tokens")
    p.add_argument("--layers", default=",".join(pipeline.DEFAULT_LAYERS),
                   help="comma-separated glob patterns of layer names (default: %(default)s)")
    p.add_argument("--statistic", default="gram", choices=list(stats.STATISTICS),
                   help="Stage-1 metric of the truncations; use that of the compression (default: %(default)s)")
    p.add_argument("--points", type=int, default=POINTS, help="truncations per layer (default: %(default)s)")
    p.add_argument("--nmse-range", type=float, nargs=2, default=list(NMSE_RANGE), metavar=("LO", "HI"),
                   help="NMSE range the truncations spread over (default: %(default)s)")
    cli.add_batch_size(p, BATCH_IMAGES)
    cli.add_num_heads(p)
    cli.add_device(p)
    cli.add_dtype(p, help="forward pass")
    cli.add_quiet(p)
    return p


def main(argv=None):
    def body(args):
        layers = tuple(x.strip() for x in args.layers.split(",") if x.strip())
        measured, seconds = run(args.weights, args.acts, args.output, images=args.images, max_images=args.max_images,
                                layers=layers, statistic=args.statistic, points=args.points,
                                nmse_range=tuple(args.nmse_range), batch=args.batch_size, num_heads=args.num_heads,
                                device=args.device, dtype=args.dtype, quiet=args.quiet)
        width = max(map(len, measured))
        for name, e in measured.items():
            print(f"{name:<{width}}  w {e['weight']:.4g}  ranks {e['ranks']}  fit residual {e['residual']:.3f}")
        print(f"wrote {args.output} ({len(measured)} layers, {seconds:.1f} s)")

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
