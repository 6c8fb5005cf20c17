"""The array-module switch: NumPy on the CPU, CuPy on a GPU.

This is the only module that imports ``cupy``. Every math function receives
the array module ``xp`` as an argument; arrays reach the host only through
:func:`to_host`.
"""

import numpy as np

from .errors import ConfigError

__all__ = ["DEVICES", "DTYPES", "get_xp", "device_name", "get_dtype", "array_module", "to_device", "to_host"]

DEVICES = ("cpu", "cuda")
DTYPES = {"float64": np.float64, "float32": np.float32}


def get_xp(device="cpu"):
    """Return the array module for ``device``.

    Parameters
    ----------
    device : {"cpu", "cuda"}
        ``"cpu"`` gives NumPy; ``"cuda"`` gives CuPy after checking that it
        imports and sees a usable GPU.

    Raises
    ------
    ConfigError
        When ``device`` is unknown, or ``"cuda"`` is asked for without CuPy
        or without a usable GPU (before any work is done).
    """
    if device == "cpu":
        return np
    if device != "cuda":
        raise ConfigError("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise ConfigError("device", "cuda needs CuPy (pip install -e .[gpu]), which failed to import: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device found")
        cupy.zeros(1).sum().item()
    except Exception as exc:
        raise ConfigError("device", f"cuda: no usable GPU ({type(exc).__name__}: {exc})") from None
    return cupy


def device_name(xp):
    """The device an array module stands for: ``"cpu"`` for NumPy, else
    ``"cuda"`` (CuPy, or the strict CPU double that the tests put in its place)."""
    return "cpu" if xp is np else "cuda"


def get_dtype(name):
    """Return the NumPy dtype named ``"float64"`` or ``"float32"``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {name!r}") from None


def array_module(a):
    """Return the array module of ``a``: its ``__array_namespace__`` when
    it declares one that is not NumPy's, else NumPy."""
    namespace = getattr(type(a), "__array_namespace__", None)
    if namespace is not None and not isinstance(a, np.ndarray):
        return a.__array_namespace__()
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import cupy

        return cupy
    return np


def to_device(xp, a, dtype=None):
    """Copy a host array ``a`` to the array module ``xp`` (with ``dtype``)."""
    return xp.asarray(a, dtype=dtype)


def to_host(a):
    """Return ``a`` as a NumPy array: the explicit device → host transfer."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if get is not None:
        return get()
    return np.asarray(a)

