"""Rounding from float64 to the storage dtypes: the one home for it.

    round_to_dtype(x, dt)   RN_dt(x), ties to even; bfloat16 through round-to-odd
                            float32 so the one rounding that counts is the last
    round_fraction(q, dt)   the element of dt nearest to an exact rational q
    certainly_rounded(...)  where a float64 approximation provably rounds like
                            the exact value (no midpoint within its error bound)

BF16 is ml_dtypes' bfloat16 as a NumPy dtype.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["BF16", "certainly_rounded", "round_fraction", "round_to_dtype"]

BF16 = np.dtype(ml_dtypes.bfloat16)


def round_to_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Round float64 values to ``dtype`` once, to nearest, ties to even.

        bfloat16:  RN_bf16(RO_f32(x))  (RO = round to odd; avoids double rounding)
        float16, float32: NumPy's direct conversion (already correctly rounded)
        float64:   x

    Args:
      x: a NumPy float64 array.
      dtype: the target dtype (NumPy dtype, name, or ml_dtypes.bfloat16).

    Returns:
      A new NumPy array of ``dtype``; NaN and Inf map to themselves, overflow
      to Inf as IEEE 754 rounding says.

    Example:
      >>> float(round_to_dtype(np.array([1 + 2**-8 + 2**-30]), "bfloat16")[0])
      1.0078125
    """
    dt = BF16 if str(dtype) == "bfloat16" else np.dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    if dt == np.float64:
        return x.copy()
    if dt != BF16:
        return x.astype(dt)
    # round to float32 by nearest, then turn it into round-to-odd:
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    back = f.astype(np.float64)
    with np.errstate(invalid="ignore"):
        inexact = (back != x) & ~np.isnan(x)
        # nearest went away from zero: step back toward zero (one less in the magnitude bits;
        # f != 0 there, and Inf steps back to the largest float32)
        away = inexact & (np.abs(back) > np.abs(x))
    # truncate, then set the last bit of every inexact result (the sticky bit)
    bits = (f.view(np.uint32) - away.view(np.uint8)) | inexact.view(np.uint8)
    # then the one rounding to bfloat16 that counts
    return bits.view(np.float32).astype(BF16)


def round_fraction(q: Fraction, dt: np.dtype) -> Any:
    """The element of ``dt`` nearest to the exact rational q (ties to even)."""
    try:
        f = float(q)  # correctly rounded to float64 (CPython's int / int)
    except OverflowError:
        f = math.copysign(math.inf, q)
    c = round_to_dtype(np.array([f]), dt)
    big = np.array([np.finfo(dt).max if dt != BF16 else ml_dtypes.finfo(dt).max], dtype=dt)
    if np.isinf(c[0]):
        # Inf only when |q| >= max + ulp(max)/2 (the tie goes to Inf: max has an odd last bit)
        m = Fraction(float(big[0]))
        limit = m + (m - Fraction(float(np.nextafter(big, np.zeros(1, dt))[0]))) / 2
        return c[0] if abs(q) >= limit else (big[0] if q > 0 else -big[0])
    # the answer is c or one of its neighbours (c is within one ulp of it)
    cands = [c, np.nextafter(c, np.full_like(c, -np.inf)), np.nextafter(c, np.full_like(c, np.inf))]
    cands = [v for v in cands if np.isfinite(v[0])]
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]

    def key(v):
        return (abs(Fraction(float(v[0])) - q), int(v.view(uint)[0]) & 1)

    return min(cands, key=key)[0]


# significant bits p and the smallest subnormal of each low-precision dtype
FORMATS = {BF16: (8, 2.0 ** -133), np.dtype(np.float16): (11, 2.0 ** -24), np.dtype(np.float32): (24, 2.0 ** -149)}


def certainly_rounded(r: np.ndarray, t: np.ndarray, e: np.ndarray, dt: np.dtype) -> np.ndarray:
    """True where every value within e of r rounds to t (t = RN(r)): no rounding midpoint is that close.

    For t = m 2^k (m in [0.5, 1)) of p significant bits the spacing is 2^(k-p), so the midpoints
    are h = 2^(k-p-1) away, except toward zero from a power of two, where the spacing halves
    (h / 2). r lies between the midpoints around t; with d = |r - t| it is certain when
    d + e < (the gap on r's side) and e < (the gap on the other side). Subnormal t are judged
    with the normal spacing (smaller: safe); t = 0 has midpoints at +-(smallest subnormal)/2;
    Inf is never certain.
    """
    p, tiny = FORMATS[dt]
    t64 = t.astype(np.float64)
    m, k = np.frexp(t64)
    h = np.ldexp(0.5, k - p)
    h = np.where(t64 == 0, tiny / 2, h)
    pow2 = np.abs(m) == 0.5
    d = np.abs(r - t64)
    # r on t's side toward zero, next to a power of two: half the gap
    side = np.where(pow2 & (np.abs(r) < np.abs(t64)), h / 2, h)
    other = np.where(pow2, h / 2, h)
    return (d + e < side) & (e < other) & np.isfinite(t64)
