"""User errors (bad input), by type, and the one-line description of a bad value.

Every exception here is a :class:`MrcError`: the command lines print it as
one line and exit with code 2. Anything else that escapes is a bug in
mrc_ref and stays a traceback.
"""

import numpy as np

__all__ = ["MrcError", "ConfigError", "InfeasibleBudget", "UnsupportedVersion", "describe"]


class MrcError(ValueError):
    """A user error: bad input, with the file and layer it concerns.

    ``str(err)`` is one line, ``"<file>: layer <name>: <problem>"`` with the
    parts that are known; the command lines print it and exit with code 2.

    Parameters
    ----------
    message : str
        What is wrong.
    file : str, optional
        The file the problem was found in.
    layer : str, optional
        The layer (tensor name prefix) the problem concerns.
    """

    def __init__(self, message, *, file=None, layer=None):
        self.message = str(message)
        self.file = None if file is None else str(file)
        self.layer = layer
        super().__init__(self.__str__())

    def __str__(self):
        parts = []
        if self.file:
            parts.append(self.file)
        if self.layer:
            parts.append(f"layer {self.layer}")
        parts.append(self.message)
        return ": ".join(parts).replace("\n", " ")

    def _copy(self, **kw):
        """The same error (same type and extra fields) with other context."""
        return type(self)(self.message, file=kw.get("file", self.file), layer=kw.get("layer", self.layer))

    def at(self, *, file=None, layer=None):
        """Return a copy with the missing file/layer context filled in."""
        return self._copy(file=self.file or file, layer=self.layer or layer)


class ConfigError(MrcError):
    """An option out of range or inconsistent, named by its field (of
    :class:`mrc_ref.pipeline.Config`, or a function's keyword).

    ``str(err)`` is ``"<field> <problem>"``; a command line names the flag
    instead (``--residual-rank`` for ``residual_rank``).

    Parameters
    ----------
    field : str
        The option's name.
    problem : str
        What is wrong with it, e.g. ``"must be in (0, 1), got 1.5"``.
    """

    def __init__(self, field, problem, *, file=None, layer=None):
        self.field = field
        self.problem = str(problem)
        super().__init__(f"{field} {self.problem}", file=file, layer=layer)

    def _copy(self, **kw):
        return ConfigError(self.field, self.problem, file=kw.get("file", self.file), layer=kw.get("layer", self.layer))

    def with_name(self, name):
        """The message with the option called ``name`` (e.g. a flag)."""
        return ConfigError(name, self.problem, file=self.file, layer=self.layer)


class InfeasibleBudget(MrcError):
    """A parameter budget below the smallest size the selected layers can reach."""


class UnsupportedVersion(MrcError):
    """A file whose format version this release of mrc_ref does not read."""


def describe(value, limit=60):
    """A short one-line description of a value read from a file, for messages.

    Examples
    --------
    >>> describe(None), describe([1, 2]), describe(np.zeros((2, 3)))
    ('null', '[1, 2]', 'an array of shape (2, 3)')
    """
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
