"""reflora.SGD against torch.optim.SGD (the peer) and its own identities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reflora
from helpers import assert_close
from reflora.backend import to_numpy

GRID = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 0.05], [False, True], [False, True])
    if not (n and (m <= 0 or d != 0))
]


def _grad_fn(params, t, rng_noise):
    """A gradient that depends on the parameters (a quadratic pull) plus fixed noise: trajectories diverge if any rule differs."""
    return {k: 0.5 * (v - 1.0) + rng_noise[k][t] for k, v in params.items()}


@pytest.mark.parametrize("opts", GRID, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch_sgd_for_50_steps(xp, opts):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"A": (3, 5), "B": (4, 3)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    noise = {k: rng.standard_normal((50,) + s) for k, s in shapes.items()}
    lr = 0.05

    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=lr, **opts)
    opt = reflora.SGD(lr, **opts)
    params = {k: xp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    for t in range(50):
        tg = _grad_fn({k: v.detach().numpy() for k, v in tparams.items()}, t, noise)
        for k, v in tparams.items():
            v.grad = torch.from_numpy(tg[k])
        topt.step()
        g = _grad_fn({k: to_numpy(v) for k, v in params.items()}, t, noise)
        params, state = opt.step(params, {k: xp.asarray(v) for k, v in g.items()}, state)
        for k in shapes:
            assert_close(params[k], tparams[k].detach().numpy(), name=f"{k} after step {t + 1}", rel=1e-13)
    assert state.count == 50


@pytest.mark.parametrize("opts", GRID, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_float32_matches_torch_sgd_bit_for_bit(opts):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((64, 33)).astype(np.float32)
    noise = rng.standard_normal((30, 64, 33)).astype(np.float32)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.037, **opts)
    opt = reflora.SGD(0.037, **opts)
    params = (p0,)
    state = opt.init(params)
    for t in range(30):
        g = np.float32(0.5) * (tp.detach().numpy() - np.float32(1.0)) + noise[t]
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        params, state = opt.step(params, (g,), state)
        np.testing.assert_array_equal(params[0].view(np.uint32), tp.detach().numpy().view(np.uint32),
                                      err_msg=f"step {t + 1}")


@pytest.mark.parametrize("kwargs", [
    dict(lr=-0.1), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0),
    dict(lr=0.1, nesterov=True), dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
])
def test_refuses_what_torch_refuses(kwargs):
    torch = pytest.importorskip("torch")
    lr = kwargs.pop("lr")
    with pytest.raises(ValueError):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, **kwargs)
    with pytest.raises(ValueError):
        reflora.SGD(lr, **kwargs)


def test_first_momentum_buffer_is_the_gradient_not_zero():
    opt = reflora.SGD(1.0, momentum=0.9, dampening=0.5)
    params = (np.zeros(2),)
    state = opt.init(params)
    params, state = opt.step(params, (np.array([1.0, 2.0]),), state)
    # buffer starts at g (not (1 - dampening) g, not 0): p = 0 - 1.0 * g
    np.testing.assert_array_equal(params[0], [-1.0, -2.0])
    np.testing.assert_array_equal(state.momentum_buffer[0], [1.0, 2.0])
    params, state = opt.step(params, (np.array([1.0, 2.0]),), state)
    # b2 = 0.9 b1 + 0.5 g = 1.4 g
    np.testing.assert_allclose(state.momentum_buffer[0], [1.4, 2.8], rtol=1e-15)


def test_step_is_pure_and_accepts_tuples_and_dicts():
    opt = reflora.SGD(0.1, momentum=0.5, weight_decay=0.1)
    p = {"A": np.ones((2, 2)), "B": np.ones(3)}
    g = {"A": np.ones((2, 2)), "B": np.ones(3)}
    for a in (*p.values(), *g.values()):
        a.flags.writeable = False
    s0 = opt.init(p)
    p1, s1 = opt.step(p, g, s0)
    p2, s2 = opt.step(p1, g, s1)
    assert s0.momentum_buffer == {"A": None, "B": None} and s0.count == 0
    assert set(p2) == {"A", "B"} and s2.count == 2
    t1, _ = opt.step(tuple(p.values()), tuple(g.values()), opt.init(tuple(p.values())))
    np.testing.assert_array_equal(t1[0], p1["A"])


def test_mismatched_structures_and_shapes_are_errors():
    opt = reflora.SGD(0.1)
    p = {"A": np.ones(2)}
    with pytest.raises(ValueError, match="keys"):
        opt.step(p, {"B": np.ones(2)}, opt.init(p))
    with pytest.raises(ValueError, match=r"grads\['A'\] has shape \(3,\); expected \(2,\)"):
        opt.step(p, {"A": np.ones(3)}, opt.init(p))
    with pytest.raises(TypeError, match="dtypes"):
        opt.step(p, {"A": np.ones(2, dtype=np.float32)}, opt.init(p))
    with pytest.raises(TypeError, match="SGDState"):
        opt.step(p, p, None)
    with pytest.raises(ValueError, match="momentum buffer"):
        reflora.SGD(0.1, momentum=0.9).step(p, p, reflora.SGDState({"A": np.ones((3, 2))}, 1))
    with pytest.raises(ValueError, match="finite"):
        reflora.SGD(float("nan"))
