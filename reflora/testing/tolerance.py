"""The derived tolerance policy: how close a candidate of dtype d must come to the reference.

The rule (flash-attention's, with a floor)
-----------------------------------------
For every output tensor T of a candidate computing in dtype d:

    ref64   = the reference in float64, from the candidate's own inputs
              (already rounded to d, so input rounding is not counted as error)
    emul_d  = the same reference with inputs, every intermediate and the output
              rounded to d, accumulating dot products in float32 by default
              (``accumulate=``: "float32" as on tensor cores and in torch's
              CPU/GPU half-precision matmuls, "float64", or "dtype": every
              partial sum rounded to d)
    mag_T   = max over elements of the same computation on absolute values,
              |x||W|^T + |bias| + |s| (|x*m||A|^T)|B|^T for y, and the like for
              the gradients (the scale of the terms that were summed)

    pass  <=>  max|cand_T - ref64_T|  <=  k * max|emul_d,T - ref64_T|  +  floor_rel * mag_T  +  floor_abs

Derivation. A correct implementation in dtype d performs the same sums and
products as emul_d, in some order and with some rounding points of its own.
By the standard model of floating-point arithmetic (Higham, Thm. 3.5) both
errors are bounded by gamma_K u_d mag_T, and in practice both are a few
rounding errors of the same intermediates: max|emul_d - ref64| measures, on
*this* problem, how much rounding to d costs. A correct candidate therefore
lands within a small multiple of it; k = 2 leaves room for a different
summation order, a different placement of the scale (before or after the
up-projection), or fused multiply-adds. A wrong formula (a missing scale, a
transposed matrix, a dropped term) makes an error of the order of the tensor
itself, which is about 1/u_d times larger, so the rule separates the two with
a wide margin in float32 and float16, and a narrower but still clear one in
bfloat16 (u = 2^-8 relative per rounding).

Why a floor. On tiny problems the emulation can be exact by luck (one output
element, integer-valued inputs) while a correct candidate that rounds
elsewhere is not: the floor floor_rel * mag_T absorbs that, and floor_abs
absorbs underflow. In float32 floor_rel is 4 u_d = 4 * 2^-24, the four or so
roundings of one chain x -> h -> scale -> y, at the scale of the summed terms;
measured on a correct torch float32 candidate over 10,000 problems, the
largest excess over 2 max|emul - ref64| was about 2 u mag_T. In float16 and
bfloat16 floor_rel is also 4 * 2^-24, not 4 u_d: mag_T is the sum of |terms|,
and 4 u_d of it is a percent-sized slice of the result (2^-6 = 1.6% in
bfloat16, more where terms cancel) that would dominate the bound and let a
scale error of 1% pass in float16 and 30% in bfloat16. torch's float16 and
bfloat16 kernels compute in float32 and round once per operation, like the
emulation, so k max|emul - ref64| covers them and the floor only has to
absorb the float32 accumulation. Two kinds of tensor keep 4 u_d in float16 and
bfloat16 (``TENSOR_DEFAULTS``): "A" and "B" after SGD steps, where each
update is rounded to d in the candidate's own order and the differences carry
from step to step, and "y_merged", the forward through a merged weight that
the candidate rounded to d in its own order. For float64 the reference *is*
emul_d, so only the floor remains: 1e-12 relative to mag_T, the agreement
expected of two float64 implementations that sum in different orders.

Defaults (k, floor_rel, floor_abs), overridable per dtype, per tensor, or per
(tensor, dtype) through ``TolerancePolicy(overrides=...)``:

    dtype     k   floor_rel        floor_abs
    float64   2   1e-12            1e-300
    float32   2   4 * 2^-24        4 * 2^-149   (a few subnormals)
    float16   2   4 * 2^-24        4 * 2^-24    ("A", "B", "y_merged": floor_rel 4 * 2^-11)
    bfloat16  2   4 * 2^-24        4 * 2^-133   ("A", "B", "y_merged": floor_rel 4 * 2^-8)

Tensor names: "y" (forward), "dx", "dA", "dB" (backward), "A", "B" (after SGD
steps), "W" (merge), "y_B0" and "y_merged" (the metamorphic forwards with
B = 0 and through a merged weight). The metamorphic pairs (batched vs looped,
rank padding) allow twice the tolerance of "y".

Measured reach (correct PyTorch candidates): over 1,000-2,000 random problems
per check, the worst err / tolerance was 0.71 in float32 (dx) and below 0.001
in float64, where the tolerance is about 1e-12 relative; over 300
derandomized problems per check in float16 and in bfloat16 it was 0.50
(forward, backward, merge, y_B0) and at most 0.22 (y_merged, SGD). A scale
error of 1% is caught in both half-precision dtypes.

Everything here is NumPy on the host: bfloat16 comes from ml_dtypes (which
the array API does not have), and an emulation is a model of rounding, not a
computation to run on a device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from .._validate import check_real
from ..backend import dtype_name
from ..numerics.rounding import round_to_dtype
from ..ops.lora import lora_backward, lora_forward

__all__ = [
    "ACCUMULATE",
    "DTYPES",
    "DEFAULTS",
    "TENSORS",
    "TENSOR_DEFAULTS",
    "Tolerance",
    "TolerancePolicy",
    "emulate_backward",
    "emulate_forward",
    "emulate_merge",
    "emulate_train",
    "magnitude_backward",
    "magnitude_forward",
    "np_dtype",
    "to_dtype",
]

DTYPES = ("float64", "float32", "float16", "bfloat16")
#: The tensor names a tolerance can be set for (see the module docstring).
TENSORS = ("y", "dx", "dA", "dB", "A", "B", "W", "y_B0", "y_merged")
ACCUMULATE = ("float32", "float64", "dtype")
_BF16 = np.dtype(ml_dtypes.bfloat16)
_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": _BF16}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """One (tensor, dtype) setting: bound = k * emul_err + floor_rel * mag + floor_abs."""

    k: float
    floor_rel: float
    floor_abs: float

    def bound(self, emul_err: float, mag: float) -> float:
        """The largest acceptable max |cand - ref64| for this tensor."""
        return self.k * emul_err + self.floor_rel * mag + self.floor_abs


#: Per-dtype defaults; see the module docstring for the derivation.
DEFAULTS: dict[str, Tolerance] = {
    "float64": Tolerance(2.0, 1e-12, 1e-300),
    "float32": Tolerance(2.0, 4 * 2.0**-24, 4 * 2.0**-149),
    "float16": Tolerance(2.0, 4 * 2.0**-24, 4 * 2.0**-24),
    "bfloat16": Tolerance(2.0, 4 * 2.0**-24, 4 * 2.0**-133),
}

#: Per-(tensor, dtype) defaults that replace DEFAULTS. In float16 and bfloat16
#: the parameters after SGD steps ("A", "B") and the forward through a merged
#: weight ("y_merged") keep a floor of 4 u_d: there the candidate rounds
#: intermediates to d (each update, the merged W) in an order of its own, and a
#: one-ulp difference in them carries into the result, which the emulation
#: cannot follow element by element.
TENSOR_DEFAULTS: dict[tuple[str, str], Tolerance] = {
    (t, d): Tolerance(2.0, 4 * u, DEFAULTS[d].floor_abs)
    for t in ("A", "B", "y_merged") for d, u in (("float16", 2.0**-11), ("bfloat16", 2.0**-8))
}


def np_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype for "float64", "float32", "float16" or "bfloat16" (ml_dtypes).

    Raises:
      TypeError: any other dtype.
    """
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype {dtype!r}; expected one of {DTYPES}")
    return _BF16 if name == "bfloat16" else np.dtype(name)


def to_dtype(a: Any, dtype: Any) -> np.ndarray:
    """Round a host array to ``dtype`` once, to nearest even (bfloat16 without double rounding)."""
    a = np.asarray(a)
    dt = np_dtype(dtype)
    if a.dtype == dt:
        return a
    if dt != _BF16:
        return a.astype(dt)  # NumPy's float64 -> float32/float16 conversion rounds once, correctly
    return round_to_dtype(a.astype(np.float64), dt)


def _rn(a: np.ndarray, d: str) -> np.ndarray:
    """RN_d on float64 values, returned as float64 (exactly representable in d)."""
    if d == "float64":
        return a
    with np.errstate(over="ignore", invalid="ignore"):
        if d != "bfloat16" or a.dtype == np.float32:
            # one correct rounding: NumPy's float64 -> float32/float16, ml_dtypes' float32 -> bfloat16
            return a.astype(_NP[d]).astype(np.float64)
        return round_to_dtype(a, d).astype(np.float64)


def _mm(a: np.ndarray, b: np.ndarray, d: str, acc: str) -> np.ndarray:
    """RN_d(a @ b) with the sums accumulated as ``acc`` says (a, b float64 holding d values)."""
    if d == "float64" or acc == "float64":
        return _rn(a @ b, d)
    if acc == "float32":
        # products of float32/float16/bfloat16 numbers, summed in float32 (as BLAS or tensor cores)
        with np.errstate(over="ignore", invalid="ignore"):
            return _rn(a.astype(np.float32) @ b.astype(np.float32), d)
    # acc == "dtype": every partial sum rounded to d, in index order
    out = np.zeros((a.shape[0], b.shape[1]))
    for k in range(a.shape[1]):
        out = _rn(out + _rn(np.outer(a[:, k], b[k, :]), d), d)
    return out


def _check_acc(accumulate: str) -> str:
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate is {accumulate!r}; expected one of {ACCUMULATE}")
    return accumulate


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _quiet(fn):
    """Run an emulation with NumPy's floating-point warnings off (overflow to inf is data here)."""
    import functools  # noqa: PLC0415

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


@_quiet
def emulate_forward(x, A, B, *, scale, W=None, bias=None, dropout_mask=None, dtype, accumulate="float32"):
    """The forward with every input, intermediate and output rounded to ``dtype``.

    Steps (PEFT's order: the scale multiplies the up-projection's output):

        xm = RN(x * m);  h = RN(xm A^T);  l = RN(RN(h B^T) * s)
        base = RN(RN(x W^T) + bias);  y = RN(base + l)

    Args:
      x (..., I), A (R, I), B (O, R), W (O, I) or None, bias (O,) or None,
      dropout_mask (..., I) or None: host arrays holding values of ``dtype``.
      scale: s. dtype: "float64", "float32", "float16" or "bfloat16".
      accumulate: "float32" (default), "float64" or "dtype".

    Returns:
      y (..., O) as float64 values of ``dtype``.

    Example:
      >>> import numpy as np
      >>> y = emulate_forward(np.ones((1, 3)), np.ones((1, 3)), np.ones((2, 1)), scale=1/3, dtype="float16")
      >>> y.tolist()
      [[1.0, 1.0]]
    """
    d, acc = dtype_name(dtype), _check_acc(accumulate)
    x, A, B, W, bias, m = map(_f64, (x, A, B, W, bias, dropout_mask))
    lead, I = x.shape[:-1], x.shape[-1]
    x_NI = x.reshape(-1, I)
    xm = x_NI if m is None else _rn(x_NI * m.reshape(-1, I), d)
    h = _mm(xm, A.T, d, acc)
    lora = _rn(_mm(h, B.T, d, acc) * float(scale), d)
    if W is None:
        y = lora if bias is None else _rn(lora + bias, d)
    else:
        base = _mm(x_NI, W.T, d, acc)
        if bias is not None:
            base = _rn(base + bias, d)
        y = _rn(base + lora, d)
    return y.reshape(lead + (B.shape[0],))


@_quiet
def emulate_backward(x, A, B, dy, *, scale, W=None, bias=None, dropout_mask=None, dtype, accumulate="float32"):
    """The backward (autograd of ``emulate_forward``'s steps) with every step rounded to ``dtype``.

        dl = RN(dy * s);  dB = RN(dl^T h);  dh = RN(dl B);  dA = RN(dh^T xm)
        dx = RN(RN(RN(dh A) * m) + RN(dy W))

    Returns:
      (dx (..., I), dA (R, I), dB (O, R)) as float64 values of ``dtype``.
    """
    d, acc = dtype_name(dtype), _check_acc(accumulate)
    x, A, B, dy, W, m = map(_f64, (x, A, B, dy, W, dropout_mask))
    I, O = x.shape[-1], B.shape[0]
    x_NI, dy_NO = x.reshape(-1, I), dy.reshape(-1, O)
    m_NI = None if m is None else m.reshape(-1, I)
    xm = x_NI if m_NI is None else _rn(x_NI * m_NI, d)
    h = _mm(xm, A.T, d, acc)
    dl = _rn(dy_NO * float(scale), d)
    dB = _mm(dl.T, h, d, acc)
    dh = _mm(dl, B, d, acc)
    dA = _mm(dh.T, xm, d, acc)
    dx = _mm(dh, A, d, acc)
    if m_NI is not None:
        dx = _rn(dx * m_NI, d)
    if W is not None:
        dx = _rn(dx + _mm(dy_NO, W, d, acc), d)
    return dx.reshape(x.shape), dA, dB


@_quiet
def emulate_merge(W, A, B, *, scale, dtype, accumulate="float32"):
    """W' = RN(W + RN(RN(B A) * s)) in ``dtype`` (PEFT's merge order); float64 values."""
    d, acc = dtype_name(dtype), _check_acc(accumulate)
    W, A, B = map(_f64, (W, A, B))
    return _rn(W + _rn(_mm(B, A, d, acc) * float(scale), d), d)


def _sgd_update(p, g, buf, first, opt, d):
    """One torch.optim.SGD update of one tensor, each tensor op rounded to d."""
    d_p = -g if opt["maximize"] else g
    if opt["weight_decay"]:
        d_p = _rn(d_p + opt["weight_decay"] * p, d)
    if opt["momentum"]:
        if first:
            buf = d_p
        else:
            buf = _rn(_rn(buf * opt["momentum"], d) + (1.0 - opt["dampening"]) * d_p, d)
        d_p = _rn(d_p + opt["momentum"] * buf, d) if opt["nesterov"] else buf
    return _rn(p - opt["lr"] * d_p, d), buf


@_quiet
def emulate_train(x, target, A, B, *, scale, W=None, bias=None, steps, sgd, dtype, accumulate="float32"):
    """``steps`` training steps (forward, MSE loss, backward, SGD on A and B) rounded to ``dtype``.

    The loss gradient is dy = RN(RN(y - t) * (2 / numel)); the SGD update is
    torch's (see ``reflora.optim.sgd``), each tensor operation rounded.

    Args:
      sgd: dict with lr, momentum, dampening, weight_decay, nesterov, maximize.

    Returns:
      A list of (A, B) after each step (float64 values of ``dtype``).
    """
    d = dtype_name(dtype)
    x, t, A, B, W, bias = map(_f64, (x, target, A, B, W, bias))
    bufs = [None, None]
    out = []
    for step in range(steps):
        y = emulate_forward(x, A, B, scale=scale, W=W, bias=bias, dtype=d, accumulate=accumulate)
        dy = _rn(_rn(y - t, d) * (2.0 / y.size), d)
        _, dA, dB = emulate_backward(x, A, B, dy, scale=scale, W=W, dtype=d, accumulate=accumulate)
        A, bufs[0] = _sgd_update(A, dA, bufs[0], step == 0, sgd, d)
        B, bufs[1] = _sgd_update(B, dB, bufs[1], step == 0, sgd, d)
        out.append((A, B))
    return out


def _abs(a):
    return None if a is None else np.abs(np.asarray(a, dtype=np.float64))


def magnitude_forward(x, A, B, *, scale, W=None, bias=None, dropout_mask=None) -> float:
    """max of |x||W|^T + |bias| + |s| (|x*m||A|^T)|B|^T: the size of the terms y sums."""
    y, _ = lora_forward(_abs(x), _abs(A), _abs(B), scale=abs(float(scale)), W=_abs(W), bias=_abs(bias),
                        dropout_mask=_abs(dropout_mask))
    return float(np.max(y)) if y.size else 0.0


def magnitude_backward(x, A, B, dy, *, scale, W=None, dropout_mask=None) -> dict[str, float]:
    """{"dx", "dA", "dB"}: max of the backward computed on absolute values (sizes of the summed terms)."""
    _, cache = lora_forward(_abs(x), _abs(A), _abs(B), scale=abs(float(scale)), W=_abs(W),
                            dropout_mask=_abs(dropout_mask))
    g = lora_backward(_abs(dy), cache)
    return {k: (float(np.max(v)) if v.size else 0.0) for k, v in zip(("dx", "dA", "dB"), g)}


@dataclasses.dataclass(frozen=True)
class TolerancePolicy:
    """Which Tolerance applies to a (tensor, dtype), and how the emulation accumulates.

    Args:
      k: the multiple of the emulated error (default 2, as flash-attention).
      accumulate: "float32" (default), "float64" or "dtype" (see the module docstring).
      overrides: {key: {"k": ..., "floor_rel": ..., "floor_abs": ...}} where key
        is a dtype ("float16"), a tensor ("dA") or both ("dA/float16"); more
        specific keys win: "dA/float16" over "dA" over "float16" over the defaults.

    Raises:
      ValueError: an unknown accumulate, override key (a dtype, a name in TENSORS, or
        "tensor/dtype") or field, or a field value that is not finite (k >= 1, floors >= 0).

    Example:
      >>> p = TolerancePolicy(overrides={"dA/bfloat16": {"k": 4}})
      >>> p.tolerance("dA", "bfloat16").k, p.tolerance("dB", "bfloat16").k
      (4.0, 2.0)
    """

    k: float = 2.0
    accumulate: str = "float32"
    overrides: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "_cache", {})
        _check_acc(self.accumulate)
        check_real(self.k, "k", minimum=1)
        for key, fields in self.overrides.items():
            parts = key.split("/") if isinstance(key, str) else []
            if not (len(parts) == 1 and (parts[0] in DTYPES or parts[0] in TENSORS)
                    or len(parts) == 2 and parts[0] in TENSORS and parts[1] in DTYPES):
                raise ValueError(f"override key {key!r}; expected 'dtype', 'tensor' or 'tensor/dtype' with dtype "
                                 f"one of {DTYPES} and tensor one of {TENSORS}")
            unknown = set(fields) - {"k", "floor_rel", "floor_abs"}
            if unknown:
                raise ValueError(f"override {key!r} has fields {sorted(unknown)}; expected k, floor_rel, floor_abs")
            for f, v in fields.items():
                try:
                    check_real(v, f, minimum=1 if f == "k" else 0)
                except (ValueError, TypeError):
                    raise ValueError(f"override {key!r} sets {f} = {v!r:.60}; expected a finite number "
                                     f">= {1 if f == 'k' else 0}") from None

    def tolerance(self, tensor: str, dtype: Any) -> Tolerance:
        """The Tolerance for one tensor name ("y", "dA", ...) and dtype."""
        d = dtype if dtype in DEFAULTS else dtype_name(dtype)
        cached = self._cache.get((tensor, d))
        if cached is not None:
            return cached
        if d not in DEFAULTS:
            raise TypeError(f"dtype {dtype!r}; expected one of {DTYPES}")
        fields = dataclasses.asdict(TENSOR_DEFAULTS.get((tensor, d), DEFAULTS[d]))
        fields["k"] = float(self.k)
        for key in (d, tensor, f"{tensor}/{d}"):
            fields.update({f: float(v) for f, v in self.overrides.get(key, {}).items()})
        tol = self._cache[(tensor, d)] = Tolerance(**fields)
        return tol

    def to_dict(self) -> dict:
        """A JSON-ready description (for golden manifests)."""
        return {"k": self.k, "accumulate": self.accumulate, "overrides": {k: dict(v) for k, v in self.overrides.items()},
                "defaults": {d: dataclasses.asdict(t) for d, t in DEFAULTS.items()},
                "tensor_defaults": {f"{t}/{d}": dataclasses.asdict(v) for (t, d), v in TENSOR_DEFAULTS.items()}}
