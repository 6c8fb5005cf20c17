"""``python -m data_tools.synthetic OUTDIR [--seed S]``

Write a small deterministic synthetic ViT and its statistics (weights.safetensors, acts.h5) into OUTDIR.
"""

import sys

from mrc_ref import cli

from . import write_example


def build_parser():
    parser = cli.parser("python -m data_tools.synthetic", __doc__)
    parser.add_argument("outdir", help="output folder (must exist)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(argv=None):
    def body(args):
        for path in write_example(args.outdir, args.seed):
            print(path)

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
