"""NumPy fast paths for the op modules, kept apart from the formulas.

Each helper gives the same result as the plain array-API expression it
replaces; it only changes how NumPy gets there (fewer calls, cache-sized blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

def _np_mT(a):
    return a.mT


def matmul_ops(xp: Any):
    """(matmul, matrix_transpose) for a namespace; every call site passes 2-D arrays.

    Note: for NumPy, ``np.dot`` and the standard's ``.mT`` attribute compute
    the same BLAS products as ``matmul``/``matrix_transpose`` on 2-D arrays
    with about half the per-call overhead, which dominates tiny problems.
    Other namespaces (CuPy, array_api_strict) use the standard functions.
    """
    return (np.dot, _np_mT) if xp is np else (xp.matmul, xp.matrix_transpose)


def add_product(out, a, b, *, xp, mm, mask=None):
    """out += (a @ b) * mask, for a freshly allocated 2-D ``out`` that we own.

    Note: on NumPy a full-size temporary for a @ b costs a fresh allocation
    and its page faults; row blocks of 2^19 elements (2 MiB in float32) reuse cache-sized
    temporaries (about 5% of a 2048 x 2048 forward+backward). Other
    namespaces (CuPy) do one product, since every block is a kernel launch.
    """
    n = out.shape[0]
    if xp is not np or n <= 64:
        t = mm(a, b)
        out += t if mask is None else t * mask
        return out
    step = max(64, (1 << 19) // max(out.shape[1], 1))
    for i in range(0, n, step):
        t = mm(a[i:i + step], b)
        if mask is not None:
            t *= mask[i:i + step]
        out[i:i + step] += t
    return out
