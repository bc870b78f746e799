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

import math
from typing import Any, NamedTuple

import numpy as np

from .._validate import _check_inputs, _check_scale, _shape
from ..backend import array_namespace
from ._fast import add_product, matmul_ops

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
    mm, mT = matmul_ops(xp)
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
        y_NO = add_product(mm(x_NI, mT(W)), hs_NR, mT(B), xp=xp, mm=mm)
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
    mm, mT = matmul_ops(xp)
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
        dx_NI = add_product(mm(dy_NO, W), dh_NR, A, xp=xp, mm=mm, mask=mask_NI)
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
