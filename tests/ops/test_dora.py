"""reflora.ops.dora: DoRA forward, hand-written backward (detached and exact norm), merge.

Oracles: PEFT with use_dora=True under torch autograd in float64 (detached
mode: outputs and the gradients of x, A, B and m to helpers.F64_PEER = 1e-12),
central finite differences in float64 (exact mode: of the forward itself;
detached mode: of an independently written forward whose norm is frozen), and
identities (m = n gives plain LoRA; merged equals unmerged).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import reflora
from reflora import dora_backward, dora_forward, dora_merge, dora_unmerge, dora_weight_norm, lora_forward
from reflora.backend import to_numpy

from helpers import F64_PEER, assert_close

DORA_FD = 1e-7      # float64 fourth-order central differences, step 1e-5 (DoRA is not affine in A or B)
DORA_FD_ABS = 1e-8  # its rounding noise, about 1e-16 |L| / h, where a gradient is (near) zero
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, mask=None):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    I, O, R = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1.0, 0.5, 2.0, -1.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    with_mask = draw(st.booleans()) if mask is None else mask
    return {
        "x": rng.standard_normal(lead + (I,)), "A": rng.standard_normal((R, I)), "B": rng.standard_normal((O, R)),
        "m": rng.uniform(0.5, 2.0, O), "W": rng.standard_normal((O, I)),
        "bias": rng.standard_normal(O) if draw(st.booleans()) else None,
        "mask": (rng.random(lead + (I,)) > 0.3) / 0.7 if with_mask else None,
        "G": rng.standard_normal(lead + (O,)), "scale": scale,
    }


def frozen_norm_forward(p, n, **o):
    """DoRA's forward written out again in NumPy, with the row norms n held fixed."""
    q = {**p, **o}
    x, A, B, W, s = q["x"], q["A"], q["B"], q["W"], q["scale"]
    xd = x if q["mask"] is None else x * q["mask"]
    g = q["m"] / n
    y = x @ W.T + (g - 1) * (xd @ W.T) + g * (s * (xd @ A.T) @ B.T)
    return y if q["bias"] is None else y + q["bias"]


def fd(loss, p, name, h=1e-5):
    """Fourth-order central differences: truncation O(h^4), rounding O(1e-16 / h)."""
    base = p[name]
    out = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        e = np.zeros_like(base)
        e[idx] = h
        f = [loss(**{name: base + k * e}) for k in (2, 1, -1, -2)]
        out[idx] = (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h)
    return out


def _run(xp, p, mode):
    q = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    y, cache = dora_forward(q["x"], q["A"], q["B"], q["m"], q["W"], scale=p["scale"], bias=q["bias"],
                            dropout_mask=q["mask"], norm_grad=mode)
    return y, dora_backward(q["G"], cache)


@fixture_ok
@given(problems())
def test_exact_mode_matches_finite_differences(xp, p):
    # finite differences lose their digits where g = m / n blows up (rounding noise ~ 1e-16 g / h):
    # keep the row norms away from 0 (the zero-norm case is an error, tested below)
    assume(np.linalg.norm(p["W"] + p["scale"] * p["B"] @ p["A"], axis=1).min() > 0.1)
    _, g = _run(xp, p, "exact")

    def loss(**o):
        q = {**p, **o}
        y, _ = dora_forward(q["x"], q["A"], q["B"], q["m"], q["W"], scale=q["scale"], bias=q["bias"],
                            dropout_mask=q["mask"])
        return float(np.sum(y * p["G"]))

    for name, got in (("x", g.dx), ("A", g.dA), ("B", g.dB), ("m", g.dm)):
        assert_close(got, fd(loss, p, name), name=f"d{name} (exact)", rel=DORA_FD, atol=DORA_FD_ABS)


@fixture_ok
@given(problems())
def test_detached_mode_is_the_gradient_with_the_norm_frozen(xp, p):
    n = np.linalg.norm(p["W"] + p["scale"] * p["B"] @ p["A"], axis=1)
    assume(n.min() > 0.1)  # as above: finite differences need g = m / n moderate
    _, g = _run(xp, p, "detached")

    def loss(**o):
        return float(np.sum(frozen_norm_forward(p, n, **o) * p["G"]))

    for name, got in (("x", g.dx), ("A", g.dA), ("B", g.dB), ("m", g.dm)):
        assert_close(got, fd(loss, p, name), name=f"d{name} (detached)", rel=DORA_FD, atol=DORA_FD_ABS)


def test_the_two_modes_differ_in_dA_dB_only():
    rng = np.random.default_rng(0)
    p = {"x": rng.standard_normal((4, 3)), "A": rng.standard_normal((2, 3)), "B": rng.standard_normal((5, 2)),
         "m": rng.uniform(0.5, 2, 5), "W": rng.standard_normal((5, 3)), "bias": None, "mask": None,
         "G": rng.standard_normal((4, 5)), "scale": 1.0}
    import array_api_compat.numpy as xp
    (y1, d), (y2, e) = _run(xp, p, "detached"), _run(xp, p, "exact")
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(d.dm, e.dm)
    np.testing.assert_array_equal(d.dx, e.dx)
    assert np.abs(d.dA - e.dA).max() > 1e-3 and np.abs(d.dB - e.dB).max() > 1e-3


@fixture_ok
@given(problems())
def test_magnitude_equal_to_norm_is_plain_lora(xp, p):
    p = {**p, "mask": None}
    n = np.linalg.norm(p["W"] + p["scale"] * p["B"] @ p["A"], axis=1)
    q = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    assert_close(dora_weight_norm(q["W"], q["A"], q["B"], scale=p["scale"]), n, name="n", rel=1e-14, atol=1e-14)
    y, _ = dora_forward(q["x"], q["A"], q["B"], xp.asarray(n), q["W"], scale=p["scale"], bias=q["bias"])
    y_lora, _ = lora_forward(q["x"], q["A"], q["B"], scale=p["scale"], W=q["W"], bias=q["bias"])
    assert_close(y, y_lora, name="y (m = n)", rel=1e-13, atol=1e-13)


def _peft_dora(p, rs):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    O, I = p["W"].shape
    R = p["A"].shape[0]
    bias = p["bias"]

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(I, O, bias=bias is not None, dtype=torch.float64)

    pm = peft.get_peft_model(One(), peft.LoraConfig(r=R, lora_alpha=p["alpha"], target_modules=["lin"],
                                                     use_dora=True, use_rslora=rs)).double()
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(p["W"]))
        if bias is not None:
            layer.base_layer.bias.copy_(torch.from_numpy(bias))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(p["A"]))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(p["B"]))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(p["m"]))
    if p["mask"] is not None:
        mask = torch.from_numpy(p["mask"])

        class FixedMask(nn.Module):
            def forward(self, x):
                return x * mask

        layer.lora_dropout["default"] = FixedMask()
    return torch, pm, layer


@pytest.mark.parametrize("case", range(8))
def test_matches_peft_use_dora_in_float64(case):
    rng = np.random.default_rng(100 + case)
    lead = [(5,), (2, 3), (1,), (4,), (3, 2), (6,), (2,), (3,)][case]
    I, O, R = [(6, 4, 2), (5, 7, 3), (3, 3, 1), (8, 2, 4), (4, 5, 8), (7, 7, 2), (2, 6, 3), (9, 4, 5)][case]
    p = {"x": rng.standard_normal(lead + (I,)), "A": rng.standard_normal((R, I)),
         "B": rng.standard_normal((O, R)), "W": rng.standard_normal((O, I)), "m": rng.uniform(0.5, 2, O),
         "bias": rng.standard_normal(O) if case % 2 else None,
         "mask": (rng.random(lead + (I,)) > 0.3) / 0.7 if case % 4 >= 2 else None,
         "G": rng.standard_normal(lead + (O,)), "alpha": [8, 3, 16, 1][case % 4]}
    rs = case >= 4
    torch, pm, layer = _peft_dora(p, rs)
    scale = reflora.LoraConfig(rank=R, alpha=p["alpha"], in_features=I, out_features=O, use_rslora=rs).scale
    assert scale == layer.scaling["default"]
    xt = torch.from_numpy(p["x"]).requires_grad_(True)
    yt = layer(xt)
    (yt * torch.from_numpy(p["G"])).sum().backward()
    y, cache = dora_forward(p["x"], p["A"], p["B"], p["m"], p["W"], scale=scale, bias=p["bias"],
                            dropout_mask=p["mask"])
    g = dora_backward(p["G"], cache)
    assert_close(y, yt.detach().numpy(), name="y", rel=F64_PEER)
    assert_close(g.dx, xt.grad.numpy(), name="dx", rel=F64_PEER)
    assert_close(g.dA, layer.lora_A["default"].weight.grad.numpy(), name="dA", rel=F64_PEER)
    assert_close(g.dB, layer.lora_B["default"].weight.grad.numpy(), name="dB", rel=F64_PEER)
    assert_close(g.dm, layer.lora_magnitude_vector["default"].weight.grad.numpy(), name="dm", rel=F64_PEER)
    if p["mask"] is None:
        # merge: reflora's float64 merge against PEFT's merge_and_unload
        merged = dora_merge(p["W"], p["A"], p["B"], p["m"], scale=scale)
        peft_w = pm.merge_and_unload().lin.weight.detach().numpy()
        assert_close(merged.weight, peft_w, name="merged W", rel=F64_PEER)


def test_peft_initial_magnitude_is_the_row_norm():
    rng = np.random.default_rng(9)
    p = {"W": rng.standard_normal((4, 6)), "A": rng.standard_normal((2, 6)), "B": rng.standard_normal((4, 2)),
         "m": np.ones(4), "bias": None, "mask": None, "alpha": 3}
    torch, pm, layer = _peft_dora(p, False)
    layer.lora_magnitude_vector["default"].update_layer(
        base_layer=layer.base_layer, lora_A=layer.lora_A["default"].weight, lora_B=layer.lora_B["default"].weight,
        scaling=layer.scaling["default"])
    n_peft = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    assert_close(dora_weight_norm(p["W"], p["A"], p["B"], scale=3 / 2), n_peft, name="n", rel=1e-14)


@fixture_ok
@given(problems(mask=False))
def test_merged_equals_unmerged_and_unmerge_restores(xp, p):
    q = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    y, _ = dora_forward(q["x"], q["A"], q["B"], q["m"], q["W"], scale=p["scale"], bias=q["bias"])
    merged = dora_merge(q["W"], q["A"], q["B"], q["m"], scale=p["scale"])
    zeros_A, zeros_B = xp.asarray(np.zeros_like(p["A"])), xp.asarray(np.zeros_like(p["B"]))
    y_m, _ = lora_forward(q["x"], zeros_A, zeros_B, scale=0.0, W=merged.weight, bias=q["bias"])
    assert_close(y_m, y, name="merged vs unmerged", rel=1e-13, atol=1e-13)
    back = dora_unmerge(merged.weight, q["A"], q["B"], q["m"], scale=p["scale"], norm=merged.norm)
    assert_close(back, p["W"], name="unmerged W", rel=1e-13, atol=1e-14)


def test_zero_norm_row_is_a_clear_error(xp):
    W = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    A, B = np.ones((1, 2)), np.array([[1.0], [0.0], [0.0]])
    args = [xp.asarray(a) for a in (np.ones((2, 2)), A, B, np.ones(3), W)]
    with pytest.raises(ValueError, match=r"row norm .* is 0 for rows o = \[1\]"):
        dora_forward(*args, scale=1.0)
    with pytest.raises(ValueError, match=r"is 0 for rows o = \[1\]"):
        dora_merge(W, A, B, np.ones(3), scale=1.0)
    # W's row cancelled exactly by s B A is zero too
    W2 = np.array([[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"rows o = \[0\]"):
        dora_forward(np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 1)), np.ones(1), W2, scale=-1.0)


def test_bad_input():
    x, A, B, m, W = np.ones((2, 3)), np.ones((1, 3)), np.ones((4, 1)), np.ones(4), np.ones((4, 3))
    with pytest.raises(ValueError, match="norm_grad is 'full'"):
        dora_forward(x, A, B, m, W, scale=1.0, norm_grad="full")
    with pytest.raises(ValueError, match="W is None"):
        dora_forward(x, A, B, m, None, scale=1.0)
    with pytest.raises(ValueError, match=r"m has shape \(3,\); expected \(O,\) = \(4,\)"):
        dora_forward(x, A, B, np.ones(3), W, scale=1.0)
    with pytest.raises(TypeError, match="m has dtype float32"):
        dora_forward(x, A, B, m.astype(np.float32), W, scale=1.0)
    with pytest.raises(ValueError, match=r"W has shape \(3, 4\); expected \(O, I\) = \(4, 3\)"):
        dora_forward(x, A, B, m, W.T, scale=1.0)
    with pytest.raises(TypeError, match="DoraCache"):
        dora_backward(np.ones((2, 4)), lora_forward(x, A, B, scale=1.0)[1])
    with pytest.raises(ValueError, match="norm has shape"):
        dora_unmerge(W, A, B, m, scale=1.0, norm=np.ones(3))
    with pytest.raises(ValueError, match="m is 0 in rows"):
        dora_unmerge(W, A, B, np.zeros(4), scale=1.0, norm=np.ones(4))
    with pytest.raises(TypeError, match="W is list; expected an array"):
        dora_weight_norm([[1.0] * 3] * 4, A, B, scale=1.0)
    with pytest.raises(ValueError, match="W is None"):
        dora_weight_norm(None, A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"W has shape \(12,\)"):
        dora_weight_norm(W.reshape(-1), A, B, scale=1.0)


def test_bfloat16_merge_is_rounded_once_from_float64():
    import ml_dtypes

    bf = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((8, 16)) * 0.05).astype(bf)
    A, B = rng.standard_normal((4, 16)).astype(np.float32), (rng.standard_normal((8, 4)) * 0.01).astype(np.float32)
    m = rng.uniform(0.1, 0.3, 8)
    got = dora_merge(W, A, B, m, scale=2.0)
    V = W.astype(np.float64) + 2.0 * B.astype(np.float64) @ A.astype(np.float64)
    ref = (m / np.linalg.norm(V, axis=1))[:, None] * V
    assert got.weight.dtype == bf
    # within half a bfloat16 ulp of the float64 value (8 significant bits: half an ulp <= 2^-8 |ref|)
    err = np.abs(got.weight.astype(np.float64) - ref)
    assert np.all(err <= np.abs(ref) * 2.0 ** -8)


def test_float16_row_norm_does_not_overflow(xp):
    # row norms near 320 and 400: float16's sum of squares (>= 65504) would overflow to inf and give g = 0
    if not hasattr(xp, "float16"):
        pytest.skip("no float16 in this namespace")
    rng = np.random.default_rng(7)
    W = np.full((2, 16), 80.0)
    W[1] = 100.0
    A, B = rng.standard_normal((2, 16)) * 0.1, rng.standard_normal((2, 2)) * 0.1
    x, m = rng.standard_normal((3, 16)), np.array([480.0, 200.0])   # g near 1.5 and 0.5
    h = [xp.asarray(a.astype(np.float16)) for a in (x, A, B, m, W)]
    y, c = dora_forward(*h, scale=1.0)
    q = [to_numpy(a).astype(np.float64) for a in h]
    n = np.linalg.norm(q[4] + q[2] @ q[1], axis=1)
    assert_close(to_numpy(c.n_O).astype(np.float64), n, name="n", rel=2.0 ** -10)
    ref = (q[3] / n) * (q[0] @ (q[4] + q[2] @ q[1]).T)
    assert_close(to_numpy(y).astype(np.float64), ref, name="y", rel=2.0 ** -6)


def test_non_finite_row_norm_is_a_clear_error(xp):
    if not hasattr(xp, "float16"):
        pytest.skip("no float16 in this namespace")
    W = np.array([[1.0, 2.0], [60000.0, 60000.0]], dtype=np.float16)   # n_1 = 84853 > 65504: inf in float16
    args = [xp.asarray(a.astype(np.float16)) for a in (np.ones((1, 2)), np.ones((1, 2)), np.zeros((2, 1)), np.ones(2), W)]
    with pytest.raises(ValueError, match=r"not finite for rows o = \[1\]"):
        dora_forward(*args, scale=1.0)
    W64 = np.array([[1.0, np.nan], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"not finite for rows o = \[0\]"):
        dora_forward(np.ones((1, 2)), np.ones((1, 2)), np.zeros((2, 1)), np.ones(2), W64, scale=1.0)
