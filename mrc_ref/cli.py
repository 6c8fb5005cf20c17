"""What every command line shares: the parser, the common flags, one-line
errors and the exit codes (docs/cli.md, "Exit codes and errors").

A command module holds its ``build_parser()`` and ``main(argv=None)`` and
nothing else; ``main`` is ``cli.run(build_parser(), body, argv)``. Usage
errors and user errors (:class:`~mrc_ref.errors.MrcError`) are one stderr
line ``<prog>: error: <message>`` and exit code 2; a
:class:`~mrc_ref.errors.ConfigError` names the option as the command's flag
(``--residual-rank`` for ``residual_rank``). Any other exception is a bug
in mrc_ref and stays a traceback.
"""

import argparse
import sys

from .backend import DEVICES, DTYPES
from .errors import ConfigError, MrcError

__all__ = ["parser", "description", "run", "add_device", "add_dtype", "add_quiet", "add_batch_size",
           "add_num_heads", "positive_int", "non_negative_int"]


def description(doc):
    """The second paragraph of a module docstring (the first is its usage
    line), on one line, without reST markup."""
    return " ".join(doc.split("\n\n")[1].replace("``", "").split())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser(prog, doc):
    """The parser of command ``prog`` (``"python -m mrc_ref.compress"``), its
    description taken from the module docstring ``doc`` (:func:`description`)."""
    return _Parser(prog=prog, description=description(doc))


def _flag(parser, field):
    """The flag of option ``field`` in ``parser``: ``--field-name`` when the
    parser has it, else the field's own name."""
    flag = "--" + field.replace("_", "-")
    return flag if flag in parser._option_string_actions else field


def run(parser, body, argv=None):
    """Parse ``argv``, call ``body(args)`` and return the exit code: what
    ``body`` returns (``None`` is 0), or 2 after printing a user error as
    one line."""
    args = parser.parse_args(argv)
    try:
        code = body(args)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err.with_name(_flag(parser, err.field))}", file=sys.stderr)
        return 2
    except MrcError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0 if code is None else code


def positive_int(text):
    """An argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    """An argparse type: an integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def add_device(p, default="cpu"):
    """``--device {cpu,cuda}``."""
    p.add_argument("--device", default=default, choices=DEVICES,
                   help="cpu (NumPy) or cuda (CuPy; checked before any work) (default: %(default)s)")


def add_dtype(p, default="float64", help="dtype of the math"):
    """``--dtype {float64,float32}``."""
    p.add_argument("--dtype", default=default, choices=list(DTYPES), help=f"{help} (default: %(default)s)")


def add_quiet(p, help="no progress bars"):
    """``--quiet``."""
    p.add_argument("--quiet", action="store_true", help=help)


def add_batch_size(p, default, help="images per forward pass"):
    """``--batch-size B`` (a positive integer)."""
    p.add_argument("--batch-size", metavar="B", type=positive_int, default=default,
                   help=f"{help} (default: %(default)s)")


def add_num_heads(p):
    """``--num-heads H``."""
    p.add_argument("--num-heads", metavar="H", type=positive_int,
                   help="attention heads (default: the weights' num_heads metadata, else width / 64)")
