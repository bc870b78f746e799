"""Gradient clipping by the norm over all tensors, with ``torch.nn.utils.clip_grad_norm_``'s semantics.

For gradients g_1..g_k and p = norm_type:

    n_j   = ||g_j||_p                     each tensor's norm, rounded to the dtype (torch's vector_norm)
    n     = ||(n_1, ..., n_k)||_p          the total: the norm of ALL elements of all tensors
    c     = min(max_norm * (1 / (n + 1e-6)), 1)
    g_j  <- g_j * c                        every tensor by the same coefficient

||.||_inf is the largest |element|. The 1e-6 is torch's (added to the norm,
not squared); the coefficient is clamped at 1 so clipping never scales a
gradient up, and the multiplication happens even when c = 1 (exact). A
non-finite norm gives c = 0 (n = inf) or NaN: every gradient becomes 0 or
NaN (inf * 0), as in torch, unless ``error_if_nonfinite``.

Rounding, as torch's float32 (and float16) tensor arithmetic: n + 1e-6 and
the reciprocal are rounded to the dtype, then max_norm times it (torch's
``max_norm / t`` is ``t.reciprocal() * max_norm``: two roundings), then
each g * c. The norms themselves are formed in float64 and rounded once;
torch's float32 reduction can differ from that in the last bit (its
summation order), so c, and then the clipped gradients, can differ from
torch's by an ulp; with the same total norm everything after matches.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .._validate import _is_real_floating
from ..backend import array_namespace
from ._tree import items as _items, rebuild as _rebuild
from ._arith import Arith

__all__ = ["clip_grad_norm"]


def _norm(xp: Any, a64: Any, p: float) -> Any:
    """||a||_p of a float64 array (0-d float64)."""
    v = xp.abs(xp.reshape(a64, (-1,)))
    if v.shape[0] == 0:
        return xp.asarray(0.0, dtype=xp.float64)
    if math.isinf(p):
        return xp.max(v)
    if p == 2.0:
        return xp.sqrt(xp.sum(v * v))
    if p == 1.0:
        return xp.sum(v)
    return xp.sum(v ** p) ** (1.0 / p)


def clip_grad_norm(grads: Any, max_norm: float, *, norm_type: float | str = 2.0,
                   error_if_nonfinite: bool = False) -> tuple[Any, Any]:
    """Scale all gradients together so that their joint p-norm is at most ``max_norm``.

    Args:
      grads: a dict, tuple or list of arrays (one namespace and one real floating dtype).
      max_norm: the largest norm allowed, >= 0 (inf leaves finite gradients unchanged).
      norm_type: p > 0, or ``inf`` / ``"inf"`` for the largest absolute element.
      error_if_nonfinite: raise instead of clipping when the total norm is NaN or Inf.

    Returns:
      (clipped grads with the input's structure, the total norm before clipping as a
      0-d array of the grads' dtype). The inputs are not modified.

    Raises:
      ValueError: a negative or NaN max_norm, a norm_type <= 0 or NaN; a non-finite
        total norm with ``error_if_nonfinite`` (torch raises RuntimeError there).
      TypeError: max_norm, norm_type or error_if_nonfinite of the wrong type; mixed
        dtypes or array libraries.

    Example:
      >>> import numpy as np
      >>> g, n = clip_grad_norm({"A": np.array([3.0]), "B": np.array([4.0])}, 1.0)
      >>> float(n), round(float(g["A"][0]), 6), round(float(g["B"][0]), 6)
      (5.0, 0.6, 0.8)
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm is {max_norm!r} ({type(max_norm).__name__}); expected a real number >= 0")
    if not max_norm >= 0:  # NaN too
        raise ValueError(f"max_norm is {max_norm!r}; expected a number >= 0 (torch takes a negative one and "
                         f"flips the sign of every gradient)")
    if isinstance(norm_type, str) and norm_type == "inf":
        norm_type = math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type is {norm_type!r} ({type(norm_type).__name__}); expected a real p > 0, "
                        f"inf or 'inf'")
    if not norm_type > 0:
        raise ValueError(f"norm_type is {norm_type!r}; expected a p > 0 or inf (torch also takes 0 and -inf, "
                         f"which do not measure a gradient's size)")
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(f"error_if_nonfinite is {error_if_nonfinite!r}; expected True or False")
    p = float(norm_type)
    keys, vals = _items(grads, "grads")
    if not vals:
        return _rebuild(grads, []), np.asarray(0.0, dtype=np.float32)  # torch: tensor(0.)
    xp = array_namespace(*vals, names=tuple(f"grads[{k!r}]" for k in keys))
    dt = vals[0].dtype
    for k, g in zip(keys, vals):
        if g.dtype != dt or not _is_real_floating(xp, g.dtype):
            raise TypeError(f"grads[{k!r}] has dtype {g.dtype}; expected one real floating dtype for all "
                            f"gradients ({dt}, that of grads[{keys[0]!r}]): float16, float32 or float64 "
                            f"(bfloat16 is not an array-API dtype: use float32)")
    r = Arith(xp, dt)
    f64 = xp.float64
    # each tensor's norm, rounded to the dtype, then the norm of those norms
    norms = [xp.astype(_norm(xp, xp.astype(g, f64), p), dt) for g in vals]
    total = xp.astype(_norm(xp, xp.astype(xp.stack(norms), f64), p), dt)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise ValueError(f"the total norm of order {p} of the gradients is {float(total)}; expected a finite "
                         f"norm (error_if_nonfinite=True; pass False to scale by it anyway, as torch does)")
    # c = min(max_norm * (1 / (n + 1e-6)), 1): torch's max_norm / t is t.reciprocal() * max_norm
    recip = r.div(xp.ones_like(total), r.add(total, r.scalar(1e-6)))
    coef = r.mul(recip, r.scalar(float(max_norm)))
    coef = xp.where(coef > 1.0, xp.asarray(1.0, dtype=dt), coef)  # torch.clamp(max=1.0); NaN stays NaN
    with np.errstate(invalid="ignore"):  # Note: inf * 0 = NaN is the intended result (NumPy would warn)
        out = [r.mul(g, coef) for g in vals]
    return _rebuild(grads, out), total
