"""LoRA candidates for the conformance-kit tests: a correct PyTorch implementation, and mutants.

The correct one is written the way PEFT computes (lora_B(lora_A(dropout(x))) * scaling,
base path through F.linear, autograd for gradients, torch.optim.SGD) and runs in
whatever dtype it is given. Each mutant changes one thing, as a real bug would.
``candidate`` is the object ``REFLORA_CANDIDATE=lora_candidates:candidate`` names.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

DTYPES = ("float32", "float16", "bfloat16", "float64")


# ---------------------------------------------------------------- correct


def forward(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    xm = x if dropout_mask is None else x * dropout_mask
    lora = (xm @ A.T) @ B.T * scale
    if W is None:
        return lora if bias is None else lora + bias
    return F.linear(x, W, bias) + lora


def _grads(fwd, x, A, B, dy, **kw):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y = fwd(x, A, B, **kw)
    return tuple(g for g in torch.autograd.grad(y, (x, A, B), dy))


def backward(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    return _grads(forward, x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)


def make_train_step(fwd=forward, sgd=torch.optim.SGD):
    def train_step(x, target, params, state, *, scale, lr, momentum, dampening, weight_decay, nesterov, maximize):
        if state is None:
            A = torch.nn.Parameter(params["A"].clone())
            B = torch.nn.Parameter(params["B"].clone())
            opt = sgd([A, B], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=maximize)
            state = (opt, A, B)
        opt, A, B = state
        opt.zero_grad()
        y = fwd(x, A, B, scale=scale, W=params["W"], bias=params["bias"])
        F.mse_loss(y, target).backward()
        opt.step()
        return {"A": A.detach().clone(), "B": B.detach().clone(), "W": params["W"], "bias": params["bias"]}, state
    return train_step


train_step = make_train_step()


def merge(W, A, B, *, scale):
    return W + (B @ A) * scale


def scaling(rank, alpha, *, use_rslora=False):
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


KEY_A = "base_model.model.linear.lora_A.weight"
KEY_B = "base_model.model.linear.lora_B.weight"


def save(path, A, B):
    from safetensors.torch import save_file

    save_file({KEY_A: A.contiguous(), KEY_B: B.contiguous()}, path, metadata={"format": "pt"})


def load(path):
    from safetensors.torch import load_file

    t = load_file(path)
    return t[KEY_A], t[KEY_B]


def save_seed(path, A, B):
    """The seed's candle layout: lora_a (I, R) = A^T, lora_b (R, O) = B^T."""
    from safetensors.torch import save_file

    save_file({"lora_a": A.T.contiguous(), "lora_b": B.T.contiguous()}, path)


def load_seed(path):
    from safetensors.torch import load_file

    t = load_file(path)
    return t["lora_a"].T.contiguous(), t["lora_b"].T.contiguous()


def unmerge(W, A, B, *, scale):
    return W - (B @ A) * scale


def init(config, *, seed):
    """PEFT's reset_lora_parameters: A by kaiming_uniform_(a=sqrt(5)) or N(0, (1/R)^2), B zeros (torch's RNG)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(config.rank, config.in_features)
    if config.init == "gaussian":
        torch.nn.init.normal_(A, std=1 / config.rank, generator=g)
    else:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    return A, torch.zeros(config.out_features, config.rank)


def _init_mutant(draw_A, B_nonzero=False):
    def bad_init(config, *, seed):
        g = torch.Generator().manual_seed(seed)
        A = draw_A(config, g)
        B = torch.randn(config.out_features, config.rank, generator=g) if B_nonzero else \
            torch.zeros(config.out_features, config.rank)
        return A, B
    return bad_init


#: the seed's bound sqrt(2/fan_in) * sqrt(6) = sqrt(12/fan_in) for kaiming_uniform
init_seed_bound = _init_mutant(lambda c, g: (torch.rand(c.rank, c.in_features, generator=g) * 2 - 1)
                               * math.sqrt(12 / c.in_features))
#: candle-lora's Kaiming normal, std sqrt(2/fan_in), for every scheme
init_candle_normal = _init_mutant(lambda c, g: torch.randn(c.rank, c.in_features, generator=g)
                                  * math.sqrt(2 / c.in_features))
#: gaussian with std 1/sqrt(R) instead of PEFT's 1/R (kaiming_uniform right)
init_gaussian_sqrt_r = _init_mutant(lambda c, g: init(c, seed=int(torch.randint(0, 2**31, (1,), generator=g)))[0]
                                    if c.init != "gaussian" else
                                    torch.randn(c.rank, c.in_features, generator=g) / math.sqrt(c.rank))
#: B left at nn.Linear's default (nonzero): the adapter does not start as the identity
init_B_nonzero = _init_mutant(lambda c, g: init(c, seed=0)[0], B_nonzero=True)


candidate = types.SimpleNamespace(forward=forward, backward=backward, train_step=train_step, merge=merge,
                                  unmerge=unmerge, init=init,
                                  scaling=scaling, save=save, load=load, dtypes=DTYPES, to="torch",
                                  layout="peft")

#: only a forward (the suite lists everything else as skipped)
forward_only = types.SimpleNamespace(forward=forward, to="torch", dtypes=("float32",))


# ---------------------------------------------------------------- mutants (one bug each)


def fwd_scale_on_base(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """candle-lora's bug: (base(x) + b(a(x))) * scale."""
    xm = x if dropout_mask is None else x * dropout_mask
    lora = (xm @ A.T) @ B.T
    base = 0 if W is None else F.linear(x, W, bias)
    return (base + lora) * scale if W is not None else (lora * scale + (0 if bias is None else bias))


def fwd_A_transposed(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """A used as (I, R): x @ A instead of x @ A^T (errors unless R = I; wrong values when R = I)."""
    xm = x if dropout_mask is None else x * dropout_mask
    lora = (xm @ A) @ B.T * scale
    return (F.linear(x, W, bias) if W is not None else (0 if bias is None else bias)) + lora


def fwd_dropout_on_base(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """Dropout applied to the base path as well."""
    xm = x if dropout_mask is None else x * dropout_mask
    lora = (xm @ A.T) @ B.T * scale
    return (F.linear(xm, W, bias) if W is not None else (0 if bias is None else bias)) + lora


def fwd_bias_twice(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """The bias added to both paths."""
    y = forward(x, A, B, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    return y if bias is None else y + bias


def bwd_no_scale_in_dA(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    dx, dA, dB = backward(x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    return dx, dA / scale, dB


def bwd_dB_from_x(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    """dB = s dy^T x instead of s dy^T (x A^T)."""
    dx, dA, dB = backward(x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dx, dA, scale * dy2.T @ x2


def bwd_not_summed_over_leading(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    """dA, dB averaged over the first leading dimension instead of summed (when x has several)."""
    dx, dA, dB = backward(x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    n = x.shape[0] if x.ndim > 2 else 1
    return dx, dA / n, dB / n


def bwd_no_base_dx(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    """dx without the base path's dy W."""
    return _grads(forward, x, A, B, dy, scale=scale, W=None, bias=bias, dropout_mask=dropout_mask)


def bwd_mask_not_in_dx(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None):
    """The dropout mask forgotten on the LoRA branch of dx."""
    dx, dA, dB = backward(x, A, B, dy, scale=scale, W=W, bias=bias, dropout_mask=dropout_mask)
    if dropout_mask is not None:
        lora_dx = (scale * dy @ B) @ A
        dx = dx - lora_dx * dropout_mask + lora_dx
    return dx, dA, dB


class SGDZeroBuffer(torch.optim.Optimizer):
    """SGD whose momentum buffer starts at zero (optax's trace) instead of at the first gradient."""

    def __init__(self, params, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                d_p = -p.grad if g["maximize"] else p.grad
                if g["weight_decay"]:
                    d_p = d_p + g["weight_decay"] * p
                if g["momentum"]:
                    buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                    buf.mul_(g["momentum"]).add_(d_p, alpha=1 - g["dampening"])
                    d_p = d_p + g["momentum"] * buf if g["nesterov"] else buf
                p.add_(d_p, alpha=-g["lr"])


train_zero_buffer = make_train_step(sgd=SGDZeroBuffer)


def train_decay_on_W(x, target, params, state, *, weight_decay, lr, **kw):
    """Weight decay also applied to the frozen base weight."""
    new, state = train_step(x, target, params, state, weight_decay=weight_decay, lr=lr, **kw)
    if new["W"] is not None and weight_decay:
        new = dict(new, W=new["W"] * (1 - lr * weight_decay))
    return new, state


def _fwd_without_bias(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    return forward(x, A, B, scale=scale, W=W, bias=None, dropout_mask=dropout_mask)


train_bias_dropped = make_train_step(fwd=_fwd_without_bias)


def merge_no_scale(W, A, B, *, scale):
    return W + B @ A


def scaling_ignores_rslora(rank, alpha, *, use_rslora=False):
    """alpha / r where alpha / sqrt(r) was configured."""
    return alpha / rank


def save_upcast(path, A, B):
    """Writes float32 whatever the dtype (a round trip that changes the dtype)."""
    save(path, A.float(), B.float())


def save_seed_keys_as_peft(path, A, B):
    """Writes PEFT's key names with the seed's transposed layout."""
    from safetensors.torch import save_file

    save_file({KEY_A: A.T.contiguous(), KEY_B: B.T.contiguous()}, path)


def load_transposed(path):
    a, b = load(path)
    return a.T.contiguous(), b.T.contiguous()


#: float32 only, everything provided (the suite's end-to-end test)
candidate_f32 = types.SimpleNamespace(**{**vars(candidate), "dtypes": ("float32",)})

#: candle-lora's scale-on-base bug, with a correct backward
mutant_candidate = types.SimpleNamespace(forward=fwd_scale_on_base, backward=backward, dtypes=("float32",), to="torch")


# ---------------------------------------------------------------- mutants of issue 10 (subtle, half precision)


def fwd_scale_error(c=1.005):
    """The scale off by a factor c (0.5 % by default): a rounded alpha / r, a wrong rsLoRA constant."""
    def scale_off(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
        return forward(x, A, B, scale=c * scale, W=W, bias=bias, dropout_mask=dropout_mask)
    scale_off.__qualname__ = f"fwd_scale_error({c})"
    return scale_off


def fwd_scale_or_one(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """``scale = scale or 1.0``: a zero scale silently becomes 1."""
    return forward(x, A, B, scale=scale or 1.0, W=W, bias=bias, dropout_mask=dropout_mask)


def _matmul_acc_in_dtype(a, bT, chunk=8):
    """a @ bT with the sum over the inner dimension accumulated in a's dtype: chunks of ``chunk`` products
    (exact or float32 inside a chunk), their partial sums added one by one, each addition rounded to the dtype."""
    out = None
    for k in range(0, a.shape[-1], chunk):
        part = a[..., k:k + chunk] @ bT[k:k + chunk]
        out = part if out is None else out + part
    return out


def fwd_acc_in_dtype(x, A, B, *, scale, W=None, bias=None, dropout_mask=None):
    """x A^T accumulated in the dtype (bfloat16 / float16) instead of float32."""
    xm = x if dropout_mask is None else x * dropout_mask
    lora = _matmul_acc_in_dtype(xm, A.T) @ B.T * scale
    return (F.linear(x, W, bias) if W is not None else (0 if bias is None else bias)) + lora


class SGDBug(torch.optim.Optimizer):
    """torch.optim.SGD's update with one semantic bug (``bug``), as written by hand:

    decay_ignored          weight decay never applied
    decay_after_momentum   buf from the gradient alone, decay added to the step afterwards
    damp_first_step        dampening applied on the first step too (torch starts buf = d_p)
    maximize_after_decay   maximize negates g + wd p instead of g alone
    buffer_reset           the momentum buffer restarts every step
    """

    def __init__(self, params, *, bug, lr, momentum, dampening, weight_decay, nesterov, maximize):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))
        self.bug = bug

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                wd, m = g["weight_decay"], g["momentum"]
                d_p = p.grad
                if self.bug != "maximize_after_decay" and g["maximize"]:
                    d_p = -d_p
                if wd and self.bug not in ("decay_ignored", "decay_after_momentum"):
                    d_p = d_p.add(p, alpha=wd)
                if self.bug == "maximize_after_decay" and g["maximize"]:
                    d_p = -d_p
                if m:
                    st = self.state[p]
                    if "buf" not in st or self.bug == "buffer_reset":
                        buf = st["buf"] = d_p.clone() if self.bug != "damp_first_step" else d_p * (1 - g["dampening"])
                    else:
                        buf = st["buf"]
                        buf.mul_(m).add_(d_p, alpha=1 - g["dampening"])
                    d_p = d_p.add(buf, alpha=m) if g["nesterov"] else buf
                if wd and self.bug == "decay_after_momentum":
                    d_p = d_p.add(p, alpha=wd)
                p.add_(d_p, alpha=-g["lr"])


SGD_BUGS = ("decay_ignored", "decay_after_momentum", "damp_first_step", "maximize_after_decay", "buffer_reset")


def train_sgd_bug(bug):
    import functools

    step = make_train_step(sgd=functools.partial(SGDBug, bug=bug))
    step.__qualname__ = f"train_sgd_bug({bug!r})"
    return step
