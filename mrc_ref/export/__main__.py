"""``python -m mrc_ref.export MODEL.safetensors [-o model.onnx]``

Export a dense, compressed or int8 ViT / DeiT to one ONNX graph of its
forward pass (images (N, C, H, W) float32 to logits), factored layers kept
factored and int8 matrices kept int8. Needs the onnx extra. See docs/export.md.
"""

import os
import sys

from .. import cli
from ..export import export_file


def build_parser():
    p = cli.parser("python -m mrc_ref.export", __doc__)
    p.add_argument("model", help="model weights: dense, compressed or int8 (safetensors)")
    p.add_argument("-o", "--output", help="ONNX file to write (default: <model without extension>.onnx)")
    cli.add_num_heads(p)
    return p


def main(argv=None):
    def body(args):
        output = args.output or os.path.splitext(args.model)[0] + ".onnx"
        summary = export_file(args.model, output, num_heads=args.num_heads)
        scales = f", of which {summary['scale_elements']} int8 scales" if summary["scale_elements"] else ""
        print(f"wrote {output}: opset {summary['opset']}, {summary['source']} model, "
              f"{summary['params']} parameters{scales}, {summary['factored_layers']} factored layers, "
              f"{summary['bytes']} bytes")

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
