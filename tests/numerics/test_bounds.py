"""reflora.numerics.bounds: the derived rounding-error bounds hold, and are not vacuous.

Checked on the host: a float32 (and float16) computation against the float64
one, |low - f64| <= bound(low) + bound(f64). The GPU suite uses the same
bounds for NumPy-vs-CuPy agreement in float64 (tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from reflora import lora_backward, lora_forward
from reflora.numerics.bounds import gamma, lora_error_bounds, unit_roundoff


def test_unit_roundoff_and_gamma():
    assert unit_roundoff("float64") == 2.0**-53 and unit_roundoff(np.float32) == 2.0**-24
    assert gamma(10, 2.0**-24) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    with pytest.raises(ValueError, match="undefined"):
        gamma(4096, 2.0**-11)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@given(lead=st.integers(1, 40), I=st.integers(1, 64), O=st.integers(1, 48), R=st.integers(1, 16),
       dtype=st.sampled_from(["float32", "float16"]), mask=st.booleans(), seed=st.integers(0, 2**32 - 1),
       magnitude=st.sampled_from([1.0, 1e-2, 1e-4, 1e-5, 1e2]))
def test_low_precision_errors_stay_within_the_bound(lead, I, O, R, dtype, mask, seed, magnitude):
    """Magnitudes down to 1e-5 put float16 products below its normal range (underflow)."""
    rng = np.random.default_rng(seed)
    assume(dtype != "float16" or max(I + R + 4, lead + I + 2, lead + O + 2) * 2.0**-11 < 0.5)
    x, A, B = (magnitude * rng.standard_normal(sh) for sh in ((lead, I), (R, I), (O, R)))
    W, b, dy = magnitude * rng.standard_normal((O, I)), rng.standard_normal(O), magnitude * rng.standard_normal((lead, O))
    m = (rng.random((lead, I)) > 0.5) * 2.0 if mask else None
    s = 1.7
    low = [None if a is None else a.astype(dtype) for a in (x, A, B, W, b, m, dy)]
    hi = [None if a is None else a.astype(dtype).astype(np.float64) for a in (x, A, B, W, b, m, dy)]  # same inputs
    with np.errstate(over="ignore", invalid="ignore"):  # float16 may overflow: such draws are discarded below
        y_l, c_l = lora_forward(*low[:3], scale=s, W=low[3], bias=low[4], dropout_mask=low[5])
        g_l = lora_backward(low[6], c_l)
    y_h, c_h = lora_forward(*hi[:3], scale=s, W=hi[3], bias=hi[4], dropout_mask=hi[5])
    g_h = lora_backward(hi[6], c_h)
    # the bounds assume no overflow (float16 saturates at 65504)
    assume(all(np.all(np.isfinite(a)) for a in (y_l, *g_l, *low[:4])))
    kw = dict(scale=s, dy=hi[6], W=hi[3], bias=hi[4], dropout_mask=hi[5])
    b_l = lora_error_bounds(*hi[:3], dtype=dtype, **kw)
    b_h = lora_error_bounds(*hi[:3], dtype="float64", **kw)
    for name, got, ref in (("y", y_l, y_h), ("dx", g_l.dx, g_h.dx), ("dA", g_l.dA, g_h.dA), ("dB", g_l.dB, g_h.dB)):
        err = np.abs(got.astype(np.float64) - ref)
        bound = getattr(b_l, name) + getattr(b_h, name)
        worst = np.max(err - bound)
        assert worst <= 0, f"{name} ({dtype}): error exceeds the derived bound by {worst:.3e}"


def test_bound_is_not_vacuous():
    """On a realistic size the observed float32 error is a visible fraction of the worst case."""
    rng = np.random.default_rng(0)
    x, A, B, W = (rng.standard_normal(s) for s in [(256, 512), (16, 512), (384, 16), (384, 512)])
    y32, _ = lora_forward(*(a.astype(np.float32) for a in (x, A, B)), scale=2.0, W=W.astype(np.float32))
    x, A, B, W = (a.astype(np.float32).astype(np.float64) for a in (x, A, B, W))
    y64, _ = lora_forward(x, A, B, scale=2.0, W=W)
    bound = lora_error_bounds(x, A, B, scale=2.0, W=W, dtype="float32").y
    ratio = np.max(np.abs(y32 - y64) / bound)
    assert 1e-4 < ratio < 1, ratio


# ---------------------------------------------------------------- constructed worst cases (issue 10)


def test_a_scale_that_is_not_a_float32_value_costs_one_more_rounding():
    """The issue's float32 case: fl32(s) differs from s, and dA's error exceeds gamma_{N+O+2}'s count by 1.25x."""
    f32, f64 = np.float32, (lambda a: a.astype(np.float64))
    x, m, B, dy = (np.array([[v]], f32) for v in (1.0002366304397583, 1.0002516508102417, 1.0002442598342896,
                                                  1.0002440214157104))
    A, s = np.ones((1, 1), f32), 1.0001220107077984
    _, c = lora_forward(x, A, B, scale=s, dropout_mask=m)
    _, c64 = lora_forward(f64(x), f64(A), f64(B), scale=s, dropout_mask=f64(m))
    err = abs(float(lora_backward(dy, c).dA[0, 0]) - float(lora_backward(f64(dy), c64).dA[0, 0]))
    kw = dict(scale=s, dy=f64(dy), dropout_mask=f64(m))
    bound = lora_error_bounds(f64(x), f64(A), f64(B), dtype="float32", **kw).dA[0, 0] \
        + lora_error_bounds(f64(x), f64(A), f64(B), dtype="float64", **kw).dA[0, 0]
    assert err <= bound
    # the count without the scale's rounding (gamma_{N+O+2}, N = O = 1) is exceeded: the test that fails for it
    under = gamma(4, 2.0**-24) * s * float((f64(dy) @ f64(B))[0, 0]) * float((f64(x) * f64(m))[0, 0])
    assert err > 1.2 * under


def test_a_bias_at_the_start_of_the_accumulator_is_covered():
    """float16: the bias 2048 starts the sum and each product 0.9 rounds away (ulp 2 there): error 3.6,
    over 3x the old count u |bias| + gamma_{I+2} |x||W|^T for a bias added last."""
    I = 4
    x = np.full((1, I), 0.9, np.float16)
    W = np.ones((1, I), np.float16)
    bias = np.array([2048.0], np.float16)
    acc = bias[0]
    for i in range(I):  # a legitimate order: accumulator = bias, then the products one by one, all in float16
        acc = np.float16(acc + np.float16(x[0, i] * W[0, i]))
    exact = 2048.0 + float(np.sum(x.astype(np.float64)))
    err = abs(float(acc) - exact)
    A, B = np.zeros((1, I)), np.zeros((1, 1))
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    bound = lora_error_bounds(f64(x), A, B, scale=1.0, W=f64(W), bias=f64(bias), dtype="float16").y[0, 0]
    assert err <= bound
    u = 2.0**-11
    old = u * 2048.0 + gamma(I + 2, u) * float((f64(x) @ f64(W).T)[0, 0])
    assert err > 3 * old
