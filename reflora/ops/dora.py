"""DoRA (weight-decomposed LoRA, Liu et al. 2024) with a hand-written backward.

Legend as in ``reflora.ops.lora``: N rows, I in_features, O out_features, R rank.
DoRA rescales each output row of the adapted weight V = W + s B A to a
trainable length m (PEFT's ``lora_magnitude_vector``, shape (O,)):

    V_OI = W_OI + s B_OR A_RI                  adapted weight (O x I, formed: the norm needs it)
    n_O  = ||V_o,:||_2                         one norm per output row (PEFT: dim=1 of (O, I))
    g_O  = m_O / n_O                           the per-row rescaling
    y_NO = g_O * (x_NI V_OI^T) + bias_O        = g * (x W^T + s (x A^T) B^T) + bias

With an inverted-dropout mask on the LoRA branch, PEFT's training forward is

    x_d  = x * mask
    y_NO = x W^T + bias + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T

(the same expression as above when there is no mask). m is initialised to n
(``dora_weight_norm``), so a fresh DoRA layer with B = 0 is the base layer.

Backward, with dy = dL/dy and l = s (x_d A^T) B^T, bd = x_d W^T:

    dg_O  = sum_N dy * (bd + l)
    dm_O  = dg / n
    dB_OR = s (g * dy)^T (x_d A^T)
    dh_NR = s (g * dy) B
    dA_RI = dh^T x_d
    dx_NI = dy W + ((g - 1) * dy W + dh A) * mask

That is PEFT's gradient, ``norm_grad="detached"`` (the default): n is treated
as a constant in backward, as the DoRA paper suggests (section 4.3) and PEFT
does (``weight_norm.detach()``), to save memory. It is *not* the gradient of
the forward. ``norm_grad="exact"`` adds the terms through n:

    dn_O  = -dg * m / n^2 = -dg * g / n,      c_O = dn / n
    dV_OI = c * V                              (d||v|| / dv = v / ||v||)
    dB   += s c * (V A^T)      with V A^T = W A^T + s B (A A^T)     (O x R)
    dA   += s (c * B)^T V      = s (c * B)^T W + s^2 ((c * B)^T B) A (R x I)

so the backward never forms V again. A row with n = 0 (W's row and s B A's
row cancel exactly) has no direction: ``dora_forward`` raises ValueError
naming the rows, where PEFT silently produces inf/NaN (no epsilon is added); so
does a non-finite n. In float16 the sum of squares is accumulated in float32
(as torch.linalg.norm does), so n overflows only past 65504, not past 256.

The LoRA branch is ``reflora.lora_forward`` / ``lora_backward`` on x_d (the
dropout mask passed through) with the upstream gradient g * dy: the two share
one implementation. The magnitude m is passed as ``magnitude=``, the base
weight as ``W=`` (required), and ``norm_grad`` to ``dora_backward``, which is
where it is read. The merge, W' = RN(g * V), lives with the other merges in
``reflora.numerics.merge`` (``dora_merge``, ``dora_unmerge``; re-exported here).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from .._validate import (_check_arrays, _check_dy, _check_inputs, _check_lowrank, _check_row_norms, _check_scale, _check_vector,
                         _is_real_floating, _legacy_arguments)
from ..backend import array_namespace
from ..numerics.merge import DoraMerged, dora_merge, dora_row_norms, dora_unmerge
from .lora import LoraCache, lora_backward, lora_forward

__all__ = ["DoraCache", "DoraGrads", "DoraMerged", "dora_backward", "dora_forward", "dora_merge",
           "dora_unmerge", "dora_weight_norm", "NORM_GRAD_MODES"]

NORM_GRAD_MODES = ("detached", "exact")


class DoraGrads(NamedTuple):
    """Gradients: dx (x's shape), dA (R, I), dB (O, R), dm (O,) (the magnitude's)."""

    dx: Any
    dA: Any
    dB: Any
    dm: Any


class DoraCache(NamedTuple):
    """What ``dora_backward`` needs: the LoRA branch's ``LoraCache`` and DoRA's (O,) and N x O intermediates.

    ``norm_grad`` is None unless the deprecated ``dora_forward(norm_grad=...)`` set it.
    """

    lora: LoraCache
    W: Any
    bdl_NO: Any
    n_O: Any
    g_O: Any
    x_shape: tuple
    norm_grad: str | None


def _check_norm_grad(norm_grad: Any) -> str:
    if norm_grad not in NORM_GRAD_MODES:
        raise ValueError(f"norm_grad is {norm_grad!r}; expected one of {NORM_GRAD_MODES}")
    return norm_grad


def dora_weight_norm(W, A, B, *, scale):
    """The row norms n_O = ||W + s B A||_o, PEFT's initial ``lora_magnitude_vector``.

    Args:
      W: (O, I) base weight; A: (R, I); B: (O, R); one namespace and dtype.
      scale: s.

    Returns:
      n, shape (O,), in W's namespace and dtype.

    Raises:
      ValueError: W None, or shapes that do not fit.
      TypeError: non-arrays, mixed dtypes or libraries.

    Example:
      >>> import numpy as np
      >>> dora_weight_norm(np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.zeros((1, 1)), scale=1.0).tolist()
      [5.0]
    """
    s = _check_scale(scale)
    if W is None:
        raise ValueError("W is None; DoRA needs the base weight (O, I)")
    xp = _check_arrays(("W", "A", "B"), (W, A, B))
    if not _is_real_floating(xp, W.dtype) or A.dtype != W.dtype or B.dtype != W.dtype:
        raise TypeError(f"W, A, B have dtypes {W.dtype}, {A.dtype}, {B.dtype}; expected one real floating dtype")
    _check_lowrank(W, A, B)
    return dora_row_norms(xp, W, A, B, s)[1]


def dora_forward(x, A, B, *legacy, magnitude=None, W=None, scale, bias=None, dropout_mask=None, norm_grad=None,
                 **legacy_keywords):
    """DoRA layer: y = x W^T + bias + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T, g = m / ||W + s B A||_row.

    Args:
      x: (..., I) input.
      A: (R, I); B: (O, R).
      magnitude: m, (O,) (PEFT's ``lora_magnitude_vector``).
      W: (O, I) frozen base weight (required: DoRA rescales it).
      scale: s (``LoraConfig.scale``; alpha/sqrt(R) with rsLoRA).
      bias: optional base bias (O,), never rescaled (as PEFT).
      dropout_mask: optional inverted-dropout mask with x's shape (LoRA branch only).
      norm_grad: deprecated here; pass it to ``dora_backward``.

    The old form ``dora_forward(x, A, B, m, W, ...)`` (and ``m=``) still works, with a
    DeprecationWarning.

    Returns:
      (y, cache): y (..., O) in x's namespace and dtype, and a ``DoraCache``.

    Raises:
      ValueError: shapes that do not fit; a row with n = 0 or n not finite (inf or NaN).
      TypeError: non-arrays, mixed dtypes or libraries; magnitude or W missing.

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.ones((1, 2)); B = np.zeros((1, 1))
      >>> y, _ = dora_forward(np.ones((1, 2)), A, B, magnitude=np.array([10.0]), W=W, scale=1.0)
      >>> y.tolist()   # (10 / 5) * (3 + 4)
      [[14.0]]
    """
    if legacy or legacy_keywords:
        if set(legacy_keywords) - {"m"}:
            raise TypeError(f"dora_forward() got unexpected keyword arguments {sorted(set(legacy_keywords) - {'m'})}")
        old = _legacy_arguments("dora_forward", legacy, ("magnitude", "W"), {"magnitude": magnitude, "W": W},
                                {"m": ("magnitude", legacy_keywords.get("m"))})
        magnitude, W = old["magnitude"], old["W"]
    if norm_grad is not None:
        warnings.warn("dora_forward: norm_grad= is deprecated here; pass it to dora_backward(dy, cache, "
                      "norm_grad=...), where it is read", DeprecationWarning, stacklevel=2)
        _check_norm_grad(norm_grad)
    s = _check_scale(scale)
    if W is None:
        raise ValueError("W is None; DoRA needs the base weight (O, I): it rescales W + s B A row by row")
    if magnitude is None:
        raise TypeError("magnitude is None; expected the DoRA magnitude m (O,), PEFT's lora_magnitude_vector")
    if not hasattr(magnitude, "shape"):
        raise TypeError(f"magnitude is {type(magnitude).__name__}; expected an array")
    xp, N, I, O, R = _check_inputs(x, A, B, W, bias, dropout_mask)
    array_namespace(x, magnitude, names=("x", "magnitude"))
    _check_vector("magnitude", magnitude, O)
    if magnitude.dtype != x.dtype:
        raise TypeError(f"magnitude has dtype {magnitude.dtype}; expected {x.dtype}, the dtype of x")
    x_NI = xp.reshape(x, (N, I))
    mask_NI = None if dropout_mask is None else xp.reshape(dropout_mask, (N, I))
    # the row norms of the adapted weight, n = ||W + s B A||_row, and g = m / n
    _, n_O = dora_row_norms(xp, W, A, B, s)
    _check_row_norms(xp, n_O)
    g_O = magnitude / n_O
    # base path on the un-dropped input: x W^T
    base_NO = xp.matmul(x_NI, xp.matrix_transpose(W))
    # base path on the dropped input, bd = x_d W^T (the same as base without a mask)
    bd_NO = base_NO if mask_NI is None else xp.matmul(x_NI * mask_NI, xp.matrix_transpose(W))
    # LoRA branch on the dropped input: l = s (x_d A^T) B^T (N x O)
    l_NO, lora = lora_forward(x_NI, A, B, scale=s, dropout_mask=mask_NI)
    # y = base + (g - 1) * bd + g * l  (+ bias)
    y_NO = base_NO + (g_O - 1) * bd_NO + g_O * l_NO
    if bias is not None:
        y_NO = y_NO + bias
    y = xp.reshape(y_NO, tuple(x.shape[:-1]) + (O,))
    return y, DoraCache(lora, W, bd_NO + l_NO, n_O, g_O, tuple(x.shape), norm_grad)


def dora_backward(dy, cache, *, norm_grad=None):
    """Gradients through ``dora_forward``; see the module docstring for the formulas.

    Args:
      dy: (..., O) upstream gradient, same namespace and dtype as x.
      cache: the ``DoraCache`` from ``dora_forward``.
      norm_grad: "detached" (PEFT's and the paper's gradient, n held constant;
        the default) or "exact" (n differentiated too).

    Returns:
      ``DoraGrads(dx, dA, dB, dm)``.

    Raises:
      TypeError / ValueError: a wrong cache, or dy of the wrong library, dtype or shape;
        an unknown norm_grad.

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.ones((1, 2)); B = np.zeros((1, 1))
      >>> y, c = dora_forward(np.ones((1, 2)), A, B, magnitude=np.array([5.0]), W=W, scale=1.0)
      >>> dora_backward(np.ones_like(y), c).dm.tolist()   # (3 + 4) / 5
      [1.4]
    """
    if not isinstance(cache, DoraCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the DoraCache returned by dora_forward")
    lora, W, bdl_NO, n_O, g_O, x_shape, cached_mode = cache
    mode = _check_norm_grad(norm_grad if norm_grad is not None else cached_mode or "detached")
    x_NI, mask_NI, A, B, s = lora.x_NI, lora.mask_NI, lora.A, lora.B, lora.scale
    N, I = x_NI.shape
    O = B.shape[0]
    xp = _check_dy(dy, x_NI, x_shape, O)
    mT = xp.matrix_transpose
    dy_NO = xp.reshape(dy, (N, O))
    # dg = sum_N dy * (bd + l): g multiplies both the dropped base path and the LoRA branch
    dg_O = xp.sum(dy_NO * bdl_NO, axis=0)
    # dm = dg / n
    dm = dg_O / n_O
    # the LoRA branch sees g * dy: dB = (g dy)^T hs, dA = (s (g dy) B)^T x_d, dx_l = (dh A) * mask
    lg = lora_backward(g_O * dy_NO, lora)
    dA, dB = lg.dA, lg.dB
    if mask_NI is None:
        # dx = dy W + (g - 1) dy W + dh A = (g dy) W + dh A
        dx_NI = xp.matmul(g_O * dy_NO, W) + lg.dx
    else:
        # dx = dy W + ((g - 1) dy W) * mask + (dh A) * mask
        dx_NI = xp.matmul(dy_NO, W) + xp.matmul((g_O - 1) * dy_NO, W) * mask_NI + lg.dx
    if mode == "exact":
        # dn = -dg m / n^2 = -dg g / n, and c = dn / n scales dV = c * V
        c_O1 = xp.reshape(-dg_O * g_O / (n_O * n_O), (O, 1))
        cB_OR = c_O1 * B
        # dB += s c * (V A^T), V A^T = W A^T + s B (A A^T): O x R, V never formed
        VAt_OR = xp.matmul(W, mT(A)) + s * xp.matmul(B, xp.matmul(A, mT(A)))
        dB = dB + s * c_O1 * VAt_OR
        # dA += s (c B)^T V = s (c B)^T W + s^2 ((c B)^T B) A
        dA = dA + s * xp.matmul(mT(cB_OR), W) + (s * s) * xp.matmul(xp.matmul(mT(cB_OR), B), A)
    return DoraGrads(xp.reshape(dx_NI, x_shape), dA, dB, dm)
