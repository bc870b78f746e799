"""A correctly rounded LoRA merge: W' = RN(W + s B A), rounded once to W's dtype.

    W'_OI = RN_dtype(W_OI + s B_OR A_RI)           merge
    W_OI  = RN_dtype(W'_OI - s B_OR A_RI)          unmerge
    bias' = RN_dtype(bias_O + s c_O)               with PEFT's lora_bias c

RN_dtype is round-to-nearest-even of the *exact* real value to W's dtype
(bfloat16, float16 or float32): every merged element is the representable
number nearest to W + s B A, within 0.5 ulp. How:

1. r = W + s (B A) in float64, rows at a time (bounded memory). (For a
   bfloat16 or float16 W the same certified scheme runs in float32 first,
   ``reflora.numerics.merge_f32``, and only its rare uncertain elements come
   here: same result, bit for bit, several times faster.)
2. A rigorous bound e >= |r - exact| (products of bf16/fp16/fp32 numbers are
   exact in float64; the R-term sum, the scaling and the add each round once):
       e = 2 (R + 3) u (|s| sum_k |B_ok| max_i |A_ki| + |W_oi|),  u = 2^-53
3. If no rounding midpoint of W's dtype lies within e of r, every real number
   in [r - e, r + e], the exact value included, rounds to the same element as
   r: it is correct (``certainly_rounded``). Otherwise (a
   value within about 1e-14 relative of a rounding midpoint: almost never in
   practice, but easy to construct) the element is recomputed exactly with
   Python ``fractions.Fraction`` and rounded exactly.

DoRA (``dora_merge``): W' = RN((m / n) (W + s B A)), n = ||W + s B A||_row,
rounded once from float64 to W's dtype; ``dora_unmerge`` needs n from merge time
(W' alone does not determine it: ||W'_o|| = |m_o|), as PEFT caches it. Neither is
certified correctly rounded (sqrt and division are involved).

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

from .._validate import (_check_arrays, _check_lowrank, _check_row_norms, _check_scale, _check_vector,
                         _legacy_arguments)
from ..backend import to_numpy
from .merge_f32 import FLOAT64_BLOCK_BYTES
from .merge_f32 import add_lowrank as add_lowrank_f32
from .rounding import BF16, certainly_rounded, round_fraction, round_to_dtype

__all__ = ["DoraMerged", "Merged", "dora_merge", "dora_unmerge", "merge", "unmerge"]

_U = 2.0 ** -53
# float64 work per block of rows in the merge loop (at least one row). Small on purpose: it
# bounds the extra memory, and temporaries under glibc's 128 KiB mmap threshold are reused
# from the heap instead of being mapped and zeroed afresh (measured 4x faster than 8 MiB).
_BLOCK_BYTES = FLOAT64_BLOCK_BYTES


class Merged(NamedTuple):
    """The merged (or unmerged) weight in W's dtype, and the bias (None when none was given)."""

    weight: Any
    bias: Any


class DoraMerged(NamedTuple):
    """The merged weight (W's dtype) and the row norms n (float64, host) that ``dora_unmerge`` needs."""

    weight: Any
    norm: Any


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
    """RN(w + s b64 a64) in w's dtype: the float32 speed path where it applies, else float64 (same bits)."""
    fast = add_lowrank_f32(w, a64, b64, s)
    return fast if fast is not None else add_lowrank_float64(w, a64, b64, s)


def add_lowrank_float64(w: np.ndarray, a64: np.ndarray, b64: np.ndarray, s: float) -> np.ndarray:
    """RN(w + s b64 a64) in w's dtype, by row blocks of float64; w (O, I), a64 (R, I), b64 (O, R).

    The reference path (and the speed path's oracle in tests/numerics/test_merge_f32.py).
    """
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
    if not isinstance(fan_in_fan_out, (bool, np.bool_)):
        raise TypeError(f"fan_in_fan_out is {fan_in_fan_out!r:.80} ({type(fan_in_fan_out).__name__}); expected "
                        "True or False")
    fan_in_fan_out = bool(fan_in_fan_out)
    for name, a in (("W", W), ("A", A), ("B", B)):
        if a is None:
            raise TypeError(f"{name} is NoneType; expected an array")
    xp = _check_arrays(("W", "A", "B", "bias", "lora_bias"), (W, A, B, bias, lora_bias))
    w, a, b = _host_float(W, "W"), _host_float(A, "A"), _host_float(B, "B")
    R, I, O = _check_lowrank(w, a, b, fan_in_fan_out=fan_in_fan_out)
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
        _check_vector("bias", hb, O)
        _check_vector("lora_bias", hc, O)
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


def dora_row_norms(xp: Any, W: Any, A: Any, B: Any, s: float) -> tuple[Any, Any]:
    """(V, n): the adapted weight V = W + s B A (O x I) and its row norms n = ||V_o||_2 (O,), in xp."""
    # V = W + s B A: the O x I adapted weight (DoRA's norm needs it; PEFT forms it too)
    V = W + s * xp.matmul(B, A)
    if V.dtype == getattr(xp, "float16", None):
        # Note: float16's sum of squares overflows (65504) once a row norm reaches 256; accumulate
        # in float32 and round n back to float16, as torch.linalg.norm (PEFT's get_weight_norm) does.
        V32 = xp.astype(V, xp.float32)
        return V, xp.astype(xp.sqrt(xp.sum(V32 * V32, axis=1)), xp.float16)
    # n = ||V_o||_2 per output row
    return V, xp.sqrt(xp.sum(V * V, axis=1))


def _dora_operands(func, W, A, B, legacy, magnitude, m):
    if legacy or m is not None:
        magnitude = _legacy_arguments(func, legacy, ("magnitude",), {"magnitude": magnitude},
                                      {"m": ("magnitude", m)}, depth=2)["magnitude"]
    if magnitude is None:
        raise TypeError(f"{func}() needs magnitude=, the DoRA magnitude m (O,); got None")
    xp = _check_arrays(("W", "A", "B", "magnitude"), (W, A, B, magnitude))
    w = _host_float(W, "W")
    a, b, mm = (_host_float(v, n).astype(np.float64) for v, n in ((A, "A"), (B, "B"), (magnitude, "magnitude")))
    _, _, O = _check_lowrank(w, a, b)
    _check_vector("magnitude", mm, O)
    return xp, w, a, b, mm


def dora_merge(W, A, B, *legacy, magnitude=None, scale, m=None) -> DoraMerged:
    """Fold a DoRA adapter into W: W' = RN((m / n) * (W + s B A)), n = ||W + s B A||_row.

    Computed in float64 on the host and rounded once to W's dtype (bfloat16
    included); not certified correctly rounded (see the module docstring).
    The old form ``dora_merge(W, A, B, m, ...)`` (and ``m=``) still works, with a
    DeprecationWarning.

    Args:
      W: (O, I); A: (R, I); B: (O, R); any floating dtypes.
      magnitude: m, (O,) (PEFT's ``lora_magnitude_vector``).
      scale: s.

    Returns:
      ``DoraMerged(weight, norm)``: weight in W's namespace and dtype; norm the
      float64 host row norms that ``dora_unmerge`` needs.

    Raises:
      ValueError: shapes that do not fit; a row with n = 0 or n not finite.
      TypeError: non-arrays, non-floating dtypes or mixed libraries.

    Example:
      >>> import numpy as np
      >>> r = dora_merge(np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.zeros((1, 1)), magnitude=np.array([10.0]),
      ...                scale=1.0)
      >>> r.weight.tolist(), r.norm.tolist()
      ([[6.0, 8.0]], [5.0])
    """
    s = _check_scale(scale)
    xp, w, a, b, mm = _dora_operands("dora_merge", W, A, B, legacy, magnitude, m)
    V, n = dora_row_norms(np, w.astype(np.float64), a, b, s)
    _check_row_norms(np, n)
    out = round_to_dtype((mm / n)[:, None] * V, w.dtype)
    return DoraMerged(out if isinstance(W, np.ndarray) else xp.asarray(out), n)


def dora_unmerge(W, A, B, *legacy, magnitude=None, scale, norm, m=None):
    """Take a DoRA adapter back out: W = RN(W' * (n / m) - s B A), with n from ``dora_merge``.

    Args:
      W: (O, I) the merged weight W'; A, B, magnitude, scale: as for ``dora_merge``.
      norm: (O,) the row norms returned by ``dora_merge`` (PEFT caches the same).

    Returns:
      The unmerged weight in W's namespace and dtype (float64 round trip: equal
      up to rounding; bfloat16: not an identity, as for ``reflora.unmerge``).

    Raises:
      ValueError: shapes that do not fit, or a magnitude with a zero entry (n / m undefined).

    Example:
      >>> import numpy as np
      >>> W = np.array([[3.0, 4.0]]); A = np.zeros((1, 2)); B = np.zeros((1, 1)); m = np.array([10.0])
      >>> r = dora_merge(W, A, B, magnitude=m, scale=1.0)
      >>> dora_unmerge(r.weight, A, B, magnitude=m, scale=1.0, norm=r.norm).tolist()
      [[3.0, 4.0]]
    """
    s = _check_scale(scale)
    xp, w, a, b, mm = _dora_operands("dora_unmerge", W, A, B, legacy, magnitude, m)
    n = np.asarray(to_numpy(norm), dtype=np.float64)
    if n.shape != mm.shape:
        raise ValueError(f"norm has shape {n.shape}; expected (O,) = {mm.shape}, as returned by dora_merge")
    if np.any(mm == 0):
        raise ValueError(f"magnitude is 0 in rows {np.nonzero(mm == 0)[0].tolist()[:10]}; expected m != 0 to "
                         "unmerge (the merged row is 0 and its direction is lost)")
    out = round_to_dtype((n / mm)[:, None] * w.astype(np.float64) - s * (b @ a), w.dtype)
    return out if isinstance(W, np.ndarray) else xp.asarray(out)
