"""reflora.resize_rank: best rank-k adapters from thin QR + SVD of the core.

Oracles: the dense SVD of s B A in float64 (Eckart-Young: the same M_k, the
same singular values), the identity ||M - M_k||_F^2 = sum of the discarded
sigma^2, and the layer output (unchanged when growing).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora import lora_forward, resize_rank
from reflora.backend import to_numpy

from helpers import assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def adapters(draw):
    I, O, R = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    A, B = rng.standard_normal((R, I)), rng.standard_normal((O, R))
    return A, B, draw(st.sampled_from([1.0, 2.0, -0.5, 1 / 3])), draw(st.integers(1, 10)), \
        draw(st.sampled_from([None, 1.0, 0.25, -2.0]))


@fixture_ok
@given(adapters())
def test_truncation_is_the_best_rank_k_approximation(xp, case):
    A, B, s, k, s_new = case
    r = resize_rank(xp.asarray(A), xp.asarray(B), scale=s, new_rank=k, new_scale=s_new)
    s2 = s if s_new is None else s_new
    R, I = A.shape
    O = B.shape[0]
    assert tuple(r.A.shape) == (k, I) and tuple(r.B.shape) == (O, k)
    M = s * B @ A
    U, sig, Vt = np.linalg.svd(M)
    n = min(O, I, R)
    assert_close(r.singular_values, sig[:n], name="singular values", rel=1e-13)
    Mk = s2 * to_numpy(r.B) @ to_numpy(r.A)
    if k < R:
        # the dense truncated SVD (unique when sigma_k > sigma_{k+1}, true for random data)
        kk = min(k, len(sig))
        ref = (U[:, :kk] * sig[:kk]) @ Vt[:kk]
        assert_close(Mk, ref, name="M_k", rel=1e-12, atol=1e-12)
        # Frobenius error = norm of the discarded singular values
        err = np.linalg.norm(M - Mk)
        assert abs(err - np.sqrt(np.sum(sig[kk:] ** 2))) <= 1e-12 * max(1.0, np.linalg.norm(M))
    else:
        assert_close(Mk, M, name="grown M", rel=1e-15, atol=1e-15)


@fixture_ok
@given(adapters())
def test_growing_pads_with_zeros_and_keeps_the_output(xp, case):
    A, B, s, _, _ = case
    R = A.shape[0]
    k = R + 3
    r = resize_rank(xp.asarray(A), xp.asarray(B), scale=s, new_rank=k)
    np.testing.assert_array_equal(to_numpy(r.A)[:R], A)
    np.testing.assert_array_equal(to_numpy(r.B)[:, :R], B)
    assert not np.any(to_numpy(r.A)[R:]) and not np.any(to_numpy(r.B)[:, R:])
    x = xp.asarray(np.random.default_rng(0).standard_normal((5, A.shape[1])))
    y0, _ = lora_forward(x, xp.asarray(A), xp.asarray(B), scale=s)
    y1, _ = lora_forward(x, r.A, r.B, scale=s)
    # zero terms change the summation order only: the same value up to rounding of O(1) products
    assert_close(y1, y0, name="y after growing", rel=1e-15, atol=1e-14)


def test_rslora_scale_follows_the_rank():
    rng = np.random.default_rng(1)
    cfg = reflora.LoraConfig(rank=16, alpha=16, in_features=32, out_features=24, use_rslora=True)
    A, B = rng.standard_normal((16, 32)), rng.standard_normal((24, 16))
    small = cfg.replace(rank=4)
    r = resize_rank(A, B, scale=cfg.scale, new_rank=4, new_scale=small.scale)
    assert small.scale == 8.0 and cfg.scale == 4.0
    M = cfg.scale * B @ A
    sig = np.linalg.svd(M, compute_uv=False)
    assert abs(np.linalg.norm(M - small.scale * r.B @ r.A) - np.sqrt(np.sum(sig[4:] ** 2))) < 1e-10
    # the factors are balanced: B'^T B' = A' A'^T = diag(sigma_k / s')
    assert_close(r.B.T @ r.B, np.diag(sig[:4] / small.scale), name="B'^T B'", rel=1e-12, atol=1e-12)
    assert_close(r.A @ r.A.T, np.diag(sig[:4] / small.scale), name="A' A'^T", rel=1e-12, atol=1e-12)


def test_low_rank_update_is_recovered_exactly():
    """A rank-2 update stored at rank 8 resizes to rank 2 with no error."""
    rng = np.random.default_rng(2)
    A = np.vstack([rng.standard_normal((2, 10)), np.zeros((6, 10))])
    B = rng.standard_normal((7, 8))
    r = resize_rank(A, B, scale=2.0, new_rank=2)
    assert_close(2.0 * r.B @ r.A, 2.0 * B @ A, name="M", rel=1e-13)
    assert np.all(np.asarray(r.singular_values)[2:] < 1e-13)


def test_bad_input():
    A, B = np.ones((2, 3)), np.ones((4, 2))
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="new_rank"):
            resize_rank(A, B, scale=1.0, new_rank=k)
    with pytest.raises(ValueError, match="new_scale is 0"):
        resize_rank(A, B, scale=1.0, new_rank=1, new_scale=0.0)
    with pytest.raises(ValueError, match=r"B has shape \(4, 3\); expected \(O, R\) = \(O, 2\)"):
        resize_rank(A, np.ones((4, 3)), scale=1.0, new_rank=1)
    with pytest.raises(TypeError, match="one real floating dtype"):
        resize_rank(A, B.astype(np.float32), scale=1.0, new_rank=1)
