"""reflora.merge / unmerge: correctly rounded W + s B A, checked against exact rational arithmetic.

Oracles: Python fractions (the exact value and the definition of round to
nearest, ties to even, via the two neighbours of the result), constructed
midpoint cases where float64 arithmetic alone rounds the wrong way, and PEFT's
merge_and_unload as a peer (reflora is never further from the exact value).
"""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora.backend import to_numpy
from reflora.numerics.rounding import round_to_dtype

from helpers import assert_close

BF16 = np.dtype(ml_dtypes.bfloat16)
LOW = {"bfloat16": BF16, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def exact_update(W, A, B, s):
    """W + s B A element by element, as Fractions (object array)."""
    O, I = W.shape
    out = np.empty((O, I), dtype=object)
    for o in range(O):
        for i in range(I):
            acc = sum((Fraction(float(B[o, k])) * Fraction(float(A[k, i])) for k in range(A.shape[0])), Fraction(0))
            out[o, i] = Fraction(float(W[o, i])) + Fraction(s) * acc
    return out


def assert_correctly_rounded(got, exact, dt):
    """Each element is at least as close to the exact value as both its neighbours; ties go to even."""
    got = np.asarray(got)
    assert got.dtype == dt, f"dtype {got.dtype} != {dt}"
    up = np.nextafter(got, np.full_like(got, np.inf))
    down = np.nextafter(got, np.full_like(got, -np.inf))
    uint = {2: np.uint16, 4: np.uint32}[dt.itemsize]
    for idx in np.ndindex(got.shape):
        v = exact[idx]
        d = abs(Fraction(float(got[idx])) - v)
        for nb in (up[idx], down[idx]):
            if np.isfinite(nb):
                dn = abs(Fraction(float(nb)) - v)
                assert d <= dn, f"element {idx}: {float(got[idx])!r} is further from {float(v)!r} than {float(nb)!r}"
                if d == dn:  # a tie: the even one wins
                    assert int(got[idx:idx + 1].view(uint)[0] if got.ndim == 1 else
                               got[idx].reshape(1).view(uint)[0]) % 2 == 0, f"element {idx}: tie not to even"


@st.composite
def low_precision_problems(draw):
    dt = draw(st.sampled_from(sorted(LOW)))
    ab = draw(st.sampled_from(["bfloat16", "float32", "float16"]))
    O, I, R = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    s = draw(st.sampled_from([1.0, 2.0, 0.5, 1 / 3, -0.7, 16 / 8, 16 / 4 ** 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = draw(st.sampled_from([1.0, 1e-2, 1e-4]))
    W = rng.standard_normal((O, I)).astype(LOW[dt])
    A = (rng.standard_normal((R, I)) * mag).astype(LOW[ab])
    B = (rng.standard_normal((O, R)) * mag).astype(LOW[ab])
    return W, A, B, s


@given(low_precision_problems())
def test_merge_is_correctly_rounded(problem):
    W, A, B, s = problem
    got = reflora.merge(W, A, B, scale=s).weight
    assert_correctly_rounded(got, exact_update(W, A, B, s), W.dtype)
    back = reflora.unmerge(got, A, B, scale=s).weight
    assert_correctly_rounded(back, exact_update(got, A, B, -s), W.dtype)


def _midpoint_case(dt, below):
    """W = 1 and an update 2^-p +- 2^-60 (p = W's precision): the exact value sits 2^-60 off a midpoint.

    float64 cannot hold 1 + 2^-p +- 2^-60, so r = W + s B A computed in float64 lands exactly on
    the midpoint and round-half-even picks 1, which is wrong when the tiny term is positive.
    """
    p = {BF16: 8, np.dtype(np.float16): 11, np.dtype(np.float32): 24}[dt]
    W = np.ones((1, 1), dtype=dt)
    A = np.array([[2.0 ** -p], [(-1.0 if below else 1.0) * 2.0 ** -60]])  # (R, I) = (2, 1)
    B = np.ones((1, 2))
    return W, A, B, 1.0 + 2.0 ** -(p - 1)


@pytest.mark.parametrize("dt", list(LOW.values()), ids=list(LOW))
def test_midpoints_that_float64_gets_wrong(dt):
    W, A, B, up = _midpoint_case(dt, below=False)
    naive = (W.astype(np.float64) + B @ A).astype(dt)
    assert float(naive[0, 0]) == 1.0  # float64 then one cast: the wrong side of the midpoint
    got = reflora.merge(W, A, B, scale=1.0).weight
    assert float(got[0, 0]) == up
    assert_correctly_rounded(got, exact_update(W, A, B, 1.0), dt)
    W, A, B, _ = _midpoint_case(dt, below=True)
    assert float(reflora.merge(W, A, B, scale=1.0).weight[0, 0]) == 1.0


def test_round_to_dtype_avoids_double_rounding_through_float32():
    x = np.array([1 + 2.0 ** -8 + 2.0 ** -30, -(1 + 2.0 ** -8 + 2.0 ** -30), 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8])
    # ml_dtypes goes float64 -> float32 -> bfloat16 and rounds the first one down
    assert float(x.astype(BF16)[0]) == 1.0
    got = round_to_dtype(x, "bfloat16")
    assert got.tolist() == [1.0078125, -1.0078125, 1.0, 1.015625]
    big = np.array([3.5e38, -3.5e38, 3.3e38, np.inf, np.nan, 1e-45, -0.0])
    got = round_to_dtype(big, BF16).astype(np.float64)
    assert np.isinf(got[0]) and got[0] > 0 and np.isinf(got[1]) and got[1] < 0
    assert got[2] == float(np.array([3.3e38], dtype=np.float32).astype(BF16)[0])
    assert np.isinf(got[3]) and np.isnan(got[4])


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e39, max_value=1e39),
                min_size=1, max_size=20))
def test_round_to_dtype_bfloat16_is_nearest(values):
    x = np.array(values, dtype=np.float64)
    got = round_to_dtype(x, BF16)
    finite = np.isfinite(got.astype(np.float64))
    exact = np.array([Fraction(v) for v in values], dtype=object)
    if finite.all():
        assert_correctly_rounded(got, exact, BF16)
    else:  # overflow only beyond max + ulp(max)/2
        big = 2.0 ** 127 * (2 - 2.0 ** -8)
        assert all(abs(v) >= big for v, f in zip(values, finite) if not f)


def test_merge_unmerge_in_bfloat16_is_not_an_identity():
    """Quantify it: elements move by one ulp at most, and some do."""
    rng = np.random.default_rng(0)
    O = I = 64
    R, s = 16, 2.0
    W = (rng.standard_normal((O, I)) * 0.02).astype(BF16)
    A = (rng.standard_normal((R, I)) / np.sqrt(I)).astype(np.float32)
    B = (rng.standard_normal((O, R)) * 1e-3).astype(np.float32)
    merged = reflora.merge(W, A, B, scale=s).weight
    back = reflora.unmerge(merged, A, B, scale=s).weight
    w64, b64, m64 = (a.astype(np.float64) for a in (W, back, merged))
    moved = w64 != b64
    frac = float(np.mean(moved))
    # one ulp of the larger of |W| and |W'| (bfloat16 has 8 significant bits)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(w64), np.abs(m64)))) - 7)
    assert 0.01 < frac < 0.5, f"{frac:.3f} of the elements moved"
    assert np.all(np.abs(b64 - w64) <= ulp), "an element moved by more than one ulp"
    # float64: an identity up to the last bits
    W64 = W.astype(np.float64)
    back64 = reflora.unmerge(reflora.merge(W64, A, B, scale=s).weight, A, B, scale=s).weight
    assert_close(back64, W64, name="float64 round trip", rel=1e-15)


def test_never_further_from_exact_than_peft_merge_and_unload():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(1)
    O, I, R, alpha = 24, 32, 8, 16
    W = (rng.standard_normal((O, I)) * 0.05).astype(BF16)
    A = (rng.standard_normal((R, I)) / np.sqrt(I)).astype(BF16)
    B = (rng.standard_normal((O, R)) * 0.02).astype(BF16)

    def t(a):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(I, O, bias=False, dtype=torch.bfloat16)

    pm = peft.get_peft_model(One(), peft.LoraConfig(r=R, lora_alpha=alpha, target_modules=["lin"]))
    pm = pm.to(torch.bfloat16)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(t(W))
        layer.lora_A["default"].weight.copy_(t(A))
        layer.lora_B["default"].weight.copy_(t(B))
    peft_w = pm.merge_and_unload().lin.weight.detach().view(torch.int16).numpy().view(BF16)
    s = alpha / R
    ours = reflora.merge(W, A, B, scale=s).weight
    exact = exact_update(W, A, B, s)
    assert_correctly_rounded(ours, exact, BF16)
    err_ours = np.array([abs(Fraction(float(v)) - e) for v, e in zip(ours.ravel(), exact.ravel())])
    err_peft = np.array([abs(Fraction(float(v)) - e) for v, e in zip(peft_w.ravel(), exact.ravel())])
    assert np.all(err_ours <= err_peft)
    differ = ours.astype(np.float64) != peft_w.astype(np.float64)
    assert differ.any(), "expected PEFT's two roundings to miss somewhere on this case"
    # PEFT rounds delta = s B A to bfloat16 first: where W and delta nearly cancel, that rounding error
    # is many ulps of the result (on this case 165 of 768 elements differ, by up to 8 bfloat16 steps)
    steps = np.abs(ours.view(np.int16).astype(np.int64) - peft_w.view(np.int16).astype(np.int64))
    assert int(steps[differ & (np.sign(ours.astype(np.float64)) == np.sign(peft_w.astype(np.float64)))].max()) > 1


def test_float32_merge_on_every_backend(xp):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 7)).astype(np.float32)
    A, B = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    m = reflora.merge(xp.asarray(W), xp.asarray(A), xp.asarray(B), scale=0.75)
    assert type(m.weight) is type(xp.asarray(W)) and m.bias is None
    assert_correctly_rounded(to_numpy(m.weight), exact_update(W, A, B, 0.75), np.dtype(np.float32))
    # fan_in_fan_out: W stored (I, O) gives the transpose of the same merge
    mt = reflora.merge(xp.asarray(np.ascontiguousarray(W.T)), xp.asarray(A), xp.asarray(B), scale=0.75,
                       fan_in_fan_out=True)
    np.testing.assert_array_equal(to_numpy(mt.weight), to_numpy(m.weight).T)


def test_lora_bias_merge_is_correctly_rounded():
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(6).astype(BF16)
    c = (rng.standard_normal(6) * 1e-2).astype(np.float32)
    W, A, B = np.zeros((6, 2), BF16), np.zeros((1, 2)), np.zeros((6, 1))
    m = reflora.merge(W, A, B, scale=3.0, bias=bias, lora_bias=c)
    exact = np.array([Fraction(float(b)) + 3 * Fraction(float(ci)) for b, ci in zip(bias, c)], dtype=object)
    assert_correctly_rounded(m.bias, exact, BF16)
    u = reflora.unmerge(m.weight, A, B, scale=3.0, bias=m.bias, lora_bias=c)
    assert u.bias.dtype == BF16
    # no lora_bias: the bias comes back as given
    assert reflora.merge(W, A, B, scale=3.0, bias=bias).bias is bias


def test_bad_input():
    W, A, B = np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"W has shape \(3, 4\); expected \(O, I\) = \(4, 3\)"):
        reflora.merge(W.T, A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(4, 3\); expected \(O, R\) = \(O, 2\)"):
        reflora.merge(W, A, np.ones((4, 3)), scale=1.0)
    with pytest.raises(ValueError, match=r"expected \(I, O\) = \(3, 4\)"):
        reflora.merge(W, A, B, scale=1.0, fan_in_fan_out=True)
    with pytest.raises(TypeError, match="W has dtype int64"):
        reflora.merge(np.ones((4, 3), dtype=np.int64), A, B, scale=1.0)
    with pytest.raises(TypeError, match="scale"):
        reflora.merge(W, A, B, scale="2")
    with pytest.raises(ValueError, match=r"lora_bias has shape \(3,\); expected \(O,\) = \(4,\)"):
        reflora.merge(W, A, B, scale=1.0, bias=np.ones(4), lora_bias=np.ones(3))


def test_inputs_are_not_written():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(s).astype(BF16) for s in [(4, 3), (2, 3), (4, 2)]]
    for a in arrays:
        a.flags.writeable = False
    copies = [a.copy() for a in arrays]
    reflora.merge(*arrays, scale=2.0)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a.view(np.uint16), c.view(np.uint16))


@pytest.mark.parametrize("dt", list(LOW.values()), ids=list(LOW))
def test_midpoint_just_below_a_power_of_two(dt):
    """Below 1 the spacing halves: the midpoint is 1 - 2^-(p+1). An exact value 2^-60 under it must round down."""
    p = {BF16: 8, np.dtype(np.float16): 11, np.dtype(np.float32): 24}[dt]
    W = np.ones((1, 1), dtype=dt)
    A = np.array([[-(2.0 ** -(p + 1))], [-(2.0 ** -60)]])
    B = np.ones((1, 2))
    assert float((W.astype(np.float64) + B @ A).astype(dt)[0, 0]) == 1.0  # float64 alone ties to 1.0
    got = reflora.merge(W, A, B, scale=1.0).weight
    assert float(got[0, 0]) == 1.0 - 2.0 ** -p
    assert_correctly_rounded(got, exact_update(W, A, B, 1.0), dt)
