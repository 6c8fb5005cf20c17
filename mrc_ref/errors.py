"""The one exception type for user errors (bad input)."""


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

    def at(self, *, file=None, layer=None):
        """Return a copy with the missing file/layer context filled in."""
        return MrcError(self.message, file=self.file or file, layer=self.layer or layer)
