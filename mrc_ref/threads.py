"""Worker threads with BLAS at one thread: the thread pool of the NumPy
forward engine (:class:`mrc_ref.vit.Engine`).

The engine splits a step's rows over Python threads. Each thread's BLAS
products then run at one BLAS thread, so the two levels of threads never
compete for the cores (measured on 2 cores: two Python threads over
2-thread OpenBLAS took 89 ms for a DeiT-B fc1 product against 46 ms at one
BLAS thread, and 31 ms against 3.2 ms for the attention scores). The BLAS
thread counts are read and set through threadpoolctl, the library that
scikit-learn and SciPy use for the same job, once per process (and again in
a forked child).

Not for CuPy: the engine steps aside there.
"""

import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

__all__ = ["blas_threads", "blas_controlled", "one_blas_thread", "parallel", "split"]

_LOCK = threading.Lock()
_STATE = {"controls": None, "depth": 0, "saved": 1, "pool": None, "workers": 0}


def _controls():
    """The BLAS libraries of the process (threadpoolctl), listed once."""
    if _STATE["controls"] is None:
        from threadpoolctl import ThreadpoolController

        importlib.import_module("scipy.linalg")  # loads SciPy's BLAS, so that it is listed too
        _STATE["controls"] = ThreadpoolController().select(user_api="blas").lib_controllers
    return _STATE["controls"]


def _current():
    return max(1, min((lib.num_threads for lib in _controls()), default=1))


def blas_controlled():
    """Whether the BLAS thread count can be set (a BLAS threadpoolctl knows)."""
    return bool(_controls())


def blas_threads():
    """Threads BLAS uses outside :func:`one_blas_thread` (1 when unknown)."""
    with _LOCK:
        return _STATE["saved"] if _STATE["depth"] else _current()


@contextmanager
def one_blas_thread():
    """Every BLAS of the process at one thread inside the block.

    Nested and concurrent holders are counted: the first saves the count
    and sets 1, the last restores it.
    """
    with _LOCK:
        if _STATE["depth"] == 0:
            _STATE["saved"] = _current()
            for lib in _controls():
                lib.set_num_threads(1)
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                for lib in _controls():
                    lib.set_num_threads(_STATE["saved"])


def _pool(workers):
    with _LOCK:
        if _STATE["workers"] < workers:
            old = _STATE["pool"]
            _STATE["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="mrc_ref")
            _STATE["workers"] = workers
            if old is not None:
                old.shutdown(wait=False)
        return _STATE["pool"]


def _after_fork_in_child():
    """A forked child has none of the parent's threads: start afresh (a new
    pool on first use, an unlocked lock, the libraries listed again)."""
    global _LOCK
    _LOCK = threading.Lock()
    _STATE.update(controls=None, depth=0, saved=1, pool=None, workers=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel(fn, parts, limit):
    """``fn(part)`` for every part: the first in the calling thread, the
    others on the pool, with BLAS at one thread meanwhile (always with
    several parts; with one part only when ``limit``). The first exception
    is raised after all parts finish."""
    if len(parts) == 1 and not limit:
        fn(parts[0])
        return
    with one_blas_thread():
        if len(parts) == 1:
            fn(parts[0])
            return
        futures = [_pool(len(parts) - 1).submit(fn, part) for part in parts[1:]]
        error = None
        try:
            fn(parts[0])
        except BaseException as exc:  # noqa: BLE001  (re-raised below, after the others finish)
            error = exc
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error


def split(total, parts):
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(total)``.

    Examples
    --------
    >>> split(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    edges = [total * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]
