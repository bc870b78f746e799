"""reflora.clip_grad_norm against torch.nn.utils.clip_grad_norm_ (the peer) and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reflora
from helpers import assert_close
from reflora.backend import to_numpy

torch = pytest.importorskip("torch")


def _torch_clip(grads: dict, max_norm, **kw):
    ps = []
    for v in grads.values():
        p = torch.zeros(v.shape, dtype=torch.from_numpy(v).dtype, requires_grad=True)
        p.grad = torch.from_numpy(v.copy())
        ps.append(p)
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=False, **kw)
    return {k: p.grad.numpy() for k, p in zip(grads, ps)}, total.numpy()


def _grads(rng, dtype, scale=1.0):
    return {"A": (scale * rng.standard_normal((4, 7))).astype(dtype), "B": (scale * rng.standard_normal((5, 4))).astype(dtype),
            "m": (scale * rng.standard_normal(5)).astype(dtype)}


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_float64_matches_torch(xp, norm_type, max_norm):
    rng = np.random.default_rng(0)
    g = _grads(rng, np.float64)
    want, total = _torch_clip(g, max_norm, norm_type=norm_type)
    got, n = reflora.clip_grad_norm({k: xp.asarray(v) for k, v in g.items()}, max_norm, norm_type=norm_type)
    assert_close(n, total, name="total norm", rel=1e-15)
    for k in g:
        assert_close(got[k], want[k], name=k, rel=2e-15)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_float32_matches_torch(norm_type):
    """Same coefficient arithmetic as torch: when the total norms agree, the clipped gradients agree bit for bit.

    The norms are formed in float64 and rounded once each; torch's are float32 reductions (the per-tensor
    norm of k <= 28 squares, then the norm of 3 norms), each off by at most about (log2 k + 2) u relative,
    so the totals differ by at most (5 + 2) + (2 + 2) = 11 half-ulps: 6 ulp.
    """
    agree = 0
    for seed in range(20):
        g = _grads(np.random.default_rng(seed), np.float32, scale=2.0)
        want, total = _torch_clip(g, 1.0, norm_type=norm_type)
        got, n = reflora.clip_grad_norm(g, 1.0, norm_type=norm_type)
        assert n.dtype == np.float32
        ulps = abs(int(n.view(np.int32)) - int(total.view(np.int32)))
        assert ulps <= 6, f"seed {seed}: total norm {n!r} vs torch {total!r}"
        if ulps == 0:
            agree += 1
            for k in g:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"seed {seed}, {k}")
        else:
            for k in g:
                np.testing.assert_array_max_ulp(got[k], want[k], maxulp=ulps + 2)
    assert agree >= 5  # the bit-for-bit branch is not vacuous


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_float16_matches_torch(norm_type):
    """float16, as the module docstring claims: torch's Half norm is a float32 reduction rounded once to
    float16, reflora's a float64 one rounded once, so the totals differ only when the float32 and float64
    values round to different float16 neighbours (1 ulp; measured: never in 400 draws); the coefficient
    and the products are rounded as torch rounds them (each op in float32, then to float16)."""
    agree = 0
    for seed in range(20):
        g = _grads(np.random.default_rng(seed), np.float16, scale=2.0)
        want, total = _torch_clip(g, 1.0, norm_type=norm_type)
        got, n = reflora.clip_grad_norm(g, 1.0, norm_type=norm_type)
        assert n.dtype == np.float16
        ulps = abs(int(n.view(np.int16)) - int(total.view(np.int16)))
        assert ulps <= 1, f"seed {seed}: total norm {n!r} vs torch {total!r}"
        if ulps == 0:
            agree += 1
            for k in g:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"seed {seed}, {k}")
    assert agree >= 15


def test_float32_exact_norm_clips_bit_for_bit():
    # entries 3/8 and 4/8 ... : sum of squares 25/64 exactly, norm 5/8; the coefficient is torch's
    # 1 / (5/8 + 1e-6) * 0.25, rounded twice in float32
    g = {"A": np.float32([[0.375, 0.0]]), "B": np.float32([0.5])}
    want, total = _torch_clip(g, 0.25)
    got, n = reflora.clip_grad_norm(g, 0.25)
    assert float(n) == float(total) == 0.625
    for k in g:
        np.testing.assert_array_equal(got[k], want[k])
    recip = np.float32(1.0) / (np.float32(0.625) + np.float32(1e-6))
    np.testing.assert_array_equal(got["B"], np.float32(0.5) * (recip * np.float32(0.25)))


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_gradients_as_torch(norm_type, bad, dtype):
    g = _grads(np.random.default_rng(1), dtype)
    g["B"][1, 2] = bad
    want, total = _torch_clip(g, 1.0, norm_type=norm_type)
    got, n = reflora.clip_grad_norm(g, 1.0, norm_type=norm_type)
    np.testing.assert_array_equal(n, total)  # inf or nan, as torch
    for k in g:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # nan where torch has nan, 0 elsewhere
    with pytest.raises(RuntimeError):
        _torch_clip(g, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="expected a finite norm"):
        reflora.clip_grad_norm(g, 1.0, norm_type=norm_type, error_if_nonfinite=True)


def test_clips_over_all_tensors_not_each():
    g = {"A": np.array([3.0, 0.0]), "B": np.array([0.0, 4.0])}
    got, n = reflora.clip_grad_norm(g, 1.0)
    assert float(n) == 5.0
    # one coefficient for both: the direction is kept, the joint norm is max_norm (up to torch's 1e-6)
    np.testing.assert_allclose([got["A"][0], got["B"][1]], [0.6, 0.8], rtol=1e-5)
    assert abs(math.hypot(got["A"][0], got["B"][1]) - 1.0) < 2e-6
    unchanged, _ = reflora.clip_grad_norm(g, 10.0)  # the coefficient is clamped at 1: never scaled up
    np.testing.assert_array_equal(unchanged["A"], g["A"])


def test_pure_and_structures(xp):
    g = (xp.asarray(np.array([3.0])), xp.asarray(np.array([4.0])))
    out, n = reflora.clip_grad_norm(g, 1.0, norm_type="inf")
    assert isinstance(out, tuple) and float(to_numpy(n)) == 4.0
    assert float(to_numpy(g[0])[0]) == 3.0
    empty, n0 = reflora.clip_grad_norm({}, 1.0)
    assert empty == {} and float(n0) == 0.0


def test_bad_arguments():
    g = {"A": np.ones(2)}
    with pytest.raises(ValueError, match="norm_type is 0; expected a p > 0 or inf"):
        reflora.clip_grad_norm(g, 1.0, norm_type=0)
    with pytest.raises(TypeError, match=r"max_norm is '1' \(str\); expected a real number"):
        reflora.clip_grad_norm(g, "1")
    with pytest.raises(ValueError, match="max_norm is -1.0; expected a number >= 0"):
        reflora.clip_grad_norm(g, -1.0)  # torch flips every gradient's sign instead
    with pytest.raises(ValueError, match="max_norm is nan"):
        reflora.clip_grad_norm(g, math.nan)
    with pytest.raises(TypeError, match="norm_type is '2'"):
        reflora.clip_grad_norm(g, 1.0, norm_type="2")
    with pytest.raises(ValueError, match="norm_type is nan"):
        reflora.clip_grad_norm(g, 1.0, norm_type=math.nan)
    with pytest.raises(TypeError, match="error_if_nonfinite is 1; expected True or False"):
        reflora.clip_grad_norm(g, 1.0, error_if_nonfinite=1)
    # max_norm = inf is torch's "no clipping" for finite gradients (inf / (n + 1e-6) clamped to 1)
    same, _ = reflora.clip_grad_norm(g, math.inf)
    np.testing.assert_array_equal(same["A"], g["A"])
    with pytest.raises(TypeError, match="one real floating dtype"):
        reflora.clip_grad_norm({"A": np.ones(2), "B": np.ones(2, np.float32)}, 1.0)
