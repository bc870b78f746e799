"""Inverted dropout on the LoRA branch: a mask drawn on the host from a seed.

PEFT applies ``lora_dropout`` to the input of the LoRA branch only; the base
path x W^T never sees it. With keep probability q = 1 - p the mask is

    m = keep / q,   keep ~ Bernoulli(q) elementwise   (entries 0 or 1/(1-p))

so E[m] = 1 and the expected LoRA output is unchanged ("inverted" dropout:
nothing to rescale at evaluation). ``reflora.lora_forward`` takes the mask as
``dropout_mask=`` and ``reflora.lora_backward`` backpropagates through it
(dx_lora = (dh A) * m, dA = dh^T (x * m)); this module only draws masks.

Draws come from ``numpy.random.Generator(PCG64(seed))`` on the host, so one
seed gives the same mask bit for bit on NumPy, CuPy and array_api_strict. They
are not torch's dropout stream: to compare with PEFT, pass the same mask to
both sides (tests/peers.py replaces PEFT's dropout module by the mask).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..backend import dtype_name, host_rng, normalize_xp, resolve_dtype

__all__ = ["dropout_mask"]


def dropout_mask(shape: Any, p: float, *, seed: int, xp: Any = None, dtype: Any = "float32") -> Any:
    """An inverted-dropout mask m of ``shape``: 0 with probability p, else 1/(1-p).

        keep_i ~ Bernoulli(1 - p) (keep_i = [u_i >= p], u_i ~ U[0, 1) on the host)
        m_i    = keep_i / (1 - p)   (1 - p rounded first, as torch; see Returns)

    p = 0 gives all ones (dropout off); p = 1 gives all zeros, as torch's
    ``F.dropout(x, 1.0)`` (the LoRA branch is switched off).

    Args:
      shape: the shape of x, (..., I), as a tuple of ints (or an int).
      p: drop probability, 0 <= p <= 1.
      seed: int seed of the host generator.
      xp: namespace to create the mask in (module or "numpy"/"cupy"/"auto");
        None = the default backend.
      dtype: a real floating dtype, normally x's.

    Returns:
      The mask, an array of ``shape`` and ``dtype`` in ``xp``. The factor is
      torch's (``nn.Dropout``, so PEFT's): 1 / RN(1 - p) divided in float32
      (float64 for float64), then rounded to ``dtype``. At float32 this can
      differ by 1 ulp from RN(1/(1-p)) (p = 0.15, say).

    Raises:
      ValueError: p outside [0, 1], or a negative dimension.
      TypeError: a non-integer seed or shape entry, or a non-floating dtype.

    Example:
      >>> m = dropout_mask((2, 4), 0.5, seed=0, xp="numpy", dtype="float64")
      >>> sorted(set(m.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
      True
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"p is {p!r}; expected a drop probability with 0 <= p <= 1")
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape is {shape!r}; expected a tuple of ints like x.shape") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"shape is {dims!r}; expected a tuple of ints like x.shape")
        if d < 0:
            raise ValueError(f"shape is {dims!r}; expected non-negative dimensions")
    target = normalize_xp(xp)
    dt = resolve_dtype(target, dtype)
    if not target.isdtype(dt, "real floating"):
        raise TypeError(f"dtype is {dtype!r}; expected a real floating dtype (the dtype of x)")
    rng = host_rng(seed)
    p = float(p)
    # u ~ U[0, 1): keep when u >= p, i.e. with probability 1 - p
    keep = rng.random(dims) >= p
    # inverted scaling as torch's dropout computes it: 1 / RN(1 - p) in float32 (float64 for float64),
    # then rounded to the target dtype; p = 1 keeps nothing
    op = np.float64 if dtype_name(dt) == "float64" else np.float32
    factor = op(0.0) if p == 1.0 else op(1.0) / op(1.0 - p)
    host = np.where(keep, factor, op(0.0)).astype(dtype_name(dt))
    return target.asarray(np.ascontiguousarray(host))
