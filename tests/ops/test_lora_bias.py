"""reflora.ops.lora_bias: PEFT's lora_bias (a bias on lora_B, scaled with the branch).

Oracles: finite differences in float64, PEFT (LoraConfig(lora_bias=True)) under
torch autograd in float64, and identities (zero lora_bias gives the core's
output; the merge folds s c into the base bias).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora import lora_bias_backward, lora_bias_forward, lora_forward
from reflora.backend import to_numpy

from helpers import F64_FD, F64_PEER, assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    I, O, R = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1.0, 0.5, -2.0, 1 / 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return {
        "x": rng.standard_normal(lead + (I,)), "A": rng.standard_normal((R, I)), "B": rng.standard_normal((O, R)),
        "c": rng.standard_normal(O), "W": rng.standard_normal((O, I)), "bias": rng.standard_normal(O),
        "mask": (rng.random(lead + (I,)) > 0.3) / 0.7 if draw(st.booleans()) else None,
        "G": rng.standard_normal(lead + (O,)), "scale": scale,
    }


def _fwd(p, **o):
    q = {**p, **o}
    return lora_bias_forward(q["x"], q["A"], q["B"], q["c"], scale=q["scale"], W=q["W"], bias=q["bias"],
                             dropout_mask=q["mask"])


@fixture_ok
@given(problems())
def test_gradients_match_central_differences(xp, p):
    q = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    y, cache = _fwd(q)
    g = lora_bias_backward(q["G"], cache)
    assert len(g) == 4 and g._fields == ("dx", "dA", "dB", "dlora_bias")
    for name, got in (("x", g.dx), ("A", g.dA), ("B", g.dB), ("c", g.dlora_bias)):
        base = p[name]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            e = np.zeros_like(base)
            e[idx] = 1e-3
            lp = float(np.sum(to_numpy(_fwd(p, **{name: base + e})[0]) * p["G"]))
            lm = float(np.sum(to_numpy(_fwd(p, **{name: base - e})[0]) * p["G"]))
            fd[idx] = (lp - lm) / 2e-3
        assert_close(got, fd, name=f"d{name}", rel=F64_FD, atol=1e-12)


def test_zero_lora_bias_is_the_core(xp):
    rng = np.random.default_rng(0)
    x, A, B, W = (xp.asarray(rng.standard_normal(s)) for s in [(3, 4), (2, 4), (5, 2), (5, 4)])
    y0, _ = lora_forward(x, A, B, scale=0.7, W=W)
    y1, _ = lora_bias_forward(x, A, B, xp.zeros((5,), dtype=x.dtype), scale=0.7, W=W)
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y0))


def test_matches_peft_lora_bias_in_float64():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(3)
    I, O, R, alpha = 6, 5, 3, 4
    x, W, bias = rng.standard_normal((2, 4, I)), rng.standard_normal((O, I)), rng.standard_normal(O)
    A, B, c = rng.standard_normal((R, I)), rng.standard_normal((O, R)), rng.standard_normal(O)
    G = rng.standard_normal((2, 4, O))

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(I, O, dtype=torch.float64)

    for rs in (False, True):
        pm = peft.get_peft_model(One(), peft.LoraConfig(r=R, lora_alpha=alpha, target_modules=["lin"],
                                                         lora_bias=True, use_rslora=rs)).double()
        layer = pm.base_model.model.lin
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.from_numpy(W))
            layer.base_layer.bias.copy_(torch.from_numpy(bias))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
            layer.lora_B["default"].bias.copy_(torch.from_numpy(c))
        s = reflora.LoraConfig(rank=R, alpha=alpha, in_features=I, out_features=O, use_rslora=rs).scale
        assert s == layer.scaling["default"]
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = layer(xt)
        (yt * torch.from_numpy(G)).sum().backward()
        y, cache = lora_bias_forward(x, A, B, c, scale=s, W=W, bias=bias)
        g = lora_bias_backward(G, cache)
        assert_close(y, yt.detach().numpy(), name="y", rel=F64_PEER)
        assert_close(g.dx, xt.grad.numpy(), name="dx", rel=F64_PEER)
        assert_close(g.dA, layer.lora_A["default"].weight.grad.numpy(), name="dA", rel=F64_PEER)
        assert_close(g.dB, layer.lora_B["default"].weight.grad.numpy(), name="dB", rel=F64_PEER)
        assert_close(g.dlora_bias, layer.lora_B["default"].bias.grad.numpy(), name="dlora_bias", rel=F64_PEER)
        # merge folds s c into the base bias, as PEFT's merge_and_unload
        merged = pm.merge_and_unload().lin
        m = reflora.merge(W, A, B, scale=s, bias=bias, lora_bias=c)
        assert_close(m.weight, merged.weight.detach().numpy(), name="merged W", rel=F64_PEER)
        assert_close(m.bias, merged.bias.detach().numpy(), name="merged bias", rel=F64_PEER)


def test_bad_lora_bias():
    x, A, B = np.ones((2, 3)), np.ones((1, 3)), np.ones((4, 1))
    with pytest.raises(ValueError, match=r"lora_bias has shape \(3,\); expected \(O,\) = \(4,\)"):
        lora_bias_forward(x, A, B, np.ones(3), scale=1.0)
    with pytest.raises(TypeError, match="lora_bias has dtype float32"):
        lora_bias_forward(x, A, B, np.ones(4, dtype=np.float32), scale=1.0)
    with pytest.raises(TypeError, match="expected an array"):
        lora_bias_forward(x, A, B, [1.0] * 4, scale=1.0)
    with pytest.raises(TypeError, match="LoraBiasCache"):
        lora_bias_backward(np.ones((2, 4)), lora_forward(x, A, B, scale=1.0)[1])
    with pytest.raises(ValueError, match="lora_bias was given but bias is None"):
        reflora.merge(np.ones((4, 3)), A, B, scale=1.0, lora_bias=np.ones(4))
