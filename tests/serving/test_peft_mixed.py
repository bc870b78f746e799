"""PEFT's mixed-adapter batches as the peer of reflora.serving (float64, <= 1e-12 relative).

PEFT serves several adapters in one batch with ``model(x, adapter_names=[...])``:
one adapter name per sample, "__base__" for none (peft/tuners/lora/layer.py,
``_mixed_batch_forward`` of Linear and Embedding). A small model with an
Embedding LoRA and LoRA on two Linear layers (different ranks and rsLoRA
across adapters, so the stacks are zero-padded and the scales differ per
adapter) runs through PEFT and through reflora's multi-adapter functions,
one adapter index per token (the sample's adapter), -1 for "__base__".
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflora.serving import multi_lora_forward
from reflora.serving.embedding import lora_embedding_forward

from helpers import F64_PEER, assert_close

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

V, D, H = 11, 6, 5
ADAPTERS = {"alpha": dict(r=2, lora_alpha=4, use_rslora=False), "beta": dict(r=4, lora_alpha=3, use_rslora=True),
            "gamma": dict(r=1, lora_alpha=1, use_rslora=False)}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D, dtype=torch.float64)
        self.q = torch.nn.Linear(D, H, dtype=torch.float64)
        self.v = torch.nn.Linear(H, D, bias=False, dtype=torch.float64)

    def forward(self, ids):
        return self.v(torch.relu(self.q(self.embed(ids))))


def _model(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pm = None
    for name, kw in ADAPTERS.items():
        cfg = peft.LoraConfig(target_modules=["embed", "q", "v"], lora_dropout=0.0, **kw)
        if pm is None:
            pm = peft.get_peft_model(Tiny(), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm = pm.double().eval()
    base = pm.base_model.model
    with torch.no_grad():   # nonzero B everywhere (PEFT initialises B = 0), all in float64
        for layer in (base.embed, base.q, base.v):
            for name in ADAPTERS:
                if hasattr(layer, "lora_embedding_A") and name in layer.lora_embedding_A:
                    for p in (layer.lora_embedding_A[name], layer.lora_embedding_B[name]):
                        p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape))))
                else:
                    for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                        p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape))))
    return pm, base


def _stacks(layer, names, emb=False):
    R = max(ADAPTERS[n]["r"] for n in names)
    As, Bs = [], []
    for n in names:
        a = (layer.lora_embedding_A[n] if emb else layer.lora_A[n].weight).detach().numpy()
        b = (layer.lora_embedding_B[n] if emb else layer.lora_B[n].weight).detach().numpy()
        As.append(np.pad(a, ((0, R - a.shape[0]), (0, 0))))
        Bs.append(np.pad(b, ((0, 0), (0, R - b.shape[1]))))
    return np.stack(As), np.stack(Bs), [layer.scaling[n] for n in names]


@given(st.lists(st.sampled_from(list(ADAPTERS) + ["__base__"]), min_size=1, max_size=5), st.integers(1, 6),
       st.integers(0, 1000))
def test_mixed_batch_matches_peft(adapter_names, seq, seed):
    pm, base = _model(seed)
    ids = np.random.default_rng(seed + 1).integers(0, V, size=(len(adapter_names), seq))
    with torch.no_grad():
        y_peft = pm(torch.tensor(ids), adapter_names=adapter_names).numpy()
    names = list(ADAPTERS)
    per_sample = np.array([names.index(n) if n != "__base__" else -1 for n in adapter_names])
    idx = np.repeat(per_sample[:, None], seq, axis=1)            # one adapter per token: its sample's
    A, B, s = _stacks(base.embed, names, emb=True)
    e, _ = lora_embedding_forward(ids, base.embed.base_layer.weight.detach().numpy(), A, B, idx, scales=s)
    A, B, s = _stacks(base.q, names)
    q, _ = multi_lora_forward(e, A, B, idx, scales=s, W=base.q.base_layer.weight.detach().numpy(),
                              bias=base.q.base_layer.bias.detach().numpy())
    A, B, s = _stacks(base.v, names)
    y, _ = multi_lora_forward(np.maximum(q, 0), A, B, idx, scales=s, W=base.v.base_layer.weight.detach().numpy())
    assert_close(y, y_peft, name="y", rel=F64_PEER, atol=1e-300)
    # the scales are PEFT's: alpha / r, alpha / sqrt(r) with rsLoRA
    assert base.q.scaling["beta"] == 3 / 2.0 and base.q.scaling["alpha"] == 2.0
