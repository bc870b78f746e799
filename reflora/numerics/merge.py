"""A correctly rounded LoRA merge: W' = RN(W + s B A), rounded once to W's dtype.

    W'_OI = RN_dtype(W_OI + s B_OR A_RI)           merge
    W_OI  = RN_dtype(W'_OI - s B_OR A_RI)          unmerge
    bias' = RN_dtype(bias_O + s c_O)               with PEFT's lora_bias c

RN_dtype is round-to-nearest-even of the *exact* real value to W's dtype
(bfloat16, float16 or float32): every merged element is the representable
number nearest to W + s B A, within 0.5 ulp. How:

1. r = W + s (B A) in float64, rows at a time (bounded memory).
2. A rigorous bound e >= |r - exact| (products of bf16/fp16/fp32 numbers are
   exact in float64; the R-term sum, the scaling and the add each round once):
       e = 2 (R + 3) u (|s| sum_k |B_ok| max_i |A_ki| + |W_oi|),  u = 2^-53
3. If no rounding midpoint of W's dtype lies within e of r, every real number
   in [r - e, r + e], the exact value included, rounds to the same element as
   r: it is correct (``certainly_rounded``). Otherwise (a
   value within about 1e-14 relative of a rounding midpoint: almost never in
   practice, but easy to construct) the element is recomputed exactly with
   Python ``fractions.Fraction`` and rounded exactly.

RN_dtype from float64 is itself done with care: ml_dtypes (and torch) convert
float64 -> bfloat16 through float32, which rounds twice. For example
1 + 2^-8 + 2^-30 becomes 1.0 instead of 1 + 2^-7. reflora rounds to float32
*to odd* first (truncate, then set the last bit if anything was cut), which
makes the second rounding correct (Boldo & Melquiond 2008).

Why it matters. PEFT's ``merge`` computes delta = s B A in the adapter's dtype
(on CPU in float32 for bf16 adapters), rounds delta to bf16, then adds it to W
in bf16: two roundings. Where W and the update nearly cancel, the first
rounding (relative to |delta|) is many ulps of the result: on a 24 x 32 bf16
layer in tests/numerics/test_merge.py, 165 of 768 elements of PEFT's merge differ from
the correctly rounded one, by up to 8 bfloat16 steps.
This is one of the sources of the merged-vs-unmerged output gaps PEFT users
report in bf16 (PEFT issues 1035, 1388, 1904, 2502); the other, unavoidable
one is that the unmerged path never rounds W + s B A at all.

Merge then unmerge is not an identity in low precision, even correctly
rounded: RN(RN(W + d) - d) = RN(W + delta) with |delta| <= ulp(W')/2, so an
element can come back one ulp away from W. Measured in tests/numerics/test_merge.py
(a 64 x 64 bf16 W, rank-16 float32 update): 4.1% of the elements move, none
by more than one ulp of max(|W|, |W'|). Keep the original W if you need
it back.

For a float64 W the result is r itself: accurate to about (R + 3) ulp, not
certified correctly rounded (reflora has no wider float to check it with).

This module works on the host in NumPy (bfloat16 from ml_dtypes): bfloat16
and the bit-level rounding are not in the array API. Arrays from other
libraries are copied to the host and the result is returned in W's namespace.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from .._validate import _check_scale
from ..backend import array_namespace, to_numpy
from .rounding import BF16, certainly_rounded, round_fraction, round_to_dtype

__all__ = ["Merged", "merge", "unmerge"]

_U = 2.0 ** -53
# float64 work per block of rows in the merge loop (at least one row). Small on purpose: it
# bounds the extra memory, and temporaries under glibc's 128 KiB mmap threshold are reused
# from the heap instead of being mapped and zeroed afresh (measured 4x faster than 8 MiB).
_BLOCK_BYTES = 64 << 10


class Merged(NamedTuple):
    """The merged (or unmerged) weight in W's dtype, and the bias (None when none was given)."""

    weight: Any
    bias: Any


def _host_float(a: Any, name: str) -> np.ndarray:
    h = np.asarray(to_numpy(a))
    if not (np.issubdtype(h.dtype, np.floating) or h.dtype == BF16):
        raise TypeError(f"{name} has dtype {h.dtype}; expected a floating dtype (bfloat16, float16, float32, float64)")
    return h


def _exact(w: float, a_col: np.ndarray, b_row: np.ndarray, s: float) -> Fraction:
    """w + s sum_k b_k a_k in exact rational arithmetic."""
    acc = sum((Fraction(float(bk)) * Fraction(float(ak)) for bk, ak in zip(b_row, a_col)), Fraction(0))
    return Fraction(float(w)) + Fraction(s) * acc


def _add_lowrank(w: np.ndarray, a64: np.ndarray, b64: np.ndarray, s: float) -> np.ndarray:
    """RN(w + s b64 a64) in w's dtype, by row blocks; w (O, I), a64 (R, I), b64 (O, R)."""
    O, I = w.shape
    R = a64.shape[0]
    out = np.empty(w.shape, dtype=w.dtype)
    certify = w.dtype != np.float64
    # per-row bound on |s sum_k B_ok A_ki| for any column i: |s| sum_k |B_ok| max_i |A_ki|
    amax = np.max(np.abs(a64), axis=1) if I and R else np.zeros(R)
    row_bound = abs(s) * (np.abs(b64) @ amax) if R else np.zeros(O)
    rows = max(1, _BLOCK_BYTES // (8 * max(I, 1)))
    for o0 in range(0, O, rows):
        o1 = min(O, o0 + rows)
        w64 = w[o0:o1].astype(np.float64)
        # the float64 approximation r = w + s (B A), one block of rows
        r = w64 + s * (b64[o0:o1] @ a64)
        t = round_to_dtype(r, w.dtype)
        if certify:
            # rigorous error bound of r, with a factor 2 to spare
            e = (2.0 * (R + 3) * _U) * (row_bound[o0:o1, None] + np.abs(w64)) + 2.0 ** -1000
            with np.errstate(invalid="ignore", over="ignore"):
                # certain where r is further than e from the midpoints around t
                unsure = ~certainly_rounded(r, t, e, w.dtype) & np.isfinite(r)
            for oi, i in zip(*np.nonzero(unsure)):
                o = o0 + int(oi)
                t[oi, i] = round_fraction(_exact(w[o, i], a64[:, i], b64[o], s), w.dtype)
        out[o0:o1] = t
    return out


def _apply(W, A, B, s, bias, lora_bias, fan_in_fan_out):
    names = ("W", "A", "B", "bias", "lora_bias")
    arrays = (W, A, B, bias, lora_bias)
    for name, a in zip(names, arrays):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array")
    xp = array_namespace(*arrays, names=names)
    w, a, b = _host_float(W, "W"), _host_float(A, "A"), _host_float(B, "B")
    if a.ndim != 2:
        raise ValueError(f"A has shape {a.shape}; expected (R, I)")
    R, I = a.shape
    if b.ndim != 2 or b.shape[1] != R:
        raise ValueError(f"B has shape {b.shape}; expected (O, R) = (O, {R}), R taken from A")
    O = b.shape[0]
    want = (I, O) if fan_in_fan_out else (O, I)
    if w.shape != want:
        letters = "(I, O)" if fan_in_fan_out else "(O, I)"
        raise ValueError(f"W has shape {w.shape}; expected {letters} = {want}, O taken from B and I from A")
    w_OI = w.T if fan_in_fan_out else w
    merged = _add_lowrank(w_OI, a.astype(np.float64), b.astype(np.float64), s)
    if fan_in_fan_out:
        merged = np.ascontiguousarray(merged.T)
    new_bias = bias
    if lora_bias is not None:
        if bias is None:
            raise ValueError("lora_bias was given but bias is None; expected the base bias (O,) to fold s c into "
                             "(PEFT refuses lora_bias on a layer without bias too)")
        hb, hc = _host_float(bias, "bias"), _host_float(lora_bias, "lora_bias")
        for name, v in (("bias", hb), ("lora_bias", hc)):
            if v.shape != (O,):
                raise ValueError(f"{name} has shape {v.shape}; expected (O,) = ({O},), O taken from B")
        # bias + s c is the merge of a rank-1 update with A = [[1]] and B = c
        new_bias = xp.asarray(_add_lowrank(hb[:, None], np.ones((1, 1)), hc.astype(np.float64)[:, None], s)[:, 0])
    return Merged(xp.asarray(merged) if not isinstance(W, np.ndarray) else merged, new_bias)


def merge(W, A, B, *, scale, bias=None, lora_bias=None, fan_in_fan_out=False) -> Merged:
    """Fold a LoRA update into the base weight, correctly rounded: W' = RN(W + s B A).

    Every element of W' is the value of W's dtype nearest to the exact
    W + s B A (ties to even); see the module docstring for how and why.

    Args:
      W: (O, I) base weight (or (I, O) with ``fan_in_fan_out``), any floating
        dtype including ml_dtypes.bfloat16; the result has its dtype.
      A: (R, I); B: (O, R); any floating dtypes (converted exactly to float64).
      scale: s (``LoraConfig.scale``: alpha/R, or alpha/sqrt(R) with rsLoRA).
      bias: optional base bias (O,), returned unchanged unless lora_bias is given.
      lora_bias: optional PEFT lora_bias c (O,): bias' = RN(bias + s c).
      fan_in_fan_out: W is stored transposed (GPT-2's Conv1D), as PEFT's flag.

    Returns:
      ``Merged(weight, bias)``: new arrays in W's namespace and dtype; nothing
      passed in is written.

    Raises:
      ValueError: shapes that do not fit, named in legend letters; lora_bias without bias.
      TypeError: non-arrays, non-floating dtypes, mixed array libraries.

    Example:
      >>> import numpy as np, ml_dtypes
      >>> W = np.ones((1, 1), dtype=ml_dtypes.bfloat16)
      >>> A = np.array([[2.0**-8 + 2.0**-30]]); B = np.ones((1, 1))
      >>> float(merge(W, A, B, scale=1.0).weight[0, 0])   # 1 + 2^-7, not 1.0
      1.0078125
    """
    return _apply(W, A, B, _check_scale(scale), bias, lora_bias, fan_in_fan_out)


def unmerge(W, A, B, *, scale, bias=None, lora_bias=None, fan_in_fan_out=False) -> Merged:
    """Take a LoRA update back out, correctly rounded: W = RN(W' - s B A).

    The same as ``merge`` with -s (and bias = RN(bias' - s c)). In bfloat16 or
    float16, unmerge(merge(W)) is not W: an element can move by one ulp.

    Args / Returns / Raises: as ``merge``.

    Example:
      >>> import numpy as np
      >>> W = np.float32([[1.0]]); A = np.ones((1, 1)); B = np.full((1, 1), 0.5)
      >>> unmerge(merge(W, A, B, scale=2.0).weight, A, B, scale=2.0).weight.tolist()
      [[1.0]]
    """
    return _apply(W, A, B, -_check_scale(scale), bias, lora_bias, fan_in_fan_out)
