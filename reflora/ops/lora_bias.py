"""PEFT's ``lora_bias``: a trainable bias on lora_B, scaled with the LoRA branch.

With ``LoraConfig(lora_bias=True)`` PEFT builds lora_B as ``nn.Linear(R, O,
bias=True)``, so the LoRA branch is lora_B(lora_A(x_d)) * s and its bias c
(shape (O,), PEFT key ``...lora_B.bias``) is scaled by s too:

    y_NO  = x_NI W_OI^T + bias_O + s ((x_NI * m_NI) A_RI^T B_OR^T + c_O)

Backward adds one gradient to ``reflora.lora_backward``'s three:

    dc_O = s sum_N dy_NO

Merge (``reflora.merge(..., bias=bias, lora_bias=c)``) folds it into the base
bias: bias' = bias + s c. PEFT refuses lora_bias on a layer without a base
bias; so does reflora's merge. PEFT initialises c to zero, like B.

These functions are built on ``reflora.ops.lora``: the forward calls
``lora_forward`` and adds s c; the backward calls ``lora_backward``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._validate import _check_scale
from ..backend import array_namespace
from .lora import LoraCache, lora_backward, lora_forward

__all__ = ["LoraBiasCache", "LoraBiasGrads", "lora_bias_backward", "lora_bias_forward"]


class LoraBiasGrads(NamedTuple):
    """Gradients of a scalar loss: dx (x's shape), dA (R, I), dB (O, R), dlora_bias (O,)."""

    dx: Any
    dA: Any
    dB: Any
    dlora_bias: Any


class LoraBiasCache(NamedTuple):
    """The core's ``LoraCache`` (the scale is in it)."""

    core: LoraCache


def lora_bias_forward(x, A, B, lora_bias, *, scale, W=None, bias=None, dropout_mask=None):
    """LoRA layer with PEFT's lora_bias: y = x W^T + bias + s ((x * m) A^T B^T + c).

    Args:
      x: (..., I) input.
      A: (R, I); B: (O, R); lora_bias: c, (O,) (PEFT's ``lora_B.bias``).
      scale: s (``LoraConfig.scale``: alpha/R, or alpha/sqrt(R) with rsLoRA).
      W: optional base weight (O, I); bias: optional base bias (O,).
      dropout_mask: optional inverted-dropout mask with x's shape (LoRA branch only).

    Returns:
      (y, cache): y (..., O) and a ``LoraBiasCache`` for ``lora_bias_backward``.

    Raises:
      TypeError: non-arrays, mixed dtypes or libraries.
      ValueError: shapes that do not fit (lora_bias must be (O,)).

    Example:
      >>> import numpy as np
      >>> x = np.ones((1, 2)); A = np.ones((1, 2)); B = np.ones((3, 1))
      >>> y, _ = lora_bias_forward(x, A, B, np.full(3, 0.5), scale=2.0)
      >>> y.tolist()
      [[5.0, 5.0, 5.0]]
    """
    s = _check_scale(scale)
    if not hasattr(lora_bias, "shape"):
        raise TypeError(f"lora_bias is {type(lora_bias).__name__}; expected an array")
    y, cache = lora_forward(x, A, B, scale=s, W=W, bias=bias, dropout_mask=dropout_mask)
    xp = array_namespace(x, lora_bias, names=("x", "lora_bias"))
    O = B.shape[0]
    if tuple(lora_bias.shape) != (O,):
        raise ValueError(f"lora_bias has shape {tuple(lora_bias.shape)}; expected (O,) = ({O},), O taken from B")
    if lora_bias.dtype != x.dtype:
        raise TypeError(f"lora_bias has dtype {lora_bias.dtype}; expected {x.dtype}, the dtype of x")
    # the LoRA bias is scaled with the branch: y += s c
    y = y + s * xp.reshape(lora_bias, (1,) * (y.ndim - 1) + (O,))
    return y, LoraBiasCache(cache)


def lora_bias_backward(dy, cache):
    """Gradients through ``lora_bias_forward``.

        dx, dA, dB  as ``reflora.lora_backward``
        dc_O = s sum_N dy_NO

    Args:
      dy: (..., O) upstream gradient, same namespace and dtype as x.
      cache: the ``LoraBiasCache`` from ``lora_bias_forward``.

    Returns:
      ``LoraBiasGrads(dx, dA, dB, dlora_bias)``.

    Raises:
      TypeError / ValueError: a wrong cache, or dy of the wrong library, dtype or shape.

    Example:
      >>> import numpy as np
      >>> x = np.ones((2, 2)); A = np.ones((1, 2)); B = np.ones((3, 1))
      >>> y, c = lora_bias_forward(x, A, B, np.zeros(3), scale=0.5)
      >>> lora_bias_backward(np.ones_like(y), c).dlora_bias.tolist()
      [1.0, 1.0, 1.0]
    """
    if not isinstance(cache, LoraBiasCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the LoraBiasCache returned by lora_bias_forward")
    g = lora_backward(dy, cache.core)
    xp = array_namespace(dy)
    O = cache.core.B.shape[0]
    # dc = s * sum over all rows of dy
    dc = cache.core.scale * xp.sum(xp.reshape(dy, (cache.core.x_NI.shape[0], O)), axis=0)
    return LoraBiasGrads(g.dx, g.dA, g.dB, dc)
