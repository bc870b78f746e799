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

Merge: W' = RN(g * V), rounded once from float64 to W's dtype; unmerge needs
the norm n from merge time (W' alone does not determine it: ||W'_o|| = |m_o|),
as PEFT caches it. Neither is certified correctly rounded (sqrt and division
are involved), unlike ``reflora.merge``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._validate import _check_inputs, _check_scale
from ..backend import array_namespace, to_numpy
from ..numerics.rounding import round_to_dtype

__all__ = ["DoraCache", "DoraGrads", "DoraMerged", "dora_backward", "dora_forward", "dora_merge",
           "dora_unmerge", "dora_weight_norm", "NORM_GRAD_MODES"]

NORM_GRAD_MODES = ("detached", "exact")


class DoraGrads(NamedTuple):
    """Gradients: dx (x's shape), dA (R, I), dB (O, R), dm (O,)."""

    dx: Any
    dA: Any
    dB: Any
    dm: Any


class DoraCache(NamedTuple):
    """What ``dora_backward`` needs: references to the inputs, and the N x R, N x O and (O,) intermediates."""

    x_NI: Any
    mask_NI: Any
    A: Any
    B: Any
    W: Any
    hs_NR: Any
    bdl_NO: Any
    n_O: Any
    g_O: Any
    scale: float
    x_shape: tuple
    norm_grad: str


class DoraMerged(NamedTuple):
    """The merged weight (W's dtype) and the row norms n (float64, host) that ``dora_unmerge`` needs."""

    weight: Any
    norm: Any


def _row_norms(xp, W, A, B, s):
    # V = W + s B A: the O x I adapted weight (DoRA's norm needs it; PEFT forms it too)
    V = W + s * xp.matmul(B, A)
    if V.dtype == getattr(xp, "float16", None):
        # Note: float16's sum of squares overflows (65504) once a row norm reaches 256; accumulate
        # in float32 and round n back to float16, as torch.linalg.norm (PEFT's get_weight_norm) does.
        V32 = xp.astype(V, xp.float32)
        return V, xp.astype(xp.sqrt(xp.sum(V32 * V32, axis=1)), xp.float16)
    # n = ||V_o||_2 per output row
    return V, xp.sqrt(xp.sum(V * V, axis=1))


def _check_nonzero(xp, n_O):
    if not bool(xp.all(xp.isfinite(n_O))):
        rows = np.nonzero(~np.isfinite(np.asarray(to_numpy(n_O))))[0].tolist()
        raise ValueError(
            f"DoRA row norm ||W + s B A||_o is not finite for rows o = {rows[:10]}{' ...' if len(rows) > 10 else ''} "
            f"in {n_O.dtype}; expected finite norms (W + s B A holds inf/NaN, or a norm exceeds the dtype's range)")
    if bool(xp.any(n_O == 0)):
        rows = np.nonzero(np.asarray(to_numpy(n_O)) == 0)[0].tolist()
        raise ValueError(
            f"DoRA row norm ||W + s B A||_o is 0 for rows o = {rows[:10]}{' ...' if len(rows) > 10 else ''}; "
            "expected > 0 for every row (such a row has no direction to rescale; PEFT would give inf/NaN)")


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
    if not hasattr(W, "shape"):
        raise TypeError(f"W is {type(W).__name__}; expected an array, the base weight (O, I)")
    if W.ndim != 2:
        raise ValueError(f"W has shape {tuple(W.shape)}; expected the base weight (O, I)")
    xp, _, _, _, _ = _check_inputs(W[:0, :], A, B, W, None, None)
    return _row_norms(xp, W, A, B, s)[1]


def dora_forward(x, A, B, m, W, *, scale, bias=None, dropout_mask=None, norm_grad="detached"):
    """DoRA layer: y = x W^T + bias + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T, g = m / ||W + s B A||_row.

    Args:
      x: (..., I) input.
      A: (R, I); B: (O, R); m: (O,) magnitude (PEFT's ``lora_magnitude_vector``).
      W: (O, I) frozen base weight (required: DoRA rescales it).
      scale: s (``LoraConfig.scale``; alpha/sqrt(R) with rsLoRA).
      bias: optional base bias (O,), never rescaled (as PEFT).
      dropout_mask: optional inverted-dropout mask with x's shape (LoRA branch only).
      norm_grad: "detached" (PEFT's and the paper's gradient, n held constant)
        or "exact" (n differentiated too). Only ``dora_backward`` differs.

    Returns:
      (y, cache): y (..., O) in x's namespace and dtype, and a ``DoraCache``.

    Raises:
      ValueError: shapes that do not fit; an unknown norm_grad; a row with n = 0 or n not finite (inf or NaN).
      TypeError: non-arrays, mixed dtypes or libraries.

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.ones((1, 2)); B = np.zeros((1, 1))
      >>> y, _ = dora_forward(np.ones((1, 2)), A, B, np.array([10.0]), W, scale=1.0)
      >>> y.tolist()   # (10 / 5) * (3 + 4)
      [[14.0]]
    """
    s = _check_scale(scale)
    if norm_grad not in NORM_GRAD_MODES:
        raise ValueError(f"norm_grad is {norm_grad!r}; expected one of {NORM_GRAD_MODES}")
    if W is None:
        raise ValueError("W is None; DoRA needs the base weight (O, I): it rescales W + s B A row by row")
    if not hasattr(m, "shape"):
        raise TypeError(f"m is {type(m).__name__}; expected an array")
    xp, N, I, O, R = _check_inputs(x, A, B, W, bias, dropout_mask)
    array_namespace(x, m, names=("x", "m"))
    if tuple(m.shape) != (O,):
        raise ValueError(f"m has shape {tuple(m.shape)}; expected (O,) = ({O},), O taken from B")
    if m.dtype != x.dtype:
        raise TypeError(f"m has dtype {m.dtype}; expected {x.dtype}, the dtype of x")
    mT = xp.matrix_transpose
    x_NI = xp.reshape(x, (N, I))
    mask_NI = None if dropout_mask is None else xp.reshape(dropout_mask, (N, I))
    # the row norms of the adapted weight, n = ||W + s B A||_row, and g = m / n
    _, n_O = _row_norms(xp, W, A, B, s)
    _check_nonzero(xp, n_O)
    g_O = m / n_O
    # base path on the un-dropped input: x W^T
    base_NO = xp.matmul(x_NI, mT(W))
    # dropout on the LoRA branch only: x_d = x * mask
    xd_NI = x_NI if mask_NI is None else x_NI * mask_NI
    # base path on the dropped input, bd = x_d W^T (the same as base without a mask)
    bd_NO = base_NO if mask_NI is None else xp.matmul(xd_NI, mT(W))
    # LoRA branch: hs = s x_d A^T (N x R), l = hs B^T (N x O)
    hs_NR = s * xp.matmul(xd_NI, mT(A))
    l_NO = xp.matmul(hs_NR, mT(B))
    # y = base + (g - 1) * bd + g * l  (+ bias)
    y_NO = base_NO + (g_O - 1) * bd_NO + g_O * l_NO
    if bias is not None:
        y_NO = y_NO + bias
    y = xp.reshape(y_NO, tuple(x.shape[:-1]) + (O,))
    cache = DoraCache(x_NI, mask_NI, A, B, W, hs_NR, bd_NO + l_NO, n_O, g_O, s, tuple(x.shape), norm_grad)
    return y, cache


def dora_backward(dy, cache):
    """Gradients through ``dora_forward``; see the module docstring for the formulas.

    Args:
      dy: (..., O) upstream gradient, same namespace and dtype as x.
      cache: the ``DoraCache`` from ``dora_forward`` (it carries norm_grad).

    Returns:
      ``DoraGrads(dx, dA, dB, dm)``.

    Raises:
      TypeError / ValueError: a wrong cache, or dy of the wrong library, dtype or shape.

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.ones((1, 2)); B = np.zeros((1, 1))
      >>> y, c = dora_forward(np.ones((1, 2)), A, B, np.array([5.0]), W, scale=1.0)
      >>> dora_backward(np.ones_like(y), c).dm.tolist()   # (3 + 4) / 5
      [1.4]
    """
    if not isinstance(cache, DoraCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the DoraCache returned by dora_forward")
    x_NI, mask_NI, A, B, W, hs_NR, bdl_NO, n_O, g_O, s, x_shape, norm_grad = cache
    if not hasattr(dy, "shape"):
        raise TypeError(f"dy is {type(dy).__name__}; expected an array")
    xp = array_namespace(dy, x_NI, names=("dy", "x"))
    if dy.dtype != x_NI.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x_NI.dtype}, the dtype of x")
    N, I = x_NI.shape
    O = B.shape[0]
    expected = tuple(x_shape[:-1]) + (O,)
    if tuple(dy.shape) != expected:
        raise ValueError(f"dy has shape {tuple(dy.shape)}; expected (..., O) = {expected}, the shape of y")
    mT = xp.matrix_transpose
    dy_NO = xp.reshape(dy, (N, O))
    # dg = sum_N dy * (bd + l): g multiplies both the dropped base path and the LoRA branch
    dg_O = xp.sum(dy_NO * bdl_NO, axis=0)
    # dm = dg / n
    dm = dg_O / n_O
    # the LoRA branch sees g * dy
    dyg_NO = g_O * dy_NO
    # dB = s (g dy)^T h = (g dy)^T hs
    dB = xp.matmul(mT(dyg_NO), hs_NR)
    # dh = s (g dy) B
    dh_NR = s * xp.matmul(dyg_NO, B)
    # dA = dh^T x_d
    xd_NI = x_NI if mask_NI is None else x_NI * mask_NI
    dA = xp.matmul(mT(dh_NR), xd_NI)
    if mask_NI is None:
        # dx = dy W + (g - 1) dy W + dh A = (g dy) W + dh A
        dx_NI = xp.matmul(dyg_NO, W) + xp.matmul(dh_NR, A)
    else:
        # dx = dy W + ((g - 1) dy W + dh A) * mask
        dx_NI = xp.matmul(dy_NO, W) + (xp.matmul((g_O - 1) * dy_NO, W) + xp.matmul(dh_NR, A)) * mask_NI
    if norm_grad == "exact":
        # dn = -dg m / n^2 = -dg g / n, and c = dn / n scales dV = c * V
        c_O1 = xp.reshape(-dg_O * g_O / (n_O * n_O), (O, 1))
        cB_OR = c_O1 * B
        # dB += s c * (V A^T), V A^T = W A^T + s B (A A^T): O x R, V never formed
        VAt_OR = xp.matmul(W, mT(A)) + s * xp.matmul(B, xp.matmul(A, mT(A)))
        dB = dB + s * c_O1 * VAt_OR
        # dA += s (c B)^T V = s (c B)^T W + s^2 ((c B)^T B) A
        dA = dA + s * xp.matmul(mT(cB_OR), W) + (s * s) * xp.matmul(xp.matmul(mT(cB_OR), B), A)
    return DoraGrads(xp.reshape(dx_NI, x_shape), dA, dB, dm)


def _host_parts(W, A, B, m):
    for name, a in (("W", W), ("A", A), ("B", B), ("m", m)):
        if not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array")
    xp = array_namespace(W, A, B, m, names=("W", "A", "B", "m"))
    w = np.asarray(to_numpy(W))
    a, b, mm = (np.asarray(to_numpy(v), dtype=np.float64) for v in (A, B, m))
    if a.ndim != 2:
        raise ValueError(f"A has shape {a.shape}; expected (R, I)")
    R, I = a.shape
    if b.ndim != 2 or b.shape[1] != R:
        raise ValueError(f"B has shape {b.shape}; expected (O, R) = (O, {R}), R taken from A")
    O = b.shape[0]
    if w.shape != (O, I):
        raise ValueError(f"W has shape {w.shape}; expected (O, I) = ({O}, {I}), O taken from B and I from A")
    if mm.shape != (O,):
        raise ValueError(f"m has shape {mm.shape}; expected (O,) = ({O},), O taken from B")
    return xp, w, a, b, mm


def dora_merge(W, A, B, m, *, scale) -> DoraMerged:
    """Fold a DoRA adapter into W: W' = RN((m / n) * (W + s B A)), n = ||W + s B A||_row.

    Computed in float64 on the host and rounded once to W's dtype (bfloat16
    included); not certified correctly rounded (see the module docstring).

    Args:
      W: (O, I); A: (R, I); B: (O, R); m: (O,); any floating dtypes.
      scale: s.

    Returns:
      ``DoraMerged(weight, norm)``: weight in W's namespace and dtype; norm the
      float64 host row norms that ``dora_unmerge`` needs.

    Raises:
      ValueError: shapes that do not fit; a row with n = 0 or n not finite.
      TypeError: non-arrays or mixed libraries.

    Example:
      >>> import numpy as np
      >>> r = dora_merge(np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.zeros((1, 1)), np.array([10.0]), scale=1.0)
      >>> r.weight.tolist(), r.norm.tolist()
      ([[6.0, 8.0]], [5.0])
    """
    s = _check_scale(scale)
    xp, w, a, b, mm = _host_parts(W, A, B, m)
    V, n = _row_norms(np, w.astype(np.float64), a, b, s)
    _check_nonzero(np, n)
    out = round_to_dtype((mm / n)[:, None] * V, w.dtype)
    return DoraMerged(out if isinstance(W, np.ndarray) else xp.asarray(out), n)


def dora_unmerge(W, A, B, m, *, scale, norm):
    """Take a DoRA adapter back out: W = RN(W' * (n / m) - s B A), with n from ``dora_merge``.

    Args:
      W: (O, I) the merged weight W'; A, B, m, scale: as for ``dora_merge``.
      norm: (O,) the row norms returned by ``dora_merge`` (PEFT caches the same).

    Returns:
      The unmerged weight in W's namespace and dtype (float64 round trip: equal
      up to rounding; bfloat16: not an identity, as for ``reflora.unmerge``).

    Raises:
      ValueError: shapes that do not fit, or m with a zero entry (n / m undefined).

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.zeros((1, 2)); B = np.zeros((1, 1)); m = np.array([10.0])
      >>> r = dora_merge(W, A, B, m, scale=1.0)
      >>> dora_unmerge(r.weight, A, B, m, scale=1.0, norm=r.norm).tolist()
      [[3.0, 4.0]]
    """
    s = _check_scale(scale)
    xp, w, a, b, mm = _host_parts(W, A, B, m)
    n = np.asarray(to_numpy(norm), dtype=np.float64)
    if n.shape != mm.shape:
        raise ValueError(f"norm has shape {n.shape}; expected (O,) = {mm.shape}, as returned by dora_merge")
    if np.any(mm == 0):
        raise ValueError(f"m is 0 in rows {np.nonzero(mm == 0)[0].tolist()[:10]}; expected m != 0 to unmerge "
                         "(the merged row is 0 and its direction is lost)")
    out = round_to_dtype((n / mm)[:, None] * w.astype(np.float64) - s * (b @ a), w.dtype)
    return out if isinstance(W, np.ndarray) else xp.asarray(out)
