"""LoRA forward and backward as pure functions over arrays.

Dimension legend (used in every shape, name and error message):

    N  rows: all leading dimensions of x flattened (x of shape (I,) has N = 1)
    I  in_features
    O  out_features
    R  rank

Canonical layout is PEFT's: A (R, I), B (O, R), W (O, I), bias (O,). Other
layouts (the seed's candle A (I, R), B (R, O); fan_in_fan_out) exist only at I/O.

Forward, for a scale s (alpha/R, or alpha/sqrt(R) with rsLoRA) and an optional
inverted-dropout mask m (entries 0 or 1/(1-p), applied to the LoRA branch only):

    xm_NI = x_NI * m_NI                       dropout on the LoRA branch
    h_NR  = xm_NI A_RI^T                      down-projection, N x R
    y_NO  = x_NI W_OI^T + bias_O + s h_NR B_OR^T

Backward, given dy_NO = dL/dy (gradients have their parameter's shape):

    dB_OR = s dy_NO^T h_NR
    dh_NR = s dy_NO B_OR
    dA_RI = dh_NR^T xm_NI
    dx_NI = (dh_NR A_RI) * m_NI + dy_NO W_OI

x A^T is computed first and the O x I product B A is never formed: the LoRA
branch costs 2NR(I + O) FLOPs, against 2NIO for x (B A)^T after forming B A
(2OIR FLOPs and O x I memory).
The scale is applied to the small N x R matrix h, not to the N x O output.

NaN and Inf in the inputs propagate as IEEE 754 says (e.g. 0 * Inf = NaN when
scale = 0); they are never checked for and never raise.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from .backend import array_namespace

__all__ = ["LoraCache", "LoraGrads", "lora_backward", "lora_forward", "mse_loss"]


class LoraGrads(NamedTuple):
    """Gradients of a scalar loss, each with its parameter's shape.

    dx has x's shape (it includes the base path x W^T when W was given);
    dA is (R, I) and dB is (O, R), summed over all leading dimensions of x.
    """

    dx: Any
    dA: Any
    dB: Any


class LoraCache(NamedTuple):
    """What ``lora_backward`` needs from the forward pass.

    Only the N x R matrix hs = s (xm A^T) is new memory; x, the mask and the
    parameters are references to the caller's arrays (never written).
    """

    x_NI: Any
    mask_NI: Any
    A: Any
    B: Any
    W: Any
    hs_NR: Any
    scale: float
    x_shape: tuple


def _shape(a: Any) -> tuple:
    return tuple(a.shape)


@functools.lru_cache(maxsize=64)
def _is_real_floating(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:  # dtypes outside the standard, e.g. ml_dtypes.bfloat16
        return False


def _np_mT(a):
    return a.mT


def _ops(xp: Any):
    """(matmul, matrix_transpose) for a namespace; every call site passes 2-D arrays.

    Note: for NumPy, ``np.dot`` and the standard's ``.mT`` attribute compute
    the same BLAS products as ``matmul``/``matrix_transpose`` on 2-D arrays
    with about half the per-call overhead, which dominates tiny problems.
    Other namespaces (CuPy, array_api_strict) use the standard functions.
    """
    return (np.dot, _np_mT) if xp is np else (xp.matmul, xp.matrix_transpose)


def _add_product(out, a, b, *, xp, mm, mask=None):
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


def lora_forward(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """LoRA-adapted linear layer: y = x W^T + bias + s ((x * m) A^T) B^T.

    Args:
      x: (..., I) input; any number of leading dimensions, including none.
      A: (R, I) down-projection (PEFT's lora_A.weight).
      B: (O, R) up-projection (PEFT's lora_B.weight).
      scale: s, a real number (``LoraConfig.scale``).
      W: optional frozen base weight (O, I); None means no base path.
      bias: optional base bias (O,).
      dropout_mask: optional (..., I) mask m with x's shape, applied to the
        LoRA branch only, already holding the inverted-dropout factor
        1/(1-p) (entries 0 or 1/(1-p)), as PEFT's ``lora_dropout``.

    Returns:
      (y, cache): y of shape (..., O) in x's namespace and dtype, and the
      ``LoraCache`` that ``lora_backward`` takes.

    Raises:
      TypeError: non-arrays, integer/bool/complex dtypes, mixed dtypes, or
        arrays from different libraries (NumPy with CuPy).
      ValueError: shapes that do not fit, named in legend letters.

    Example:
      >>> import numpy as np
      >>> x = np.ones((2, 3)); A = np.ones((1, 3)); B = np.full((4, 1), 0.5)
      >>> y, _ = lora_forward(x, A, B, scale=2.0)
      >>> y.tolist()
      [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
    """
    s = _check_scale(scale)
    xp, N, I, O, R = _check_inputs(x, A, B, W, bias, dropout_mask)
    mm, mT = _ops(xp)
    flat = x.ndim == 2
    x_NI = x if flat else xp.reshape(x, (N, I))
    mask_NI = dropout_mask if dropout_mask is None or flat else xp.reshape(dropout_mask, (N, I))
    # dropout on the LoRA branch only: xm = x * m
    xm_NI = x_NI if mask_NI is None else x_NI * mask_NI
    # down-projection, scaled while it is small: hs = s (xm A^T), N x R
    hs_NR = s * mm(xm_NI, mT(A))
    if W is None:
        # up-projection: the LoRA branch hs B^T, N x O
        y_NO = mm(hs_NR, mT(B))
    else:
        # base path x W^T, then the up-projection hs B^T added into it
        y_NO = _add_product(mm(x_NI, mT(W)), hs_NR, mT(B), xp=xp, mm=mm)
    if bias is not None:
        y_NO += bias
    y = y_NO if flat else xp.reshape(y_NO, tuple(x.shape[:-1]) + (O,))
    return y, LoraCache(x_NI, mask_NI, A, B, W, hs_NR, s, _shape(x))


def lora_backward(dy, cache):
    """Gradients of a scalar loss L through ``lora_forward``.

    With dy = dL/dy (the forward's output shape), in legend letters:

        dB_OR = s dy^T h            (h = xm A^T from the forward)
        dh_NR = s dy B
        dA_RI = dh^T xm
        dx_NI = (dh A) * m + dy W   (the last term only when W was given)

    Args:
      dy: (..., O), the upstream gradient, same namespace and dtype as x.
      cache: the ``LoraCache`` returned by ``lora_forward``.

    Returns:
      ``LoraGrads(dx, dA, dB)``: dx with x's shape, dA (R, I), dB (O, R),
      summed over all leading dimensions.

    Raises:
      TypeError / ValueError: dy of the wrong library, dtype or shape.

    Example:
      >>> import numpy as np
      >>> x = np.ones((2, 3)); A = np.ones((1, 3)); B = np.zeros((4, 1))
      >>> y, cache = lora_forward(x, A, B, scale=2.0)
      >>> g = lora_backward(np.ones_like(y), cache)
      >>> g.dA.tolist(), g.dB.tolist()
      ([[0.0, 0.0, 0.0]], [[12.0], [12.0], [12.0], [12.0]])
    """
    if not isinstance(cache, LoraCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the LoraCache returned by lora_forward")
    x_NI, mask_NI, A, B, W, hs_NR, s, x_shape = cache
    if type(dy) is np.ndarray and type(x_NI) is np.ndarray:
        xp = np
    elif not hasattr(dy, "shape"):
        raise TypeError(f"dy is {type(dy).__name__}; expected an array")
    else:
        xp = array_namespace(dy, x_NI, names=("dy", "x"))
    if dy.dtype != x_NI.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x_NI.dtype}, the dtype of x")
    N, I = x_NI.shape
    O = B.shape[0]
    expected = tuple(x_shape[:-1]) + (O,)
    if _shape(dy) != expected:
        raise ValueError(f"dy has shape {_shape(dy)}; expected (..., O) = {expected}, the shape of y")
    mm, mT = _ops(xp)
    flat = len(x_shape) == 2
    dy_NO = dy if flat else xp.reshape(dy, (N, O))
    # dB = s dy^T h = dy^T hs, summed over the N rows by the matmul
    dB = mm(mT(dy_NO), hs_NR)
    # dh = s dy B: gradient at the rank-R bottleneck
    dh_NR = s * mm(dy_NO, B)
    # dA = dh^T xm, recomputing xm = x * m (cheaper than caching N x I)
    xm_NI = x_NI if mask_NI is None else x_NI * mask_NI
    dA = mm(mT(dh_NR), xm_NI)
    if W is None:
        # dx through the LoRA branch: (dh A) * m
        dx_NI = mm(dh_NR, A)
        if mask_NI is not None:
            dx_NI = dx_NI * mask_NI
    else:
        # dx through the base path dy W, then the LoRA branch (dh A) * m added into it
        dx_NI = _add_product(mm(dy_NO, W), dh_NR, A, xp=xp, mm=mm, mask=mask_NI)
    return LoraGrads(dx_NI if flat else xp.reshape(dx_NI, x_shape), dA, dB)


def mse_loss(y, target):
    """Mean squared error over all elements, and its gradient.

        L = mean((y - t)^2),   dL/dy = 2 (y - t) / numel

    Args:
      y, target: arrays of one shape, namespace and dtype.

    Returns:
      (loss, dy): loss a 0-d array of y's namespace, dy with y's shape.

    Example:
      >>> import numpy as np
      >>> loss, dy = mse_loss(np.array([1.0, 3.0]), np.array([0.0, 0.0]))
      >>> float(loss), dy.tolist()
      (5.0, [1.0, 3.0])
    """
    for name, a in (("y", y), ("target", target)):
        if not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array")
    xp = array_namespace(y, target, names=("y", "target"))
    if _shape(y) != _shape(target):
        raise ValueError(f"target has shape {_shape(target)}; expected y's shape {_shape(y)}")
    if not xp.isdtype(y.dtype, "real floating") or target.dtype != y.dtype:
        raise TypeError(f"y and target have dtypes {y.dtype} and {target.dtype}; expected one real floating dtype")
    n = math.prod(y.shape)
    if n == 0:
        raise ValueError(f"y has shape {_shape(y)}: the mean of no elements is undefined")
    r = y - target
    return xp.sum(r * r) / n, (2.0 / n) * r
