"""Error envelopes: how far ANY legitimate evaluation in dtype d can land from the exact result, per element.

A candidate computing in dtype d is judged against the exact result of the
math on its own inputs (already values of d). Its legitimate freedom is a
class of evaluations, not one order:

* dot products accumulated in the working precision a (float32 by default, or
  wider) in any order or blocking, with any terms fused into the accumulator
  (bias or LoRA output added by addmm, W added inside a merge GEMM);
* every intermediate at a product boundary rounded to d, or kept in a
  (h = x A^T, s h, the product with B^T, the merge delta, an SGD update);
* the scale s applied to any factor of the product chain (x, A, h, B, the
  LoRA output), and held as s, fl_a(s) or fl_d(s);
* the base output, bias and LoRA output summed in any order, with or without
  a rounding between.

``Q`` carries, per element, the exact value ``v`` (float64), a bound ``e`` on
|held - exact| over the whole class, and the magnitude ``m`` (the same
computation on absolute values; it bounds float64's own error). Each
operation below propagates ``e`` rigorously, with the standard model
fl(a op b) = (a op b)(1 + delta) + eta, |delta| <= u (Higham, section 2.2):

    round to d (optional)   e' = e + u_d (|v| + e) + eta_d
    product s * q           e' = |s| e + e_s (|v| + e),  then one rounding in a
    dot a . b of length K   e' = |a| e_b + e_a (|b| + e_b) + ((1 + u_a)^K - 1) (|a| + e_a) . (|b| + e_b) + 2 K eta_a
    sum a + b               e' = e_a + e_b,  then one rounding in a

An operation is *certified exact* (e' = e = 0, no rounding at all) when its
inputs are exact and every partial result of every order is representable:
a dot product whose terms are multiples of a power of two g (the product of
the operands' grids) with Sum|terms| < 2^p_a g and g at least a's smallest
normal; a rounding to d of a value that is a normal number (or zero) of d.
Where a whole chain is certified, every legitimate evaluation gives exactly
the reference and the tolerance is 0: this is where systematic errors (a
scale off by 0.5 %) show in bfloat16.

The evaluation class is the max over concrete paths (scale placements,
fusions), each bounded as above; see docs/derivations/tolerance.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from ..backend import dtype_name
from .emulation import DTYPES, np_dtype

__all__ = ["Q", "Units", "backward_envelope", "forward_envelope", "lora_bias_grad_envelope", "merge_envelope",
           "units"]  # train_envelope: reflora.testing.envelope_train

_P = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
_TINY = {"float64": 2.0**-1022, "float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}
_MAX = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max),
        "float16": 65504.0, "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)}
ACCUMULATE = ("float32", "float64", "dtype")


@dataclasses.dataclass(frozen=True)
class Units:
    """The arithmetic of one class: d (storage) and a (working/accumulation, never coarser than d)."""

    d: str
    a: str
    u_d: float
    u_a: float
    eta_d: float
    eta_a: float


def units(dtype: Any, accumulate: str = "float32") -> Units:
    """Units for dtype d with accumulation ``accumulate`` ("float32", "float64" or "dtype")."""
    d = dtype if dtype in _P else dtype_name(dtype)
    if d not in _P:
        raise TypeError(f"dtype {dtype!r}; expected one of {DTYPES}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate is {accumulate!r}; expected one of {ACCUMULATE}")
    acc = d if accumulate == "dtype" else accumulate
    a = d if _P[d] >= _P[acc] else acc
    # eta: the smallest normal number, so flush-to-zero is covered as well as gradual underflow
    return Units(d, a, 2.0 ** -_P[d], 2.0 ** -_P[a], _TINY[d], _TINY[a])


class Q(NamedTuple):
    """Exact value v, error bound e over the evaluation class, magnitude m (all float64 arrays)."""

    v: np.ndarray
    e: np.ndarray
    m: np.ndarray

    @property
    def T(self) -> "Q":
        return Q(self.v.T, self.e.T, self.m.T)


def exact(a: Any) -> Q:
    """An input: a value of d held exactly."""
    v = np.asarray(a, dtype=np.float64)
    return Q(v, np.zeros_like(v), np.abs(v))


def _rep(v: np.ndarray, fmt: str) -> np.ndarray:
    """v is a normal number of fmt, or zero (so rounding it, even with flush-to-zero, is exact)."""
    av = np.abs(v)
    ok = (v == 0) | ((av >= _TINY[fmt]) & (av <= _MAX[fmt]))
    if fmt == "float64":
        return ok
    with np.errstate(over="ignore", invalid="ignore"):
        r = v.astype(np.float32)
        if fmt == "bfloat16":
            r = r.astype(np_dtype("bfloat16"))  # exact if v is a bfloat16 value; otherwise differs
        elif fmt == "float16":
            r = v.astype(np.float16)
        return ok & (r.astype(np.float64) == v)


def overflow_to_inf(e: np.ndarray, v: np.ndarray, fmt: str) -> np.ndarray:
    """Where a held value may exceed fmt's range the class includes inf: no bound (inf)."""
    return np.where(np.abs(v) + e >= _MAX[fmt], np.inf, e)


def round_d(q: Q, U: Units) -> Q:
    """The value may be rounded to d here (or kept in a): the max of both."""
    if U.d == U.a:  # held values already are values of d
        return q
    ex = (q.e == 0) & _rep(q.v, U.d)
    e = np.where(ex, 0.0, q.e + U.u_d * (np.abs(q.v) + q.e) + U.eta_d)
    return Q(q.v, overflow_to_inf(e, q.v, U.d), q.m)


def round_work(v, e_in, m, U: Units, exact64: Any = True) -> Q:
    """One rounding in the working precision a, skipped where it is certified exact.

    ``exact64``: where float64 computed v exactly (inputs held exactly have at most p_a <= 24 bits when a
    is not float64, so their products are exact in float64; sums are checked by the caller).
    """
    if U.a == "float64":  # products and sums of 53-bit values: no certificate but an exact zero
        ex = (e_in == 0) & (v == 0)
    else:
        ex = (e_in == 0) & _rep(v, U.a) & exact64
    e = np.where(ex, e_in, e_in + U.u_a * (np.abs(v) + e_in) + U.eta_a)
    return Q(v, overflow_to_inf(e, v, U.a), m)


def scalar_error(s: float, U: Units) -> float:
    """e_s = max |s - held s| over s as given (float64), fl_a(s), fl_d(s), and fl_d(fl_32(s)) (a conversion
    through float32, as torch's double -> half does)."""
    from ..numerics.rounding import round_to_dtype  # noqa: PLC0415

    s = float(s)
    held = [s]
    with np.errstate(over="ignore"):
        for fmt in {U.a, U.d} - {"float64"}:
            held.append(float(round_to_dtype(np.array([s]), fmt)[0]))
            held.append(float(round_to_dtype(np.array([s], np.float32).astype(np.float64), fmt)[0]))
    return max(abs(s - h) for h in held)


def mul_s(q: Q, s: float, U: Units, e_s: float | None = None) -> Q:
    """s * q with s held as s, fl_a(s) or fl_d(s), one rounding in a."""
    s = float(s)
    e_s = scalar_error(s, U) if e_s is None else e_s
    v = s * q.v
    e_in = abs(s) * q.e + e_s * (np.abs(q.v) + q.e)
    return round_work(v, e_in, (abs(s) + e_s) * q.m, U)


def mul_e(q: Q, w: np.ndarray, U: Units) -> Q:
    """q * w elementwise, w exact (a dropout mask), one rounding in a."""
    aw = np.abs(w)
    return round_work(q.v * w, q.e * aw, q.m * aw, U)


def add(a: Q, b: Q, U: Units, sign: float = 1.0) -> Q:
    """a + sign * b, one rounding in a."""
    bv = sign * b.v
    v = a.v + bv
    z = v - a.v
    err = (a.v - (v - z)) + (bv - z)  # TwoSum: float64's own rounding error of the sum
    return round_work(v, a.e + b.e, a.m + b.m, U, exact64=(err == 0))


def _grid(v: np.ndarray) -> float:
    """The largest power of two dividing every element (inf for all zeros, 0 if not finite)."""
    nz = v[v != 0]
    if nz.size == 0:
        return math.inf
    if not np.all(np.isfinite(nz)):
        return 0.0
    mant, ex = np.frexp(nz)
    k = np.abs(mant * 2.0**53).astype(np.int64)
    low = (k & -k).astype(np.float64)
    return float(np.min(np.ldexp(low, ex - 53)))


def dot(a: Q, b: Q, U: Units, plus: Sequence[Q] = ()) -> Q:
    """a @ b (+ terms fused into the accumulator), accumulated in a in any order."""
    va, vb = np.abs(a.v), np.abs(b.v)
    v = a.v @ b.v
    M = va @ vb
    if a.e.any() or b.e.any():
        e_in = va @ b.e + a.e @ (vb + b.e)
    else:
        e_in = np.zeros_like(M)
    m = a.m @ b.m
    for p in plus:
        v = v + p.v
        M = M + np.abs(p.v)
        e_in = e_in + p.e
        m = m + p.m
    g = 0.0
    if (e_in == 0).any():  # the grid only matters where the inputs are exact
        g = _grid(a.v) * _grid(b.v) if M.size else math.inf
        for p in plus:
            g = min(g, _grid(p.v))
    K = a.v.shape[-1] + len(plus)
    Mt = M + e_in
    if (e_in == 0).any():
        ex = (e_in == 0) & ((M == 0) | ((M < 2.0 ** -math.log2(U.u_a) * g) & (g >= U.eta_a)))
    else:  # no element has exact inputs: nothing to certify
        ex = np.zeros(M.shape, dtype=bool)
    theta = math.expm1(K * math.log1p(U.u_a))  # (1 + u)^K - 1: every term passes <= K roundings
    e = np.where(ex, e_in, e_in + theta * Mt + 2 * K * U.eta_a)
    return Q(v, overflow_to_inf(e, v, U.a), m)


def qmax(qs: Sequence[Q]) -> Q:
    """The class of several paths to the same value: the largest error bound."""
    e = qs[0].e
    for q in qs[1:]:
        e = np.maximum(e, q.e)
    return Q(qs[0].v, e, qs[0].m)


def sum_any(parts: Sequence[Q], U: Units) -> Q:
    """The sum of 1-3 parts in any order, any partial sum optionally rounded to d, the result rounded."""
    if len(parts) == 1:
        return round_d(parts[0], U)
    if len(parts) == 2:
        return round_d(add(parts[0], parts[1], U), U)
    paths = []
    for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
        paths.append(round_d(add(round_d(add(parts[i], parts[j], U), U), parts[k], U), U))
    return qmax(paths)


def quantity(a: Any) -> Q | None:
    if a is None or isinstance(a, Q):
        return a
    return exact(a)


def as_rows(q: Q, I: int) -> Q:
    return Q(q.v.reshape(-1, I), q.e.reshape(-1, I), q.m.reshape(-1, I))


PLACEMENTS = ("x", "A", "h", "B", "l")


def _lora_paths(xm: Q, A: Q, B: Q, s: float, U: Units, e_s: float):
    """(placement, X, Aq, Bq, h, hs) for each placement of the scale in s ((xm A^T) B^T)."""
    h0 = round_d(dot(xm, A.T, U), U)  # shared by the placements after h
    for P in PLACEMENTS:
        X = round_d(mul_s(xm, s, U, e_s), U) if P == "x" else xm
        Aq = round_d(mul_s(A, s, U, e_s), U) if P == "A" else A
        Bq = round_d(mul_s(B, s, U, e_s), U) if P == "B" else B
        h = round_d(dot(X, Aq.T, U), U) if P in ("x", "A") else h0
        hs = round_d(mul_s(h, s, U, e_s), U) if P == "h" else h
        yield P, X, Aq, Bq, h, hs


def forward_envelope(x, A, B, *, scale, W=None, bias=None, dropout_mask=None, lora_bias=None, dtype,
                     accumulate="float32") -> Q:
    """The envelope of y = x W^T + bias + s ((x * m) A^T B^T + c) over the evaluation class; Q of shape (..., O).

    Inputs are host arrays (values of ``dtype``) or ``Q`` (held with an error bound, e.g. A and B after SGD
    steps, or a merged W). ``lora_bias`` is c (O,), PEFT's lora_B.bias (None: no c).
    """
    U = units(dtype, accumulate)
    xq, A, B, W, b, c = map(quantity, (x, A, B, W, bias, lora_bias))
    lead, I, O = xq.v.shape[:-1], xq.v.shape[-1], B.v.shape[0]
    x2 = as_rows(xq, I)
    xm = x2 if dropout_mask is None else round_d(mul_e(x2, np.asarray(dropout_mask, np.float64).reshape(-1, I), U), U)
    e_s = scalar_error(scale, U)
    paths = []
    cs = None if c is None else round_d(mul_s(c, scale, U, e_s), U)
    for P, X, Aq, Bq, h, hs in _lora_paths(xm, A, B, scale, U, e_s):
        if c is None:
            l_ = round_d(dot(hs, Bq.T, U), U)
            paths.append(round_d(mul_s(l_, scale, U, e_s), U) if P == "l" else l_)
        elif P == "l":  # (h B^T + c) s: c in the accumulator (addmm, as nn.Linear) or added after
            for l_ in (round_d(dot(hs, Bq.T, U, plus=[c]), U), sum_any([round_d(dot(hs, Bq.T, U), U), c], U)):
                paths.append(round_d(mul_s(l_, scale, U, e_s), U))
        else:  # the scale went in before B: c is scaled on its own
            paths += [round_d(dot(hs, Bq.T, U, plus=[cs]), U), sum_any([round_d(dot(hs, Bq.T, U), U), cs], U)]
    L = qmax(paths)
    if W is None:
        y = sum_any([L] if b is None else [L, b], U)
    else:
        extra = [] if b is None else [b]
        WT = W.T
        variants = [sum_any([round_d(dot(x2, WT, U), U), L] + extra, U),                   # separate
                    sum_any([round_d(dot(x2, WT, U, plus=[L]), U)] + extra, U)]           # addmm(L, x, W^T)
        if b is not None:
            variants += [sum_any([round_d(dot(x2, WT, U, plus=[b]), U), L], U),           # F.linear(x, W, b)
                         round_d(dot(x2, WT, U, plus=[b, L]), U)]                          # all in one accumulator
        y = qmax(variants)
    return Q(y.v.reshape(lead + (O,)), y.e.reshape(lead + (O,)), y.m.reshape(lead + (O,)))


def backward_envelope(x, A, B, dy, *, scale, W=None, dropout_mask=None, dtype, accumulate="float32"):
    """Envelopes of (dx, dA, dB), the gradients of sum(y * dy), over the class (autograd of any forward path)."""
    U = units(dtype, accumulate)
    xq, A, B, W, dyq = map(quantity, (x, A, B, W, dy))
    I, O = xq.v.shape[-1], B.v.shape[0]
    x2, dy2 = as_rows(xq, I), as_rows(dyq, O)
    mask = None if dropout_mask is None else np.asarray(dropout_mask, np.float64).reshape(-1, I)
    xm = x2 if mask is None else round_d(mul_e(x2, mask, U), U)
    e_s = scalar_error(scale, U)
    out = {"dx": [], "dA": [], "dB": []}
    dh0 = round_d(dot(dy2, B, U), U)  # dy B: shared by the placements before B
    dyW = None if W is None else round_d(dot(dy2, W, U), U)
    for P, X, Aq, Bq, h, hs in _lora_paths(xm, A, B, scale, U, e_s):
        dl = round_d(mul_s(dy2, scale, U, e_s), U) if P == "l" else dy2
        dBq = round_d(dot(dl.T, hs, U), U)
        out["dB"].append(round_d(mul_s(dBq, scale, U, e_s), U) if P == "B" else dBq)
        dhs = round_d(dot(dl, Bq, U), U) if P in ("B", "l") else dh0
        dh = round_d(mul_s(dhs, scale, U, e_s), U) if P == "h" else dhs
        dAq = round_d(dot(dh.T, X, U), U)
        out["dA"].append(round_d(mul_s(dAq, scale, U, e_s), U) if P == "A" else dAq)
        dX = round_d(dot(dh, Aq, U), U)
        dxm = round_d(mul_s(dX, scale, U, e_s), U) if P == "x" else dX
        dxl = dxm if mask is None else round_d(mul_e(dxm, mask, U), U)
        if W is None:
            out["dx"].append(round_d(dxl, U))
        else:
            out["dx"] += [sum_any([dxl, dyW], U), round_d(dot(dy2, W, U, plus=[dxl]), U)]
    dx = qmax(out["dx"])
    dx = Q(dx.v.reshape(xq.v.shape), dx.e.reshape(xq.v.shape), dx.m.reshape(xq.v.shape))
    return dx, qmax(out["dA"]), qmax(out["dB"])


def lora_bias_grad_envelope(dy, *, scale, dtype, accumulate="float32") -> Q:
    """The envelope of dc = s sum_N dy (the gradient of PEFT's lora_B.bias c), the scale before or after."""
    U = units(dtype, accumulate)
    dyq = quantity(dy)
    O = dyq.v.shape[-1]
    dy2 = as_rows(dyq, O)
    ones = exact(np.ones((1, dy2.v.shape[0])))
    e_s = scalar_error(scale, U)
    after = round_d(mul_s(round_d(dot(ones, dy2, U), U), scale, U, e_s), U)
    before = round_d(dot(ones, round_d(mul_s(dy2, scale, U, e_s), U), U), U)
    out = qmax([after, before])
    return Q(out.v.reshape(O), out.e.reshape(O), out.m.reshape(O))


def merge_envelope(W, A, B, *, scale, dtype, accumulate="float32") -> Q:
    """W' = W + s B A over the class: PEFT (delta in a or d, cast, added), torchtune (W + (s B) A),
    loralib (W + (B A) s), s on A, and addmm(W, B, A, alpha=s). Unmerge is scale -> -scale."""
    U = units(dtype, accumulate)
    W, A, B = map(quantity, (W, A, B))
    e_s = scalar_error(scale, U)
    variants = []
    for P in ("B", "A", "out"):
        Bq = round_d(mul_s(B, scale, U, e_s), U) if P == "B" else B
        Aq = round_d(mul_s(A, scale, U, e_s), U) if P == "A" else A
        D = round_d(dot(Bq, Aq, U), U)
        if P == "out":
            D = round_d(mul_s(D, scale, U, e_s), U)
        else:
            variants.append(round_d(dot(Bq, Aq, U, plus=[W]), U))
        variants.append(sum_any([W, D], U))
    return qmax(variants)
