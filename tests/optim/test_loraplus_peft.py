"""LoRA+ groups against PEFT's create_loraplus_optimizer, and PEFT training runs reproduced by reflora (float64).

The training runs put everything together as users run it: PEFT model, torch.optim.AdamW through
create_loraplus_optimizer, torch.nn.utils.clip_grad_norm_ before each step. reflora computes the same
from its own forward/backward (reflora.stack, LoraAdapter), clip_grad_norm, AdamW and loraplus_groups.
"""

from __future__ import annotations

import numpy as np
import pytest

import reflora
from helpers import assert_close
from reflora.ops.stack import LoraLayer, stack_backward, stack_forward

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402
from torch import nn  # noqa: E402

RUN_REL = 1e-12  # the bound for a 20-step float64 run


class Net(nn.Module):
    def __init__(self, I=6, H=8, O=5, vocab=0):
        super().__init__()
        if vocab:
            self.emb = nn.Embedding(vocab, I)
        self.fc1 = nn.Linear(I, H)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(H, O)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _peft_groups(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in opt.param_groups]


@pytest.mark.parametrize("kind", ["plain", "lora_bias", "dora", "embedding"])
def test_groups_match_peft(kind):
    torch.manual_seed(0)
    model = Net(vocab=11 if kind == "embedding" else 0)
    targets = ["fc1", "fc2"] + (["emb"] if kind == "embedding" else [])
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_bias=kind == "lora_bias",
                          use_dora=kind == "dora")
    pm = peft.get_peft_model(model, cfg)
    kw = dict(lr=3e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.05, loraplus_lr_embedding=2e-6)
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, **kw)
    want = _peft_groups(opt, pm)
    params = {n: p.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}
    got = [(g["params"], g["lr"], g["weight_decay"]) for g in reflora.loraplus_groups(params, **kw)]
    assert got == want
    assert any(g[0] for g in got[2:])  # B's groups are not empty
    if kind == "embedding":
        assert got[1][0] and all("lora_embedding" in n for n in got[1][0])


def test_adapter_names_follow_peft_rules():
    p = {"A": np.ones((2, 3)), "B": np.ones((4, 2)), "m": np.ones(4), "lora_bias": np.ones(4)}
    g = reflora.loraplus_groups(p, lr=0.1, loraplus_lr_ratio=4.0, loraplus_weight_decay=0.5)
    assert [(x["params"], x["lr"], x["weight_decay"]) for x in g] == [
        (["A"], 0.1, 0.5), ([], 1e-6, 0.5), (["B", "m"], 0.4, 0.5), (["lora_bias"], 0.4, 0.0)]
    with pytest.raises(ValueError, match="loraplus_lr_ratio is -1; expected a finite number >= 0"):
        reflora.loraplus_groups(p, lr=0.1, loraplus_lr_ratio=-1)
    with pytest.raises(TypeError, match=r"loraplus_lr_ratio is '4' \(str\)"):
        reflora.loraplus_groups(p, lr=0.1, loraplus_lr_ratio="4")
    with pytest.raises(TypeError, match="params is list; expected a dict"):
        reflora.loraplus_groups(list(p.values()), lr=0.1, loraplus_lr_ratio=4.0)


def test_peft_model_training_run_is_reproduced():
    """Two target modules, AdamW + LoRA+ + clipping, 20 steps, float64: reflora within 1e-12 of PEFT/torch."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Net().double()
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"])
    pm = peft.get_peft_model(model, cfg).double()
    with torch.no_grad():  # B = 0 at init would hide A's first steps: start from a random B
        for name in ("fc1", "fc2"):
            getattr(pm.base_model.model, name).lora_B["default"].weight.normal_(0.0, 0.3)
    x = rng.standard_normal((16, 6))
    target = rng.standard_normal((16, 5))
    kw = dict(lr=1e-2, loraplus_lr_ratio=4.0, loraplus_weight_decay=0.1)
    topt = create_loraplus_optimizer(pm, torch.optim.AdamW, betas=(0.8, 0.99), eps=1e-6, amsgrad=True, **kw)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    tparams = dict(pm.named_parameters())
    params = {n: tparams[n].detach().numpy().copy() for n in names}
    layers_t = [getattr(pm.base_model.model, k) for k in ("fc1", "fc2")]
    frozen = [(lay.base_layer.weight.detach().numpy().copy(), lay.base_layer.bias.detach().numpy().copy())
              for lay in layers_t]
    prefix = ["base_model.model.fc1", "base_model.model.fc2"]
    opt = reflora.AdamW(kw["lr"], betas=(0.8, 0.99), eps=1e-6, amsgrad=True,
                        groups=reflora.loraplus_groups(params, **kw))
    state = opt.init(params)
    max_norm, clipped = 0.5, 0
    for step in range(20):
        # torch / PEFT
        topt.zero_grad()
        loss = torch.nn.functional.mse_loss(pm(torch.from_numpy(x)), torch.from_numpy(target))
        loss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_([tparams[n] for n in names], max_norm)
        topt.step()
        # reflora
        layers = [LoraLayer(params[f"{p}.lora_A.default.weight"], params[f"{p}.lora_B.default.weight"], W, b)
                  for p, (W, b) in zip(prefix, frozen)]
        y, cache = stack_forward(x, layers, scales=2.0, activation="relu")
        rloss, dy = reflora.mse_loss(y, target)
        grads = stack_backward(dy, cache)
        g = {}
        for p, lg in zip(prefix, grads.layers):
            g[f"{p}.lora_A.default.weight"], g[f"{p}.lora_B.default.weight"] = lg.dA, lg.dB
        g, norm = reflora.clip_grad_norm({n: g[n] for n in names}, max_norm)
        params, state = opt.step(params, g, state)
        assert abs(float(rloss) - loss.item()) <= RUN_REL * loss.item()
        assert abs(float(norm) - tnorm.item()) <= RUN_REL * tnorm.item()
        clipped += tnorm.item() > max_norm
        for n in names:
            assert_close(params[n], tparams[n].detach().numpy(), name=f"{n} after step {step + 1}", rel=RUN_REL)
    assert clipped > 0  # clipping acted on some steps (the coefficient path is exercised)


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_adapter_fit_trains_dora_magnitude_and_lora_bias_like_peft(kind):
    """LoraAdapter.fit with AdamW, LoRA+ groups and clipping: the magnitude / lora_bias train as in PEFT."""
    rng = np.random.default_rng(1)
    I, O, R = 6, 5, 3
    W, bias = rng.standard_normal((O, I)), rng.standard_normal(O)
    A, B = rng.standard_normal((R, I)) * 0.4, rng.standard_normal((O, R)) * 0.4
    x, target = rng.standard_normal((12, I)), rng.standard_normal((12, O))

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(I, O, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

    cfg = peft.LoraConfig(r=R, lora_alpha=6, target_modules=["lin"], use_dora=kind == "dora",
                          lora_bias=kind == "lora_bias")
    pm = peft.get_peft_model(One(), cfg).double()
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W))
        layer.base_layer.bias.copy_(torch.from_numpy(bias))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        extra = (layer.lora_magnitude_vector["default"].weight if kind == "dora" else layer.lora_B["default"].bias)
        if kind == "lora_bias":
            extra.normal_(0.0, 0.5)
    kw = dict(lr=2e-2, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.2)
    topt = create_loraplus_optimizer(pm, torch.optim.AdamW, **kw)
    ps = [p for p in pm.parameters() if p.requires_grad]
    extra0 = extra.detach().numpy().copy()
    ad = reflora.LoraAdapter.from_arrays(A.copy(), B.copy(), alpha=6, W=W, bias=bias,
                                         **({"magnitude": extra0.copy()} if kind == "dora" else
                                            {"lora_bias": extra0.copy()}))
    opt = reflora.AdamW(kw["lr"], groups=reflora.loraplus_groups(ad.params(), **kw))
    losses = ad.fit(x, target, steps=10, optimizer=opt, max_norm=0.3)
    for step in range(10):
        topt.zero_grad()
        loss = torch.nn.functional.mse_loss(pm(torch.from_numpy(x)), torch.from_numpy(target))
        assert abs(losses[step] - loss.item()) <= RUN_REL * loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ps, 0.3)
        topt.step()
    got_extra = ad.magnitude if kind == "dora" else ad.lora_bias
    assert np.max(np.abs(got_extra - extra0)) > 1e-3  # it trained
    assert_close(got_extra, extra.detach().numpy(), name=kind, rel=RUN_REL)
    assert_close(ad.A, layer.lora_A["default"].weight.detach().numpy(), name="A", rel=RUN_REL)
    assert_close(ad.B, layer.lora_B["default"].weight.detach().numpy(), name="B", rel=RUN_REL)


def test_fit_takes_any_optimiser_and_refuses_others():
    cfg = reflora.LoraConfig(rank=2, in_features=4, out_features=3)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    for opt in (reflora.SGD(0.01), reflora.Adam(0.01), reflora.AdamW(0.01)):
        ad = reflora.LoraAdapter(cfg, xp="numpy", dtype="float64", W=rng.standard_normal((3, 4)))
        losses = ad.fit(x, t, steps=30, optimizer=opt)
        assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="one optimiser"):
        ad.fit(x, t, steps=1)
    with pytest.raises(TypeError, match="expected reflora.SGD, reflora.Adam or reflora.AdamW"):
        ad.fit(x, t, steps=1, optimizer=torch.optim.SGD)


def test_a_layernorm_in_modules_to_save_is_not_decayed_as_in_peft():
    """PEFT's decay exclusion drops parameters inside LayerNorm modules: a modules_to_save LayerNorm's 1-d weight
    lands in groupB_no_decay. reflora sees names only: without no_decay it puts that weight in groupB (with
    decay, a silent difference whenever loraplus_weight_decay != 0); with no_decay it matches PEFT."""

    class NormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    torch.manual_seed(0)
    pm = peft.get_peft_model(NormNet(), peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["norm"]))
    kw = dict(lr=3e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.05)
    want = _peft_groups(create_loraplus_optimizer(pm, torch.optim.AdamW, **kw), pm)
    params = {n: p.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}
    norm_weight = "base_model.model.norm.modules_to_save.default.weight"
    assert norm_weight in want[3][0]  # PEFT: no decay
    plain = [(g["params"], g["lr"], g["weight_decay"]) for g in reflora.loraplus_groups(params, **kw)]
    assert norm_weight in plain[2][0] and plain != want
    got = [(g["params"], g["lr"], g["weight_decay"])
           for g in reflora.loraplus_groups(params, **kw, no_decay=[norm_weight])]
    assert got == want
    with pytest.raises(ValueError, match="no_decay names"):
        reflora.loraplus_groups(params, **kw, no_decay=["nope"])
    with pytest.raises(TypeError, match="no_decay is"):
        reflora.loraplus_groups(params, **kw, no_decay=norm_weight)
