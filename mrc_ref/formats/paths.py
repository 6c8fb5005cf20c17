"""Paths: inputs checked before they are opened, outputs checked before any
work and written atomically (all of a run's outputs or none), and
disk-backed scratch arrays."""

import os
import stat
import tempfile
from contextlib import contextmanager

import numpy as np

from ..errors import MrcError

__all__ = ["check_input", "same_file", "inside", "check_output", "check_outputs", "check_output_dir",
           "atomic_path", "write_files", "scratch_space"]


def check_input(path):
    """Raise :class:`MrcError` unless ``path`` names a readable regular file
    (links followed): a missing file, a link loop, a directory, a FIFO or a
    device is refused before anything opens it (a FIFO would block the
    reader forever). Returns ``path`` as a string."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MrcError("no such file", file=path) from None
    except OSError as exc:
        raise MrcError(f"cannot read: {exc.strerror or exc}", file=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise MrcError("cannot read: is a directory, not a file", file=path)
    if not stat.S_ISREG(st.st_mode):
        raise MrcError("cannot read: not a regular file (a FIFO, socket or device)", file=path)
    return path


def _resolved(path):
    """``path`` with every symbolic link resolved, also for a file that does
    not exist yet (its existing parent directories are resolved)."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def same_file(a, b):
    """Whether ``a`` and ``b`` name the same file: same resolved path (through
    links and ``..``, existing or not), or the same inode (hard links)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def inside(path, folder):
    """Whether ``path`` is ``folder`` or lies below it, once every symbolic
    link in both is resolved (``path`` need not exist)."""
    real, root = _resolved(path), _resolved(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _restore_times(directory, times):
    os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))


def check_output(path, inputs=(), outputs=(), folders=()):
    """Raise :class:`MrcError` unless ``path`` can be written: its directory
    exists, it is not a directory, it is none of ``inputs``, none of the
    other ``outputs`` of the same run, and it is not inside any of the input
    ``folders`` (an image folder: a file written there would become an input
    of the next run, whatever its name). Two paths are the same file when they
    resolve to the same path (any spelling, symbolic links in the file or in
    its directories, files that do not exist yet) or share an inode (hard
    links). The directory must be writable: a file is created in it and
    removed, and the directory's times put back (this works whatever the
    permissions say, e.g. for root, and on a read-only mount). Called before
    any work, and again when writing. Every command that writes a file calls
    it (through :func:`check_outputs`, or
    :func:`mrc_ref.images.check_image_outputs` when it reads an image folder)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MrcError("output directory does not exist", file=path)
    if os.path.isdir(path):
        raise MrcError("output is a directory", file=path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise MrcError("output exists and is not a regular file (a FIFO, socket or device)", file=path)
    for src in inputs:
        if src is not None and same_file(path, src):
            raise MrcError(f"output would overwrite an input file ({os.fspath(src)})", file=path)
    for other in outputs:
        if other is not None and same_file(path, other):
            raise MrcError(f"output would overwrite another output of the same run ({os.fspath(other)})", file=path)
    for folder in folders:
        if folder is not None and inside(path, folder):
            raise MrcError(f"output is inside the image folder {os.fspath(folder)} (it would be read as an input)",
                           file=path)
    try:
        times = os.stat(directory)
        fd, probe = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".probe", dir=directory)
        os.close(fd)
        os.unlink(probe)
        _restore_times(directory, times)  # the probe leaves no trace
    except OSError as exc:
        raise MrcError(f"cannot write in the output directory: {exc.strerror or exc}", file=path) from None


def check_outputs(outputs, inputs=(), folders=()):
    """:func:`check_output` on every path of ``outputs`` (``None`` entries
    skipped) against the ``inputs``, the input ``folders`` and each other."""
    outputs = [o for o in outputs if o is not None]
    for i, path in enumerate(outputs):
        check_output(path, inputs, outputs[:i], folders)


def check_output_dir(directory, files, inputs=(), folders=()):
    """Raise :class:`MrcError` unless the output folder ``directory`` can
    receive ``files`` (names): it is a directory or can be created (its
    parent exists and a directory is created in it and removed, the parent's
    times put back: the probe leaves no trace), it is not inside any input
    ``folders``, and each ``directory/name`` passes :func:`check_output`.
    Called before any work."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MrcError("output is not a directory", file=directory)
    for folder in folders:
        if folder is not None and inside(directory, folder):
            raise MrcError(f"the output directory is inside the image folder {os.fspath(folder)} "
                           "(its files would be read as inputs)", file=directory)
    if not os.path.isdir(directory):
        parent = os.path.dirname(os.path.abspath(directory))
        if not os.path.isdir(parent):
            raise MrcError("the parent of the output directory does not exist", file=directory)
        try:
            times = os.stat(parent)
            probe = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(directory)) + ".",
                                     suffix=".probe", dir=parent)
            os.rmdir(probe)
            _restore_times(parent, times)
        except OSError as exc:
            raise MrcError(f"cannot create the output directory: {exc.strerror or exc}", file=directory) from None
        return
    for name in files:
        check_output(os.path.join(directory, name), inputs, folders=folders)


@contextmanager
def atomic_path(path, inputs=()):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if
    the block succeeds, so a reader never sees a half-written file.

    Raises :class:`MrcError` when :func:`check_output` refuses ``path`` or the
    operating system refuses the write (permissions, full disk).
    """
    with _atomic([path], inputs) as (tmp,):
        yield tmp


def write_files(blobs, inputs=()):
    """Write several outputs all or none: ``blobs`` maps each path to its
    bytes. Every file is written beside its target first; only when all are
    written are they renamed into place, so a failed run leaves no output."""
    paths = list(blobs)
    with _atomic(paths, inputs) as tmps:
        for tmp, path in zip(tmps, paths):
            with open(tmp, "wb") as fh:
                fh.write(blobs[path])


@contextmanager
def _atomic(paths, inputs):
    paths = [os.fspath(p) for p in paths]
    check_outputs(paths, inputs)
    tmps, current = [], None
    try:
        umask = os.umask(0)
        os.umask(umask)
        for path in paths:
            current = path
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
            tmps.append(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        current = None
        yield tmps
        for tmp, path in zip(tmps, paths):
            current = path
            os.replace(tmp, path)
    except OSError as exc:
        raise MrcError(f"cannot write: {exc.strerror or exc}", file=current or paths[0]) from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def scratch_space(directory=None):
    """Yield ``scratch(shape, dtype) -> array``: zero-filled arrays backed by
    temporary ``.npy`` files (``numpy.lib.format.open_memmap``), all removed
    when the block exits. Memory stays that of the pages in use, whatever the
    size (the sequential Stage 3 keeps its two token streams here)."""
    with tempfile.TemporaryDirectory(prefix="mrc_ref-", dir=directory) as root:
        count = iter(range(1 << 62))

        def scratch(shape, dtype):
            path = os.path.join(root, f"{next(count)}.npy")
            return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

        yield scratch
