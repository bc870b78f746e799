"""Input validation shared by every public function (the one private module others may import from).

Messages follow the house form "X is ...; expected ..." and use the dimension
legend N rows, I in_features, O out_features, R rank.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy as np

from .backend import array_namespace

def _shape(a: Any) -> tuple:
    return tuple(a.shape)


@functools.lru_cache(maxsize=64)
def _is_real_floating(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:  # dtypes outside the standard, e.g. ml_dtypes.bfloat16
        return False


def _check_scale(scale: Any) -> float:
    if type(scale) is float:
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        # Also accept 0-d arrays (numpy scalars are numbers.Real already).
        if getattr(scale, "shape", None) == ():
            return float(scale)
        raise TypeError(f"scale is {scale!r} ({type(scale).__name__}); expected a real number")
    return float(scale)


def _check_inputs(x, A, B, W, bias, mask):
    """Namespace, dtype and shape checks at the public boundary.

    Returns (xp, N, I, O, R). Messages use the legend letters.
    """
    names = ("x", "A", "B", "W", "bias", "dropout_mask")
    arrays = (x, A, B, W, bias, mask)
    nd = np.ndarray
    if (type(x) is nd and type(A) is nd and type(B) is nd and (W is None or type(W) is nd)
            and (bias is None or type(bias) is nd) and (mask is None or type(mask) is nd)):
        xp = np  # the common case, checked without the generic machinery
    else:
        for name, a in zip(names, arrays):
            if a is not None and not hasattr(a, "shape"):
                raise TypeError(f"{name} is {type(a).__name__}; expected an array (convert with reflora.asarray)")
        xp = array_namespace(*arrays, names=names)
    dt = x.dtype
    if not _is_real_floating(xp, dt):
        raise TypeError(f"x has dtype {dt}; expected a real floating dtype (float16, float32 or float64); "
                        "for bfloat16 compute in float32 (reflora.testing emulates bfloat16 rounding)")
    if A.dtype != dt or B.dtype != dt or (W is not None and W.dtype != dt) or (
            bias is not None and bias.dtype != dt) or (mask is not None and mask.dtype != dt):
        name, a = next((n, a) for n, a in zip(names[1:], arrays[1:]) if a is not None and a.dtype != dt)
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dt}, the dtype of x (reflora does not promote silently)")
    if x.ndim < 1:
        raise ValueError(f"x has shape {_shape(x)}; expected (..., I) with at least one dimension")
    I = x.shape[-1]
    if A.ndim != 2 or A.shape[1] != I:
        exp = f"(R, {I})" if A.ndim == 2 else "(R, I)"
        raise ValueError(f"A has shape {_shape(A)}; expected (R, I) = {exp}, I taken from x")
    R = A.shape[0]
    if B.ndim != 2 or B.shape[1] != R:
        raise ValueError(f"B has shape {_shape(B)}; expected (O, R) = (O, {R}), R taken from A")
    O = B.shape[0]
    if W is not None and _shape(W) != (O, I):
        raise ValueError(f"W has shape {_shape(W)}; expected (O, I) = ({O}, {I}), O taken from B and I from x")
    if bias is not None and _shape(bias) != (O,):
        raise ValueError(f"bias has shape {_shape(bias)}; expected (O,) = ({O},), O taken from B")
    if mask is not None and _shape(mask) != _shape(x):
        raise ValueError(f"dropout_mask has shape {_shape(mask)}; expected x's shape {_shape(x)}")
    N = math.prod(x.shape[:-1])
    return xp, N, I, O, R
