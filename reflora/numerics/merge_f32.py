"""The merge's speed path: RN(W + s L R) for a bfloat16/float16 W, in float32, certified.

    W'_PQ = RN_dtype(W_PQ + s L_PR R_RQ)     L = B, R = A (or A^T, B^T for fan_in_fan_out)

The same correctly rounded result as ``reflora.numerics.merge`` (bit for bit:
both give the element of W's dtype nearest to the exact value), from about
15 float32/uint32 passes over cache-sized row blocks instead of float64 ones.

Derivation (u = 2^-24, the float32 unit roundoff; S_pq = sum_k |s L_pk R_kq|):

1. L' = fl32(s L), R' = fl32(R): |L'_pk - s L_pk| <= 2u |s L_pk| + eta and
   |R'_kq - R_kq| <= u |R_kq| + eta, eta = 2^-126 covering subnormals and
   flush-to-zero.
2. D = fl32(L' R') by any BLAS sgemm: any summation order, FMA or not,
   |D - L' R'| <= gamma_R sum_k |L'_pk R'_kq| (+ R eta (1 + max|L'| + max|R'|)),
   gamma_R = R u / (1 - R u) <= 1.001 R u for R <= 4096.
3. r = fl32(W + D): |r - (W + D)| <= ulp32(r)/2 <= 2^-24 |r| (r normal).
   Together, with x the exact W + s L R:
       |r - x| <= 2^-24 |r| + K,   K = 2 ((R + 4) 1.01 u max_p rho_p + eta (2 + (R + 2)(1 + max|L'| + max|R'|)))
   where rho_p = |s| sum_k |L_pk| max_q |R_kq| >= S_pq (the old merge's row
   bound), and the factor 2 is spare.
4. Rounding to a target of p significant bits (bfloat16 p = 8, float16
   p = 11) keeps the top p bits of r's significand: with h = 24 - p low bits,
   the midpoint above the truncated value T is M = T | 2^(h-1) (bit pattern),
   and |r| - |M| is exact in float32. If ||r| - |M|| > 2^-23 |r| + K (computed
   in float32 from rounded-up constants), no midpoint lies within the error
   bound (the next ones are at least 2^(h-2) ulp32(r) >= 2^(h-26) |r| away,
   which |r| >= LOW = 2^(25-h) 1.01 K makes safe), so RN(x) = RN(r), which is
   T rounded up when |r| > |M|. Every other element -- near a midpoint, tiny
   (|r| < LOW), outside the target's normal range, not finite -- is a
   candidate: recomputed in float64 from the inputs with the old bound
   e = 2 (R + 3) 2^-53 (sum_k |s L_pk R_kq| + |W|) and, if still unsure, with
   ``fractions.Fraction`` (``reflora.numerics.merge``'s own fallbacks).
5. Settling a candidate: where the float64 bound cannot decide, the exact
   value is often a midpoint itself (bfloat16-valued adapters leave few
   significant bits); if the float64 sum provably made no error (TwoSum at
   each step, exact products, s a power of two) it is rounded directly,
   else with ``fractions.Fraction``. A zero result follows the float64
   path: +0 (its Fraction fallback rounds the exact 0 to +0), except where
   that path could certify its own signed zero (error bound below half the
   smallest subnormal: float16, or bfloat16 with values below about
   2^-80); there its row block is replayed through ``add_lowrank_float64``
   itself (same BLAS calls, same bits). Inf/NaN inputs or overflow raise
   ``NeedsFloat64`` and the caller redoes the whole tensor in float64 (NaN
   payloads follow that path's arithmetic).

Typical candidate rate: 1e-4 to 1e-3 of the elements (a rank-16 update of a
bfloat16 weight with std 0.02 and a trained-size B), each costing a few float64
operations; about 2e-2 for PEFT's ``init_lora_weights=False`` adapters (B as
large as A), where the whole merge costs about 10 ns an element.

The arithmetic takes a namespace ``xp`` (NumPy, or CuPy on a GPU; CuPy's
float32 matmul must not use TF32, which ``check_gpu_float32`` enforces):
bfloat16 travels as its uint16 bits, so no bfloat16 dtype is needed there.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from typing import Any

import numpy as np

from .rounding import BF16, certainly_rounded, round_fraction, round_to_dtype

__all__: list[str] = []

F16 = np.dtype(np.float16)
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53
_ETA = 2.0 ** -126
#: elements per sub-block: the float32 work arrays (about 22 bytes an element) stay in a 2 MiB L2 cache
SUB_ELEMENTS = 1 << 16
#: target -> (h = 24 - p low bits dropped, lowest normal, largest finite)
_TARGETS = {BF16: (16, 2.0 ** -126, 3.3895313892515355e38), F16: (13, 2.0 ** -14, 65504.0)}
_MAX_RANK = 4096
#: float64 bytes per row block of ``reflora.numerics.merge.add_lowrank_float64`` (its zero replays need it)
FLOAT64_BLOCK_BYTES = 64 << 10
#: candidates x rank per float64 fix-up batch (bounds its memory: about 8 bytes a term plus 120 a candidate)
FIX_BATCH_TERMS = 1 << 16
_TINY = {BF16: 2.0 ** -133, F16: 2.0 ** -24}  # smallest subnormals


class NeedsFloat64(Exception):
    """A candidate whose result depends on the float64 path's own arithmetic (zero sign, NaN, overflow)."""


def supported(dtype: Any) -> bool:
    """True for the storage dtypes the float32 path handles (bfloat16, float16)."""
    return np.dtype(dtype) in _TARGETS


def _f32_bits(x: float) -> int:
    return int(np.array(x, np.float32).view(np.uint32))


def _f32_up(x: float) -> float:
    """The smallest float32 >= x (x finite, positive)."""
    v = np.float32(x)
    if float(v) < x:
        v = np.nextafter(v, np.float32(np.inf))
    return float(v)


class Plan:
    """The constants for one tensor: W_PQ (bf16/f16) + s L_PR R_RQ; ``ok`` is False where the path does not apply."""

    def __init__(self, dtype: Any, left: np.ndarray, right: np.ndarray, s: float, *, o_axis: int = 0):
        self.dtype = np.dtype(dtype)
        self.o_axis = o_axis  # 0: rows of W are O (L = B); 1: columns are (fan_in_fan_out, L = A^T)
        h, lowest, largest = _TARGETS[self.dtype]
        self.l64 = np.asarray(left, dtype=np.float64)
        self.r64 = np.asarray(right, dtype=np.float64)
        self.s = float(s)
        (P, R), Q = self.l64.shape, self.r64.shape[1]
        self.P, self.Q, self.R = P, Q, R
        with np.errstate(over="ignore", invalid="ignore"):
            self.l32 = np.ascontiguousarray((self.s * self.l64).astype(np.float32))
            self.r32 = np.ascontiguousarray(self.r64.astype(np.float32))
            finite = bool(np.all(np.isfinite(self.l64)) and np.all(np.isfinite(self.r64))
                          and np.all(np.isfinite(self.l32)) and np.all(np.isfinite(self.r32)))
            rmax = np.max(np.abs(self.r64), axis=1) if Q and R else np.zeros(R)
            rho = abs(self.s) * (np.abs(self.l64) @ rmax) if R else np.zeros(P)
            if o_axis == 0:  # the float64 path's row bound, per O index (for its zero results, see fix)
                self.rho_old = rho
            else:
                lmax = np.max(np.abs(self.l64), axis=0) if P and R else np.zeros(R)
                self.rho_old = abs(self.s) * (np.abs(self.r64).T @ lmax) if R else np.zeros(Q)
            self.old_rows = max(1, FLOAT64_BLOCK_BYTES // (8 * max(Q, 1)))  # the float64 path's row block
            # products of float32-representable numbers are exact in float64; s a power of two scales exactly
            self.exact_terms = bool(np.array_equal(self.l64, self.l64.astype(np.float32))
                                    and np.array_equal(self.r64, self.r64.astype(np.float32))
                                    and 2.0 ** -400 < abs(self.s) < 2.0 ** 400
                                    and math.frexp(abs(self.s))[0] == 0.5)
            big = 1.0 + (float(np.max(np.abs(self.l32))) if self.l32.size else 0.0) \
                + (float(np.max(np.abs(self.r32))) if self.r32.size else 0.0)
            k = 2.0 * ((R + 4) * 1.01 * _U32 * (float(np.max(rho)) if P else 0.0) + _ETA * (2 + (R + 2) * big))
        low = max(2.0 ** -100, lowest, 2.0 ** (25 - h) * 1.01 * k)
        self.ok = finite and R <= _MAX_RANK and math.isfinite(k) and low < largest
        if not self.ok:
            return
        self.K = np.float32(_f32_up(k))
        self.C = np.float32(2.0 ** -23)
        self.mask = np.uint32((0xFFFFFFFF << h) & 0xFFFFFFFF)
        self.half = np.uint32(1 << (h - 1))
        lowb = _f32_bits(low)
        if float(np.array(lowb, np.uint32).view(np.float32)) < low:
            lowb += 1
        self.lowb = np.uint32(lowb)
        self.spanb = np.uint32(_f32_bits(largest) - lowb)  # candidates: |r| bits - LOW bits >= span (wraps below LOW)
        self.h = h

    def device_copy(self, xp: Any) -> tuple[Any, Any]:
        """L', R' in namespace xp (CuPy: on the GPU)."""
        return xp.asarray(self.l32), xp.asarray(self.r32)

    def block(self, xp: Any, p0: int, w16: Any, out16: Any, work: dict, lr: tuple | None = None) -> Any:
        """Rows p0.. of W as uint16 bits (n, Q) into out16 (n, Q); returns the flat candidate indices (xp array).

        Candidates hold provisional bits in out16 until ``fix`` replaces them.
        """
        n, Q = w16.shape
        m = n * Q
        l32, r32 = lr if lr is not None else (self.l32, self.r32)
        r = work["r"][:m].reshape(n, Q)
        xp.matmul(l32[p0:p0 + n], r32, out=r)  # D = L' R' (float32 sgemm)
        wf = work["t"][:m].reshape(n, Q)
        if self.dtype == BF16:  # bfloat16 bits are the top half of float32 bits: exact widening
            xp.left_shift(w16, 16, out=wf.view(xp.uint32), dtype=xp.uint32)
        else:
            xp.copyto(wf, w16.view(xp.float16))
        xp.add(r, wf, out=r)  # r = fl32(W + D)
        absr = work["a"][:m].reshape(n, Q)
        xp.abs(r, out=absr)
        ab = absr.view(xp.uint32)
        mid = work["u"][:m].reshape(n, Q)
        xp.bitwise_and(ab, self.mask, out=mid)  # |M| = |T| with the half bit set: the midpoint above |T|
        xp.bitwise_or(mid, self.half, out=mid)
        d = mid.view(xp.float32)
        xp.subtract(absr, d, out=d)  # |r| - |M|, exact
        up = work["c"][:m].reshape(n, Q)
        xp.greater(d, 0, out=up)  # beyond the midpoint: round the magnitude up
        bits = r.view(xp.uint32)
        if self.dtype == BF16:
            xp.right_shift(bits, 16, out=out16, casting="unsafe")
        else:  # float16 bits: sign | (|r| bits >> 13) - (127 - 15) << 10, valid in float16's normal range
            tmp = wf.view(xp.uint32)
            xp.right_shift(ab, 13, out=tmp)
            xp.subtract(tmp, xp.uint32(112 << 10), out=tmp)
            xp.copyto(out16, tmp, casting="unsafe")
            xp.right_shift(bits, 16, out=tmp)
            xp.bitwise_and(tmp, xp.uint32(0x8000), out=tmp)
            xp.bitwise_or(out16, tmp, out=out16, casting="unsafe")
        xp.add(out16, up, out=out16, casting="unsafe")
        xp.abs(d, out=d)
        e = wf
        xp.multiply(absr, self.C, out=e)
        xp.add(e, self.K, out=e)  # e >= |r - x| (step 3)
        cand = up
        xp.less_equal(d, e, out=cand)
        span = mid
        xp.subtract(ab, self.lowb, out=span)
        far = work["c2"][:m].reshape(n, Q)
        xp.greater_equal(span, self.spanb, out=far)  # |r| < LOW, |r| >= largest finite, Inf, NaN
        xp.logical_or(cand, far, out=cand)
        return xp.flatnonzero(cand)

    def fix(self, p0: int, w: np.ndarray, out16: np.ndarray, idx: np.ndarray) -> int:
        """Replace the candidates' bits (host arrays; w in its own dtype, rows p0..); returns the Fraction count."""
        if idx.size == 0:
            return 0
        Q = self.Q
        p, q = idx // Q + p0, idx % Q
        wv = w.reshape(-1)[idx].astype(np.float64)
        prods = self.l64[p] * self.r64[:, q].T
        with np.errstate(over="ignore", invalid="ignore"):
            r = wv + self.s * prods.sum(axis=1)
            e = (2.0 * (self.R + 3) * _U64) * (abs(self.s) * np.abs(prods).sum(axis=1) + np.abs(wv)) + 2.0 ** -1000
        t = round_to_dtype(r, self.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            sure = certainly_rounded(r, t, e, self.dtype)
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(e))):
            raise NeedsFloat64  # Inf/NaN inputs or overflow: NaN payloads follow the float64 path's arithmetic
        # A zero result: the float64 path gives RN(exact) with RN(0) = +0 (its Fraction fallback) unless it
        # could certify its own +-0 (e_old < tiny/2), whose sign then follows its BLAS sum: replay its block.
        zero = t == 0
        if zero.any():  # (zero is used below too)
            sure &= ~zero
            zero_plus = (wv == 0) & ~np.signbit(wv) & np.all(prods == 0, axis=1)  # +0 + (+-0) = +0, any order
            o = p if self.o_axis == 0 else q
            e_old = (2.0 * (self.R + 3) * _U64) * (self.rho_old[o] + np.abs(wv)) + 2.0 ** -1000
            replay = zero & ~zero_plus & (e_old < _TINY[self.dtype] / 2 * 1.01)
            if replay.any():
                self._replay(p0, w, t, p[replay], q[replay], np.flatnonzero(replay))
                sure |= replay
        if self.exact_terms and not sure.all():
            # ties: with few significant bits (bf16-valued adapters) the exact value often IS a midpoint,
            # which no error bound can settle; where the float64 sum provably made no error it is exact
            j = np.flatnonzero(~sure & ~zero)
            rx, ok = _error_free_sum(wv[j], prods[j], self.s)
            t[j[ok]] = round_to_dtype(rx[ok], self.dtype)  # RN of the exact value (ties to even)
            sure[j[ok]] = True
        unsure = np.flatnonzero(~sure)
        for j in unsure:
            exact = _exact(float(wv[j]), self.r64[:, q[j]], self.l64[p[j]], self.s)
            t[j] = round_fraction(exact, self.dtype)
        out16.reshape(-1)[idx] = t.view(np.uint16)
        return int(unsure.size)

    def _replay(self, p0: int, w: np.ndarray, t: np.ndarray, p: np.ndarray, q: np.ndarray, j: np.ndarray) -> None:
        """t[j] from the float64 path itself, run on the same row blocks it would use (same BLAS calls)."""
        from .merge import add_lowrank_float64  # noqa: PLC0415 - merge imports this module

        if self.o_axis != 0:
            raise NeedsFloat64  # its blocks run over W's columns here: redo the whole tensor
        n = w.shape[0]
        done = {}
        for k, (pk, qk) in enumerate(zip(p, q)):
            b0 = int(pk) // self.old_rows * self.old_rows
            if b0 not in done:
                if b0 < p0 or min(self.P, b0 + self.old_rows) > p0 + n:
                    raise NeedsFloat64  # the block is not all in these rows
                rows = slice(b0 - p0, min(self.P, b0 + self.old_rows) - p0)
                done[b0] = add_lowrank_float64(w[rows], self.r64, self.l64[b0:b0 + self.old_rows], self.s)
            t[j[k]] = done[b0][int(pk) - b0, int(qk)]


def _error_free_sum(w: np.ndarray, prods: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(w + s sum_k prods_k, True where that float64 value is exact): TwoSum at each step, all errors zero.

    Needs exact products and s a power of two (``Plan.exact_terms``); Knuth's TwoSum gives the rounding
    error of each addition exactly, so zero errors (and finite values) prove the sum exact.
    """
    acc = np.zeros(w.shape)
    clean = np.ones(w.shape, bool)
    with np.errstate(all="ignore"):
        for term in list(prods.T * s) + [w]:
            total = acc + term
            back = total - acc
            err = (acc - (total - back)) + (term - back)
            clean &= err == 0
            acc = total
        clean &= np.isfinite(acc)
    return acc, clean


def _exact(w: float, col: np.ndarray, row: np.ndarray, s: float):
    from fractions import Fraction  # noqa: PLC0415

    acc = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(row, col)), Fraction(0))
    return Fraction(w) + Fraction(s) * acc


def work_arrays(xp: Any, elements: int) -> dict:
    """Scratch for ``Plan.block`` on up to ``elements`` elements (about 22 bytes each)."""
    m = max(int(elements), 1)
    return {"r": xp.empty(m, xp.float32), "a": xp.empty(m, xp.float32), "t": xp.empty(m, xp.float32),
            "u": xp.empty(m, xp.uint32), "c": xp.empty(m, bool), "c2": xp.empty(m, bool)}


def merge_rows(plan: Plan, w: np.ndarray, p0: int, out: np.ndarray, work: dict) -> int:
    """RN(W + s L R) for the rows p0.. held in w (host, W's dtype) into out; sub-blocked for the cache.

    Returns the number of Fraction fallbacks; raises NeedsFloat64 (see the module docstring).
    """
    n, Q = w.shape
    step = max(1, SUB_ELEMENTS // max(Q, 1))
    w16, o16 = w.view(np.uint16), out.view(np.uint16)
    batch = max(256, FIX_BATCH_TERMS // max(plan.R, 1))
    found: list = []
    count = fractions = 0
    for a in range(0, n, step):
        b = min(n, a + step)
        idx = plan.block(np, p0 + a, w16[a:b], o16[a:b], work)
        if idx.size:
            found.append(idx + a * Q)
            count += idx.size
        if count >= batch or (b == n and count):
            # the float64 pass over candidates in batches: its fixed cost is a few dozen small NumPy
            # calls, its memory about (8 R + 120) bytes a candidate
            todo = np.concatenate(found)
            for c in range(0, todo.size, batch):
                fractions += plan.fix(p0, w, o16, todo[c:c + batch])
            found, count = [], 0
    return fractions


def add_lowrank(w: np.ndarray, a64: np.ndarray, b64: np.ndarray, s: float) -> np.ndarray | None:
    """RN(w + s b64 a64) for w (O, I) bf16/f16 on the host; None where the float32 path does not apply."""
    if not supported(w.dtype) or w.ndim != 2:
        return None
    plan = Plan(w.dtype, b64, a64, s)
    if not plan.ok:
        return None
    wc = np.ascontiguousarray(w)
    out = np.empty(wc.shape, wc.dtype)
    try:
        with blas_threads(1), np.errstate(all="ignore"):  # Inf/NaN/overflow go to the candidates, not to warnings
            merge_rows(plan, wc, 0, out, work_arrays(np, min(wc.size, max(SUB_ELEMENTS, wc.shape[1]))))
    except NeedsFloat64:
        return None
    return out


# ---- BLAS threads: one per worker thread (OpenBLAS's own pool fights ours on small products)

def _openblas_calls() -> list:
    calls = []
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return calls
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    calls.append((get, put))
    return calls


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with OpenBLAS (as bundled with NumPy) on n threads; a no-op where that is not found."""
    calls = _openblas_calls() if os.name == "posix" else []
    before = []
    for get, put in calls:
        try:
            before.append((put, int(get())))
            put(int(n))
        except Exception:  # noqa: BLE001 - a foreign library: leave it as it was
            continue
    try:
        yield
    finally:
        for put, k in before:
            put(k)


def check_gpu_float32(xp: Any) -> None:
    """Refuse CuPy set up to run float32 matmuls in TF32 (10-bit products break the bound of step 2)."""
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise RuntimeError("CUPY_TF32 is set; the GPU merge needs full float32 matmuls (unset CUPY_TF32)")
