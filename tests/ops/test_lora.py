"""reflora.ops.lora: forward/backward against finite differences, identities and bad input.

Oracle 1 (this file): central finite differences in float64. The test loss is
L = sum(y * G) for a fixed random G, so dL/dy = G, and y is affine in each of
x, A and B taken alone: the central difference is then exact up to rounding
for any step, and the check compares every coordinate of every gradient.
Oracle 2 (test_peer_peft.py): PyTorch autograd through PEFT's LoRA Linear.
Oracle 3 (here): identities — B = 0 gives the base output, merged equals
unmerged, batched equals looped, scale is linear.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora import lora_backward, lora_forward, mse_loss
from reflora.backend import to_numpy

from helpers import F64_FD, assert_close

# the xp fixture is stateless, so reusing it across hypothesis examples is safe
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, *, with_base=None, with_bias=None, with_mask=None):
    """A LoRA problem in float64: shapes (leading dims, I, O, R), arrays, scale, G."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    I = draw(st.integers(1, 6))
    O = draw(st.integers(1, 6))
    R = draw(st.integers(1, 8))  # includes rank 1 and rank > I
    scale = draw(st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.5, 1 / 3]))
    base = draw(st.booleans()) if with_base is None else with_base
    bias = draw(st.booleans()) if with_bias is None else with_bias
    mask = draw(st.booleans()) if with_mask is None else with_mask
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = {
        "x": rng.standard_normal(lead + (I,)),
        "A": rng.standard_normal((R, I)),
        "B": rng.standard_normal((O, R)),
        "W": rng.standard_normal((O, I)) if base else None,
        "bias": rng.standard_normal((O,)) if bias else None,
        "mask": (rng.random(lead + (I,)) > 0.3) / 0.7 if mask else None,
        "G": rng.standard_normal(lead + (O,)),
    }
    return p, scale


def _to(xp, p):
    return {k: (None if v is None else xp.asarray(v)) for k, v in p.items()}


def _forward(q, scale, **over):
    q = {**q, **over}
    return lora_forward(q["x"], q["A"], q["B"], scale=scale, W=q["W"], bias=q["bias"], dropout_mask=q["mask"])


def _loss(xp, q, scale, **over):
    y, _ = _forward(q, scale, **over)
    return float(xp.sum(y * q["G"]))


def _fd_grad(xp, q, scale, name, eps=1e-3):
    """Central differences of L = sum(y G) w.r.t. every coordinate of q[name]."""
    base = to_numpy(q[name]).astype(np.float64)
    grad = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        e = np.zeros_like(base)
        e[idx] = eps
        lp = _loss(xp, q, scale, **{name: xp.asarray(base + e)})
        lm = _loss(xp, q, scale, **{name: xp.asarray(base - e)})
        grad[idx] = (lp - lm) / (2 * eps)
    return grad


@fixture_ok
@given(problems())
def test_gradients_match_central_differences(xp, problem):
    p, scale = problem
    q = _to(xp, p)
    y, cache = _forward(q, scale)
    grads = lora_backward(q["G"], cache)
    for name, g in (("x", grads.dx), ("A", grads.dA), ("B", grads.dB)):
        fd = _fd_grad(xp, q, scale, name)
        assert tuple(g.shape) == tuple(q[name].shape), f"d{name} shape {g.shape} != {q[name].shape}"
        assert_close(g, fd, name=f"d{name}", rel=F64_FD, atol=1e-12)


@fixture_ok
@given(problems(with_base=True))
def test_zero_B_gives_the_base_output(xp, problem):
    p, scale = problem
    q = _to(xp, p)
    q["B"] = xp.zeros_like(q["B"])
    y, _ = _forward(q, scale)
    ref = p["x"] @ p["W"].T + (0 if p["bias"] is None else p["bias"])
    assert_close(y, ref, name="y", rel=1e-14, atol=1e-14)


@fixture_ok
@given(problems(with_base=True, with_mask=False))
def test_merged_equals_unmerged(xp, problem):
    p, scale = problem
    q = _to(xp, p)
    y, _ = _forward(q, scale)
    W_merged = p["W"] + scale * (p["B"] @ p["A"])
    R = p["A"].shape[0]
    y_m, _ = _forward(q, 0.0, W=xp.asarray(W_merged), A=xp.asarray(np.zeros((R, p["A"].shape[1]))))
    assert_close(y, y_m, name="y merged vs unmerged", rel=1e-13, atol=1e-13)


@fixture_ok
@given(problems())
def test_batched_equals_looped_over_rows(xp, problem):
    p, scale = problem
    q = _to(xp, p)
    y, _ = _forward(q, scale)
    I = p["x"].shape[-1]
    x2 = p["x"].reshape(-1, I)
    m2 = None if p["mask"] is None else p["mask"].reshape(-1, I)
    rows = []
    for n in range(x2.shape[0]):
        yn, _ = _forward(q, scale, x=xp.asarray(x2[n]), mask=None if m2 is None else xp.asarray(m2[n]))
        rows.append(to_numpy(yn))
    looped = np.stack(rows).reshape(to_numpy(y).shape) if rows else np.zeros(to_numpy(y).shape)
    assert_close(y, looped, name="y batched vs looped", rel=1e-13, atol=1e-13)


@fixture_ok
@given(problems(with_base=False, with_bias=False))
def test_lora_branch_is_linear_in_scale(xp, problem):
    p, scale = problem
    q = _to(xp, p)
    y1, _ = _forward(q, 1.0)
    ys, _ = _forward(q, scale)
    assert_close(ys, scale * to_numpy(y1), name="y(scale)", rel=1e-14, atol=1e-14)


def test_gradients_are_summed_over_leading_dims(xp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    A, B, G = rng.standard_normal((2, 4)), rng.standard_normal((5, 2)), rng.standard_normal((2, 3, 5))
    _, cache = lora_forward(xp.asarray(x), xp.asarray(A), xp.asarray(B), scale=1.5)
    g = lora_backward(xp.asarray(G), cache)
    dA_sum = np.zeros_like(A)
    dB_sum = np.zeros_like(B)
    for idx in np.ndindex(2, 3):
        _, c1 = lora_forward(xp.asarray(x[idx][None]), xp.asarray(A), xp.asarray(B), scale=1.5)
        g1 = lora_backward(xp.asarray(G[idx][None]), c1)
        dA_sum += to_numpy(g1.dA)
        dB_sum += to_numpy(g1.dB)
    assert_close(g.dA, dA_sum, name="dA", rel=1e-13)
    assert_close(g.dB, dB_sum, name="dB", rel=1e-13)


def test_no_leading_dims_gives_a_vector(xp):
    x = xp.asarray(np.arange(3.0))
    y, cache = lora_forward(x, xp.asarray(np.ones((2, 3))), xp.asarray(np.ones((4, 2))), scale=0.5)
    assert tuple(y.shape) == (4,)
    np.testing.assert_array_equal(to_numpy(y), np.full(4, 0.5 * 2 * 3.0))
    g = lora_backward(xp.asarray(np.ones(4)), cache)
    assert tuple(g.dx.shape) == (3,) and tuple(g.dA.shape) == (2, 3) and tuple(g.dB.shape) == (4, 2)


def test_empty_batch(xp):
    x = xp.asarray(np.zeros((0, 3)))
    y, cache = lora_forward(x, xp.asarray(np.ones((2, 3))), xp.asarray(np.ones((4, 2))), scale=1.0)
    assert tuple(y.shape) == (0, 4)
    g = lora_backward(xp.asarray(np.zeros((0, 4))), cache)
    np.testing.assert_array_equal(to_numpy(g.dA), np.zeros((2, 3)))


def test_float32_matches_float64_reference(xp):
    rng = np.random.default_rng(3)
    x, A, B, W = (rng.standard_normal(s) for s in [(8, 16), (4, 16), (12, 4), (12, 16)])
    y64, _ = lora_forward(x, A, B, scale=2.0, W=W)
    f32 = [xp.asarray(a.astype(np.float32)) for a in (x, A, B, W)]
    y32, _ = lora_forward(f32[0], f32[1], f32[2], scale=2.0, W=f32[3])
    assert str(y32.dtype).endswith("float32")
    assert_close(y32, y64, name="y float32", rel=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_propagate_and_never_raise(xp):
    x = np.ones((2, 3))
    x[0, 0] = np.nan
    y, cache = lora_forward(xp.asarray(x), xp.asarray(np.ones((1, 3))), xp.asarray(np.ones((2, 1))), scale=1.0)
    yn = to_numpy(y)
    assert np.isnan(yn[0]).all() and np.isfinite(yn[1]).all()
    # 0 * Inf = NaN: a zero scale does not hide an infinite input (IEEE 754)
    x = np.ones((1, 3))
    x[0, 1] = np.inf
    y, _ = lora_forward(xp.asarray(x), xp.asarray(np.ones((1, 3))), xp.asarray(np.ones((2, 1))), scale=0.0)
    assert np.isnan(to_numpy(y)).all()


def test_mse_loss_value_and_gradient(xp):
    rng = np.random.default_rng(5)
    y, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss, dy = mse_loss(xp.asarray(y), xp.asarray(t))
    assert math.isclose(float(loss), float(np.mean((y - t) ** 2)), rel_tol=1e-14)
    # finite differences of the loss itself (quadratic: exact up to rounding)
    fd = np.zeros_like(y)
    for idx in np.ndindex(y.shape):
        e = np.zeros_like(y)
        e[idx] = 1e-3
        fd[idx] = (float(mse_loss(xp.asarray(y + e), xp.asarray(t))[0])
                   - float(mse_loss(xp.asarray(y - e), xp.asarray(t))[0])) / 2e-3
    assert_close(dy, fd, name="dy", rel=1e-9)


# ---------------------------------------------------------------- bad input

def _ok(xp):
    return {"x": xp.asarray(np.ones((2, 8))), "A": xp.asarray(np.ones((4, 8))), "B": xp.asarray(np.ones((5, 4)))}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"A": np.ones((4, 7))}, r"A has shape \(4, 7\); expected \(R, I\) = \(R, 8\), I taken from x"),
        ({"A": np.ones(8)}, r"A has shape \(8,\); expected \(R, I\)"),
        ({"B": np.ones((5, 3))}, r"B has shape \(5, 3\); expected \(O, R\) = \(O, 4\), R taken from A"),
        ({"W": np.ones((5, 7))}, r"W has shape \(5, 7\); expected \(O, I\) = \(5, 8\)"),
        ({"bias": np.ones(4)}, r"bias has shape \(4,\); expected \(O,\) = \(5,\)"),
        ({"dropout_mask": np.ones((2, 7))}, r"dropout_mask has shape \(2, 7\); expected x's shape \(2, 8\)"),
        ({"x": np.ones(())}, r"x has shape \(\); expected \(\.\.\., I\)"),
    ],
)
def test_bad_shapes_raise_value_error_in_legend_letters(xp, override, message):
    args = _ok(xp)
    args.update({k: xp.asarray(v) for k, v in override.items()})
    x, A, B = args.pop("x"), args.pop("A"), args.pop("B")
    with pytest.raises(ValueError, match=message):
        lora_forward(x, A, B, scale=1.0, **args)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.int32])
def test_integer_and_bool_arrays_raise_type_error(xp, dtype):
    args = _ok(xp)
    with pytest.raises(TypeError, match="expected a real floating dtype"):
        lora_forward(xp.asarray(np.ones((2, 8), dtype=dtype)), args["A"], args["B"], scale=1.0)


def test_bfloat16_is_refused_with_a_clear_message():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((2, 8), dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"x has dtype bfloat16; expected a real floating dtype"):
        lora_forward(x, np.ones((4, 8), dtype=x.dtype), np.ones((5, 4), dtype=x.dtype), scale=1.0)


def test_mixed_dtypes_raise_type_error(xp):
    args = _ok(xp)
    with pytest.raises(TypeError, match=r"A has dtype .*float32.*; expected .*float64"):
        lora_forward(args["x"], xp.asarray(np.ones((4, 8), dtype=np.float32)), args["B"], scale=1.0)


def test_non_arrays_and_bad_scale_raise_type_error():
    with pytest.raises(TypeError, match="x is list; expected an array"):
        lora_forward([[1.0] * 8], np.ones((4, 8)), np.ones((5, 4)), scale=1.0)
    with pytest.raises(TypeError, match="scale is"):
        lora_forward(np.ones((2, 8)), np.ones((4, 8)), np.ones((5, 4)), scale="2")
    with pytest.raises(TypeError, match="scale is"):
        lora_forward(np.ones((2, 8)), np.ones((4, 8)), np.ones((5, 4)), scale=True)


def test_mixing_array_libraries_names_both():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"x: numpy\.ndarray.*A: array_api_strict"):
        lora_forward(np.ones((2, 8)), strict.ones((4, 8), dtype=strict.float64), np.ones((5, 4)), scale=1.0)


def test_backward_checks_dy(xp):
    args = _ok(xp)
    _, cache = lora_forward(args["x"], args["A"], args["B"], scale=1.0)
    with pytest.raises(ValueError, match=r"dy has shape \(2, 4\); expected \(\.\.\., O\) = \(2, 5\)"):
        lora_backward(xp.asarray(np.ones((2, 4))), cache)
    with pytest.raises(TypeError, match="dy has dtype"):
        lora_backward(xp.asarray(np.ones((2, 5), dtype=np.float32)), cache)
    with pytest.raises(TypeError, match="expected the LoraCache"):
        lora_backward(xp.asarray(np.ones((2, 5))), (1, 2))


def test_mse_loss_checks(xp):
    with pytest.raises(ValueError, match="target has shape"):
        mse_loss(xp.asarray(np.ones(3)), xp.asarray(np.ones(4)))
    with pytest.raises(ValueError, match="undefined"):
        mse_loss(xp.asarray(np.ones(0)), xp.asarray(np.ones(0)))


def test_functions_never_write_into_arguments():
    """Bit-level check on plain NumPy (the numpy_readonly backend checks it by raising)."""
    rng = np.random.default_rng(9)
    args = [rng.standard_normal(s) for s in [(3, 4), (2, 4), (5, 2), (5, 4), (5,), (3, 4), (3, 5)]]
    before = [a.copy() for a in args]
    x, A, B, W, b, m, G = args
    y, cache = lora_forward(x, A, B, scale=2.0, W=W, bias=b, dropout_mask=m)
    lora_backward(G, cache)
    mse_loss(y, G)
    for a, a0 in zip(args, before):
        np.testing.assert_array_equal(a, a0)


def test_public_api_is_exported():
    for name in ["lora_forward", "lora_backward", "mse_loss", "LoraGrads", "LoraConfig", "LoraAdapter",
                 "SGD", "init_lora", "asarray", "FormatError"]:
        assert hasattr(reflora, name), name
    assert issubclass(reflora.FormatError, ValueError)


def test_many_rows_take_the_row_block_path_and_stay_consistent():
    """N x O > 2^19: the NumPy path adds the LoRA terms in row blocks (forward and dx)."""
    rng = np.random.default_rng(17)
    N, I, O, R = 600, 8, 2048, 3
    x, A, B, W = rng.standard_normal((N, I)), rng.standard_normal((R, I)), rng.standard_normal((O, R)), \
        rng.standard_normal((O, I))
    m, G = (rng.random((N, I)) > 0.5) * 2.0, rng.standard_normal((N, O))
    y, cache = lora_forward(x, A, B, scale=1.5, W=W, dropout_mask=m)
    g = lora_backward(G, cache)
    # forward: each row alone (one block) gives the same numbers
    for n in (0, 255, 256, 599):
        yn, _ = lora_forward(x[n], A, B, scale=1.5, W=W, dropout_mask=m[n])
        assert_close(y[n], yn, name=f"y row {n}", rel=1e-14)
    # backward: directional central differences (exact for this loss up to rounding)
    q = {"x": x, "A": A, "B": B, "W": W, "bias": None, "mask": m, "G": G}
    for name, grad in (("x", g.dx), ("A", g.dA), ("B", g.dB)):
        for _ in range(3):
            v = rng.standard_normal(q[name].shape)
            fd = (_loss(np, q, 1.5, **{name: q[name] + v}) - _loss(np, q, 1.5, **{name: q[name] - v})) / 2
            an = float(np.sum(grad * v))
            assert abs(fd - an) <= 1e-9 * abs(an), f"d{name}: directional derivative {an} vs {fd}"
