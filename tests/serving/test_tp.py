"""reflora.serving.tp: shards recombine to the unsharded layer within the derived bound, tp in {1, 2, 4, 8}.

Both sides are float64 evaluations in the class of ``reflora.serving.bounds``
(the sharded one with 2T more accumulation steps and at most 2 (T - 1) more
roundings for its reductions), so they differ by at most 2 theta_64 M per element, M the
element's magnitude. Also: rank outputs of the row modes are the same on
every rank and are the rank-order sum of the partials; each column rank's
output is its shard of the unsharded output; the fully sharded column mode's
all-gather sees A split along R.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflora.serving import bounds as SB
from reflora.serving.tp import MODES, gather_columns, tp_forward, unsharded

from helpers import assert_close


@st.composite
def tp_problems(draw, T):
    L = draw(st.integers(1, 4))
    R = T * draw(st.integers(1, 3))
    I, N = T * draw(st.integers(1, 4)), draw(st.integers(1, 10))
    widths = [T * draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    A = [rng.standard_normal((L, R, I)) for _ in widths]
    B = [rng.standard_normal((L, o, R)) for o in widths]
    ranks = rng.integers(0, R + 1, size=L)
    for a, b in zip(A, B):
        for lv, r in enumerate(ranks):
            a[lv, r:] = 0
            b[lv, :, r:] = 0
    W = rng.standard_normal((sum(widths), I)) if draw(st.booleans()) else None
    bias = rng.standard_normal(sum(widths)) if draw(st.booleans()) else None
    return (rng.standard_normal((N, I)), A, B, rng.integers(-1, L, size=N), list(rng.choice([0.5, 2.0, -1.25], L)),
            W, bias, widths)


def _bound(x, A, B, idx, s, W, bias, T, I, R):
    mag = unsharded(np.abs(x), [np.abs(a) for a in A], [np.abs(b) for b in B], idx, scales=np.abs(s),
                    W=None if W is None else np.abs(W), bias=None if bias is None else np.abs(bias))
    return SB.tolerance(mag, dtype="float64", K=I + R + 3 + 2 * T, m=7 + 2 * (T - 1))


@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
def test_shards_recombine_within_the_bound(T, mode, data):
    x, A, B, idx, s, W, bias, widths = data.draw(tp_problems(T))
    if mode.startswith("row"):
        A, B, widths = A[:1], B[:1], widths[:1]
        W = None if W is None else W[:widths[0]]
        bias = None if bias is None else bias[:widths[0]]
    ref = unsharded(x, A, B, idx, scales=s, W=W, bias=bias)
    r = tp_forward(x, A if len(A) > 1 else A[0], B if len(B) > 1 else B[0], idx, scales=s, tp=T, mode=mode, W=W,
                   bias=bias)
    assert len(r.outputs) == T
    got = gather_columns(r.outputs, widths) if mode.startswith("column") else r.outputs[0]
    tol = _bound(x, A, B, idx, s, W, bias, T, x.shape[1], A[0].shape[1])
    err = np.abs(got - ref)
    assert (err <= tol).all(), f"{mode} tp={T}: max error {err.max():.3g}, worst err/tol {np.max(err / tol):.3g}"
    if mode.startswith("row"):
        # every rank holds the same reduced output: the rank-order sum of the partials, plus bias
        for o in r.outputs:
            assert np.array_equal(o, r.outputs[0])
        total = r.partials[0]
        for p in r.partials[1:]:
            total = total + p
        assert np.array_equal(r.outputs[0], total if bias is None else total + bias)
    else:
        assert r.partials is None
        assert all(o.shape == (x.shape[0], sum(widths) // T) for o in r.outputs)


def test_column_rank_is_its_shard_of_the_unsharded_output():
    rng = np.random.default_rng(5)
    x, A, B = rng.standard_normal((3, 8)), rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 8, 4))
    idx = np.array([1, -1, 0])
    ref = unsharded(x, A, B, idx, scales=[1.0, 3.0])
    for mode in ("column", "column_sharded"):
        r = tp_forward(x, A, B, idx, scales=[1.0, 3.0], tp=4, mode=mode)
        for t, o in enumerate(r.outputs):
            assert_close(o, ref[:, 2 * t:2 * t + 2], name=f"rank {t}", rel=1e-14)


def test_bad_input():
    x, A, B, idx = np.ones((2, 6)), np.ones((1, 4, 6)), np.ones((1, 6, 4)), np.array([0, 0])
    with pytest.raises(ValueError, match="I = 6 is not divisible by tp = 4"):
        tp_forward(x, A, B, idx, scales=1.0, tp=4, mode="row")
    with pytest.raises(ValueError, match="mode is 'diagonal'"):
        tp_forward(x, A, B, idx, scales=1.0, tp=2, mode="diagonal")
    with pytest.raises(ValueError, match="tp is 0"):
        tp_forward(x, A, B, idx, scales=1.0, tp=0, mode="row")
    with pytest.raises(ValueError, match=r"R \(slice 0\) = 4 is not divisible by tp = 3"):
        tp_forward(np.ones((2, 3)), np.ones((1, 4, 3)), np.ones((1, 3, 4)), idx, scales=1.0, tp=3, mode="column_sharded")
    with pytest.raises(ValueError, match="takes one A and one B stack"):
        tp_forward(x, [A, A], [B, B], idx, scales=1.0, tp=2, mode="row")
