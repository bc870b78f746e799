"""reflora.ops.dropout: host-seeded inverted-dropout masks, and dropout on the LoRA branch only.

Oracles: the definition (values 0 or 1/(1-p), the law of large numbers for the
keep rate), bit-identity across backends for one seed, the base path being
untouched (B = 0), and finite differences of the loss through a masked forward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora import dropout_mask, lora_backward, lora_forward
from reflora.backend import to_numpy

from helpers import F64_FD, assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]),
       st.integers(0, 2**32 - 1))
def test_mask_values_are_zero_or_inverse_keep(xp, shape, p, seed):
    m = to_numpy(dropout_mask(tuple(shape), p, seed=seed, xp=xp, dtype="float64"))
    assert m.shape == tuple(shape) and m.dtype == np.float64
    allowed = {0.0} if p == 1.0 else {0.0, 1.0 / (1.0 - p)}
    assert set(np.unique(m).tolist()) <= allowed
    if p == 0.0:
        assert (m == 1.0).all()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_scale_factor_is_torch_dropouts(dtype):
    torch = pytest.importorskip("torch")
    for p in [0.15, 0.1, 0.3, 0.05] + np.linspace(0.01, 0.99, 99).tolist():
        m = dropout_mask((256,), p, seed=0, xp="numpy", dtype=dtype)
        t = torch.nn.Dropout(p)(torch.ones(256, dtype=getattr(torch, dtype)))
        ours, theirs = m[m != 0], t[t != 0]
        if ours.size and theirs.numel():
            assert float(ours[0]) == float(theirs[0]), (dtype, p, float(ours[0]), float(theirs[0]))


def test_keep_rate_and_mean(xp):
    # 200k Bernoulli(0.7) draws: the keep rate is within 5 standard deviations of 0.7
    n, p = 200_000, 0.3
    m = to_numpy(dropout_mask((n,), p, seed=7, xp=xp, dtype="float64"))
    rate = float(np.mean(m != 0))
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sd, f"keep rate {rate} vs {1 - p} (sd {sd:.1e})"
    assert abs(float(np.mean(m)) - 1.0) < 5 * sd / (1 - p)


def test_same_seed_same_bits_on_every_backend(xp):
    ref = to_numpy(dropout_mask((6, 7), 0.4, seed=123, xp="numpy", dtype="float32"))
    got = to_numpy(dropout_mask((6, 7), 0.4, seed=123, xp=xp, dtype="float32"))
    np.testing.assert_array_equal(got, ref)
    other = to_numpy(dropout_mask((6, 7), 0.4, seed=124, xp=xp, dtype="float32"))
    assert not np.array_equal(other, ref)


def test_dropout_reaches_the_lora_branch_only(xp):
    rng = np.random.default_rng(0)
    x, W, A = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    m = dropout_mask((5, 4), 0.5, seed=1, xp=xp, dtype="float64")
    # B = 0: the output is exactly the base output, whatever the mask
    y, _ = lora_forward(xp.asarray(x), xp.asarray(A), xp.asarray(np.zeros((3, 2))), scale=2.0,
                        W=xp.asarray(W), dropout_mask=m)
    assert_close(y, x @ W.T, name="y with B = 0", rel=1e-15)
    # W = None: the LoRA branch sees x * m
    B = rng.standard_normal((3, 2))
    y, _ = lora_forward(xp.asarray(x), xp.asarray(A), xp.asarray(B), scale=2.0, dropout_mask=m)
    assert_close(y, 2.0 * (x * to_numpy(m)) @ A.T @ B.T, name="y LoRA branch", rel=1e-14)


def test_backward_through_a_drawn_mask_matches_finite_differences(xp):
    rng = np.random.default_rng(2)
    x, W, A, B = (rng.standard_normal(s) for s in [(4, 5), (3, 5), (2, 5), (3, 2)])
    G = rng.standard_normal((4, 3))
    m = to_numpy(dropout_mask((4, 5), 0.3, seed=5, xp="numpy", dtype="float64"))
    assert 0 < np.count_nonzero(m) < m.size  # the mask really drops something

    def loss(**o):
        q = {"x": x, "A": A, "B": B, **o}
        y, _ = lora_forward(q["x"], q["A"], q["B"], scale=1.5, W=W, dropout_mask=m)
        return float(np.sum(y * G))

    _, cache = lora_forward(xp.asarray(x), xp.asarray(A), xp.asarray(B), scale=1.5, W=xp.asarray(W),
                            dropout_mask=xp.asarray(m))
    g = lora_backward(xp.asarray(G), cache)
    for name, got in (("x", g.dx), ("A", g.dA), ("B", g.dB)):
        base = {"x": x, "A": A, "B": B}[name]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            e = np.zeros_like(base)
            e[idx] = 1e-3
            fd[idx] = (loss(**{name: base + e}) - loss(**{name: base - e})) / 2e-3
        assert_close(got, fd, name=f"d{name}", rel=F64_FD, atol=1e-12)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_probability(p):
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        dropout_mask((2, 2), p, seed=0, xp="numpy")


def test_bad_shape_seed_and_dtype():
    with pytest.raises(ValueError, match="non-negative"):
        dropout_mask((2, -1), 0.5, seed=0, xp="numpy")
    with pytest.raises(TypeError, match="tuple of ints"):
        dropout_mask((2.0, 3), 0.5, seed=0, xp="numpy")
    with pytest.raises(TypeError, match="seed"):
        dropout_mask((2, 3), 0.5, seed=1.5, xp="numpy")
    with pytest.raises(TypeError, match="real floating"):
        dropout_mask((2, 3), 0.5, seed=0, xp="numpy", dtype="int32")


def test_exported():
    assert reflora.dropout_mask is dropout_mask
