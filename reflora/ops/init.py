"""Initialisation of A and B, drawn on the host so every backend gets the same bits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import dtype_name, host_rng, normalize_xp, resolve_dtype
from ..config import LoraConfig

__all__ = ["init_lora", "kaiming_uniform_bound"]


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """torch.nn.init.kaiming_uniform_'s bound: gain * sqrt(3 / fan_in).

    gain = sqrt(2 / (1 + a^2)); with a = sqrt(5) (what nn.Linear, PEFT and
    loralib use for A) the bound is exactly 1 / sqrt(fan_in).
    """
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def init_lora(config: LoraConfig, *, seed: int, xp: Any = None, dtype: Any = "float32") -> tuple[Any, Any]:
    """Fresh LoRA parameters A (R, I) and B (O, R) in PEFT's layout.

    Schemes (``config.init``), as PEFT's ``reset_lora_parameters``:

      "kaiming_uniform": A ~ U(-1/sqrt(I), 1/sqrt(I)), torch's
          ``kaiming_uniform_(A, a=sqrt(5))`` with fan_in = I.
      "gaussian":        A ~ N(0, (1/R)^2)  (std 1/R, not 1/sqrt(R)).
      B = 0 in both, so the adapter starts as the identity on the base layer.

    The seed document instead states the bound sqrt(2/fan_in) * sqrt(6) =
    sqrt(12/fan_in): 2*sqrt(3) times PEFT's and sqrt(2) times torch's
    ``kaiming_uniform_(a=0)`` (sqrt(6/fan_in)). It matches no torch formula;
    reflora implements the documented ones. Use ``kaiming_uniform_bound`` and
    your own draw if you need the seed's numbers.

    Draws come from ``numpy.random.Generator(PCG64(seed))`` in float64 on the
    host, are rounded to ``dtype`` on the host, then moved to ``xp``: the same
    seed gives bit-identical arrays on NumPy, CuPy and array_api_strict. They
    are not torch's random streams (no library shares those).

    Args:
      config: the adapter's LoraConfig.
      seed: an int.
      xp: target namespace (module, or "numpy"/"cupy"/"auto"); None = default backend.
      dtype: floating dtype of A and B.

    Returns:
      (A, B) with A of shape (R, I), B zeros of shape (O, R).

    Example:
      >>> A, B = init_lora(LoraConfig(rank=2, in_features=4, out_features=3), seed=0, xp="numpy")
      >>> A.shape, B.shape, float(abs(A).max()) <= 0.5
      ((2, 4), (3, 2), True)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config is {type(config).__name__}; expected reflora.LoraConfig")
    target = normalize_xp(xp)
    dt = resolve_dtype(target, dtype)
    if not target.isdtype(dt, "real floating"):
        raise TypeError(f"dtype is {dtype!r}; expected a real floating dtype")
    rng = host_rng(seed)
    shape = (config.rank, config.in_features)
    if config.init == "kaiming_uniform":
        bound = kaiming_uniform_bound(config.in_features)
        a64 = rng.uniform(-bound, bound, size=shape)
    else:  # "gaussian"
        a64 = rng.normal(0.0, 1.0 / config.rank, size=shape)
    A = target.asarray(np.ascontiguousarray(a64.astype(dtype_name(dt))))
    B = target.zeros((config.out_features, config.rank), dtype=dt)
    return A, B
