"""Rigorous rounding-error bounds for the LoRA forward and backward.

Used to compare two float implementations of the same formula (NumPy vs CuPy,
CPU vs GPU BLAS) with a tolerance derived from the arithmetic, not guessed.

The standard result (Higham, *Accuracy and Stability of Numerical
Algorithms*, Thm. 3.5): a dot product of length K computed in floating point
with unit roundoff u, in *any* summation order and with or without FMA, obeys

    |fl(a . b) - a . b| <= gamma_K |a| . |b|,   gamma_K = K u / (1 - K u).

Products of computed quantities compound: if h = x A^T carries error
gamma_I |x||A|^T, then h B^T carries gamma_{I+R} |x||A|^T|B|^T (to first
order; gamma_j + gamma_k + gamma_j gamma_k <= gamma_{j+k}). The scale s and
the dropout mask add one rounding each, and holding s in the dtype one more
where s is not a value of it (k_s = 1, else 0). The output y sums S terms in
any order: the I products of x W^T, the LoRA output and the bias (S = I + 1 +
[bias]; 1 + [bias] without W), so each takes part in up to S - 1 additions,
wherever the bias or the LoRA output enters (even as the start of the base
dot's accumulator); dx likewise sums dy W's O terms and the LoRA part. So,
elementwise, with |.| taken entrywise:

    y   <= gamma_S |x||W|^T + gamma_{S-1} |bias| + gamma_{I+R+1+k_s+S} |s| (|xm||A|^T)|B|^T
    dB  <= gamma_{N+I+2+k_s} |s| |dy|^T (|xm||A|^T)
    dA  <= gamma_{N+O+2+k_s} |s| (|dy||B|)^T |xm|
    dx  <= gamma_{2O+R+2+k_s} |s| ((|dy||B|)|A|) |mask| + gamma_{O+1} |dy||W|

with xm = x * mask (mask = 1 without dropout; the O of dx's first term is 0 without W). Below the normal range a rounding can
also lose an absolute amount eta (the smallest normal number, which covers
flush-to-zero too): each dot product of length K adds 2 K eta, carried through
the products that follow (Higham, section 2.1's model fl(a op b) = (a op b)(1 +
delta) + eta). In float64 and float32 these terms are negligible unless the
data are tiny; in float16 (eta = 6.1e-5) they matter for values below ~1e-2.
Overflow is not covered: the bounds assume every computed value is finite.
Two implementations that each satisfy these differ by at most
twice the bound: that is the agreement test between NumPy and CuPy in float64.
The bounds are worst-case; typical errors are ~sqrt(K) u rather than K u.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import dtype_name, to_numpy

__all__ = ["LoraErrorBounds", "gamma", "lora_error_bounds", "underflow_unit", "unit_roundoff"]


def unit_roundoff(dtype: Any) -> float:
    """u = 2^-p for a dtype with p significand bits (float64: 2^-53, float32: 2^-24)."""
    return float(np.finfo(np.dtype(dtype_name(dtype))).eps) / 2


def underflow_unit(dtype: Any) -> float:
    """eta: the largest absolute error one rounding can add below the normal range.

    The smallest normal number, so that flush-to-zero arithmetic (as some GPU
    paths use) is covered as well as gradual underflow (whose error is at most
    half the smallest subnormal).
    """
    return float(np.finfo(np.dtype(dtype_name(dtype))).tiny)


def _representable(s: float, dtype: Any) -> bool:
    """Whether the scale s is a value of ``dtype`` (so holding it in the dtype adds no rounding)."""
    name = dtype_name(dtype)
    if name == "float64":
        return True
    from .rounding import round_to_dtype  # noqa: PLC0415

    return float(np.asarray(round_to_dtype(np.array([float(s)]), name), dtype=np.float64)[0]) == float(s)


def gamma(k: int, u: float) -> float:
    """gamma_k = k u / (1 - k u); defined while k u < 1."""
    if k * u >= 1:
        raise ValueError(f"gamma_k undefined: k u = {k * u} >= 1")
    return k * u / (1 - k * u)


class LoraErrorBounds(NamedTuple):
    """Elementwise worst-case rounding error of one implementation (host float64 arrays)."""

    y: np.ndarray
    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray


def lora_error_bounds(x, A, B, *, scale: float, dy=None, W=None, bias=None, dropout_mask=None,
                      dtype: Any = None) -> LoraErrorBounds:
    """Bounds on |computed - exact| for lora_forward/lora_backward's outputs.

    Args:
      x: (..., I); A: (R, I); B: (O, R); W: (O, I) or None; bias: (O,) or None.
      dy: (..., O) upstream gradient (None: gradient bounds are zeros).
      scale: s.
      dtype: the precision the implementation computes in (default: x's dtype).

    Returns:
      ``LoraErrorBounds(y, dx, dA, dB)`` with the outputs' shapes, as NumPy float64.
    """
    f = lambda a: None if a is None else np.abs(np.asarray(to_numpy(a), dtype=np.float64))  # noqa: E731
    ax, aA, aB, aW, ab, am, ady = map(f, (x, A, B, W, bias, dropout_mask, dy))
    u = unit_roundoff(dtype if dtype is not None else to_numpy(x).dtype)
    I = ax.shape[-1]
    R, O = aA.shape[0], aB.shape[0]
    lead = ax.shape[:-1]
    x2 = ax.reshape(-1, I)
    xm = x2 if am is None else x2 * am.reshape(-1, I)
    N = x2.shape[0]
    s = abs(float(scale))
    h = xm @ aA.T                                     # |x||A|^T, N x R
    # Underflow: each rounding may also lose an absolute eta (below the normal
    # range, or flushed to zero); a dot of length K loses at most 2 K eta, and
    # an input's absolute error is carried through the |.| products after it.
    # The factor 2 on the sums covers the (1 + gamma) that multiplies them.
    eta = underflow_unit(dtype if dtype is not None else to_numpy(x).dtype)
    e_xm = eta if am is not None else 0.0                      # x * mask
    e_hs = s * (2 * I * eta + e_xm * aA.sum(axis=1)) + eta     # per r: hs = s (xm A^T)
    # The scale: an implementation holds fl(s) where s is not a value of the dtype: one more rounding on
    # every term that carries s (k_s = 1), none where s is representable (k_s = 0).
    k_s = 0 if _representable(scale, dtype if dtype is not None else to_numpy(x).dtype) else 1
    # The output sums S terms in any order (bias and LoRA output anywhere, even inside the base dot's
    # accumulator): each takes part in at most S - 1 additions after its own roundings.
    S = (I if aW is not None else 0) + 1 + (ab is not None)
    y = gamma(I + R + 2 + k_s + S - 1, u) * s * (h @ aB.T) + 2 * (2 * R * eta + aB @ e_hs + S * eta)
    if aW is not None:
        y = y + gamma(S, u) * (x2 @ aW.T) + 2 * (2 * I * eta)
    if ab is not None:
        y = y + gamma(S - 1, u) * ab + S * eta
    if ady is None:
        z = np.zeros
        return LoraErrorBounds(y.reshape(lead + (O,)), z(ax.shape), z(aA.shape), z(aB.shape))
    dy2 = ady.reshape(-1, O)
    dB = gamma(N + I + 2 + k_s, u) * s * (dy2.T @ h) + 2 * (2 * N * eta + np.outer(dy2.sum(axis=0), e_hs))
    dh = dy2 @ aB                                      # |dy||B|, N x R
    e_dh = s * 2 * O * eta + eta                       # dh = s (dy B)
    dA = gamma(N + O + 2 + k_s, u) * s * (dh.T @ xm) + 2 * (2 * N * eta + e_dh * xm.sum(axis=0)[None, :]
                                                     + s * dh.sum(axis=0)[:, None] * e_xm)
    # dx sums the LoRA part and the O terms of dy W in any order (the LoRA part may be the accumulator's start)
    S_dx = (O if aW is not None else 0) + 1
    dx = gamma(O + R + 2 + k_s + S_dx - 1, u) * s * (dh @ aA) + 2 * (2 * R * eta + e_dh * aA.sum(axis=0)[None, :])
    if am is not None:
        dx = dx * am.reshape(-1, I) + eta
    if aW is not None:
        dx = dx + gamma(S_dx, u) * (dy2 @ aW) + 2 * (2 * O * eta + S_dx * eta)
    return LoraErrorBounds(y.reshape(lead + (O,)), dx.reshape(ax.shape), dA, dB)
