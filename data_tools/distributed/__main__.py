"""``python -m data_tools.distributed weights.safetensors IMAGES -o acts.h5 --dask ADDRESS``

Capture acts.h5 of a timm-layout ViT over an image folder as shards on a Dask cluster.
"""

import sys

from mrc_ref import cli

from ..capture.options import add_capture_arguments
from . import PROG, run


def build_parser():
    parser = cli.parser(PROG, __doc__)
    add_capture_arguments(parser)
    parser.add_argument("--dask", metavar="ADDRESS", required=True,
                        help="address of the Dask scheduler, e.g. tcp://10.0.0.1:8786")
    parser.add_argument("--shards", metavar="N", type=cli.positive_int, default=None,
                        help="number of shards (default: the cluster's worker threads)")
    return parser


def main(argv=None):
    def body(args):
        attrs = run(args.weights, args.images_folder, args.output, address=args.dask, shards=args.shards,
                    max_images=args.max_images, proxy_images=args.proxy_images, batch_size=args.batch_size,
                    num_heads=args.num_heads, device=args.device, dtype=args.dtype, store_dtype=args.store_dtype)
        if not args.quiet:
            print(f"wrote {args.output} ({attrs['merged_shards']} shards, {attrs['num_images']} images)",
                  file=sys.stderr)

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
