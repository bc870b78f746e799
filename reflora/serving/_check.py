"""Input checks and small array helpers shared by the serving modules (private).

Messages use the legend letters of ``reflora.serving``: N rows, I in, O out,
R rank (padded to the largest adapter's), L adapters, V vocabulary, D embedding dim.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..backend import array_namespace


def shape(a: Any) -> tuple:
    return tuple(a.shape)


def namespace(names: tuple[str, ...], arrays: tuple) -> Any:
    """The one namespace of ``arrays`` (None skipped); TypeError for non-arrays or mixed libraries."""
    for name, a in zip(names, arrays):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array (convert with reflora.asarray)")
    return array_namespace(*arrays, names=names)


def real_floating(xp: Any, dt: Any) -> bool:
    try:
        return bool(xp.isdtype(dt, "real floating"))
    except TypeError:  # ml_dtypes.bfloat16 and other dtypes outside the standard
        return False


def check_float(xp: Any, name: str, a: Any) -> None:
    if not real_floating(xp, a.dtype):
        raise TypeError(f"{name} has dtype {a.dtype}; expected a real floating dtype (float16, float32 or float64); "
                        "for bfloat16 compute in float32 (reflora.testing.serving emulates bfloat16 rounding)")


def check_same_dtype(ref_name: str, ref: Any, pairs) -> None:
    for name, a in pairs:
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {a.dtype}; expected {ref.dtype}, the dtype of {ref_name} "
                            "(reflora does not promote silently)")


def check_int(xp: Any, name: str, a: Any) -> None:
    try:
        ok = bool(xp.isdtype(a.dtype, "integral"))
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{name} has dtype {a.dtype}; expected an integer dtype")


def stacked(name: str, a: Any, xp: Any, letters: str) -> Any:
    """Accept vLLM's (L, 1, X, Y) stacked layout as (L, X, Y); check ndim 3."""
    if a.ndim == 4 and a.shape[1] == 1:
        return xp.reshape(a, (a.shape[0], a.shape[2], a.shape[3]))
    if a.ndim != 3:
        raise ValueError(f"{name} has shape {shape(a)}; expected {letters} (or vLLM's stacked (L, 1, ...) layout)")
    return a


def rows(xp: Any, name: str, a: Any, width_name: str) -> tuple[Any, tuple]:
    """Flatten (..., K) to (N, K); returns (a_NK, lead shape)."""
    if a.ndim < 1:
        raise ValueError(f"{name} has shape {shape(a)}; expected (..., {width_name}) with at least one dimension")
    lead = tuple(a.shape[:-1])
    n = 1
    for s in lead:
        n *= s
    return (a if a.ndim == 2 else xp.reshape(a, (n, a.shape[-1]))), lead


def check_indices(xp: Any, indices: Any, lead: tuple, L: int, name: str = "indices") -> Any:
    """indices with x's leading shape, integer, each in [-1, L); returned flattened (N,).

    The range check costs one device-to-host transfer of two scalars; it is what
    keeps an out-of-range adapter id from reading another adapter's weights
    (the engines' -1 aliasing bug).
    """
    if not hasattr(indices, "shape"):
        raise TypeError(f"{name} is {type(indices).__name__}; expected an integer array")
    check_int(xp, name, indices)
    if shape(indices) != lead:
        raise ValueError(f"{name} has shape {shape(indices)}; expected the leading shape of x {lead} (one adapter per row)")
    flat = xp.reshape(indices, (-1,))
    if flat.shape[0]:
        from ..backend import to_numpy  # noqa: PLC0415

        # one device-to-host transfer for both ends of the range
        lo, hi = (int(v) for v in to_numpy(xp.stack([xp.min(flat), xp.max(flat)])))
        if lo < -1 or hi >= L:
            raise ValueError(f"{name} range from {lo} to {hi}; expected -1 (no adapter) or an adapter in [0, L) = [0, {L})")
    return flat


def check_scales(scales: Any, L: int, name: str = "scales") -> np.ndarray:
    """Per-adapter scales as a host float64 (L,) vector: a real number (all adapters) or L reals."""
    if isinstance(scales, bool):
        raise TypeError(f"{name} is {scales!r}; expected a real number or one real number per adapter (L = {L})")
    if isinstance(scales, numbers.Real) or getattr(scales, "shape", None) == ():
        s = np.full(L, float(scales))
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} is {float(scales)}; expected a finite real number (as reflora.lora_forward)")
        return s
    try:
        if hasattr(scales, "shape") and not isinstance(scales, np.ndarray):
            from ..backend import to_numpy  # noqa: PLC0415

            scales = to_numpy(scales)
        s = np.asarray(scales, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} is {type(scales).__name__}; expected a real number or one real number per adapter "
                        f"(L = {L})") from None
    if s.shape != (L,):
        raise ValueError(f"{name} has shape {s.shape}; expected (L,) = ({L},), one scale per adapter")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} is {s.tolist()}; expected finite real numbers (as reflora.lora_forward)")
    return s


def check_offset(offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset is {offset!r}; expected a non-negative int")
    if offset < 0:
        raise ValueError(f"offset is {offset}; expected a non-negative column offset")
    return int(offset)
