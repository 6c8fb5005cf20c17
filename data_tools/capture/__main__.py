"""``python -m data_tools.capture weights.safetensors IMAGES -o acts.h5 [--shard K/N] …``

Capture per-layer input statistics (acts.h5) of a timm-layout ViT over an image folder.
"""

import sys

from mrc_ref import cli

from . import parse_shard, run
from .options import add_capture_arguments

PROG = "python -m data_tools.capture"


def build_parser():
    parser = cli.parser(PROG, __doc__)
    add_capture_arguments(parser)
    parser.add_argument("--shard", metavar="K/N", default=None,
                        help="capture only shard K of N (0-based K: 0/N .. N-1/N), a contiguous slice of the "
                             "sorted image list; add the parts with python -m data_tools.merge")
    return parser


def main(argv=None):
    def body(args):
        shard = (0, 1) if args.shard is None else parse_shard(args.shard)
        n = run(args.weights, args.images_folder, args.output, max_images=args.max_images, shard=shard,
                proxy_images=args.proxy_images, batch_size=args.batch_size, num_heads=args.num_heads,
                device=args.device, quiet=args.quiet, dtype=args.dtype, store_dtype=args.store_dtype)
        if not args.quiet:
            print(f"wrote {args.output} ({n} images)", file=sys.stderr)

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
