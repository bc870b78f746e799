"""LoraAdapter: the state holder around the pure functions."""

from __future__ import annotations

import numpy as np
import pytest

import reflora
from helpers import assert_close
from reflora import LoraAdapter, LoraConfig, SGD, lora_backward, lora_forward, mse_loss
from reflora.backend import to_numpy


def _adapter(xp, **kw):
    rng = np.random.default_rng(0)
    c = LoraConfig(rank=3, alpha=6, in_features=8, out_features=5)
    ad = LoraAdapter(c, seed=1, xp=xp, dtype="float64", W=rng.standard_normal((5, 8)), bias=rng.standard_normal(5), **kw)
    return ad, rng


def test_forward_backward_are_the_functions(xp):
    ad, rng = _adapter(xp)
    ad.B = xp.asarray(rng.standard_normal((5, 3)))
    x, dy = xp.asarray(rng.standard_normal((4, 8))), xp.asarray(rng.standard_normal((4, 5)))
    y = ad.forward(x)
    g = ad.backward(dy)
    y2, cache = lora_forward(x, ad.A, ad.B, scale=2.0, W=ad.W, bias=ad.bias)
    g2 = lora_backward(dy, cache)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y2))
    for a, b in zip(g, g2):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert ad.num_params() == 3 * (8 + 5)


def test_step_matches_sgd_and_keeps_momentum(xp):
    ad, rng = _adapter(xp)
    x, t = xp.asarray(rng.standard_normal((6, 8))), xp.asarray(rng.standard_normal((6, 5)))
    opt = SGD(0.01, momentum=0.9)
    params = ad.params()
    state = opt.init(params)
    W0 = to_numpy(ad.W).copy()
    for _ in range(3):
        _, dy = mse_loss(ad.forward(x), t)
        g = ad.backward(dy)
        params, state = opt.step(params, {"A": g.dA, "B": g.dB}, state)
        ad.step(g, opt)
        np.testing.assert_array_equal(to_numpy(ad.A), to_numpy(params["A"]))
    np.testing.assert_array_equal(to_numpy(ad.W), W0)  # W stays frozen


def test_fit_recovers_a_low_rank_update():
    rng = np.random.default_rng(2)
    I, O, R = 16, 12, 2
    W = rng.standard_normal((O, I)) / 4
    A_true, B_true = rng.standard_normal((R, I)) / 4, rng.standard_normal((O, R)) / 4
    x = rng.standard_normal((200, I))
    t, _ = lora_forward(x, A_true, B_true, scale=1.0, W=W)
    ad = LoraAdapter(LoraConfig(rank=R, alpha=R, in_features=I, out_features=O), seed=0, xp="numpy",
                     dtype="float64", W=W)
    seen = []
    losses = ad.fit(x, t, steps=400, sgd=SGD(0.2, momentum=0.9), callback=lambda i, l: seen.append(i))
    assert seen == list(range(400)) and len(losses) == 400
    assert losses[-1] < 1e-4 * losses[0]
    assert_close(ad.B @ ad.A, B_true @ A_true, name="recovered BA", rel=1e-2)


def test_merge_unmerge(xp):
    ad, rng = _adapter(xp)
    ad.B = xp.asarray(rng.standard_normal((5, 3)))
    x = xp.asarray(rng.standard_normal((4, 8)))
    y = to_numpy(ad.forward(x)).copy()
    W0 = to_numpy(ad.W).copy()
    ad.merge()
    assert ad.merged
    assert_close(ad.forward(x), y, name="merged forward", rel=1e-13)
    with pytest.raises(RuntimeError, match="merged"):
        ad.backward(xp.asarray(np.ones((4, 5))))
    with pytest.raises(RuntimeError, match="already merged"):
        ad.merge()
    ad.unmerge()
    assert_close(ad.W, W0, name="W after unmerge", rel=1e-14)


def test_merge_needs_a_base():
    ad = LoraAdapter(LoraConfig(rank=1, in_features=2, out_features=2), xp="numpy")
    with pytest.raises(ValueError, match="base weight"):
        ad.merge()


def test_to_moves_every_array():
    strict = pytest.importorskip("array_api_strict")
    ad, _ = _adapter("numpy")
    ad.to(strict)
    assert all(type(a).__module__.startswith("array_api_strict") for a in (ad.A, ad.B, ad.W, ad.bias))
    y = ad.forward(strict.ones((2, 8), dtype=strict.float64))
    assert tuple(y.shape) == (2, 5)
    ad.to("numpy")
    assert isinstance(ad.A, np.ndarray)


def test_base_shapes_are_checked():
    with pytest.raises(ValueError, match=r"W has shape \(4, 4\); expected \(O, I\) = \(3, 4\)"):
        LoraAdapter(LoraConfig(rank=1, in_features=4, out_features=3), xp="numpy", W=np.ones((4, 4)))


def test_from_arrays_and_errors():
    ad = LoraAdapter.from_arrays(np.ones((2, 4)), np.zeros((3, 2)), alpha=4)
    assert ad.config.rank == 2 and ad.scale == 2.0 and ad.num_params() == 14
    with pytest.raises(ValueError, match="expected"):
        LoraAdapter.from_arrays(np.ones((2, 4)), np.zeros((3, 3)), alpha=4)
    with pytest.raises(ValueError, match="steps"):
        ad.fit(np.ones((1, 4)), np.ones((1, 3)), steps=-1, sgd=SGD(0.1))
    with pytest.raises(RuntimeError, match="forward"):
        LoraAdapter(LoraConfig(rank=1, in_features=2, out_features=2), xp="numpy").backward(np.ones((1, 2)))
    assert "rank=2" in repr(ad) and reflora.LoraAdapter is LoraAdapter
