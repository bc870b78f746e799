"""torch's CPU elementwise arithmetic, each operation rounded where torch rounds it.

torch computes a float32 (and float16: in float32, its "opmath" type) kernel
in float32 and rounds each op's result once; on x86 with AVX2/AVX-512
kernels (torch's default dispatch there) ``add(b, alpha=s)``, ``lerp`` and
``addcmul`` use a fused multiply-add, rounded once. To reproduce a float32
result bit for bit:

  * +, -, x, /, sqrt of float32 (or float16) numbers are formed in float64 and
    rounded to float32: one float64 rounding then one float32 rounding gives
    the correctly rounded result (Figueroa 1995: innocuous double rounding
    for p' >= 2p + 2; 53 >= 2*24 + 2);
  * a fused a*b + c is not covered: a*b is exact in float64 (48 bits) but
    a*b + c rounds there, and rounding that again to float32 can land on the
    wrong side of a float32 tie. ``round_sum`` keeps the error of the float64
    sum (TwoSum, exact) and breaks exactly those ties by its sign: the
    single, correct rounding (the effect of round-to-odd, the trick of
    ``reflora.merge.round_to_dtype``, without bit views, so it runs on any
    array-API namespace).

float64 parameters are computed in float64 without emulation (torch's FMA
there rounds once, reflora twice: a difference of at most an ulp per op).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import dtype_name

__all__ = ["Arith", "round_sum"]


def _two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum, float64)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def round_sum(xp: Any, a64: Any, b64: Any, dt: Any) -> Any:
    """RN_dt(a + b) for float64 arrays a, b: the exact sum rounded once to ``dt`` (float32 or float16).

    s = fl64(a + b) is off the exact sum by e (TwoSum). RN_dt(s) can differ
    from RN_dt(a + b) only when a rounding tie of ``dt`` lies between s and
    a + b; a tie is a float64 number, and none can lie strictly between the
    exact sum and its nearest float64 s, so the tie is s itself: there the
    sign of e says which neighbour is nearer.
    """
    s, e = _two_sum(a64, b64)
    r = xp.astype(s, dt)
    r64 = xp.astype(r, xp.float64)
    inf = xp.asarray(float("inf"), dtype=dt)
    n = xp.nextafter(r, xp.where(s > r64, inf, -inf))  # the other neighbour of s in dt
    n64 = xp.astype(n, xp.float64)
    tie = (s != r64) & (s == (r64 + n64) * 0.5) & (e != 0)
    return xp.where(tie & ((e > 0) == (n64 > r64)), n, r)


class Arith:
    """Elementwise ops on arrays of one dtype, rounded as torch's CPU kernels round them.

    ``om`` is torch's opmath dtype: float32 for float16 and float32, float64
    for float64. Each op is computed exactly (or correctly rounded) to ``om``,
    then rounded to the array's dtype (a second rounding only for float16,
    as torch does). Python scalars enter rounded to ``om`` (``scalar``), as
    torch converts a wrapped Python number to the kernel's opmath type.
    """

    def __init__(self, xp: Any, dtype: Any):
        self.xp, self.dt = xp, dtype
        self.name = dtype_name(dtype)
        self.exact = self.name == "float64"
        self.om = xp.float64 if self.exact else xp.float32

    def scalar(self, v: float) -> float:
        """v as the kernel sees it: rounded to the opmath dtype."""
        return float(v) if self.exact else float(np.float32(v))

    def _f64(self, a: Any) -> Any:
        return a if self.exact else self.xp.astype(a, self.xp.float64)

    def _out(self, r64: Any) -> Any:
        """Round a float64 result that is correctly rounded once to om (Figueroa) to om, then to dt."""
        xp = self.xp
        return r64 if self.exact else xp.astype(xp.astype(r64, self.om), self.dt)

    def mul(self, a: Any, b: Any) -> Any:
        """RN(a * b); b an array or a scalar already rounded with ``scalar``."""
        return self._out(self._f64(a) * (b if isinstance(b, float) else self._f64(b)))

    def add(self, a: Any, b: Any) -> Any:
        """RN(a + b)."""
        return self._out(self._f64(a) + (b if isinstance(b, float) else self._f64(b)))

    def sub(self, a: Any, b: Any) -> Any:
        """RN(a - b)."""
        return self._out(self._f64(a) - self._f64(b))

    def div(self, a: Any, b: Any) -> Any:
        """RN(a / b)."""
        return self._out(self._f64(a) / (b if isinstance(b, float) else self._f64(b)))

    def sqrt(self, a: Any) -> Any:
        """RN(sqrt(a)), correctly rounded (torch's CPU sqrt is not: see the AdamW page)."""
        return self._out(self.xp.sqrt(self._f64(a)))

    def fma(self, a: Any, b: Any, c: Any) -> Any:
        """RN(a * b + c), rounded once (a fused multiply-add); a or b may be a rounded scalar."""
        xp = self.xp
        p = (a if isinstance(a, float) else self._f64(a)) * (b if isinstance(b, float) else self._f64(b))
        if self.exact:
            return p + c  # Note: two roundings in float64 (no exact FMA in the array API)
        r = round_sum(xp, p, self._f64(c), self.om)  # a * b is exact in float64: one rounding
        return xp.astype(r, self.dt)
