"""Independent peers: PyTorch autograd through PEFT's own LoRA Linear (float64)."""

from __future__ import annotations

import numpy as np


def peft_lora_linear(A, B, W, bias=None, *, r, lora_alpha, use_rslora=False, mask=None):
    """A PEFT-wrapped nn.Linear in float64 holding the given A (R, I), B (O, R), W (O, I).

    Built with peft.get_peft_model on a one-layer module, as users build it.
    ``mask`` (optional, x's shape) replaces PEFT's lora_dropout module by a
    multiplication with that fixed inverted-dropout mask.
    Returns (peft_model, lora_layer).
    """
    import peft
    import torch
    from torch import nn

    O, I = W.shape

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(I, O, bias=bias is not None, dtype=torch.float64)

    model = One()
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["lin"], lora_dropout=0.0,
                          use_rslora=use_rslora)
    pm = peft.get_peft_model(model, cfg).double()
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(np.asarray(W, dtype=np.float64)))
        if bias is not None:
            layer.base_layer.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float64)))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(A, dtype=np.float64)))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(B, dtype=np.float64)))
    if mask is not None:
        m = torch.from_numpy(np.asarray(mask, dtype=np.float64))

        class FixedMask(nn.Module):
            def forward(self, x):
                return x * m

        layer.lora_dropout["default"] = FixedMask()
    return pm, layer


def peft_forward_backward(layer, x, G):
    """y = layer(x) and the gradients of sum(y * G) for x, lora_A, lora_B (NumPy float64)."""
    import torch

    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_(True)
    y = layer(xt)
    (y * torch.from_numpy(np.asarray(G, dtype=np.float64))).sum().backward()
    return (y.detach().numpy(), xt.grad.numpy(), layer.lora_A["default"].weight.grad.numpy(),
            layer.lora_B["default"].weight.grad.numpy())
