"""reflora.ops.stack: stacked LoRA layers with relu / tanh-gelu between them, manual backward.

Oracles: central finite differences in float64 through the whole stack, torch
autograd on the same stack (F.linear, relu, gelu(approximate="tanh")), and end
to end training by SGD on a synthetic task, step for step against torch.optim.SGD.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora import SGD, LoraLayer, mse_loss, stack_backward, stack_forward
from reflora.backend import to_numpy
from reflora.ops.stack import activation_backward, activation_forward

from helpers import F64_PEER, assert_close

STACK_FD = 1e-6  # float64 central differences with h = 1e-6 through a nonlinear stack
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def stacks(draw):
    L = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 5)) for _ in range(L + 1)]
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers = []
    for l in range(L):
        I, O, R = widths[l], widths[l + 1], draw(st.integers(1, 3))
        layers.append(LoraLayer(rng.standard_normal((R, I)), rng.standard_normal((O, R)),
                                rng.standard_normal((O, I)) if draw(st.booleans()) else None,
                                rng.standard_normal(O) if draw(st.booleans()) else None))
    acts = [draw(st.sampled_from(["relu", "gelu_tanh", "identity"])) for _ in range(L - 1)]
    scales = [draw(st.sampled_from([1.0, 0.5, 2.0])) for _ in range(L)]
    x = rng.standard_normal(lead + (widths[0],))
    G = rng.standard_normal(lead + (widths[-1],))
    return layers, acts, scales, x, G


def _to(xp, layers):
    return [LoraLayer(*(None if a is None else xp.asarray(a) for a in layer)) for layer in layers]


@fixture_ok
@given(stacks())
def test_gradients_match_central_differences(xp, case):
    layers, acts, scales, x, G = case
    y, cache = stack_forward(xp.asarray(x), _to(xp, layers), scales=scales, activation=acts)
    g = stack_backward(xp.asarray(G), cache)

    def loss(x_=x, layers_=layers):
        y_, _ = stack_forward(x_, layers_, scales=scales, activation=acts)
        return float(np.sum(y_ * G))

    def fd(get, put):
        base = get()
        out = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            e = np.zeros_like(base)
            e[idx] = 1e-6
            out[idx] = (put(base + e) - put(base - e)) / 2e-6
        return out

    assert_close(g.dx, fd(lambda: x, lambda v: loss(x_=v)), name="dx", rel=STACK_FD, atol=1e-8)
    for l, layer in enumerate(layers):
        for k, name in ((0, "dA"), (1, "dB")):
            def put(v, l=l, k=k):
                new = list(layers)
                new[l] = layer._replace(**{"AB"[k]: v})
                return loss(layers_=new)

            assert_close(g.layers[l][1 + k], fd(lambda: layer[k], put), name=f"layer {l} {name}",
                         rel=STACK_FD, atol=1e-8)


def _torch_stack(layers, acts, scales, x, G):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tp = [[None if a is None else torch.from_numpy(a).requires_grad_(i < 2) for i, a in enumerate(layer)]
          for layer in layers]
    h = xt = torch.from_numpy(x).requires_grad_(True)
    for l, ((A, B, W, b), s) in enumerate(zip(tp, scales)):
        z = s * F.linear(F.linear(h, A), B)
        if W is not None:
            z = z + F.linear(h, W)
        if b is not None:
            z = z + b
        if l < len(layers) - 1:
            z = {"relu": F.relu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                 "identity": lambda t: t}[acts[l]](z)
        h = z
    (h * torch.from_numpy(G)).sum().backward()
    return h.detach().numpy(), xt.grad.numpy(), [(A.grad.numpy(), B.grad.numpy()) for A, B, _, _ in tp]


@given(stacks())
def test_matches_torch_autograd(case):
    layers, acts, scales, x, G = case
    y_ref, dx_ref, ref = _torch_stack(layers, acts, scales, x, G)
    y, cache = stack_forward(x, layers, scales=scales, activation=acts)
    g = stack_backward(G, cache)
    # outputs can cancel to ~1e-6 from O(1) terms: an absolute floor of 1e-13 (inputs are O(1))
    assert_close(y, y_ref, name="y", rel=F64_PEER, atol=1e-13)
    assert_close(g.dx, dx_ref, name="dx", rel=F64_PEER, atol=1e-13)
    for l, (dA, dB) in enumerate(ref):
        assert_close(g.layers[l].dA, dA, name=f"layer {l} dA", rel=F64_PEER, atol=1e-13)
        assert_close(g.layers[l].dB, dB, name=f"layer {l} dB", rel=F64_PEER, atol=1e-13)


def test_activations_against_torch():
    torch = pytest.importorskip("torch")
    z = np.linspace(-6, 6, 1201)
    zt = torch.from_numpy(z).requires_grad_(True)
    for kind, fn in (("relu", torch.relu), ("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh"))):
        zt.grad = None
        out = fn(zt)
        out.sum().backward()
        assert_close(activation_forward(z, kind), out.detach().numpy(), name=kind, rel=1e-15)
        assert_close(activation_backward(np.ones_like(z), z, kind), zt.grad.numpy(), name=f"{kind}'", rel=1e-14)


def test_relu_at_nan_and_zero_like_torch():
    torch = pytest.importorskip("torch")
    z = np.array([-1.0, -0.0, 0.0, np.nan, 2.0, -np.inf, np.inf])
    da = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, np.nan])
    zt = torch.from_numpy(z).requires_grad_(True)
    out = torch.relu(zt)
    out.backward(torch.from_numpy(da))
    y = activation_forward(z, "relu")
    np.testing.assert_array_equal(y, out.detach().numpy())   # NaN where NaN
    np.testing.assert_array_equal(np.signbit(y), np.signbit(out.detach().numpy()))
    np.testing.assert_array_equal(activation_backward(da, z, "relu"), zt.grad.numpy())


def test_sgd_trains_a_three_layer_stack_like_torch():
    """A synthetic regression task: recover hidden LoRA updates through a relu/gelu stack, 40 SGD steps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    dims, R = [8, 16, 16, 4], 4
    Ws = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]
    acts = ["gelu_tanh", "relu"]
    cfgs = [reflora.LoraConfig(rank=R, alpha=8, in_features=i, out_features=o, use_rslora=True)
            for i, o in zip(dims, dims[1:])]
    scales = [c.scale for c in cfgs]
    assert scales == [4.0, 4.0, 4.0]  # rsLoRA: alpha / sqrt(R)
    teacher = [LoraLayer(rng.standard_normal((R, i)) / np.sqrt(i), rng.standard_normal((o, R)) * 0.1, W)
               for i, o, W in zip(dims, dims[1:], Ws)]
    x = rng.standard_normal((64, dims[0]))
    target, _ = stack_forward(x, teacher, scales=scales, activation=acts)
    params = {}
    for l, c in enumerate(cfgs):
        params[f"A{l}"], params[f"B{l}"] = reflora.init_lora(c, seed=l, xp="numpy", dtype="float64")
    opt = SGD(0.05, momentum=0.9)
    state = opt.init(params)
    tparams = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=0.05, momentum=0.9)
    losses = []
    for step in range(40):
        layers = [LoraLayer(params[f"A{l}"], params[f"B{l}"], Ws[l]) for l in range(3)]
        y, cache = stack_forward(x, layers, scales=scales, activation=acts)
        loss, dy = mse_loss(y, target)
        losses.append(float(loss))
        g = stack_backward(dy, cache)
        grads = {}
        for l in range(3):
            grads[f"A{l}"], grads[f"B{l}"] = g.layers[l].dA, g.layers[l].dB
        params, state = opt.step(params, grads, state)
        # the same step in torch
        topt.zero_grad()
        h = torch.from_numpy(x)
        for l in range(3):
            z = scales[l] * (h @ tparams[f"A{l}"].T) @ tparams[f"B{l}"].T + h @ torch.from_numpy(Ws[l]).T
            h = (torch.nn.functional.gelu(z, approximate="tanh") if acts[l] == "gelu_tanh" else torch.relu(z)) \
                if l < 2 else z
        torch.mean((h - torch.from_numpy(target)) ** 2).backward()
        topt.step()
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    for k, v in params.items():
        assert_close(v, tparams[k].detach().numpy(), name=f"{k} after 40 steps", rel=1e-10)


def test_one_scale_may_be_a_numpy_scalar_or_0d_array(xp):
    rng = np.random.default_rng(1)
    layers = [LoraLayer(xp.asarray(rng.standard_normal((2, 3))), xp.asarray(rng.standard_normal((4, 2)))),
              LoraLayer(xp.asarray(rng.standard_normal((2, 4))), xp.asarray(rng.standard_normal((2, 2))))]
    x = xp.asarray(rng.standard_normal((5, 3)))
    y_ref, _ = stack_forward(x, layers, scales=[0.5, 0.5])
    for one in (0.5, np.float32(0.5), np.float64(0.5), np.array(0.5), xp.asarray(0.5)):
        y, _ = stack_forward(x, layers, scales=one)
        assert_close(y, y_ref, name=f"scales={one!r}", rel=0.0)


def test_bad_input():
    l1 = LoraLayer(np.ones((1, 3)), np.ones((4, 1)))
    l2 = LoraLayer(np.ones((1, 5)), np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"layer 1: A has shape \(1, 5\); expected \(R, I\) = \(R, 4\)"):
        stack_forward(np.ones((2, 3)), [l1, l2], scales=1.0)
    with pytest.raises(ValueError, match="expected one of"):
        stack_forward(np.ones((2, 3)), [l1, l1._replace(A=np.ones((1, 4)))], scales=1.0, activation="tanh")
    with pytest.raises(ValueError, match="expected L - 1 = 1"):
        stack_forward(np.ones((2, 3)), [l1, l1._replace(A=np.ones((1, 4)))], scales=1.0, activation=["relu"] * 2)
    with pytest.raises(ValueError, match="expected one per layer"):
        stack_forward(np.ones((2, 3)), [l1], scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        stack_forward(np.ones((2, 3)), [], scales=1.0)
    with pytest.raises(TypeError, match="scales is NoneType; expected a real number"):
        stack_forward(np.ones((2, 3)), [l1], scales=None)
    with pytest.raises(TypeError, match="scale is True"):
        stack_forward(np.ones((2, 3)), [l1], scales=True)
    with pytest.raises(TypeError, match="StackCache"):
        stack_backward(np.ones((2, 4)), reflora.lora_forward(np.ones((2, 3)), l1.A, l1.B, scale=1.0)[1])
