"""reflora.serving.embedding: embedding and lm_head LoRA against PEFT, finite differences, identities.

PEFT's ``lora.Embedding`` (peft/tuners/lora/layer.py) is the peer for one
adapter in float64: forward and autograd gradients of lora_embedding_A / _B.
Finite differences in float64 check every gradient, including the
scatter-add of dA over repeated tokens and the added-token tables; the extra
vocabulary follows vLLM's VocabParallelEmbeddingWithLoRA (an added token t
of adapter l reads extra[l, t - V]).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflora.serving import multi_lora_forward
from reflora.serving.embedding import (lora_embedding_backward, lora_embedding_forward, lora_logits_backward,
                                       lora_logits_forward)

from helpers import F64_FD, F64_PEER, assert_close

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def emb_problems(draw):
    L = draw(st.integers(1, 3))
    ranks = [draw(st.integers(0, 4)) for _ in range(L)]
    R = max(ranks)
    V, D, X = draw(st.integers(1, 7)), draw(st.integers(1, 5)), draw(st.integers(0, 3))
    N = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = rng.integers(-1, L, size=N)
    ids = rng.integers(0, V, size=N)
    if X:
        ids = np.where((idx >= 0) & (rng.random(N) < 0.5), rng.integers(V, V + X, size=N), ids)
    A, B = rng.standard_normal((L, R, V + X)), rng.standard_normal((L, D, R))
    for lv, r in enumerate(ranks):
        A[lv, r:] = 0
        B[lv, :, r:] = 0
    scales = [draw(st.sampled_from([1.0, 0.5, 2.0, -1.5])) for _ in range(L)]
    return dict(ids=ids, E=rng.standard_normal((V, D)), A=A, B=B, idx=idx,
                extra=rng.standard_normal((L, X, D)) if X else None, G=rng.standard_normal((N, D))), scales


def _emb_loss(p, scales, **over):
    q = {**p, **over}
    y, _ = lora_embedding_forward(q["ids"], q["E"], q["A"], q["B"], q["idx"], scales=scales, extra=q["extra"])
    return float(np.sum(y * p["G"]))


def _fd(p, name, loss):
    fd = np.zeros_like(p[name])
    for k in np.ndindex(p[name].shape):
        plus, minus = p[name].copy(), p[name].copy()
        plus[k] += 0.5
        minus[k] -= 0.5
        fd[k] = (loss(**{name: plus}) - loss(**{name: minus}))
    return fd


@given(emb_problems())
def test_embedding_gradients_match_central_differences(problem):
    p, scales = problem
    _, cache = lora_embedding_forward(p["ids"], p["E"], p["A"], p["B"], p["idx"], scales=scales, extra=p["extra"])
    g = lora_embedding_backward(p["G"], cache)
    names = [("A", g.dA), ("B", g.dB), ("E", g.dE)] + ([("extra", g.dextra)] if p["extra"] is not None else [])
    for name, grad in names:
        assert_close(grad, _fd(p, name, lambda **o: _emb_loss(p, scales, **o)), name=f"d{name}", rel=F64_FD,
                     atol=F64_FD)


@given(emb_problems())
def test_embedding_identities(problem):
    p, scales = problem
    ids, E, A, B, idx, extra = p["ids"], p["E"], p["A"], p["B"], p["idx"], p["extra"]
    y, _ = lora_embedding_forward(ids, E, A, B, idx, scales=scales, extra=extra)
    V = E.shape[0]
    base = np.where((ids < V)[:, None], E[np.minimum(ids, V - 1)], 0.0)
    if extra is not None:
        X = extra.shape[1]
        base = np.where((ids >= V)[:, None], extra[np.maximum(idx, 0), np.clip(ids - V, 0, X - 1)], base)
    # B = 0: the base rows exactly, and rows without adapter are base rows
    assert np.array_equal(lora_embedding_forward(ids, E, A, np.zeros_like(B), idx, scales=scales, extra=extra)[0], base)
    assert np.array_equal(y[idx < 0], base[idx < 0])
    # the LoRA term equals a one-hot multi_lora_forward (an embedding is a linear layer on one-hot rows)
    onehot = np.eye(A.shape[2])[ids]
    y_lin, _ = multi_lora_forward(onehot, A, B, idx, scales=scales)
    assert_close(y - base, y_lin, name="lora term", rel=F64_PEER, atol=1e-300)


@fixture_ok
@given(emb_problems())
def test_embedding_every_backend_agrees_with_numpy(xp, problem):
    p, scales = problem
    y, c = lora_embedding_forward(p["ids"], p["E"], p["A"], p["B"], p["idx"], scales=scales, extra=p["extra"])
    g = lora_embedding_backward(p["G"], c)
    q = {k: (None if v is None else xp.asarray(v)) for k, v in p.items()}
    y2, c2 = lora_embedding_forward(q["ids"], q["E"], q["A"], q["B"], q["idx"], scales=scales, extra=q["extra"])
    g2 = lora_embedding_backward(q["G"], c2)
    assert_close(y2, y, name="y", rel=F64_PEER, atol=1e-300)
    for name, a, b in zip(g._fields, g2, g):
        if b is not None:
            assert_close(a, b, name=name, rel=F64_PEER, atol=1e-300)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**32 - 1), st.booleans())
def test_peft_embedding_forward_and_autograd(V, D, r, seed, rslora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(seed)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, D, dtype=torch.float64)

    cfg = peft.LoraConfig(r=r, lora_alpha=3, target_modules=["emb"], lora_dropout=0.0, use_rslora=rslora)
    layer = peft.get_peft_model(One(), cfg, adapter_name="tenant").double().base_model.model.emb
    emb = layer.base_layer
    A, B = rng.standard_normal((r, V)), rng.standard_normal((D, r))
    with torch.no_grad():
        layer.lora_embedding_A["tenant"].copy_(torch.tensor(A))
        layer.lora_embedding_B["tenant"].copy_(torch.tensor(B))
    ids = rng.integers(0, V, size=(2, 5))
    G = rng.standard_normal((2, 5, D))
    y_t = layer(torch.tensor(ids))
    (y_t * torch.tensor(G)).sum().backward()
    s = layer.scaling["tenant"]
    assert s == (3 / r ** 0.5 if rslora else 3 / r)
    E = emb.weight.detach().numpy()
    y, c = lora_embedding_forward(ids, E, A[None], B[None], np.zeros_like(ids), scales=s)
    g = lora_embedding_backward(G, c)
    assert_close(y, y_t.detach().numpy(), name="y", rel=F64_PEER, atol=1e-300)
    assert_close(g.dA[0], layer.lora_embedding_A["tenant"].grad.numpy(), name="dA", rel=F64_PEER, atol=1e-300)
    assert_close(g.dB[0], layer.lora_embedding_B["tenant"].grad.numpy(), name="dB", rel=F64_PEER, atol=1e-300)


def test_extra_vocabulary_as_vllm():
    # V = 3 base tokens; adapter 0 adds 2 tokens, adapter 1 adds 2 others; token 4 means different rows
    E = np.arange(6.0).reshape(3, 2)
    extra = np.array([[[10.0, 11.0], [12.0, 13.0]], [[20.0, 21.0], [22.0, 23.0]]])
    A, B = np.zeros((2, 1, 5)), np.zeros((2, 2, 1))
    y, _ = lora_embedding_forward(np.array([4, 4, 0, 3]), E, A, B, np.array([0, 1, -1, 1]), scales=1.0, extra=extra)
    assert y.tolist() == [[12.0, 13.0], [22.0, 23.0], [0.0, 1.0], [20.0, 21.0]]
    with pytest.raises(ValueError, match=r"a row without an adapter \(index -1\) has an added token"):
        lora_embedding_forward(np.array([4]), E, A, B, np.array([-1]), scales=1.0, extra=extra)
    with pytest.raises(ValueError, match=r"ids range from 0 to 5; expected tokens in \[0, V \+ X\) = \[0, 5\)"):
        lora_embedding_forward(np.array([0, 5]), E, A, B, np.array([0, 0]), scales=1.0, extra=extra)
    with pytest.raises(ValueError, match=r"A has shape \(2, 1, 3\); expected \(L, R, V \+ X\) = \(2, 1, 5\)"):
        lora_embedding_forward(np.array([0]), E, np.zeros((2, 1, 3)), B, np.array([0]), scales=1.0, extra=extra)


@st.composite
def logits_problems(draw):
    L = draw(st.integers(1, 3))
    R, V, D, X, N = (draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(0, 2)),
                     draw(st.integers(1, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(h=rng.standard_normal((N, D)), W=rng.standard_normal((V, D)), A=rng.standard_normal((L, R, D)),
                B=rng.standard_normal((L, V + X, R)), idx=rng.integers(-1, L, size=N),
                extra=rng.standard_normal((L, X, D)) if X else None, bias=rng.standard_normal(V),
                G=rng.standard_normal((N, V + X))), [draw(st.sampled_from([1.0, 0.5, -2.0])) for _ in range(L)]


@given(logits_problems())
def test_logits_forward_backward(problem):
    p, scales = problem

    def run(**o):
        q = {**p, **o}
        return lora_logits_forward(q["h"], q["W"], q["A"], q["B"], q["idx"], scales=scales, extra=q["extra"],
                                   bias=q["bias"])

    y, cache = run()
    V = p["W"].shape[0]
    # the first V columns: base logits plus the multi-adapter LoRA term; -inf only in adapter-less extra columns
    lin, _ = multi_lora_forward(p["h"], p["A"], p["B"][:, :V], p["idx"], scales=scales, W=p["W"], bias=p["bias"])
    assert_close(y[:, :V], lin, name="logits[:, :V]", rel=F64_PEER, atol=1e-300)
    assert np.all(np.isneginf(y[p["idx"] < 0, V:])) and np.all(np.isfinite(y[p["idx"] >= 0]))
    g = lora_logits_backward(p["G"], cache)
    finite = np.isfinite(y)

    def loss(**o):
        yy, _ = run(**o)
        return float(np.sum(np.where(finite, yy, 0.0) * p["G"]))

    names = [("h", g.dx), ("A", g.dA), ("B", g.dB)] + ([("extra", g.dextra)] if p["extra"] is not None else [])
    for name, grad in names:
        assert_close(grad, _fd(p, name, loss), name=f"d{name}", rel=F64_FD, atol=F64_FD)
