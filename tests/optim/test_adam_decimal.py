"""reflora.Adam / AdamW in float64 against an independent reference: Python ``decimal`` at 60 digits.

The reference is written from torch.optim.Adam's documented algorithm (the pseudo-code of
its docstring and the single-tensor code path), element by element in ``Decimal``, with
no NumPy and no torch: nothing is shared with reflora's code. It carries, next to each
value, a running bound on how far a float64 computation of that value can be from it
(Wilkinson's running error analysis): every elementary operation of the float64 path is
one IEEE rounding, |fl(z) - z| <= u |z| with u = 2^-53, and errors already in the
operands propagate to first order plus their products (so the bound is rigorous, not a
first-order estimate):

    a + b   e = ea + eb + u (|a + b| + ea + eb)
    a * b   e = |a| eb + |b| ea + ea eb + u (|a b| + that)
    a / b   e = (ea + |a / b| eb) / (|b| - eb) + u (|a / b| + that)
    sqrt a  e = ea / sqrt(a)  (a > 0; sqrt(ea) at 0) + u (sqrt a + that)
    max     e = max(ea, eb)

Python's ``x ** y`` (libm pow, b^t and the root of the second bias correction) is
faithful, within one ulp: 2u relative. The lerp m + w (g - m) is modelled as torch's
kernel writes it (``weight < 0.5 ? self + w (end - self) : end - (1 - w) (end - self)``).
So the test passes only if reflora's float64 result lies within that many roundings of
the exact Adam step, for every option, over several steps from scratch (the state is
not fed back from reflora). The bounds come out between 2 u and about 200 u absolute
(|p| < 1, lr = 0.05): the bias correction 1 - b2^t cancels at small t (1 - 0.999 at
t = 1), amplifying pow's rounding by 1 / (1 - b2^t); torch forms it the same way in
Python floats. The option effects are far larger (checked: each option moves the
result by more than 1e6 bounds).
"""

from __future__ import annotations

import itertools
from decimal import Decimal, localcontext

import numpy as np
import pytest

import reflora

U = Decimal(2) ** -53
SLACK = Decimal(10) ** -50  # the reference's own (60-digit) rounding, relative


class E:
    """A real value (Decimal, 60 digits) and a bound on |float64 computation - value|."""

    __slots__ = ("x", "e")

    def __init__(self, x, e=Decimal(0)):
        self.x, self.e = Decimal(x), Decimal(e)

    def _r(self, x, e, k=1):
        # the result's own rounding: k u of its magnitude (k = 2 for pow), plus the reference's slack
        return E(x, e + k * U * (abs(x) + e) + SLACK * abs(x))

    def __add__(self, o):
        o = o if isinstance(o, E) else E(o)
        return self._r(self.x + o.x, self.e + o.e)

    def __sub__(self, o):
        o = o if isinstance(o, E) else E(o)
        return self._r(self.x - o.x, self.e + o.e)

    def __rsub__(self, o):
        return E(o) - self

    def __mul__(self, o):
        o = o if isinstance(o, E) else E(o)
        return self._r(self.x * o.x, abs(self.x) * o.e + abs(o.x) * self.e + self.e * o.e)

    def __truediv__(self, o):
        o = o if isinstance(o, E) else E(o)
        assert abs(o.x) > o.e, "denominator not bounded away from 0"
        q = self.x / o.x
        return self._r(q, (self.e + abs(q) * o.e) / (abs(o.x) - o.e))

    def __neg__(self):
        return E(-self.x, self.e)

    def sqrt(self, k=1):
        r = self.x.sqrt() if self.x > 0 else Decimal(0)
        prop = self.e / r if r > 0 else self.e.sqrt()
        return self._r(r, prop, k)

    def pow(self, t):
        # libm pow: faithful (one ulp = 2u relative); the operand is an exact float here
        assert self.e == 0
        return self._r(self.x ** t, Decimal(0), k=2)


def emax(a, b):
    return E(max(a.x, b.x), max(a.e, b.e))


def reference_step(p, g, m, v, vmax, t, *, lr, b1, b2, eps, wd, decoupled, amsgrad, maximize):
    """One Adam(W) step on one element, torch's algorithm; every argument an E (or a float hyper-parameter)."""
    lr, b1, b2, eps, wd = (E(x) for x in (lr, b1, b2, eps, wd))
    if maximize:
        g = -g
    if wd.x != 0:
        if decoupled:
            p = p * (1 - lr * wd)            # param.mul_(1 - lr * weight_decay)
        else:
            g = g + wd * p                    # grad.add(param, alpha=weight_decay), unfused in float64
    w = 1 - b1                                # exp_avg.lerp_(grad, 1 - beta1)
    if w.x < Decimal("0.5"):
        m = m + w * (g - m)
    else:
        m = g - (1 - w) * (g - m)
    v = v * b2 + g * (1 - b2) * g             # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - b1.pow(t)
    bc2_sqrt = (1 - b2.pow(t)).sqrt(k=2)      # bias_correction2 ** 0.5: pow again
    step_size = lr / bc1
    if amsgrad:
        vmax = emax(vmax, v)
        src = vmax
    else:
        src = v
    denom = src.sqrt() / bc2_sqrt + eps       # eps outside the root, after the correction
    p = p + (m * (-step_size)) / denom        # param.addcdiv_(exp_avg, denom, value=-step_size)
    return p, m, v, vmax


GRID = [dict(amsgrad=a, maximize=mx, weight_decay=wd, betas=b, eps=e)
        for a, mx, wd, b, e in itertools.product([False, True], [False, True], [0.0, 0.1], [(0.9, 0.999), (0.5, 0.8)],
                                                 [1e-8, 1e-3])]
STEPS = 6


def _problem(seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal((2, 3))
    # gradient scales that fall (so the second moment falls and amsgrad's max differs) and rise again
    scales = [1.0, 0.05, 0.05, 1.0, 0.02, 0.5]
    grads = [s * rng.standard_normal((2, 3)) for s in scales[:STEPS]]
    return p0, grads


def _run_reference(cls, opts, lr, p0, grads):
    """Params after each step, and the bound, as float64 arrays (value rounded to float64 only to compare)."""
    kw = dict(lr=lr, b1=opts["betas"][0], b2=opts["betas"][1], eps=opts["eps"],
              wd=opts.get("weight_decay", 0.0 if cls == "Adam" else 1e-2), decoupled=cls == "AdamW",
              amsgrad=opts["amsgrad"], maximize=opts["maximize"])
    with localcontext() as ctx:
        ctx.prec = 60
        flat = [E(float(x)) for x in p0.reshape(-1)]
        ms = [E(0) for _ in flat]
        vs = [E(0) for _ in flat]
        vmaxs = [E(0) for _ in flat]
        out = []
        for t, g in enumerate(grads, start=1):
            gs = [E(float(x)) for x in g.reshape(-1)]
            for i in range(len(flat)):
                flat[i], ms[i], vs[i], vmaxs[i] = reference_step(flat[i], gs[i], ms[i], vs[i], vmaxs[i], t, **kw)
            out.append(([x.x for x in flat], [x.e for x in flat]))
    return out


def _within(got, ref):
    """max over elements of |got - exact| / bound (<= 1 passes), and the largest bound."""
    worst, most = 0.0, 0.0
    for a, x, e in zip(got.reshape(-1), *ref):
        err = abs(Decimal(float(a)) - x)
        worst = max(worst, float(err / e))
        most = max(most, float(e))
    return worst, most


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("opts", GRID, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o in GRID])
def test_float64_within_the_running_error_bound_of_the_exact_step(cls, opts):
    p0, grads = _problem(0)
    lr = 0.05
    ref = _run_reference(cls, opts, lr, p0, grads)
    opt = getattr(reflora, cls)(lr, **opts)
    params = {"p": p0}
    state = opt.init(params)
    for t, g in enumerate(grads):
        params, state = opt.step(params, {"p": g}, state)
        worst, most = _within(params["p"], ref[t])
        assert worst <= 1.0, f"{cls} {opts}: step {t + 1} is {worst:.3g} bounds from the exact Adam step"
        # the bound is tight enough to mean something: below 1024 u (measured at most ~280 u here)
        assert most < 1024 * float(U), f"bound {most:.3g}: too loose to mean anything"


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_each_option_moves_the_result_by_far_more_than_the_bound(cls):
    """The test above can fail: flipping any one option (or a bug equivalent to it) puts reflora outside."""
    p0, grads = _problem(0)
    lr = 0.05
    base = dict(amsgrad=True, maximize=False, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-3)
    ref = _run_reference(cls, base, lr, p0, grads)
    flips = [dict(amsgrad=False), dict(maximize=True), dict(weight_decay=0.0), dict(eps=1e-8),
             dict(betas=(0.9, 0.99)), dict(betas=(0.8, 0.999))]
    for flip in flips:
        opt = getattr(reflora, cls)(lr, **{**base, **flip})
        params, state = {"p": p0}, None
        state = opt.init(params)
        for g in grads:
            params, state = opt.step(params, {"p": g}, state)
        worst, _ = _within(params["p"], ref[-1])
        assert worst > 1e6, (flip, worst)
    # and Adam's L2 decay is not AdamW's decoupled one
    other = "AdamW" if cls == "Adam" else "Adam"
    opt = getattr(reflora, other)(lr, **base)
    params = {"p": p0}
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, {"p": g}, state)
    assert _within(params["p"], ref[-1])[0] > 1e6
