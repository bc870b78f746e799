"""ΔW: what an adapter does to its base weight, the common language of every format.

Legend: I in, O out, R rank; s = alpha / R (alpha / sqrt(R) with rsLoRA).

    plain LoRA   ΔW = s B A                                   (O, I)
    lora_bias    ΔW = s B A,  Δbias = s c                      (c = PEFT's lora_B.bias, (O,))
    DoRA         ΔW = (m / n) ⊙ (W + s B A) - W,  n = ||W + s B A|| per row (O,)

Two adapters are the same adapter exactly when their ΔW (and Δbias) agree, whatever
their files, layouts, key names, ranks or factorisations. Everything here is
evaluated in float64 from the stored values (exact conversions), so a conversion
that keeps A, B and s keeps ΔW bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..adapter import LoraAdapter
from ..backend import to_numpy

__all__ = ["delta_bias", "delta_rows", "delta_weight"]


def as_float64(x: Any) -> np.ndarray:
    """A float64 host copy of any array (exact for every floating dtype)."""
    return np.asarray(to_numpy(x), dtype=np.float64)


def delta_rows(adapter: LoraAdapter, lo: int, hi: int, *, W: Any = None) -> np.ndarray:
    """Rows lo:hi of ΔW in float64 (host), so large modules are compared a block at a time.

    ΔW rows are s (B[lo:hi] A); for DoRA (m/n)(W + s B A) - W on the same rows (each row's
    norm needs only that row).
    """
    A, B = as_float64(adapter.A), as_float64(adapter.B)[lo:hi]
    upd = adapter.scale * (B @ A)  # s (B A): the product first, then the scale, as PEFT's get_delta_weight
    if adapter.magnitude is None:
        return upd
    base = W if W is not None else adapter.W
    if base is None:
        raise ValueError("a DoRA adapter's ΔW depends on its base weight: pass W (O, I) or give the adapter W")
    w = as_float64(base)
    if w.shape != (adapter.B.shape[0], adapter.A.shape[1]):
        raise ValueError(f"W has shape {w.shape}; expected (O, I) = {(adapter.B.shape[0], adapter.A.shape[1])}")
    w = w[lo:hi]
    merged = w + upd
    n = np.linalg.norm(merged, axis=1)  # per output row, as PEFT (dim=1 of the (O, I) weight)
    m = as_float64(adapter.magnitude)[lo:hi]
    return (m / n)[:, None] * merged - w


def delta_weight(adapter: LoraAdapter | Mapping[str, LoraAdapter], *, W: Any = None) -> Any:
    """ΔW of one adapter (float64 (O, I), host NumPy), or {module: ΔW} of a mapping.

    Args:
      adapter: a LoraAdapter or {module path: LoraAdapter}.
      W: the base weight (O, I) of a DoRA adapter without one (one adapter only).

    Returns:
      s B A; for DoRA (m / n) ⊙ (W + s B A) - W with n the row norms of W + s B A.
      lora_bias does not change ΔW (see ``delta_bias``).

    Raises:
      ValueError: a DoRA adapter without a base weight.
      TypeError: not a LoraAdapter or mapping of them.

    Example:
      >>> import numpy as np, reflora
      >>> ad = reflora.LoraAdapter.from_arrays(np.ones((1, 2)), np.full((3, 1), 2.0), alpha=4.0)
      >>> delta_weight(ad)   # s = 4 / 1
      array([[8., 8.],
             [8., 8.],
             [8., 8.]])
    """
    if isinstance(adapter, Mapping):
        if W is not None:
            raise ValueError("W= applies to one adapter; give each DoRA adapter its W")
        return {m: delta_weight(ad) for m, ad in adapter.items()}
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"adapter is {type(adapter).__name__}; expected a reflora.LoraAdapter or a mapping of them")
    return delta_rows(adapter, 0, int(adapter.B.shape[0]), W=W)


def delta_bias(adapter: LoraAdapter) -> np.ndarray | None:
    """Δbias = s c for PEFT's lora_bias c (O,) in float64, or None when the adapter has none."""
    if adapter.lora_bias is None:
        return None
    return adapter.scale * as_float64(adapter.lora_bias)
