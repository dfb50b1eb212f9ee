"""LAPACK ``?syevr`` (top eigenpairs of a symmetric matrix) called without holding Python's GIL.

``scipy.linalg.eigh`` computes a subset of eigenvectors (MRRR) but its wrapper keeps the GIL during the
call, so worker threads decomposing different matrices run one at a time; ``torch.linalg.eigh`` releases
it but always computes every eigenvector (1.4-2.4× the time of the top k = n/8 … n/20 at n = 768). Here
SciPy's own LAPACK routine (the function pointer that ``scipy.linalg.cython_lapack`` exports) is called
through ``ctypes``, which releases the GIL for the duration of a foreign call.

Kept (measured): ViT-B/32 T = 8 TSV-M wall +21 % with SciPy's eigh, +15 % with it for subsets and torch for all
eigenpairs (same CPU-seconds: the GIL serializes the workers); torch for all: top-k +70 % CPU (merge_kernels).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import numpy as np

__all__ = ["syevr_top", "available"]

_INT = ctypes.c_int


@lru_cache(maxsize=None)
def _routine(name: str):
    """The ctypes function of ``scipy.linalg.cython_lapack.<name>`` (None if SciPy does not export it)."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:  # pragma: no cover
        return None
    capsule = getattr(cython_lapack, "__pyx_capi__", {}).get(name)
    if capsule is None:  # pragma: no cover
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    pointer = get_pointer(capsule, get_name(capsule))
    real = ctypes.c_double if name[0] == "d" else ctypes.c_float
    p, i, r, c = ctypes.c_void_p, ctypes.POINTER(_INT), ctypes.POINTER(real), ctypes.c_char_p
    # jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info
    prototype = ctypes.CFUNCTYPE(None, c, c, c, i, p, i, r, r, i, i, r, i, p, p, i, p, p, i, p, i, i)
    return prototype(pointer), real


def available(dtype) -> bool:
    """Whether SciPy exports ``?syevr`` for this float32/float64 (NumPy or torch) dtype."""
    return _routine(_name(dtype)) is not None


def _name(dtype) -> str:
    return "dsyevr" if "float64" in str(dtype) else "ssyevr"  # NumPy or torch dtypes


def syevr_top(a: np.ndarray, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The ``k`` largest eigenvalues (ascending, ``(k,)``) and eigenvectors (``(n, k)``) of the symmetric
    float32/float64 matrix ``a``, which is overwritten. None if LAPACK reports an error.
    """
    routine, real = _routine(_name(a.dtype))
    n = a.shape[0]
    if not a.flags.c_contiguous and not a.flags.f_contiguous:
        raise ValueError("syevr_top needs a contiguous matrix")
    ref = lambda v: ctypes.byref(_INT(v))  # noqa: E731
    n_, il, iu, m, info = _INT(n), _INT(n - k + 1), _INT(n), _INT(0), _INT(0)
    vl, vu, abstol = real(0), real(0), real(0)
    w = np.empty(n, a.dtype)
    z = np.empty((k, n), a.dtype)  # column-major n × k
    isuppz = np.empty(2 * max(1, k), np.intc)
    work_q, iwork_q = np.empty(1, a.dtype), np.empty(1, np.intc)

    def call(work, lwork, iwork, liwork):
        routine(b"V", b"I", b"L", ctypes.byref(n_), a.ctypes.data, ctypes.byref(n_), ctypes.byref(vl),
                ctypes.byref(vu), ctypes.byref(il), ctypes.byref(iu), ctypes.byref(abstol), ctypes.byref(m),
                w.ctypes.data, z.ctypes.data, ctypes.byref(n_), isuppz.ctypes.data, work.ctypes.data,
                ref(lwork), iwork.ctypes.data, ref(liwork), ctypes.byref(info))

    call(work_q, -1, iwork_q, -1)  # workspace query
    lwork, liwork = int(work_q[0]), int(iwork_q[0])
    call(np.empty(lwork, a.dtype), lwork, np.empty(liwork, np.intc), liwork)
    if info.value != 0 or m.value != k:
        return None
    return w[:k], z.T
