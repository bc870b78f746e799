"""LoraAdapter: the state holder around the pure functions."""

from __future__ import annotations

import numpy as np
import pytest

import reflora
from helpers import F64_PEER, assert_close
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



def test_from_arrays_sets_every_attribute_init_sets():
    # one private constructor builds both: an attribute added to one path cannot go missing in the other
    cfg = LoraConfig(rank=2, in_features=4, out_features=3)
    made = LoraAdapter(cfg, xp="numpy", dtype="float64", W=np.ones((3, 4)), bias=np.zeros(3))
    wrapped = LoraAdapter.from_arrays(made.A, made.B, alpha=cfg.alpha, W=made.W, bias=made.bias)
    assert vars(wrapped).keys() == vars(made).keys()
    for k in ("A", "B", "W", "bias"):
        np.testing.assert_array_equal(getattr(wrapped, k), getattr(made, k))
    for k in ("dtype", "merged", "_cache", "_sgd_state", "dora_norm_grad", "_dora_norm", "magnitude", "lora_bias"):
        assert getattr(wrapped, k) == getattr(made, k), k
    assert wrapped.config == made.config

def _extras(xp, *, dora, lora_bias, seed=4):
    rng = np.random.default_rng(seed)
    O, I, R = 5, 8, 3
    arrs = {"A": rng.standard_normal((R, I)), "B": rng.standard_normal((O, R)), "W": rng.standard_normal((O, I)),
            "bias": rng.standard_normal(O), "m": rng.uniform(0.5, 2.0, O), "c": rng.standard_normal(O),
            "x": rng.standard_normal((2, 3, I)), "dy": rng.standard_normal((2, 3, O)),
            "mask": (rng.random((2, 3, I)) > 0.25) / 0.75}
    q = {k: xp.asarray(v) for k, v in arrs.items()}
    ad = LoraAdapter.from_arrays(q["A"], q["B"], alpha=6, W=q["W"], bias=q["bias"],
                                 magnitude=q["m"] if dora else None, lora_bias=q["c"] if lora_bias else None)
    return ad, arrs, q


def _same(a, b):
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_and_lora_bias_paths_are_the_functions(xp, kind):
    ad, p, q = _extras(xp, dora=kind == "dora", lora_bias=kind == "lora_bias")
    s = ad.scale
    assert s == 2.0 and ad.num_params() == 3 * (8 + 5) + 5
    y = ad.forward(q["x"], dropout_mask=q["mask"])
    g = ad.backward(q["dy"])
    if kind == "dora":
        y2, c2 = reflora.dora_forward(q["x"], q["A"], q["B"], magnitude=q["m"], W=q["W"], scale=s, bias=q["bias"],
                                      dropout_mask=q["mask"])
        g2 = reflora.dora_backward(q["dy"], c2)
        extra, dextra = "m", g.dm
    else:
        y2, c2 = reflora.lora_bias_forward(q["x"], q["A"], q["B"], lora_bias=q["c"], scale=s, W=q["W"], bias=q["bias"],
                                           dropout_mask=q["mask"])
        g2 = reflora.lora_bias_backward(q["dy"], c2)
        extra, dextra = "lora_bias", g.dlora_bias
    _same(y, y2)
    assert type(g) is type(g2)
    for a, b in zip(g, g2):
        _same(a, b)
    # step: A, B and the extra parameter (dm or dlora_bias) all move, as SGD.step on the same dict
    opt = SGD(0.1, momentum=0.9)
    params = ad.params()
    assert set(params) == {"A", "B", extra}
    state = opt.init(params)
    for _ in range(2):
        params, state = opt.step(params, {"A": g.dA, "B": g.dB, extra: dextra}, state)
        ad.step(g, opt)
        for k in params:
            _same(ad.params()[k], params[k])
    _same(ad.magnitude if kind == "dora" else ad.lora_bias, params[extra])
    # merge / unmerge: the merged forward is the unmerged one, and unmerge restores W (and bias)
    y_un = to_numpy(ad.forward(q["x"])).copy()
    W0, b0 = to_numpy(ad.W).copy(), to_numpy(ad.bias).copy()
    ad.merge()
    if kind == "dora":
        _same(ad.W, reflora.dora_merge(q["W"], ad.A, ad.B, magnitude=ad.magnitude, scale=s).weight)
        _same(ad.bias, b0)
    else:
        ref = reflora.merge(q["W"], ad.A, ad.B, scale=s, bias=q["bias"], lora_bias=ad.lora_bias)
        _same(ad.W, ref[0])
        _same(ad.bias, ref[1])
    assert_close(ad.forward(q["x"]), y_un, name=f"{kind} merged forward", rel=1e-13)
    ad.unmerge()
    assert_close(ad.W, W0, name=f"{kind} unmerged W", rel=1e-13)
    assert_close(ad.bias, b0, name=f"{kind} unmerged bias", rel=1e-13, atol=1e-15)
    assert_close(ad.forward(q["x"]), y_un, name=f"{kind} forward after unmerge", rel=1e-13)


def test_dora_with_lora_bias_is_refused(xp):
    ad, _, q = _extras(xp, dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="DoRA with lora_bias is not supported"):
        ad.forward(q["x"])


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_and_lora_bias_adapters_match_peft(kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    ad, p, _ = _extras(np, dora=kind == "dora", lora_bias=kind == "lora_bias", seed=5)
    O, I = p["W"].shape

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(I, O, dtype=torch.float64)

    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=kind == "dora",
                          lora_bias=kind == "lora_bias")
    layer = peft.get_peft_model(One(), cfg).double().base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(p["W"]))
        layer.base_layer.bias.copy_(torch.from_numpy(p["bias"]))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(p["A"]))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(p["B"]))
        if kind == "dora":
            layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(p["m"]))
        else:
            layer.lora_B["default"].bias.copy_(torch.from_numpy(p["c"]))
    mask = torch.from_numpy(p["mask"])

    class FixedMask(nn.Module):
        def forward(self, x):
            return x * mask

    layer.lora_dropout["default"] = FixedMask()
    xt = torch.from_numpy(p["x"]).requires_grad_(True)
    yt = layer(xt)
    (yt * torch.from_numpy(p["dy"])).sum().backward()
    y = ad.forward(p["x"], dropout_mask=p["mask"])
    g = ad.backward(p["dy"])
    assert_close(y, yt.detach().numpy(), name="y", rel=F64_PEER)
    assert_close(g.dx, xt.grad.numpy(), name="dx", rel=F64_PEER)
    assert_close(g.dA, layer.lora_A["default"].weight.grad.numpy(), name="dA", rel=F64_PEER)
    assert_close(g.dB, layer.lora_B["default"].weight.grad.numpy(), name="dB", rel=F64_PEER)
    if kind == "dora":
        assert_close(g.dm, layer.lora_magnitude_vector["default"].weight.grad.numpy(), name="dm", rel=F64_PEER)
    else:
        assert_close(g.dlora_bias, layer.lora_B["default"].bias.grad.numpy(), name="dlora_bias", rel=F64_PEER)
