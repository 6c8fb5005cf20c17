"""``python -m data_tools.merge PART [PART …] -o acts.h5``

Add acts.h5 parts written by python -m data_tools.capture --shard K/N into one acts.h5.
"""

import sys

from mrc_ref import cli

from . import merge_files


def build_parser():
    parser = cli.parser("python -m data_tools.merge", __doc__)
    parser.add_argument("parts", metavar="PART", nargs="+", help="the parts, one per shard, in any order")
    parser.add_argument("-o", "--output", metavar="ACTS", required=True, help="output acts.h5")
    parser.add_argument("--store-dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the stored statistics (the sums are float64; default float64)")
    cli.add_quiet(parser, "no summary line")
    return parser


def main(argv=None):
    def body(args):
        attrs = merge_files(args.parts, args.output, store_dtype=args.store_dtype)
        if not args.quiet:
            print(f"wrote {args.output} ({attrs['merged_shards']} shards, {attrs['num_images']} images)",
                  file=sys.stderr)

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
