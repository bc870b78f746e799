"""reflora.serving.bounds: the a-priori bound holds for emulated evaluations across the class.

Each emulation is one legitimate evaluation of the multi-adapter forward in
dtype d: float32 accumulation (BLAS order, or a sequential sum in reversed
order), h rounded to d or kept in float32, the scale applied to h, to B or to
the expand output, rounded to d at each boundary. Every emulated output must
lie within the tolerance of its float64 reference, element by element. And
the bound is not vacuous: a 1% scale error exceeds it in float32 and float16.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from reflora.serving import bounds as SB
from reflora.testing.serving import serving_reference
from reflora.testing.serving_problems import host_dtype, round_to
from reflora.testing.serving_strategies import serving_problems


def _rd(a, d):
    return round_to(a, d)


def _mm32(a, b, order):
    """a @ b with float32 products and sums: BLAS order, or sequential in reversed k order."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    if order == "blas":
        return (a32 @ b32).astype(np.float64)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    for k in reversed(range(a.shape[1])):
        out = out + np.outer(a32[:, k], b32[k, :]).astype(np.float32)
    return out.astype(np.float64)


def _emulate(p, where, round_h, order):
    a = p.arrays()
    d = p.dtype
    x, A, B, W, bias, idx = a["x"], a["A"], a["B"], a["W"], a["bias"], a["indices"]
    y = np.zeros((p.N, p.O))
    if W is not None:
        y = _rd(_mm32(x, W.T, order), d)
    if bias is not None:
        y = _rd(y + bias, d)
    for n, lv in enumerate(idx.tolist()):
        if lv < 0:
            continue
        s = float(_rd(np.array(p.scales[lv]), d))            # the scale held in d
        h = _mm32(x[n:n + 1], A[lv].T, order)
        if round_h:
            h = _rd(h, d)
        Bl = B[lv]
        if where == "h":
            h = _rd(s * h, d)
        elif where == "B":
            Bl = _rd(s * Bl, d)
        t = _rd(_mm32(h, Bl.T, order), d)
        if where == "out":
            t = _rd(s * t, d)
        y[n] = _rd(y[n] + t[0], d)
    return y


@given(serving_problems(dtypes=("float32", "float16", "bfloat16"), max_rows=10, layouts=("unsorted", "sorted")),
       st.sampled_from(["h", "B", "out"]), st.booleans(), st.sampled_from(["blas", "reversed"]))
def test_every_emulated_evaluation_is_within_the_bound(p, where, round_h, order):
    ref, tol = serving_reference("multi_forward", p)["y"]
    with np.errstate(over="ignore"):
        y = _emulate(p, where, round_h, order)
    err = np.abs(y - ref)
    assert (err <= tol).all(), f"worst err/tol {np.max(err / np.where(tol > 0, tol, np.nan)):.3g}"


def test_the_bound_separates_a_one_percent_scale_error():
    from reflora.testing.serving_problems import ServingProblem

    for d in ("float32", "float16"):
        p = ServingProblem(I=16, O=8, ranks=(4, 4), indices=(0, 1) * 5, scales=(2.0, 0.5), dtype=d, seed=7, W=False)
        ref, tol = serving_reference("multi_forward", p)["y"]
        q = ServingProblem(**{**p.__dict__, "scales": (2.02, 0.505)})
        wrong, _ = serving_reference("multi_forward", q)["y"]
        assert (np.abs(wrong - ref) > tol).any()


def test_theta_and_gamma():
    assert SB.gamma(10, 2.0**-24) == 10 * 2.0**-24 / (1 - 10 * 2.0**-24)
    assert math.isinf(SB.gamma(2**24, 2.0**-24))
    # bfloat16: 7 roundings of 2^-8 plus float32 accumulation of 40 terms
    assert math.isclose(SB.theta("bfloat16", K=40, m=7), (1 + 2.0**-8) ** 7 * (1 + SB.gamma(40, 2.0**-24)) - 1)
    assert SB.theta("float64", K=40, m=7) < 1e-13


def test_exactness_rules():
    ints = [np.array([[1.0, -3.0]])]
    assert SB.exact("bfloat16", ints, [0.5, 2.0], partial_max=64)        # 64 * 2 / 0.5 = 256 = 2^8
    assert not SB.exact("bfloat16", ints, [0.5, 2.0], partial_max=65)
    assert not SB.exact("float32", ints, [1 / 3], partial_max=1)
    assert not SB.exact("float32", [np.array([0.5])], [1.0], partial_max=1)
    tol = SB.tolerance(np.ones(3), dtype="float16", K=4, m=2, is_exact=True)
    assert not tol.any()
    assert np.isinf(SB.tolerance(np.array([1e6]), dtype="float16", K=4, m=2))[0]
    assert host_dtype("bfloat16").name == "bfloat16"
