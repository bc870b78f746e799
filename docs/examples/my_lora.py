"""my_lora: a PyTorch LoRA under test (the module REFLORA_CANDIDATE names)."""
import torch

dtypes = ("float32", "bfloat16")      # what this implementation computes in
to = "torch"                          # how the kit should hand it arrays

def forward(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    y = scale * ((xm @ A.T) @ B.T)
    if W is not None:
        y = y + x @ W.T
    return y if bias is None else y + bias

def backward(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    x, A, B = (t.detach().requires_grad_(True) for t in (x, A, B))
    forward(x, A, B, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask).backward(dy)
    return x.grad, A.grad, B.grad

def train_step(x, target, params, state, *, scale, lr, momentum, dampening, weight_decay, nesterov, maximize):
    A, B = (params[k].detach().clone().requires_grad_(True) for k in ("A", "B"))
    opt = torch.optim.SGD([A, B], lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    if state is not None:
        opt.load_state_dict(state)
    torch.mean((forward(x, A, B, scale=scale, W=params["W"], bias=params["bias"]) - target) ** 2).backward()
    opt.step()
    return {"A": A.detach(), "B": B.detach(), "W": params["W"], "bias": params["bias"]}, opt.state_dict()

def merge(W, A, B, *, scale):
    return W + scale * (B @ A)

def scaling(rank, alpha, *, use_rslora):
    return alpha / rank               # known bug: rsLoRA not implemented yet
