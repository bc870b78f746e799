"""The error envelope of a training run: forward, MSE loss, backward and torch.optim.SGD steps.

Built from the primitives of ``reflora.testing.envelope`` (see its docstring and
docs/derivations/tolerance.md); each SGD ``a + alpha b`` may be fused or rounded twice.
"""

from __future__ import annotations

from .envelope import (Q, Units, add, backward_envelope, forward_envelope, mul_s, quantity, round_d, scalar_error,
                       units)

__all__ = ["train_envelope"]


def _sgd_env(p: Q, g: Q, buf: Q | None, first: bool, opt: dict, U: Units):
    """torch.optim.SGD on one tensor over the class (each a + alpha b fused or in two roundings)."""
    d_p = Q(-g.v, g.e, g.m) if opt["maximize"] else g
    if opt["weight_decay"]:
        d_p = round_d(add(d_p, round_d(mul_s(p, opt["weight_decay"], U), U), U), U)
    if opt["momentum"]:
        if first:
            buf = d_p
        else:
            buf = round_d(add(round_d(mul_s(buf, opt["momentum"], U), U),
                              round_d(mul_s(d_p, 1.0 - opt["dampening"], U), U), U), U)
        d_p = round_d(add(d_p, round_d(mul_s(buf, opt["momentum"], U), U), U), U) if opt["nesterov"] else buf
    return round_d(add(p, round_d(mul_s(d_p, -opt["lr"], U), U), U), U), buf


def train_envelope(x, target, A, B, *, scale, W=None, bias=None, steps, sgd, dtype, accumulate="float32"):
    """[(A, B)] envelopes after each of ``steps`` steps: forward, MSE loss, backward, SGD (torch semantics)."""
    U = units(dtype, accumulate)
    A, B = quantity(A), quantity(B)
    t = quantity(target)
    bufs: list = [None, None]
    out = []
    for step in range(steps):
        y = forward_envelope(x, A, B, scale=scale, W=W, bias=bias, dtype=dtype, accumulate=accumulate)
        n = y.v.size
        diff = round_d(add(y, t, U, sign=-1.0), U)
        # d mean((y - t)^2) / dy = (2 / n)(y - t), as 2 (y - t) times fl(1/n) or (y - t) times 2/n: one rounding
        dy = round_d(mul_s(diff, 2.0 / n, U, e_s=2 * scalar_error(1.0 / n, U)), U)
        _, dA, dB = backward_envelope(x, A, B, dy, scale=scale, W=W, dtype=dtype, accumulate=accumulate)
        A, bufs[0] = _sgd_env(A, dA, bufs[0], step == 0, sgd, U)
        B, bufs[1] = _sgd_env(B, dB, bufs[1], step == 0, sgd, U)
        out.append((A, B))
    return out
