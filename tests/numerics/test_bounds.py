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
