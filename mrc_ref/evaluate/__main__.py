"""``python -m mrc_ref.evaluate weights.safetensors IMAGES [--reference ORIGINAL]``

Evaluate a dense or compressed ViT on an image folder: top-1/top-5 accuracy
when the folder has class sub-folders, and agreement with a reference model
(top-1 agreement, mean KL, output NMSE) when ``--reference`` is given.
"""

import json
import sys

from .. import cli
from ..evaluate import evaluate_files


def build_parser():
    p = cli.parser("python -m mrc_ref.evaluate", __doc__)
    p.add_argument("weights", help="model weights, dense or compressed (safetensors)")
    p.add_argument("images", metavar="IMAGES", help="image folder (class sub-folders, or flat)")
    p.add_argument("--reference", help="original model to compare the outputs with")
    p.add_argument("--images", dest="limit", type=cli.positive_int, metavar="N",
                   help="use the first N images (default: all)")
    cli.add_batch_size(p, 64)
    p.add_argument("--crop-pct", type=float, default=0.875,
                   help="centre-crop fraction of the DeiT eval transform, in (0, 1] (default: %(default)s)")
    cli.add_num_heads(p)
    cli.add_device(p)
    cli.add_dtype(p, help="dtype of the forward pass")
    p.add_argument("--save-logits", help="write the logits (and labels) to this .npz")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    cli.add_quiet(p, "no progress bar")
    return p


def main(argv=None):
    def body(args):
        result = evaluate_files(args.weights, args.images, reference=args.reference, save_logits=args.save_logits,
                                num_heads=args.num_heads, batch_size=args.batch_size, limit=args.limit,
                                crop_pct=args.crop_pct, device=args.device, dtype=args.dtype, quiet=args.quiet)
        if args.json:
            print(json.dumps(result, allow_nan=False))  # strict JSON: the logits are finite, so are the metrics
        else:
            for key, value in result.items():
                print(f"{key:>15}: {value:.4f}" if isinstance(value, float) else f"{key:>15}: {value}")

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
