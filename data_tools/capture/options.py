"""The command-line arguments shared by ``python -m data_tools.capture`` and
``python -m data_tools.distributed``."""

from mrc_ref import cli

from . import DEFAULT_BATCH_SIZE, DEFAULT_PROXY_IMAGES

__all__ = ["add_capture_arguments"]


def add_capture_arguments(parser):
    """The arguments shared by ``data_tools.capture`` and ``data_tools.distributed``."""
    parser.add_argument("weights", metavar="WEIGHTS", help="timm-layout .safetensors (dense or compressed)")
    parser.add_argument("images_folder", metavar="IMAGES", help="image folder (flat, or one sub-folder per class)")
    parser.add_argument("-o", "--output", metavar="ACTS", required=True, help="output acts.h5")
    parser.add_argument("--max-images", metavar="M", type=cli.positive_int, default=None,
                        help="use only the first M images of the sorted list (default: all)")
    parser.add_argument("--proxy-images", metavar="P", type=cli.non_negative_int, default=DEFAULT_PROXY_IMAGES,
                        help=f"store block-0 tokens of the first P images (default {DEFAULT_PROXY_IMAGES})")
    cli.add_batch_size(parser, DEFAULT_BATCH_SIZE)
    cli.add_num_heads(parser)
    cli.add_device(parser)
    cli.add_dtype(parser, help="compute dtype of the forward pass and of each batch's products (sums across "
                               "batches are float64 always)")
    parser.add_argument("--store-dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the stored statistics (default float64)")
    cli.add_quiet(parser, "no progress bar")
