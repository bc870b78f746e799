"""The error envelope of the DoRA forward (``reflora.testing.envelope``'s rules, plus a norm and a quotient).

    V = W + s B A,  n_o = ||V_o,:||_2,  g = m / n
    y = x W^T + bias + (g - 1) * (x W^T) + g * s (x A^T) B^T      (PEFT: DoraLinearLayer.forward)
      = g * (x W^T + s (x A^T) B^T) + bias                        (the same, factored; reflora's order)

Two more rules, elementwise, for a value held within e:

    sqrt(q)     e' = e / (sqrt(v) + sqrt(max(v - e, 0)))   (|sqrt(a) - sqrt(b)| = |a - b| / (sqrt(a) + sqrt(b)));
                v = 0: e' = sqrt(e); then one rounding in a
    m / q       e' = |m| e / (|v| (|v| - e)) while e < |v| (else no bound), then one rounding in a
    p * q       e' = |p| e_q + e_p (|q| + e_q), then one rounding in a

The squared norm is a dot product of V's row with itself (any order, float32 accumulation). A norm
computed by a scaled algorithm (LAPACK's nrm2) rounds a few more times per element than a plain sum of
squares; the bound counts I + 2 roundings per term, which covers one scaling per element.
"""

from __future__ import annotations

import math

import numpy as np

from .envelope import (Q, Units, overflow_to_inf, quantity, as_rows, round_work, add, dot, exact, merge_envelope, mul_s, qmax,
                       round_d, scalar_error, sum_any, units)

__all__ = ["dora_backward_envelope", "dora_forward_envelope"]


def _mul_q(p: Q, q: Q, U: Units) -> Q:
    return round_work(p.v * q.v, np.abs(p.v) * q.e + p.e * (np.abs(q.v) + q.e), p.m * q.m, U)


def _norm_rows(V: Q, U: Units) -> Q:
    """n_o = sqrt(sum_i V_oi^2), the sum of squares in any order, then the square root."""
    av = np.abs(V.v)
    v = np.sum(V.v * V.v, axis=1)
    M = np.sum(av * av, axis=1)
    e_in = np.sum(2 * av * V.e + V.e * V.e, axis=1)
    K = V.v.shape[1] + 2
    theta = math.expm1(K * math.log1p(U.u_a))
    e2 = e_in + theta * (M + e_in) + 2 * K * U.eta_a
    r = np.sqrt(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.where(v > 0, e2 / (r + np.sqrt(np.maximum(v - e2, 0.0))), np.sqrt(e2))
    return round_d(round_work(r, e, np.sqrt(np.sum(V.m * V.m, axis=1)), U, exact64=False), U)


def _divide(m: Q, n: Q, U: Units) -> Q:
    """m / n (m exact, n held within e)."""
    an = np.abs(n.v)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        v = m.v / n.v
        e = np.where(n.e < an, np.abs(m.v) * n.e / (an * (an - n.e)), np.inf)
        mag = np.where(an > n.e, m.m / np.maximum(an - n.e, 1e-300), np.inf)
    return round_d(round_work(v, e, mag, U, exact64=False), U)


def dora_forward_envelope(x, A, B, m, W, *, scale, bias=None, dtype, accumulate="float32") -> Q:
    """The envelope of the DoRA forward (no dropout) over PEFT's order and the factored order."""
    U = units(dtype, accumulate)
    xq, A, B, W, b, mq = map(quantity, (x, A, B, W, bias, m))
    lead, I, O = xq.v.shape[:-1], xq.v.shape[-1], B.v.shape[0]
    x2 = as_rows(xq, I)
    e_s = scalar_error(scale, U)
    # the norm of V = W + s B A, with V in any of the merge orders (PEFT: W + s * (B @ A) in x's dtype)
    n = _norm_rows(merge_envelope(W.v, A.v, B.v, scale=scale, dtype=dtype, accumulate=accumulate), U)
    g = _divide(mq, n, U)
    g2 = Q(g.v[None, :], g.e[None, :], g.m[None, :])
    z = round_d(dot(x2, W.T, U), U)                                     # x W^T
    h = round_d(dot(x2, A.T, U), U)
    lora = round_d(dot(h, B.T, U), U)                                   # (x A^T) B^T, unscaled
    ls = round_d(mul_s(lora, scale, U, e_s), U)
    one = exact(np.ones_like(g2.v))
    gm1 = round_d(add(g2, one, U, sign=-1.0), U)
    base = z if b is None else sum_any([z, b], U)
    z_back = z if b is None else round_d(add(base, b, U, sign=-1.0), U)  # PEFT: base_result - bias
    paths = []
    for zz in ((z, z_back) if b is not None else (z,)):
        t1 = round_d(_mul_q(gm1, zz, U), U)
        for t2 in (round_d(mul_s(round_d(_mul_q(g2, lora, U), U), scale, U, e_s), U),
                   round_d(_mul_q(g2, ls, U), U)):
            dora = round_d(add(t1, t2, U), U)
            paths.append(round_d(add(base, dora, U), U))
            paths.append(sum_any([z, t1, t2] if b is None else [base, t1, t2], U))
    # factored: g * (x W^T + s (x A^T) B^T) + bias, the inner sum with the scale anywhere
    from .envelope import forward_envelope  # noqa: PLC0415

    inner = as_rows(forward_envelope(x2, A, B, scale=scale, W=W, dtype=dtype, accumulate=accumulate), O)
    fac = round_d(_mul_q(g2, inner, U), U)
    paths.append(fac if b is None else sum_any([fac, b], U))
    y = qmax(paths)
    e = overflow_to_inf(y.e, y.v, U.d)
    return Q(y.v.reshape(lead + (O,)), e.reshape(lead + (O,)), y.m.reshape(lead + (O,)))


def _divide_q(a: Q, n: Q, U: Units) -> Q:
    """a / n, both held within their bounds: |a^/n^ - a/n| <= (|a| e_n + |n| e_a) / (|n| (|n| - e_n))."""
    an = np.abs(n.v)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        v = a.v / n.v
        e = np.where(n.e < an, (np.abs(a.v) * n.e + an * a.e) / (an * (an - n.e)), np.inf)
        mag = np.where(an > n.e, a.m / np.maximum(an - n.e, 1e-300), np.inf)
    return round_d(round_work(v, e, mag, U, exact64=False), U)


def _colsum_of_products(p: Q, q: Q, U: Units) -> Q:
    """sum_N p * q per column (autograd's reduction of a broadcast product), any order."""
    ones = exact(np.ones((1, p.v.shape[0])))
    prod = round_d(_mul_q(p, q, U), U)
    out = round_d(dot(ones, prod, U), U)
    return Q(out.v[0], out.e[0], out.m[0])


def dora_backward_envelope(x, A, B, m, W, dy, *, scale, bias=None, dtype, accumulate="float32"):
    """Envelopes of (dx, dA, dB, dm) of the DoRA forward with the norm detached (PEFT's gradient).

    ``bias`` matters for dm only: PEFT's x W^T is base(x) - bias, rounded twice.
    """
    from .envelope import backward_envelope, forward_envelope  # noqa: PLC0415

    U = units(dtype, accumulate)
    xq, A, B, W, mq, dyq, b = map(quantity, (x, A, B, W, m, dy, bias))
    I, O = xq.v.shape[-1], B.v.shape[0]
    x2, dy2 = as_rows(xq, I), as_rows(dyq, O)
    e_s = scalar_error(scale, U)
    n = _norm_rows(merge_envelope(W.v, A.v, B.v, scale=scale, dtype=dtype, accumulate=accumulate), U)
    g = _divide(mq, n, U)
    g2 = Q(g.v[None, :], g.e[None, :], g.m[None, :])
    one = exact(np.ones_like(g2.v))
    gm1 = round_d(add(g2, one, U, sign=-1.0), U)
    # the LoRA branch sees g * dy, with the scale anywhere (backward_envelope's placements) or s * dy first
    gdy = round_d(_mul_q(g2, dy2, U), U)
    gsdy = round_d(_mul_q(g2, round_d(mul_s(dy2, scale, U, e_s), U), U), U)
    lora = [backward_envelope(x2, A, B, gdy, scale=scale, dtype=dtype, accumulate=accumulate),
            backward_envelope(x2, A, B, gsdy, scale=1.0, dtype=dtype, accumulate=accumulate)]
    dx_l = qmax([lora[0][0], lora[1][0]])
    dA = qmax([lora[0][1], lora[1][1]])
    dB = qmax([lora[0][2], lora[1][2]])
    dyW = round_d(dot(dy2, W, U), U)
    gm1dyW = round_d(dot(round_d(_mul_q(gm1, dy2, U), U), W, U), U)
    gdyW = round_d(dot(gdy, W, U), U)
    dx = qmax([sum_any([dyW, gm1dyW, dx_l], U), sum_any([gdyW, dx_l], U)])
    # dm = (sum_N dy * (x W^T) + sum_N (s dy) * (x A^T) B^T) / n, or sum_N dy * (x W^T + s x A^T B^T) / n
    z = round_d(dot(x2, W.T, U), U)
    h = round_d(dot(x2, A.T, U), U)
    lo = round_d(dot(h, B.T, U), U)
    sdy = round_d(mul_s(dy2, scale, U, e_s), U)
    ls = round_d(mul_s(lo, scale, U, e_s), U)
    zs = [z] if b is None else [z, round_d(add(sum_any([z, b], U), b, U, sign=-1.0), U)]  # PEFT: base(x) - bias
    dg = qmax([round_d(add(_colsum_of_products(dy2, zz, U), _colsum_of_products(t, l_, U), U), U)
               for zz in zs for t, l_ in ((sdy, lo), (dy2, ls))]
              + [_colsum_of_products(dy2, as_rows(forward_envelope(x2, A, B, scale=scale, W=W, dtype=dtype,
                                                                 accumulate=accumulate), O), U)])
    dm = _divide_q(dg, n, U)
    dx = Q(dx.v.reshape(xq.v.shape), dx.e.reshape(xq.v.shape), dx.m.reshape(xq.v.shape))
    return dx, dA, dB, dm
