"""Emulated reduced-precision references: the LoRA math with every step rounded to one chosen order.

One concrete evaluation in dtype d (PEFT's order, float32 accumulation by
default), useful to see what rounding to d costs on a problem and to build
golden vectors. The kit does NOT judge candidates against it: a correct
candidate may evaluate in any legitimate order (``reflora.testing.envelope``
bounds that whole class; ``reflora.testing.policy`` turns it into the
tolerance).

Everything here is NumPy on the host: bfloat16 comes from ml_dtypes (which
the array API does not have), and an emulation is a model of rounding, not a
computation to run on a device.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from ..backend import dtype_name
from ..ops.lora import lora_backward, lora_forward
from ..numerics.rounding import round_to_dtype

__all__ = [
    "ACCUMULATE",
    "DTYPES",
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
ACCUMULATE = ("float32", "float64", "dtype")
_BF16 = np.dtype(ml_dtypes.bfloat16)
_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": _BF16}


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


def check_accumulate(accumulate: str) -> str:
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate is {accumulate!r}; expected one of {ACCUMULATE}")
    return accumulate


def as_f64(a):
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
    d, acc = dtype_name(dtype), check_accumulate(accumulate)
    x, A, B, W, bias, m = map(as_f64, (x, A, B, W, bias, dropout_mask))
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
    d, acc = dtype_name(dtype), check_accumulate(accumulate)
    x, A, B, dy, W, m = map(as_f64, (x, A, B, dy, W, dropout_mask))
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
    d, acc = dtype_name(dtype), check_accumulate(accumulate)
    W, A, B = map(as_f64, (W, A, B))
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
    x, t, A, B, W, bias = map(as_f64, (x, target, A, B, W, bias))
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
