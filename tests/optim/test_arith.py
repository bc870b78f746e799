"""reflora.optim._arith: the fused a*b + c rounded once, against exact rational arithmetic (fractions)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

from reflora.backend import to_numpy
from reflora.optim._arith import Arith, round_sum


def _exact_rn(q: Fraction, dt) -> float:
    """The element of dt nearest to q, ties to even (by comparing the neighbours exactly)."""
    r = np.asarray(float(q)).astype(dt)
    with np.errstate(over="ignore"):  # the neighbour of the largest finite value is inf: left out below
        cands = [c for c in (r, np.nextafter(r, dt(-np.inf)), np.nextafter(r, dt(np.inf))) if np.isfinite(c)]
    bits = {np.float32: np.uint32, np.float16: np.uint16}[dt]
    return float(min(cands, key=lambda v: (abs(Fraction(float(v)) - q), int(np.asarray(v).view(bits)) & 1)))


floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-2.0**60, max_value=2.0**60)
floats16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@given(a=floats32, b=floats32, c=floats32)
def test_fma_float32_is_the_exact_sum_rounded_once(a, b, c):
    q = Fraction(a) * Fraction(b) + Fraction(c)
    if abs(q) > Fraction(float(np.finfo(np.float32).max)):
        return  # overflow is not what this tests
    got = Arith(np, np.float32).fma(np.float32([a]), np.float32([b]), np.float32([c]))
    assert float(got[0]) == _exact_rn(q, np.float32)


@given(a=floats16, b=floats16, c=floats16)
def test_round_sum_float16_is_the_exact_sum_rounded_once(a, b, c):
    q = Fraction(a) * Fraction(b) + Fraction(c)
    if abs(q) > 65504:
        return
    got = round_sum(np, np.array([a * b]), np.array([c]), np.float16)  # a*b exact in float64
    assert float(got[0]) == _exact_rn(q, np.float16)


@pytest.mark.parametrize("k", range(1, 40))
def test_ties_within_float64_reach_are_broken_by_the_error(xp, k):
    # 1 + 2^-24 (a float32 tie) plus or minus a tail far below float64's resolution at 1
    tail = 2.0 ** -(60 + k)
    for sign in (1.0, -1.0):
        a64, c64 = xp.asarray(np.array([1.0 + 2.0 ** -24])), xp.asarray(np.array([sign * tail]))
        got = float(to_numpy(round_sum(xp, a64, c64, xp.float32))[0])
        assert got == (1.0 + 2.0 ** -23 if sign > 0 else 1.0)
        naive = float(np.float32(np.float64(1.0 + 2.0 ** -24) + sign * tail))
        assert naive == 1.0  # the float64 sum is the tie itself: a plain cast rounds to even either way
