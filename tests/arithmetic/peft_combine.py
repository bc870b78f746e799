"""A tiny PEFT model with several LoRA adapters, mirrored as reflora adapters (float64).

``build(specs)`` makes a torch model with two Linear targets (lin0 7 -> 6, lin1 6 -> 5),
adds one PEFT adapter per spec (names a0, a1, ...), fills every lora_A / lora_B (and
lora_B.bias, lora_magnitude_vector) with random float64 values, and returns the
model with the same adapters as reflora {module: LoraAdapter} dicts. The scales are
checked against PEFT's own ``layer.scaling`` so both sides start from one adapter.

``run_peft(model, ...)`` calls PEFT's add_weighted_adapter and reads the new adapter
back per module: A, B, PEFT's scaling, lora_B.bias and magnitude when present.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import peft
import torch
from torch import nn

import reflora

MODULES = {"lin0": (7, 6), "lin1": (6, 5)}  # module -> (I, O)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(7, 6)
        self.lin1 = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


@contextlib.contextmanager
def float64_default():
    """torch's default dtype float64: PEFT builds its weight tensors with torch.tensor(list) (default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float64))


def build(specs: list[dict], *, seed: int = 0, scale_b: float = 1.0):
    """(PEFT model, [ {module: LoraAdapter} per spec ]); spec keys go to peft.LoraConfig (r, lora_alpha, ...)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = Net().double()
    model = None
    names = [f"a{i}" for i in range(len(specs))]
    for name, spec in zip(names, specs):
        # PEFT's default init (B = 0, lora_B.bias = 0, m = ||W||), as for adapters trained from it; the
        # values are overwritten below, and a combined adapter starts from this init too
        cfg = peft.LoraConfig(target_modules=list(MODULES), **spec)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    ours = [dict() for _ in specs]
    with torch.no_grad():
        for mod in MODULES:
            layer = getattr(model.base_model.model, mod)
            W = layer.get_base_layer().weight.detach().numpy().copy()
            bias = layer.get_base_layer().bias.detach().numpy().copy()
            for i, name in enumerate(names):
                R, I = layer.lora_A[name].weight.shape
                O = layer.lora_B[name].weight.shape[0]
                A = rng.standard_normal((R, I))
                B = scale_b * rng.standard_normal((O, R))
                layer.lora_A[name].weight.copy_(_t(A))
                layer.lora_B[name].weight.copy_(_t(B))
                lb = mag = None
                if specs[i].get("lora_bias"):
                    lb = rng.standard_normal(O)
                    layer.lora_B[name].bias.copy_(_t(lb))
                if specs[i].get("use_dora"):
                    mag = np.linalg.norm(W + layer.scaling[name] * B @ A, axis=1) * (1 + 0.3 * rng.standard_normal(O))
                    layer.lora_magnitude_vector[name].weight.copy_(_t(mag))
                alpha = specs[i].get("lora_alpha", 8)
                for pat, a in specs[i].get("alpha_pattern", {}).items():
                    if pat == mod:
                        alpha = a
                ad = reflora.LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=specs[i].get("use_rslora", False),
                                                     W=W, bias=bias, magnitude=mag, lora_bias=lb)
                assert ad.scale == layer.scaling[name], (mod, name, ad.scale, layer.scaling[name])
                ours[i][mod] = ad
    return model, ours


def run_peft(model, weights, combination_type, **kw) -> dict[str, dict]:
    """PEFT's combined adapter "comb", per module: A, B, scaling (and bias, magnitude when PEFT has them)."""
    names = [f"a{i}" for i in range(len(weights))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(names, list(weights), "comb", combination_type=combination_type, **kw)
    out = {}
    for mod in MODULES:
        layer = getattr(model.base_model.model, mod)
        rec = {"A": layer.lora_A["comb"].weight.detach().numpy().copy(),
               "B": layer.lora_B["comb"].weight.detach().numpy().copy(),
               "scaling": layer.scaling["comb"]}
        if layer.lora_B["comb"].bias is not None:
            rec["lora_bias"] = layer.lora_B["comb"].bias.detach().numpy().copy()
        if "comb" in layer.lora_magnitude_vector:
            rec["magnitude"] = layer.lora_magnitude_vector["comb"].weight.detach().numpy().copy()
        out[mod] = rec
    return out


def peft_output(model, adapter: str, x: np.ndarray, module: str) -> np.ndarray:
    """One PEFT layer's output for input x with only ``adapter`` active (unmerged forward)."""
    model.base_model.set_adapter(adapter)
    layer = getattr(model.base_model.model, module)
    with torch.no_grad():
        return layer(_t(x)).numpy().copy()


@contextlib.contextmanager
def bernoulli_from(masks: list[np.ndarray], density: float):
    """Make torch.bernoulli (PEFT's random_pruning) return the given masks, in order, and check it drew them all."""
    queue = list(masks)
    real = torch.bernoulli

    def fake(p, *args, **kwargs):
        assert queue, "PEFT drew more DARE masks than given"
        m = queue.pop(0)
        assert tuple(p.shape) == m.shape, (tuple(p.shape), m.shape)
        assert bool(torch.all(p == density)), "PEFT asked for a Bernoulli probability other than density"
        return _t(m).to(p.dtype)

    torch.bernoulli = fake
    try:
        yield
    finally:
        torch.bernoulli = real
    assert not queue, f"PEFT drew {len(masks) - len(queue)} of {len(masks)} DARE masks"
