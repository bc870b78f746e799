"""reflora.serving.multi: batched multi-adapter forward/backward against three oracles.

Oracle 1: central finite differences in float64 (L = sum(y * G) is affine in
each of x, A, B alone, so the central difference is exact up to rounding).
Oracle 2: PyTorch autograd on a per-row loop of single-adapter products.
Oracle 3: identities (B = 0 and all rows -1 give the base output; one adapter
for every row is ``reflora.lora_forward``; rank padding and row order change
nothing; an adapter without rows gets zero gradient; the segment form equals
the per-row form).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from reflora.backend import to_numpy
from reflora.serving import multi_lora_backward, multi_lora_forward, segments_to_indices

from helpers import F64_FD, F64_PEER, assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, *, max_rows=12):
    """Float64 multi-adapter problem: L, mixed ranks incl. 0, indices incl. -1, unsorted rows."""
    L = draw(st.integers(1, 4))
    ranks = [draw(st.integers(0, 5)) for _ in range(L)]
    R = max(ranks)
    I, O = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    idx = draw(st.lists(st.integers(-1, L - 1), min_size=1, max_size=max_rows))
    scales = [draw(st.sampled_from([1.0, 0.5, 2.0, -1.5, 1 / 3, 0.0])) for _ in range(L)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    A = rng.standard_normal((L, R, I))
    B = rng.standard_normal((L, O, R))
    for lv, r in enumerate(ranks):
        A[lv, r:] = 0
        B[lv, :, r:] = 0
    p = {"x": rng.standard_normal((len(idx), I)), "A": A, "B": B, "idx": np.array(idx),
         "W": rng.standard_normal((O, I)) if draw(st.booleans()) else None,
         "bias": rng.standard_normal(O) if draw(st.booleans()) else None,
         "G": rng.standard_normal((len(idx), O))}
    return p, scales, ranks


def _loss(p, scales, **over):
    q = {**p, **over}
    y, _ = multi_lora_forward(q["x"], q["A"], q["B"], q["idx"], scales=scales, W=q["W"], bias=q["bias"])
    return float(np.sum(y * p["G"]))


@given(problems())
def test_gradients_match_central_differences(problem):
    p, scales, _ = problem
    _, cache = multi_lora_forward(p["x"], p["A"], p["B"], p["idx"], scales=scales, W=p["W"], bias=p["bias"])
    g = multi_lora_backward(p["G"], cache)
    for name, grad in (("x", g.dx), ("A", g.dA), ("B", g.dB)):
        fd = np.zeros_like(p[name])
        h = 0.5
        for k in np.ndindex(p[name].shape):
            plus, minus = p[name].copy(), p[name].copy()
            plus[k] += h
            minus[k] -= h
            fd[k] = (_loss(p, scales, **{name: plus}) - _loss(p, scales, **{name: minus})) / (2 * h)
        assert_close(grad, fd, name=f"d{name}", rel=F64_FD, atol=F64_FD)


@given(problems())
def test_forward_and_backward_match_torch_autograd(problem):
    torch = pytest.importorskip("torch")
    p, scales, _ = problem
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in ("x", "A", "B"))
         for k, v in p.items() if v is not None and k != "idx"}
    rows = []
    for n, lv in enumerate(p["idx"].tolist()):
        yn = torch.zeros(p["B"].shape[1], dtype=torch.float64) if p["W"] is None else t["W"] @ t["x"][n]
        if p["bias"] is not None:
            yn = yn + t["bias"]
        if lv >= 0:
            yn = yn + scales[lv] * (t["B"][lv] @ (t["A"][lv] @ t["x"][n]))
        rows.append(yn)
    y_t = torch.stack(rows)
    loss = (y_t * t["G"]).sum()
    if loss.requires_grad:
        loss.backward()
    y, cache = multi_lora_forward(p["x"], p["A"], p["B"], p["idx"], scales=scales, W=p["W"], bias=p["bias"])
    g = multi_lora_backward(p["G"], cache)
    assert_close(y, y_t.detach().numpy(), name="y", rel=F64_PEER, atol=1e-300)
    for name, ours in (("x", g.dx), ("A", g.dA), ("B", g.dB)):
        peer = t[name].grad  # None: the loss does not depend on it (no adapter rows, no base)
        assert_close(ours, np.zeros(p[name].shape) if peer is None else peer.numpy(), name=f"d{name}",
                     rel=F64_PEER, atol=1e-300)


@given(problems())
def test_identities(problem):
    p, scales, ranks = problem
    x, A, B, idx, W, bias = p["x"], p["A"], p["B"], p["idx"], p["W"], p["bias"]
    y, cache = multi_lora_forward(x, A, B, idx, scales=scales, W=W, bias=bias)
    base = (np.zeros((x.shape[0], B.shape[1])) if W is None else x @ W.T) + (0 if bias is None else bias)
    # B = 0, and every row without adapter: exactly the base output
    assert np.array_equal(multi_lora_forward(x, A, np.zeros_like(B), idx, scales=scales, W=W, bias=bias)[0], base)
    assert np.array_equal(multi_lora_forward(x, A, B, np.full_like(idx, -1), scales=scales, W=W, bias=bias)[0], base)
    # rows without adapter are the base rows, bit for bit
    none = idx < 0
    assert np.array_equal(y[none], base[none])
    # row order: permuting the rows permutes the outputs (unsorted batches are fine)
    perm = np.random.default_rng(0).permutation(len(idx))
    y_p, _ = multi_lora_forward(x[perm], A, B, idx[perm], scales=scales, W=W, bias=bias)
    assert_close(y_p, y[perm], name="y permuted", rel=F64_PEER)
    # each row equals reflora.lora_forward with its own adapter
    for n, lv in enumerate(idx.tolist()):
        if lv >= 0:
            y1, _ = reflora.lora_forward(x[n:n + 1], A[lv], B[lv], scale=scales[lv], W=W, bias=bias)
            assert_close(y[n:n + 1], y1, name=f"row {n}", rel=F64_PEER, atol=1e-300)
    # padding the rank with 3 zero slots changes nothing
    Ap = np.concatenate([A, np.zeros(A.shape[:1] + (3,) + A.shape[2:])], axis=1)
    Bp = np.concatenate([B, np.zeros(B.shape[:2] + (3,))], axis=2)
    assert_close(multi_lora_forward(x, Ap, Bp, idx, scales=scales, W=W, bias=bias)[0], y, name="y padded",
                 rel=F64_PEER, atol=1e-300)
    # adapters with no rows get zero gradients; padded slots get zero gradients
    g = multi_lora_backward(p["G"], cache)
    for lv in range(A.shape[0]):
        if lv not in idx.tolist():
            assert not g.dA[lv].any() and not g.dB[lv].any()
        assert not g.dA[lv, ranks[lv]:].any() and not g.dB[lv, :, ranks[lv]:].any()


@fixture_ok
@given(problems())
def test_every_backend_agrees_with_numpy(xp, problem):
    p, scales, _ = problem
    y, cache = multi_lora_forward(p["x"], p["A"], p["B"], p["idx"], scales=scales, W=p["W"], bias=p["bias"])
    g = multi_lora_backward(p["G"], cache)
    q = {k: (None if v is None else xp.asarray(v)) for k, v in p.items()}
    y2, c2 = multi_lora_forward(q["x"], q["A"], q["B"], q["idx"], scales=scales, W=q["W"], bias=q["bias"])
    g2 = multi_lora_backward(q["G"], c2)
    assert_close(y2, y, name="y", rel=F64_PEER, atol=1e-300)
    for name, a, b in zip(("dx", "dA", "dB"), g2, g):
        assert_close(a, b, name=name, rel=F64_PEER, atol=1e-300)


def test_leading_dimensions_and_vllm_stacked_layout():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5))
    A, B = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 6, 4))
    idx = np.array([[0, 1, -1], [1, 1, 0]])
    y, c = multi_lora_forward(x, A, B, idx, scales=[0.5, 2.0])
    y4, _ = multi_lora_forward(x, A[:, None], B[:, None], idx, scales=[0.5, 2.0])   # vLLM's (L, 1, R, I)
    assert y.shape == (2, 3, 6) and np.array_equal(y, y4)
    yf, _ = multi_lora_forward(x.reshape(6, 5), A, B, idx.reshape(6), scales=[0.5, 2.0])
    assert np.array_equal(y.reshape(6, 6), yf)
    assert multi_lora_backward(np.ones_like(y), c).dx.shape == x.shape


def test_segments_to_indices_is_repeat_interleave():
    torch = pytest.importorskip("torch")
    lens, adapters = np.array([3, 0, 145, 2]), np.array([2, 0, -1, 1])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    idx = segments_to_indices(starts, lens, adapters, num_rows=150)
    assert idx.tolist() == torch.repeat_interleave(torch.tensor(adapters), torch.tensor(lens)).tolist()
    with pytest.raises(ValueError, match="running sum"):
        segments_to_indices(np.array([0, 4, 4, 150]), lens, adapters)
    with pytest.raises(ValueError, match="num_rows"):
        segments_to_indices(starts, lens, adapters, num_rows=10)
    with pytest.raises(ValueError, match="negative"):
        segments_to_indices(np.array([0]), np.array([-1]), np.array([0]))
    with pytest.raises(TypeError, match="integer"):
        segments_to_indices(starts, lens.astype(float), adapters)


def test_bad_input_is_refused_with_a_clear_message():
    x, A, B = np.ones((3, 4)), np.ones((2, 2, 4)), np.ones((2, 5, 2))
    idx = np.array([0, 1, -1])
    with pytest.raises(ValueError, match=r"indices range from -2 to 1; expected -1 \(no adapter\)"):
        multi_lora_forward(x, A, B, np.array([0, 1, -2]), scales=1.0)
    with pytest.raises(ValueError, match=r"expected -1 \(no adapter\) or an adapter in \[0, L\) = \[0, 2\)"):
        multi_lora_forward(x, A, B, np.array([0, 2, 1]), scales=1.0)
    with pytest.raises(ValueError, match=r"scales has shape \(3,\); expected \(L,\) = \(2,\)"):
        multi_lora_forward(x, A, B, idx, scales=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"A has shape \(2, 2, 3\); expected \(L, R, I\) = \(2, 2, 4\)"):
        multi_lora_forward(x, np.ones((2, 2, 3)), B, idx, scales=1.0)
    with pytest.raises(ValueError, match=r"B has shape \(3, 5, 2\); expected \(L, O, R\)"):
        multi_lora_forward(x, A, np.ones((3, 5, 2)), idx, scales=1.0)
    with pytest.raises(ValueError, match=r"indices has shape \(2,\); expected the leading shape of x \(3,\)"):
        multi_lora_forward(x, A, B, idx[:2], scales=1.0)
    with pytest.raises(TypeError, match="indices has dtype float64; expected an integer dtype"):
        multi_lora_forward(x, A, B, idx.astype(float), scales=1.0)
    with pytest.raises(TypeError, match="A has dtype float32; expected float64"):
        multi_lora_forward(x, A.astype(np.float32), B, idx, scales=1.0)
    with pytest.raises(TypeError, match="scales is True"):
        multi_lora_forward(x, A, B, idx, scales=True)
    for bad in (float("nan"), float("inf"), [1.0, float("-inf")], np.array([np.nan, 1.0])):  # as lora_forward
        with pytest.raises(ValueError, match="expected finite real numbers|expected a finite real number"):
            multi_lora_forward(x, A, B, idx, scales=bad)
    _, cache = multi_lora_forward(x, A, B, idx, scales=1.0)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 4\); expected \(\.\.\., O\) = \(3, 5\)"):
        multi_lora_backward(np.ones((3, 4)), cache)
    with pytest.raises(TypeError, match="expected the MultiLoraCache"):
        multi_lora_backward(np.ones((3, 5)), (1, 2))


def test_inputs_are_never_written(xp):
    rng = np.random.default_rng(2)
    host = [rng.standard_normal((4, 3)), rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 5, 2))]
    arrs = [xp.asarray(a) for a in host]
    idx = xp.asarray(np.array([0, -1, 1, 1]))
    y, c = multi_lora_forward(*arrs, idx, scales=[1.0, 2.0], W=xp.asarray(rng.standard_normal((5, 3))))
    multi_lora_backward(xp.asarray(np.ones((4, 5))), c)
    for a, h in zip(arrs, host):
        assert np.array_equal(to_numpy(a), h)
