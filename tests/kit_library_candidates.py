"""Candidates for the kit's no-false-alarm tests: real libraries' LoRA layers and hand-written legitimate orders.

Each real-library candidate is a thin wrapper: it builds the library's own
layer from the kit's arrays and uses the library's forward, torch autograd,
torch.optim.SGD and the library's merge. None of them computes in reflora's
order; every one must pass in every dtype (``tests/test_kit_candidates.py``).

    peft          peft.tuners.lora.Linear, adapter in the base dtype
    peft_mixed    the same with the adapter in float32 on a float16/bfloat16 base (PEFT's
                  autocast_adapter_dtype default): outputs of the LoRA parameters are float32
    loralib       loralib.Linear (microsoft/LoRA), merge through eval()

Hand-written legitimate orders (each computes the same math, rounded elsewhere):

    scale_first       ((s x) A^T) B^T
    scale_bottleneck  ((x A^T) s) B^T, reflora's own order
    scale_on_B        (x A^T) (s B)^T, torchtune's merge order in a forward
    addmm_all         bias, base and LoRA in one accumulator: addmm(addmm(bias, x, W^T) ...)
    bias_last         (x W^T + LoRA) + bias
    merge_torchtune   W + (s B) A;  merge_peft_cpu: fp32 delta, cast, added;  merge_addmm: addmm(W, B, A, alpha=s)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import lora_candidates as lc

DTYPES = ("float32", "float16", "bfloat16", "float64")


def _lead(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


# ---------------------------------------------------------------- module wrappers


def _wrap(build, *, param_dtype=None):
    """forward / backward / train_step / merge over a torch module built by ``build(A, B, W, bias, scale)``,
    which returns (module, A_param, B_param, merge_fn)."""

    def make(A, B, W, bias, scale):
        dt = A.dtype
        O, I = B.shape[0], A.shape[1]
        W_ = W if W is not None else torch.zeros((O, I), dtype=dt)
        return build(A, B, W_, bias, scale, param_dtype or dt)

    def forward(x, A, B, *, scale, W=None, bias=None):
        mod, _, _, _ = make(A, B, W, bias, scale)
        with torch.no_grad():
            return mod(x)

    def backward(x, A, B, dy, *, scale, W=None, bias=None):
        mod, pA, pB, _ = make(A, B, W, bias, scale)
        x = x.detach().clone().requires_grad_(True)
        y = mod(x)
        gx, gA, gB = torch.autograd.grad(y, (x, pA, pB), dy.to(y.dtype))
        return gx, gA, gB

    def train_step(x, target, params, state, *, scale, lr, momentum, dampening, weight_decay, nesterov, maximize):
        if state is None:
            mod, pA, pB, _ = make(params["A"], params["B"], params["W"], params["bias"], scale)
            opt = torch.optim.SGD([pA, pB], lr=lr, momentum=momentum, dampening=dampening,
                                  weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
            state = (mod, pA, pB, opt)
        mod, pA, pB, opt = state
        opt.zero_grad()
        y = mod(x)
        F.mse_loss(y, target.to(y.dtype)).backward()
        opt.step()
        return {"A": pA.detach().clone(), "B": pB.detach().clone(), "W": params["W"], "bias": params["bias"]}, state

    def merge(W, A, B, *, scale):
        mod, _, _, do_merge = make(A, B, W, None, scale)
        with torch.no_grad():
            return do_merge(mod)

    return forward, backward, train_step, merge


def _build_peft(A, B, W, bias, scale, pdt):
    import peft  # noqa: PLC0415
    from peft.tuners.lora import Linear as PeftLinear  # noqa: PLC0415

    R, I, O = A.shape[0], A.shape[1], B.shape[0]
    base = torch.nn.Linear(I, O, bias=bias is not None, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        if bias is not None:
            base.bias.copy_(bias)
    base.requires_grad_(False)
    layer = PeftLinear(base, "default", config=peft.LoraConfig(r=R, lora_alpha=R), r=R, lora_alpha=R)
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(pdt)
    lb.to(pdt)
    with torch.no_grad():
        la.weight.copy_(A.to(pdt))
        lb.weight.copy_(B.to(pdt))
    layer.scaling["default"] = scale

    def do_merge(mod):
        mod.merge()
        return mod.get_base_layer().weight.detach().clone()

    return layer, la.weight, lb.weight, do_merge


def _build_loralib(A, B, W, bias, scale, pdt):
    import loralib  # noqa: PLC0415

    R, I, O = A.shape[0], A.shape[1], B.shape[0]
    layer = loralib.Linear(I, O, r=R, lora_alpha=R, bias=bias is not None, merge_weights=True).to(W.dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.scaling = scale
    layer.train(True)  # unmerged: forward computes base + LoRA branch

    def do_merge(mod):
        mod.train(False)  # loralib merges on eval(): weight += (B @ A) * scaling
        return mod.weight.detach().clone()

    return layer, layer.lora_A, layer.lora_B, do_merge


_pf, _pb, _pt, _pm = _wrap(_build_peft)
peft = types.SimpleNamespace(forward=_pf, backward=_pb, train_step=_pt, merge=_pm, dtypes=DTYPES, to="torch")
_mf, _mb, _mt, _mm = _wrap(_build_peft, param_dtype=torch.float32)
#: PEFT's default mixed precision: float32 adapter on a half base (its parameters' outputs are float32)
peft_mixed = types.SimpleNamespace(forward=_mf, backward=_mb, train_step=_mt, merge=_mm,
                                   dtypes=("float16", "bfloat16"), to="torch")
_lf, _lb, _lt, _lm = _wrap(_build_loralib)
loralib = types.SimpleNamespace(forward=_lf, backward=_lb, train_step=_lt, merge=_lm, dtypes=DTYPES, to="torch")


# ---------------------------------------------------------------- hand-written legitimate orders


def _base(x, W, bias):
    if W is None:
        return None if bias is None else bias
    return F.linear(x, W, bias)


def _finish(lora, x, W, bias):
    base = _base(x, W, bias)
    return lora if base is None else base + lora


def fwd_scale_first(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    return _finish(((xm * scale) @ A.T) @ B.T, x, W, bias)


def fwd_scale_bottleneck(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    return _finish(((xm @ A.T) * scale) @ B.T, x, W, bias)


def fwd_scale_on_B(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    return _finish((xm @ A.T) @ (scale * B).T, x, W, bias)


def fwd_addmm_all(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """The LoRA output as addmm's input, base and bias accumulated on top: one rounding for the sum."""
    x2, lead = _lead(x)
    xm = x2 if dropout_mask is None else x2 * dropout_mask.reshape(x2.shape)
    lora = (xm @ A.T) @ B.T * scale
    if bias is not None:
        lora = lora + bias
    y = lora if W is None else torch.addmm(lora, x2, W.T)
    return y.reshape(*lead, B.shape[0])


def fwd_bias_last(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    y = (xm @ A.T) @ B.T * scale
    if W is not None:
        y = x @ W.T + y
    return y if bias is None else y + bias


def _bwd(fwd):
    def backward(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
        return lc._grads(fwd, x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    return backward


HAND_FORWARDS = {"scale_first": fwd_scale_first, "scale_bottleneck": fwd_scale_bottleneck,
                 "scale_on_B": fwd_scale_on_B, "addmm_all": fwd_addmm_all, "bias_last": fwd_bias_last}
HAND = {name: types.SimpleNamespace(forward=f, backward=_bwd(f), train_step=lc.make_train_step(fwd=f), dtypes=DTYPES,
                                    to="torch") for name, f in HAND_FORWARDS.items()}


def merge_torchtune(W, A, B, *, scale):
    return W + (scale * B) @ A


def merge_peft_cpu(W, A, B, *, scale):
    """PEFT on CPU: for half dtypes the delta in float32, cast to the weight's dtype, then added."""
    if W.dtype not in (torch.float16, torch.bfloat16):
        return W + (B @ A) * scale
    delta = (B.float() @ A.float()) * scale
    return W + delta.to(W.dtype)


def merge_peft_gpu(W, A, B, *, scale):
    """PEFT on GPU: the delta in the adapter dtype, then added."""
    return W + (B @ A) * scale


def merge_addmm(W, A, B, *, scale):
    return torch.addmm(W, B, A, alpha=scale)


MERGES = {"torchtune": merge_torchtune, "peft_cpu": merge_peft_cpu, "peft_gpu": merge_peft_gpu, "addmm": merge_addmm,
          "peft_layer": _pm, "loralib_layer": _lm}


def peft_init(config, *, seed):
    """PEFT's own reset_lora_parameters (init_lora_weights True or "gaussian") on a fresh lora.Linear."""
    import peft as peft_  # noqa: PLC0415
    from peft.tuners.lora import Linear as PeftLinear  # noqa: PLC0415

    torch.manual_seed(seed)
    scheme = "gaussian" if config.init == "gaussian" else True
    base = torch.nn.Linear(config.in_features, config.out_features)
    cfg = peft_.LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=scheme)
    layer = PeftLinear(base, "default", config=cfg, r=config.rank, lora_alpha=config.alpha, init_lora_weights=scheme)
    return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()


def peft_unmerge(W, A, B, *, scale):
    """PEFT's unmerge: the layer marked merged into W', then unmerge() subtracts its delta."""
    layer, _, _, _ = _build_peft(A, B, W, None, scale, A.dtype)
    layer.merged_adapters.append("default")
    with torch.no_grad():
        layer.unmerge()
    return layer.get_base_layer().weight.detach().clone()


def loralib_unmerge(W, A, B, *, scale):
    """loralib's unmerge: train(True) on a merged layer subtracts (B @ A) * scaling."""
    layer, _, _, _ = _build_loralib(A, B, W, None, scale, A.dtype)
    layer.merged = True
    layer.train(True)
    return layer.weight.detach().clone()


# ---------------------------------------------------------------- lora_bias (PEFT's lora_B.bias)


def _peft_bias_layer(A, B, c, W, bias, scale):
    import peft as peft_  # noqa: PLC0415
    from peft.tuners.lora import Linear as PeftLinear  # noqa: PLC0415

    R, I, O = A.shape[0], A.shape[1], B.shape[0]
    base = torch.nn.Linear(I, O, bias=bias is not None, dtype=A.dtype)
    with torch.no_grad():
        base.weight.copy_(W if W is not None else torch.zeros((O, I), dtype=A.dtype))
        if bias is not None:
            base.bias.copy_(bias)
    base.requires_grad_(False)
    cfg = peft_.LoraConfig(r=R, lora_alpha=R, lora_bias=True)
    layer = PeftLinear(base, "default", config=cfg, r=R, lora_alpha=R, lora_bias=True)
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(A.dtype)
    lb.to(A.dtype)
    with torch.no_grad():
        la.weight.copy_(A)
        lb.weight.copy_(B)
        lb.bias.copy_(c)
    layer.scaling["default"] = scale
    return layer, la.weight, lb.weight, lb.bias


def peft_lora_bias_forward(x, A, B, lora_bias, *, scale, W=None, bias=None):
    layer, *_ = _peft_bias_layer(A, B, lora_bias, W, bias, scale)
    with torch.no_grad():
        return layer(x)


def peft_lora_bias_backward(x, A, B, lora_bias, dy, *, scale, W=None, bias=None):
    layer, pA, pB, pc = _peft_bias_layer(A, B, lora_bias, W, bias, scale)
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(layer(x), (x, pA, pB, pc), dy)


def lora_bias_forward_c_unscaled(x, A, B, lora_bias, *, scale, W=None, bias=None):
    """Mutant: c added after the scale (s (x A^T) B^T + c)."""
    return lc.forward(x, A, B, scale=scale, W=W, bias=bias) + lora_bias


def lora_bias_backward_dc_unscaled(x, A, B, lora_bias, dy, *, scale, W=None, bias=None):
    """Mutant: dc = sum_N dy, the scale forgotten."""
    dx, dA, dB, dc = peft_lora_bias_backward(x, A, B, lora_bias, dy, scale=scale, W=W, bias=bias)
    return dx, dA, dB, dc / scale if scale else dc + 1


# ---------------------------------------------------------------- DoRA (PEFT's use_dora)


def _peft_dora_layer(A, B, m, W, bias, scale):
    import peft as peft_  # noqa: PLC0415
    from peft.tuners.lora import Linear as PeftLinear  # noqa: PLC0415

    R, I, O = A.shape[0], A.shape[1], B.shape[0]
    base = torch.nn.Linear(I, O, bias=bias is not None, dtype=A.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        if bias is not None:
            base.bias.copy_(bias)
    cfg = peft_.LoraConfig(r=R, lora_alpha=R, use_dora=True)
    layer = PeftLinear(base, "default", config=cfg, r=R, lora_alpha=R, use_dora=True)
    layer.to(A.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        layer.scaling["default"] = scale
        layer.lora_magnitude_vector["default"].weight.copy_(m)
    return layer


def peft_dora_forward(x, A, B, m, W, *, scale, bias=None):
    """PEFT's lora.Linear with use_dora=True: its DoraLinearLayer forward, magnitude set to m."""
    layer = _peft_dora_layer(A, B, m, W, bias, scale)
    with torch.no_grad():
        # PEFT's DoRA broadcasts g as (1, O): a 1-D x would come back (1, O), so rows go in as 2-D
        return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], B.shape[0])


def peft_dora_backward(x, A, B, m, W, dy, *, scale, bias=None):
    """torch autograd through PEFT's DoRA forward (the norm detached, as PEFT does)."""
    layer = _peft_dora_layer(A, B, m, W, bias, scale)
    x2 = x.detach().reshape(-1, x.shape[-1]).clone().requires_grad_(True)
    y = layer(x2)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight)
    gx, gA, gB, gm = torch.autograd.grad(y, (x2, *params), dy.reshape(y.shape))
    return gx.reshape(x.shape), gA, gB, gm


def dora_forward_norm_without_scale(x, A, B, m, W, *, scale, bias=None):
    """Mutant: the norm of W + B A (the scale left out of the norm)."""
    n = torch.linalg.norm(W + B @ A, dim=1)
    y = (m / n) * (x @ W.T + scale * (x @ A.T) @ B.T)
    return y if bias is None else y + bias


def dora_backward_dm_not_divided(x, A, B, m, W, dy, *, scale, bias=None):
    """Mutant: dm = sum_N dy * (x V^T), the division by the (detached) norm forgotten."""
    dx, dA, dB, dm = peft_dora_backward(x, A, B, m, W, dy, scale=scale, bias=bias)
    return dx, dA, dB, dm * torch.linalg.norm((W + scale * (B @ A)).float(), dim=1).to(dm.dtype)
