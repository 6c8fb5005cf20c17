"""A strict CPU double of CuPy, for testing the ``xp`` code paths without a GPU.

``from strict_xp import xp`` gives an array module (``xp.__name__ ==
"strict_xp"``) whose arrays, :class:`StrictArray`, wrap a private NumPy array
and behave like CuPy arrays where it matters for device code:

* they are **not** NumPy arrays, and nothing converts them to one implicitly:
  ``np.asarray(a)`` / ``np.array(a)`` raise ``TypeError`` (``__array__``
  raises, as CuPy's does; there is no ``__array_interface__`` nor buffer),
  NumPy ufuncs refuse them (``__array_ufunc__ = None``, so ``np.sqrt(a)`` and
  ``scipy.special.erf(a)`` raise), and NumPy functions refuse them
  (``__array_function__`` returns ``NotImplemented``, so ``np.mean(a)``,
  ``np.concatenate([a])`` raise);
* mixing them with NumPy arrays in arithmetic, indexing or assignment raises
  ``TypeError`` (CuPy: "Unsupported type <class 'numpy.ndarray'>"); Python and
  NumPy scalars are fine;
* ``a.get()`` is the one way to the host (a copy); ``float(a)``, ``int(a)``,
  ``bool(a)`` and ``a.item()`` work on size-1 arrays, as in CuPy (a sync);
* ``xp.asarray(host)`` is the explicit host → device transfer and always
  copies (device memory never aliases host memory); ``xp.asarray(strict)``
  returns the array itself when the dtype already matches;
* integer indexing gives a 0-d array, not a Python/NumPy scalar, and
  reductions give 0-d arrays, as in CuPy;
* only float/int/bool/complex dtypes exist.

The module has exactly the functions the library calls (``xp.<name>`` in
``mrc_ref/`` and ``data_tools/``), each with CuPy's semantics, plus
``xp.erf`` (``cupyx.scipy.special.erf``'s semantics), the hook that
:func:`mrc_ref.vit.erf_function` looks up first. Underneath, the same NumPy
(and SciPy) routines run as in a NumPy run, so results agree bit for bit.
"""

import numbers
import operator
import types

import numpy as np
import scipy.special

_MESSAGE = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")  # CuPy's wording


def _unsupported(value):
    return TypeError(f"Unsupported type {type(value)}")


def _operand(value):
    """The NumPy value behind an operand: a StrictArray's data, or a scalar."""
    if isinstance(value, StrictArray):
        return value._data
    if isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, np.ndarray):
        return value
    raise _unsupported(value)


def _index(key):
    """An index with StrictArray index arrays unwrapped; host arrays refused."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, StrictArray):
        return key._data
    if key is None or key is Ellipsis or isinstance(key, (slice, numbers.Integral, np.integer)):
        return key
    raise _unsupported(key)


def _check_dtype(dtype):
    if dtype.kind not in "biufc":
        raise TypeError(f"dtype {dtype} is not supported by strict_xp (nor by CuPy)")


def _wrap(value):
    """Wrap a NumPy result; NumPy scalars become 0-d arrays (CuPy never hands
    back host scalars)."""
    data = np.asarray(value)  # no copy for an ndarray: views stay views
    _check_dtype(data.dtype)
    return StrictArray(data)


def _binary(op):
    def method(self, other):
        try:
            other = _operand(other)
        except TypeError:
            return NotImplemented  # lets Python raise TypeError (NumPy defers too)
        return _wrap(op(self._data, other))

    return method


def _reflected(op):
    def method(self, other):
        try:
            other = _operand(other)
        except TypeError:
            return NotImplemented
        return _wrap(op(other, self._data))

    return method


def _inplace(op):
    def method(self, other):
        op(self._data, _operand(other))  # NumPy's in-place operator: same buffer
        return self

    return method


class StrictArray:
    """A device-array double: a private NumPy array behind a CuPy-like face."""

    __slots__ = ("_data",)
    __array_ufunc__ = None  # NumPy/SciPy ufuncs raise; NumPy scalars' operators defer to ours
    __hash__ = None

    def __init__(self, data):
        if not isinstance(data, np.ndarray):
            raise TypeError("StrictArray wraps a numpy.ndarray; use strict_xp.xp.asarray")
        self._data = data

    # ---------------------------------------------------------------- interop
    def __array__(self, *args, **kwargs):
        raise TypeError(_MESSAGE)

    def __array_function__(self, func, types, args, kwargs):
        return NotImplemented  # NumPy then raises TypeError

    def __array_namespace__(self, api_version=None):
        return xp

    def get(self):
        """The explicit device → host transfer: a NumPy copy."""
        return self._data.copy()

    # ---------------------------------------------------------------- scalars (size 1)
    def item(self):
        return self._data.item()

    def __float__(self):
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __bool__(self):
        return bool(self._data)

    # ---------------------------------------------------------------- attributes
    @property
    def shape(self):
        return self._data.shape

    @property
    def ndim(self):
        return self._data.ndim

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def size(self):
        return self._data.size

    @property
    def T(self):
        return StrictArray(self._data.T)

    def __len__(self):
        return len(self._data)  # TypeError for 0-d, as in CuPy

    def __iter__(self):  # as CuPy: 0-d arrays refuse; otherwise rows as (device) arrays
        if self._data.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._data.shape[0]))

    def __repr__(self):
        return f"strict_array({np.array2string(self._data)}, dtype={self._data.dtype})"

    # ---------------------------------------------------------------- methods
    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return StrictArray(self._data.reshape(shape, order=order))

    def astype(self, dtype, copy=True):
        dtype = np.dtype(dtype)
        _check_dtype(dtype)
        return StrictArray(self._data.astype(dtype, copy=copy))

    def copy(self):
        return StrictArray(self._data.copy())

    def sum(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._data.sum(axis=axis, dtype=dtype, keepdims=keepdims))

    def mean(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._data.mean(axis=axis, dtype=dtype, keepdims=keepdims))

    def max(self, axis=None, keepdims=False):
        return _wrap(self._data.max(axis=axis, keepdims=keepdims))

    def min(self, axis=None, keepdims=False):
        return _wrap(self._data.min(axis=axis, keepdims=keepdims))

    def all(self, axis=None, keepdims=False):
        return _wrap(self._data.all(axis=axis, keepdims=keepdims))

    def any(self, axis=None, keepdims=False):
        return _wrap(self._data.any(axis=axis, keepdims=keepdims))

    # ---------------------------------------------------------------- indexing
    def __getitem__(self, key):
        return _wrap(self._data[_index(key)])

    def __setitem__(self, key, value):
        self._data[_index(key)] = _operand(value)

    # ---------------------------------------------------------------- operators
    __add__, __radd__, __iadd__ = _binary(operator.add), _reflected(operator.add), _inplace(operator.iadd)
    __sub__, __rsub__, __isub__ = _binary(operator.sub), _reflected(operator.sub), _inplace(operator.isub)
    __mul__, __rmul__, __imul__ = _binary(operator.mul), _reflected(operator.mul), _inplace(operator.imul)
    __truediv__, __rtruediv__, __itruediv__ = (_binary(operator.truediv), _reflected(operator.truediv),
                                               _inplace(operator.itruediv))
    __floordiv__, __rfloordiv__ = _binary(operator.floordiv), _reflected(operator.floordiv)
    __mod__, __rmod__ = _binary(operator.mod), _reflected(operator.mod)
    __pow__, __rpow__, __ipow__ = _binary(operator.pow), _reflected(operator.pow), _inplace(operator.ipow)
    __matmul__, __rmatmul__ = _binary(operator.matmul), _reflected(operator.matmul)
    __eq__, __ne__ = _binary(operator.eq), _binary(operator.ne)
    __lt__, __le__ = _binary(operator.lt), _binary(operator.le)
    __gt__, __ge__ = _binary(operator.gt), _binary(operator.ge)

    def __neg__(self):
        return StrictArray(-self._data)

    def __pos__(self):
        return StrictArray(+self._data)

    def __abs__(self):
        return StrictArray(abs(self._data))

    def trace(self):
        return _wrap(self._data.trace())


# -------------------------------------------------------------------- the module
def _arrays(*values):
    """Unwrap function arguments: StrictArrays and scalars only (CuPy refuses
    NumPy arrays as function arguments too)."""
    return [_operand(v) for v in values]


def _strict_only(value):
    if not isinstance(value, StrictArray):
        raise _unsupported(value)
    return value._data


def asarray(a, dtype=None):
    """``cupy.asarray``: a StrictArray is returned as is when ``dtype`` matches
    (else converted); anything else is host data (NumPy array, scalar,
    list, h5py dataset) copied to the "device"."""
    if isinstance(a, StrictArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    data = np.array(a, dtype=dtype, copy=True)  # a list of StrictArrays raises here (__array__)
    _check_dtype(data.dtype)
    return StrictArray(data)


def zeros(shape, dtype=float):
    return _wrap(np.zeros(shape, dtype=dtype))


def empty(shape, dtype=float):
    return _wrap(np.empty(shape, dtype=dtype))


def zeros_like(a, dtype=None):
    return _wrap(np.zeros_like(_strict_only(a), dtype=dtype))


def eye(N, M=None, k=0, dtype=float):
    return _wrap(np.eye(N, M, k, dtype=dtype))


def outer(a, b):
    return _wrap(np.outer(_strict_only(a), _strict_only(b)))


def concatenate(tup, axis=0):
    return _wrap(np.concatenate([_strict_only(a) for a in tup], axis=axis))


def cumsum(a, axis=None, dtype=None):
    return _wrap(np.cumsum(_strict_only(a), axis=axis, dtype=dtype))


def clip(a, a_min, a_max):
    lo = None if a_min is None else _operand(a_min)
    hi = None if a_max is None else _operand(a_max)
    return _wrap(np.clip(_strict_only(a), lo, hi))


def sqrt(x):
    return _wrap(np.sqrt(*_arrays(x)))


def exp(x):
    return _wrap(np.exp(*_arrays(x)))


def rint(x):
    """``cupy.rint``: round half to even, as NumPy."""
    return _wrap(np.rint(*_arrays(x)))


def isfinite(x):
    return _wrap(np.isfinite(*_arrays(x)))


def _abs(x):
    return _wrap(np.abs(*_arrays(x)))


def erf(x):
    """``cupyx.scipy.special.erf``'s semantics (the hook of ``vit.erf_function``)."""
    return _wrap(scipy.special.erf(*_arrays(x)))


def diagonal(a, offset=0, axis1=0, axis2=1):
    return _wrap(np.diagonal(_strict_only(a), offset, axis1, axis2))


def reshape(a, newshape, order="C"):
    return StrictArray(np.reshape(_strict_only(a), newshape, order=order))


def transpose(a, axes=None):
    return StrictArray(np.transpose(_strict_only(a), axes))


def swapaxes(a, axis1, axis2):
    return StrictArray(np.swapaxes(_strict_only(a), axis1, axis2))


def broadcast_to(array, shape):
    return StrictArray(np.broadcast_to(_strict_only(array), shape))


def _sum(a, axis=None, dtype=None, keepdims=False):
    return _wrap(np.sum(_strict_only(a), axis=axis, dtype=dtype, keepdims=keepdims))


def mean(a, axis=None, dtype=None, keepdims=False):
    return _wrap(np.mean(_strict_only(a), axis=axis, dtype=dtype, keepdims=keepdims))


def _max(a, axis=None, keepdims=False):
    return _wrap(np.max(_strict_only(a), axis=axis, keepdims=keepdims))


def _all(a, axis=None, keepdims=False):
    return _wrap(np.all(_strict_only(a), axis=axis, keepdims=keepdims))


def _any(a, axis=None, keepdims=False):
    return _wrap(np.any(_strict_only(a), axis=axis, keepdims=keepdims))


def _eigh(a, UPLO="L"):
    w, v = np.linalg.eigh(_strict_only(a), UPLO=UPLO)
    return StrictArray(w), StrictArray(v)


def _eigvalsh(a, UPLO="L"):
    return StrictArray(np.linalg.eigvalsh(_strict_only(a), UPLO=UPLO))


def _cholesky(a):
    """``cupy.linalg.cholesky`` without ``cupyx.errstate(linalg="raise")``
    (which mrc_ref sets on real CuPy): no error on a matrix that is not
    positive definite, and a factor whose failed pivot is not a positive real
    (here NaN), so the library's second guard, the factor's diagonal, is what
    catches it. The factor comes from the LAPACK call mrc_ref makes on NumPy
    (``potrf`` of the Fortran-ordered transpose), so NumPy and double runs
    differ only where the array-module discipline does."""
    from scipy.linalg import lapack

    c = _strict_only(a)
    U, info = (lapack.dpotrf if c.dtype == np.float64 else lapack.spotrf)(c.T, lower=0, clean=1)
    if info != 0:
        return StrictArray(np.full(c.shape, np.nan))
    return StrictArray(U.T)


def _solve(a, b):
    return StrictArray(np.linalg.solve(_strict_only(a), _strict_only(b)))


def argmax(a, axis=None):
    return _wrap(np.argmax(_strict_only(a), axis=axis))


def take_along_axis(arr, indices, axis):
    return StrictArray(np.take_along_axis(_strict_only(arr), _strict_only(indices), axis))


def where(condition, x, y):
    """``cupy.where``: the condition must be a device array; x and y device
    arrays or scalars."""
    return _wrap(np.where(_strict_only(condition), *_arrays(x, y)))


def _svd(a, full_matrices=True, compute_uv=True):
    out = np.linalg.svd(_strict_only(a), full_matrices=full_matrices, compute_uv=compute_uv)
    return tuple(StrictArray(o) for o in out) if compute_uv else StrictArray(out)


xp = types.ModuleType("strict_xp", "A strict CPU double of CuPy (see tests/strict_xp.py).")
for _fn in (asarray, empty, zeros, zeros_like, eye, outer, concatenate, cumsum, clip, sqrt, exp, rint, isfinite, erf,
            diagonal, reshape, transpose, swapaxes, broadcast_to, mean, argmax, take_along_axis, where):
    setattr(xp, _fn.__name__, _fn)
# defined as _abs etc. so that the builtins stay usable in this file
xp.abs, xp.sum, xp.max, xp.all, xp.any = _abs, _sum, _max, _all, _any
xp.linalg = types.SimpleNamespace(eigh=_eigh, eigvalsh=_eigvalsh, svd=_svd, solve=_solve, cholesky=_cholesky)
xp.finfo = np.finfo  # CuPy re-exports NumPy's
xp.float32, xp.float64, xp.int8 = np.float32, np.float64, np.int8  # CuPy's dtypes are NumPy's
xp.ndarray = StrictArray
del _fn
