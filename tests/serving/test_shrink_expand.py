"""reflora.serving.shrink_expand: the engines' halves compose to the forward; fused slices.

Checks: shrink then expand (add_inputs into the base) equals multi_lora_forward;
the expand writes only columns [offset, offset + O) of rows with an adapter;
several unequal slices (qkv 64/16/16, the 4096/1024/1024 of a 4096-wide
model scaled down by 64, and gate_up) equal one multi_lora_forward with the
slices' ranks concatenated and B block-diagonal, and equal vLLM's torch
reference ops (bgmv_shrink / bgmv_expand_slice semantics) rebuilt in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflora.serving import multi_lora_forward
from reflora.serving.shrink_expand import lora_expand, lora_shrink, sliced_lora_forward

from helpers import F64_PEER, assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def _stacks(rng, L, ranks, I, O):
    R = max(ranks)
    A, B = rng.standard_normal((L, R, I)), rng.standard_normal((L, O, R))
    for lv, r in enumerate(ranks):
        A[lv, r:] = 0
        B[lv, :, r:] = 0
    return A, B


@st.composite
def sliced(draw):
    L = draw(st.integers(1, 4))
    K = draw(st.integers(1, 3))
    widths = draw(st.sampled_from([(64, 16, 16), (32, 32), (8,), (5, 3, 1), (1, 1)]))[:K] or (4,)
    I = draw(st.integers(1, 12))
    idx = np.array(draw(st.lists(st.integers(-1, L - 1), min_size=1, max_size=20)))
    scales = [draw(st.sampled_from([1.0, 0.5, 2.0, -0.75])) for _ in range(L)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slices = [_stacks(rng, L, [draw(st.integers(0, 4)) for _ in range(L)], I, o) for o in widths]
    x = rng.standard_normal((len(idx), I))
    W = rng.standard_normal((sum(widths), I)) if draw(st.booleans()) else None
    bias = rng.standard_normal(sum(widths)) if draw(st.booleans()) else None
    return x, slices, idx, scales, W, bias


@given(sliced())
def test_slices_equal_one_block_diagonal_adapter(case):
    x, slices, idx, scales, W, bias = case
    y = sliced_lora_forward(x, [a for a, _ in slices], [b for _, b in slices], idx, scales=scales, W=W, bias=bias)
    # one adapter per row with ranks concatenated: A stacked along R, B block-diagonal
    L = slices[0][0].shape[0]
    A_cat = np.concatenate([a for a, _ in slices], axis=1)
    Rs, Os = [a.shape[1] for a, _ in slices], [b.shape[1] for _, b in slices]
    B_bd = np.zeros((L, sum(Os), sum(Rs)))
    o = r = 0
    for (a, b), Ok, Rk in zip(slices, Os, Rs):
        B_bd[:, o:o + Ok, r:r + Rk] = b
        o, r = o + Ok, r + Rk
    y_ref, _ = multi_lora_forward(x, A_cat, B_bd, idx, scales=scales, W=W, bias=bias)
    assert_close(y, y_ref, name="y", rel=F64_PEER, atol=1e-300)


@given(sliced())
def test_slices_equal_vllm_torch_reference_ops(case):
    torch = pytest.importorskip("torch")
    x, slices, idx, scales, W, bias = case
    y = sliced_lora_forward(x, [a for a, _ in slices], [b for _, b in slices], idx, scales=scales, W=W, bias=bias)
    # vLLM's add_lora_linear with bgmv_shrink / bgmv_expand_slice (masked -1 rows), scales folded into lora_b
    # per adapter as vLLM does at load time (LoRALayerWeights.optimize)
    t_idx = torch.tensor(idx)
    out = torch.zeros((len(idx), sum(b.shape[1] for _, b in slices)), dtype=torch.float64)
    if W is not None:
        out += torch.tensor(x) @ torch.tensor(W).T
    if bias is not None:
        out += torch.tensor(bias)
    s = torch.tensor(scales, dtype=torch.float64)
    off, valid = 0, t_idx >= 0
    for a, b in slices:
        la, lb = torch.tensor(a), torch.tensor(b) * s[:, None, None]
        buf = torch.zeros((len(idx), a.shape[1]), dtype=torch.float64)
        if valid.any():
            buf[valid] = torch.einsum("bi, boi -> bo", torch.tensor(x)[valid], la[t_idx[valid]])
            out[valid, off:off + b.shape[1]] += torch.einsum("bi, boi -> bo", buf[valid], lb[t_idx[valid]])
        off += b.shape[1]
    assert_close(y, out.numpy(), name="y", rel=F64_PEER, atol=1e-300)


@fixture_ok
@given(sliced())
def test_shrink_then_expand_is_the_forward_on_every_backend(xp, case):
    x, slices, idx, scales, W, bias = case
    A, B = slices[0]
    q = [xp.asarray(v) for v in (x, A, B, idx)]
    h = lora_shrink(q[0], q[1], q[3], scale=scales)
    base = xp.asarray(np.zeros((len(idx), B.shape[1])) if W is None else x @ W[:B.shape[1]].T)
    y = lora_expand(h, q[2], q[3], base=base)
    y_ref, _ = multi_lora_forward(x, A, B, idx, scales=scales, W=None if W is None else W[:B.shape[1]])
    assert_close(y, y_ref, name="y", rel=F64_PEER, atol=1e-300)
    # the fused slices on this backend equal NumPy's
    qs = [(xp.asarray(a), xp.asarray(b)) for a, b in slices]
    y_sl = sliced_lora_forward(q[0], [a for a, _ in qs], [b for _, b in qs], q[3], scales=scales,
                               W=None if W is None else xp.asarray(W), bias=None if bias is None else xp.asarray(bias))
    y_np = sliced_lora_forward(x, [a for a, _ in slices], [b for _, b in slices], idx, scales=scales, W=W, bias=bias)
    assert_close(y_sl, y_np, name="sliced", rel=F64_PEER, atol=1e-300)
    # without base: the product alone
    assert_close(lora_expand(h, q[2], q[3]), multi_lora_forward(x, A, B, idx, scales=scales)[0], name="product",
                 rel=F64_PEER, atol=1e-300)


def test_expand_touches_only_its_slice_and_rows_with_an_adapter():
    rng = np.random.default_rng(3)
    h, B = rng.standard_normal((4, 2)), rng.standard_normal((3, 5, 2))
    base = rng.standard_normal((4, 11))
    idx = np.array([2, -1, 0, 2])
    y = lora_expand(h, B, idx, base=base, offset=4)
    assert np.array_equal(y[:, :4], base[:, :4]) and np.array_equal(y[:, 9:], base[:, 9:])
    assert np.array_equal(y[1], base[1])
    assert_close(y[:, 4:9][[0, 2, 3]], base[[0, 2, 3], 4:9] + np.einsum("nr,nor->no", h[[0, 2, 3]], B[idx[[0, 2, 3]]]),
                 name="slice", rel=F64_PEER)
    assert not np.shares_memory(y, base)


def test_shrink_scale_one_number_or_per_adapter():
    rng = np.random.default_rng(4)
    x, A, idx = rng.standard_normal((3, 4)), rng.standard_normal((2, 3, 4)), np.array([1, 0, -1])
    h1 = lora_shrink(x, A, idx, scale=0.5)
    h2 = lora_shrink(x, A, idx, scale=[0.5, 0.5])
    assert np.array_equal(h1, h2) and not h1[2].any()
    assert_close(lora_shrink(x, A, idx, scale=[1.0, 3.0])[0], 3 * (x[0] @ A[1].T), name="h", rel=F64_PEER)


def test_bad_input_is_refused():
    h, B, idx = np.ones((2, 3)), np.ones((1, 4, 3)), np.array([0, 0])
    with pytest.raises(ValueError, match=r"offset 2 \+ O 4 = 6 exceeds base's width O_total = 5"):
        lora_expand(h, B, idx, base=np.ones((2, 5)), offset=2)
    with pytest.raises(ValueError, match="offset is 1 without base"):
        lora_expand(h, B, idx, offset=1)
    with pytest.raises(ValueError, match="offset is -1"):
        lora_expand(h, B, idx, base=np.ones((2, 5)), offset=-1)
    with pytest.raises(ValueError, match=r"B has shape \(1, 4, 2\); expected \(L, O, R\) = \(1, 4, 3\), R taken from h"):
        lora_expand(h, np.ones((1, 4, 2)), idx)
    with pytest.raises(TypeError, match="base has dtype float32"):
        lora_expand(h, B, idx, base=np.ones((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"A has shape \(1, 3, 5\); expected \(L, R, I\) = \(1, 3, 3\)"):
        lora_shrink(h, np.ones((1, 3, 5)), idx, scale=1.0)
    with pytest.raises(ValueError, match="2 A slices and 1 B slices"):
        sliced_lora_forward(np.ones((2, 3)), [np.ones((1, 1, 3))] * 2, [np.ones((1, 2, 1))], idx, scales=1.0)
