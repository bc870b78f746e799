"""Stacked LoRA layers with activations between them, and a manual backward through the stack.

Legend as in ``reflora.ops.lora``: N rows; layer l maps width D_{l-1} to D_l (its I
and O), rank R_l. For layers l = 1..L with activation f between layers:

    h_0 = x
    z_l = h_{l-1} W_l^T + bias_l + s_l ((h_{l-1} * m_l) A_l^T) B_l^T     (``lora_forward``)
    h_l = f_l(z_l)            for l < L   (no activation after the last layer)
    y   = z_L

Backward, given dy = dL/dy, from the last layer to the first:

    dz_L = dy
    dA_l, dB_l, dh_{l-1} = lora_backward(dz_l)                              (``lora_backward``)
    dz_{l-1} = f'_{l-1}(z_{l-1}) * dh_{l-1}

Activations (each forward beside its derivative, micrograd-style):

    relu:       f(z) = max(z, 0)                 f'(z) = [z > 0]   (0 at z = 0; NaN and its gradient pass through, as torch)
    gelu_tanh:  f(z) = z/2 (1 + tanh u),  u = c (z + k z^3),  c = sqrt(2/pi), k = 0.044715
                f'(z) = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) c (1 + 3 k z^2)
                (torch's ``gelu(approximate="tanh")``, PEFT models' "gelu_new"/"gelu_pytorch_tanh")
    identity:   f(z) = z                         f'(z) = 1

The cache keeps each layer's ``LoraCache`` and pre-activation z_l (N x D_l).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

from .._validate import _check_scale
from ..backend import array_namespace
from .lora import LoraCache, LoraGrads, lora_backward, lora_forward

__all__ = ["ACTIVATIONS", "LoraLayer", "StackCache", "StackGrads", "activation_backward", "activation_forward",
           "stack_backward", "stack_forward"]

ACTIVATIONS = ("relu", "gelu_tanh", "identity")
_C = math.sqrt(2.0 / math.pi)
_K = 0.044715


class LoraLayer(NamedTuple):
    """One LoRA-adapted linear layer of a stack: A (R, I), B (O, R), W (O, I) or None, bias (O,) or None."""

    A: Any
    B: Any
    W: Any = None
    bias: Any = None


class StackCache(NamedTuple):
    """Per-layer ``LoraCache``s, pre-activations z_l (layers 1..L-1) and activation names."""

    layers: tuple
    z: tuple
    activations: tuple


class StackGrads(NamedTuple):
    """dx (x's shape) and one ``LoraGrads`` per layer (its dx is that layer's input gradient)."""

    dx: Any
    layers: tuple


def activation_forward(z, kind: str):
    """f(z) for kind in ACTIVATIONS (see the module docstring).

    Example:
      >>> import numpy as np
      >>> activation_forward(np.array([-1.0, 0.0, 2.0]), "relu").tolist()
      [0.0, 0.0, 2.0]
    """
    xp = array_namespace(z)
    if kind == "relu":
        # max(z, 0), written as torch's relu: NaN stays NaN, -0.0 stays -0.0
        return xp.where(z < 0, xp.zeros_like(z), z)
    if kind == "gelu_tanh":
        # z/2 (1 + tanh(c (z + k z^3)))
        return 0.5 * z * (1.0 + xp.tanh(_C * (z + _K * z * z * z)))
    if kind == "identity":
        return z
    raise ValueError(f"activation is {kind!r}; expected one of {ACTIVATIONS}")


def activation_backward(da, z, kind: str):
    """dz = f'(z) * da for kind in ACTIVATIONS.

    Example:
      >>> import numpy as np
      >>> activation_backward(np.ones(3), np.array([-1.0, 0.0, 2.0]), "relu").tolist()
      [0.0, 0.0, 1.0]
    """
    xp = array_namespace(da, z)
    if kind == "relu":
        # [z > 0] * da, as torch's threshold_backward: 0 where z <= 0 (subgradient 0 at z = 0), da where z is NaN
        return xp.where(z <= 0, xp.zeros_like(da), da)
    if kind == "gelu_tanh":
        t = xp.tanh(_C * (z + _K * z * z * z))
        # (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 k z^2)
        return da * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (_C * (1.0 + 3.0 * _K * z * z)))
    if kind == "identity":
        return da
    raise ValueError(f"activation is {kind!r}; expected one of {ACTIVATIONS}")


def _activations(activation: Any, L: int) -> tuple:
    acts = (activation,) * (L - 1) if isinstance(activation, str) else tuple(activation)
    if len(acts) != L - 1:
        raise ValueError(f"{len(acts)} activations for {L} layers; expected L - 1 = {L - 1} (one between layers)")
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"activation is {a!r}; expected one of {ACTIVATIONS}")
    return acts


def stack_forward(x, layers: Sequence[LoraLayer], *, scales, activation="relu", dropout_masks=None):
    """y of L stacked LoRA layers with activations between them (see the module docstring).

    Args:
      x: (..., D_0) input.
      layers: L ``LoraLayer``s (or (A, B, W, bias) tuples); layer l has A (R_l, D_{l-1}),
        B (D_l, R_l), W (D_l, D_{l-1}) or None, bias (D_l,) or None.
      scales: one scale s_l per layer (``LoraConfig.scale``: rsLoRA honoured there), or
        one real number (a NumPy scalar or 0-d array too) for all.
      activation: a name from ACTIVATIONS for every gap, or a sequence of L - 1 names.
      dropout_masks: optional sequence of L masks (or None entries), mask l with h_{l-1}'s shape.

    Returns:
      (y, cache): y (..., D_L) and a ``StackCache``.

    Raises:
      ValueError: no layers, widths that do not chain (named by layer), bad activation names
        or counts; TypeError: dtypes or libraries that differ.

    Example:
      >>> import numpy as np
      >>> l1 = LoraLayer(np.ones((1, 2)), np.ones((3, 1)))
      >>> l2 = LoraLayer(np.ones((1, 3)), np.ones((1, 1)))
      >>> y, _ = stack_forward(np.array([[1.0, -2.0]]), [l1, l2], scales=1.0)
      >>> y.tolist()   # relu(-1) = 0 in every hidden unit
      [[0.0]]
    """
    L = len(layers)
    if L == 0:
        raise ValueError("layers is empty; expected at least one LoraLayer")
    if isinstance(scales, numbers.Real) or getattr(scales, "shape", None) == ():
        # one number (NumPy scalars and 0-d arrays included) for every layer; _check_scale refuses a bool
        scales = (scales,) * L
    if isinstance(scales, str) or not hasattr(scales, "__iter__"):
        raise TypeError(f"scales is {type(scales).__name__}; expected a real number or a sequence of L = {L}")
    scales = tuple(_check_scale(s) for s in scales)
    if len(scales) != L:
        raise ValueError(f"{len(scales)} scales for {L} layers; expected one per layer")
    acts = _activations(activation, L)
    masks = (None,) * L if dropout_masks is None else tuple(dropout_masks)
    if len(masks) != L:
        raise ValueError(f"{len(masks)} dropout masks for {L} layers; expected one (or None) per layer")
    h = x
    caches, zs = [], []
    for l, (layer, s, mask) in enumerate(zip(layers, scales, masks)):
        A, B, W, bias = LoraLayer(*layer)
        try:
            # z_l = h W^T + bias + s ((h * m) A^T) B^T
            z, cache = lora_forward(h, A, B, scale=s, W=W, bias=bias, dropout_mask=mask)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {l}: {exc}") from None
        caches.append(cache)
        if l < L - 1:
            zs.append(z)
            # h_l = f(z_l)
            h = activation_forward(z, acts[l])
        else:
            h = z
    return h, StackCache(tuple(caches), tuple(zs), acts)


def stack_backward(dy, cache: StackCache) -> StackGrads:
    """Gradients through ``stack_forward``, layer by layer from the last.

    Args:
      dy: (..., D_L) upstream gradient.
      cache: the ``StackCache`` from ``stack_forward``.

    Returns:
      ``StackGrads(dx, layers)``: dx with x's shape and one ``LoraGrads(dx, dA, dB)``
      per layer, in layer order.

    Raises:
      TypeError / ValueError: a wrong cache or dy (as ``lora_backward``).

    Example:
      >>> import numpy as np
      >>> l1 = LoraLayer(np.ones((1, 2)), np.ones((2, 1)))
      >>> y, c = stack_forward(np.array([[1.0, 2.0]]), [l1, l1], scales=1.0)
      >>> stack_backward(np.ones_like(y), c).dx.tolist()
      [[4.0, 4.0]]
    """
    if not isinstance(cache, StackCache) or not all(isinstance(c, LoraCache) for c in cache.layers):
        raise TypeError(f"cache is {type(cache).__name__}; expected the StackCache returned by stack_forward")
    grads: list[LoraGrads] = []
    dz = dy
    L = len(cache.layers)
    for l in range(L - 1, -1, -1):
        # dA_l, dB_l and dh_{l-1} from the layer's own backward
        g = lora_backward(dz, cache.layers[l])
        grads.append(g)
        if l > 0:
            # dz_{l-1} = f'(z_{l-1}) * dh_{l-1}
            dz = activation_backward(g.dx, cache.z[l - 1], cache.activations[l - 1])
    grads.reverse()
    return StackGrads(grads[0].dx, tuple(grads))
