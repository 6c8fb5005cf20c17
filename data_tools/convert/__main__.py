"""``python -m data_tools.convert CHECKPOINT -o weights.safetensors``

Convert a timm or transformers ViT/DeiT checkpoint to timm-layout safetensors.
"""

import sys

from mrc_ref import cli

from . import convert_file


def build_parser():
    parser = cli.parser("python -m data_tools.convert", __doc__)
    parser.add_argument("checkpoint", help=".pth/.pt/.bin/.ckpt or .safetensors")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors")
    parser.add_argument("--num-heads", type=cli.positive_int, default=None,
                        help="attention heads (default: config.json, metadata, or D // 64)")
    return parser


def main(argv=None):
    def body(args):
        metadata = convert_file(args.checkpoint, args.output, num_heads=args.num_heads)
        print(f"wrote {args.output} (num_heads={metadata['num_heads']}, source={metadata['source']})",
              file=sys.stderr)

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
