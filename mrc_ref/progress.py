"""Progress bars on stderr (tqdm), shown only on a terminal.

The math takes an optional ``progress(iterable, desc) -> iterable``; the
drivers build it here. Bars appear only when stderr is a terminal
(``disable=None``), so a failing run's stderr stays one line.
"""

import sys

__all__ = ["progress_bar", "counter"]


def progress_bar(quiet):
    """A ``progress(iterable, desc)`` wrapper printing one tqdm bar per loop."""
    from tqdm import tqdm

    return lambda it, desc: tqdm(it, desc=desc, disable=True if quiet else None, file=sys.stderr, leave=False)


def counter(total, desc, quiet, unit="it"):
    """A tqdm bar of ``total`` steps advanced by ``bar.update(k)`` (a context manager)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet else None, leave=False)
