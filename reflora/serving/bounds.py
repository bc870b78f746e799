"""A-priori rounding-error bounds for the serving ops: the tolerance of the serving checks.

The class of legitimate evaluations. A candidate computing in dtype d (float64,
float32, float16 or bfloat16) evaluates the same sums and products as the
reference, from the same inputs (already rounded to d), in any summation order
or blocking, accumulating each dot product in float32 (float64 when d is
float64), possibly rounding to d at any product boundary (the shrink output h,
the scale or s h or s B, the expand output, the base output, the bias sum,
the final sum), with the scale applied anywhere in the chain (s (x A^T) B^T,
(x A^T)(s B)^T, s ((x A^T) B^T)), and rounds its output to d.

The bound (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
Lemma 3.1 and Sec. 3.1). Every element of an output is a sum of products of
inputs, t_j = x_i A_ri s B_or and the like. In any such evaluation each term
reaches the result multiplied by at most K factors (1 + a), |a| <= u_acc (one
per accumulation step of length-K dot products in float32) and at most m
factors (1 + b), |b| <= u_d (one per possible rounding to d), so

    |computed - exact| <= theta * sum_j |t_j| = theta * M,
    theta = (1 + u_d)^m (1 + gamma_K(u_acc)) - 1,   gamma_K(u) = K u / (1 - K u),

where M, the element's magnitude, is the same formula evaluated on absolute
values: |x||W|^T + |bias| + |s| (|x||A|^T)|B|^T for y. The reference is a
float64 evaluation of the same class (u_d = u_acc = 2^-53), so a candidate
passes when

    |cand - ref64| <= (theta_d + theta_64) M + floor_abs          (per element).

The counts, per op (K: the longest chain of accumulations a term passes
through, plus 3 for additions that may be done in float32 before a rounding
to d; m: roundings to d at product boundaries, counted from the list above):

    op                      K                     m
    shrink  h = s x A^T     I + 3                 4  (x A^T, s, s.(x A^T), output)
    expand  base + h B^T    R + 3                 3  (h B^T, the add, output)
    multi forward  y        I + R + 3             7  (x A^T, s, s h, h B^T, x W^T, + bias, + )
    multi backward dx       O + R + 3             7  (dy B, s, s dh, dh A, dy W, +, output)
    multi backward dA       O + N + 3             5  (dy B, s, s dh, the row sum, output)
    multi backward dB       I + N + 3             5  (x A^T, s, s h, the row sum, output)
    embedding  y            R + 3                 5  (lookup exact; s, s a, a B^T, +, output)
    embedding dA / dB / dE  D + N + 3 / N + 3     5
    tensor parallel, row    + 2T                  + T - 1  (the all-reduce, possibly in d; row_sharded
                                                            also all-reduces h: another T - 1)

Gradual underflow is not covered by the standard model; floor_abs adds
(K + m) eta_d F per element, eta_d the smallest subnormal of d and F the
largest factor an underflowed intermediate can be multiplied by afterwards
(1 + max|s|) max(1, max|entries|)^2. The kit's problems keep entries at
2^-8 or above, or zero, so this floor matters only in float16.

Exactness. When every input entry is an integer, every scale is a power of two
(or zero), and every intermediate of every evaluation above is a multiple of
g = min(1, min |s|) bounded by Mx = max(1, max|s|) * (the largest magnitude of
any partial result, scaled or not), all of them are exactly representable in d
whenever Mx / g <= 2^p_d (p_d = 53, 24, 11, 8 significand bits): then every
evaluation in the class gives the exact result, and the tolerance is zero.
``exact`` decides that per problem (conservatively).

Everything here runs in float64 NumPy on the host (the bounds are a model of
rounding, computed once per problem).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import dtype_name, to_numpy

__all__ = ["DTYPES", "PRECISION_BITS", "UNIT_ROUNDOFF", "exact", "gamma", "theta", "tolerance"]

DTYPES = ("float64", "float32", "float16", "bfloat16")
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
PRECISION_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
SUBNORMAL_MIN = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
FINITE_MAX = {"float64": 1.7976931348623157e308, "float32": 3.4028234663852886e38, "float16": 65504.0,
              "bfloat16": 3.3895313892515355e38}


def _name(dtype: Any) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype {dtype!r}; expected one of {DTYPES}")
    return name


def gamma(n: int, u: float) -> float:
    """gamma_n(u) = n u / (1 - n u) (Higham, Lemma 3.1); inf when n u >= 1."""
    nu = n * u
    return math.inf if nu >= 1 else nu / (1 - nu)


def theta(dtype: Any, *, K: int, m: int) -> float:
    """(1 + u_d)^m (1 + gamma_K(u_acc)) - 1: the relative bound of one evaluation in dtype d.

    u_acc is float32's unit roundoff for float32/float16/bfloat16 and float64's for float64.
    """
    d = _name(dtype)
    u_d = UNIT_ROUNDOFF[d]
    u_acc = UNIT_ROUNDOFF["float64" if d == "float64" else "float32"]
    return (1 + u_d) ** m * (1 + gamma(K, u_acc)) - 1


def tolerance(mag: Any, *, dtype: Any, K: int, m: int, factor: float = 1.0, is_exact: bool = False) -> np.ndarray:
    """Per-element tolerance (theta_d + theta_64) mag + floor_abs; zeros when ``is_exact``.

    Args:
      mag: per-element magnitude (sum of |terms|), any array (brought to the host as float64).
      dtype: the candidate's dtype. K, m: the counts of the op (module docstring).
      factor: F of the underflow floor, (1 + max|s|) max(1, max|entries|)^2.
      is_exact: the problem is exact in d (``exact``): tolerance 0.

    Returns:
      float64 NumPy array of mag's shape; inf where the bound passes d's largest
      finite number (a legitimate evaluation may overflow there).
    """
    d = _name(dtype)
    M = np.asarray(to_numpy(mag), dtype=np.float64)
    if is_exact:
        return np.zeros_like(M)
    rel = theta(d, K=K, m=m) + theta("float64", K=K, m=m)
    tol = rel * M + (K + m) * SUBNORMAL_MIN[d] * factor
    with np.errstate(invalid="ignore"):
        return np.where(M * (1 + rel) > FINITE_MAX[d], np.inf, tol)


def _is_int(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def _pow2_or_zero(s: float) -> bool:
    if s == 0:
        return True
    m, _ = math.frexp(abs(s))
    return m == 0.5


def exact(dtype: Any, inputs, scales, partial_max: float) -> bool:
    """True when every evaluation in the class is exact for this problem (tolerance 0).

    Args:
      dtype: the candidate's dtype.
      inputs: the input arrays (host or device), all of which must be integer-valued.
      scales: the scales in use (host numbers), each a power of two or 0.
      partial_max: the largest magnitude of any partial result of the op,
        unscaled (computed from the magnitudes, e.g. max of |x||A|^T and
        (|x||A|^T)|B|^T and the outputs' magnitudes).
    """
    d = _name(dtype)
    s = [abs(float(v)) for v in np.ravel(np.asarray(scales, dtype=np.float64))]
    if not all(_pow2_or_zero(v) for v in s):
        return False
    if not all(_is_int(np.asarray(to_numpy(a), dtype=np.float64)) for a in inputs if a is not None):
        return False
    nz = [v for v in s if v]
    g = min([1.0] + nz)
    big = max([1.0] + s)
    return partial_max * big / g <= 2.0 ** PRECISION_BITS[d]


def floor_factor(scales, *arrays) -> float:
    """F = (1 + max|s|) max(1, max|entries|)^2 for the underflow floor."""
    s = np.abs(np.asarray(scales, dtype=np.float64))
    e = max([1.0] + [float(np.max(np.abs(np.asarray(to_numpy(a), dtype=np.float64)))) for a in arrays
                     if a is not None and a.size])
    return (1.0 + (float(s.max()) if s.size else 0.0)) * e * e
