"""LoraConfig: the hyper-parameters of one LoRA adapter.

Defaults are the seed document's (rank 8, alpha 16, 768 x 768). Note that PEFT's
``LoraConfig`` defaults to r=8, lora_alpha=8: the same rank, half the scale.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import numpy as np

from ._validate import check_real

__all__ = ["INIT_SCHEMES", "LoraConfig"]

INIT_SCHEMES = ("kaiming_uniform", "gaussian")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Shape and scaling of one LoRA adapter.

    ``scale`` = alpha / rank, or alpha / sqrt(rank) with ``use_rslora``.

    Args:
      rank: R, the inner dimension of the update (>= 1).
      alpha: the numerator of the scale (finite).
      in_features: I, the input width of the adapted linear layer.
      out_features: O, its output width.
      use_rslora: rank-stabilised scaling alpha / sqrt(R) (Kalajdzievski 2023).
      init: "kaiming_uniform" (PEFT/loralib default) or "gaussian".

    Raises:
      TypeError: a field of the wrong type (rank 2.0, alpha "16", use_rslora 1).
      ValueError: a field with an invalid value (rank 0, alpha NaN, an unknown init);
        either message names the field.

    Example:
      >>> LoraConfig().scale
      2.0
      >>> LoraConfig(rank=4, alpha=8, use_rslora=True).scale
      4.0
    """

    rank: int = 8
    alpha: float = 16.0
    in_features: int = 768
    out_features: int = 768
    use_rslora: bool = False
    init: str = "kaiming_uniform"

    def __post_init__(self) -> None:
        for name in ("rank", "in_features", "out_features"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"LoraConfig.{name} is {value!r} ({type(value).__name__}); expected an int >= 1")
            if value < 1:
                raise ValueError(f"LoraConfig.{name} is {value}; expected an int >= 1")
            object.__setattr__(self, name, int(value))  # NumPy integers become plain ints
        object.__setattr__(self, "alpha", check_real(self.alpha, "LoraConfig.alpha"))
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"LoraConfig.use_rslora is {self.use_rslora!r}; expected True or False")
        if not isinstance(self.init, str):
            raise TypeError(f"LoraConfig.init is {self.init!r} ({type(self.init).__name__}); expected one of "
                            f"{INIT_SCHEMES}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"LoraConfig.init is {self.init!r}; expected one of {INIT_SCHEMES}")

    @property
    def scale(self) -> float:
        """alpha / R, or alpha / sqrt(R) when ``use_rslora``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def num_params(self) -> int:
        """Trainable parameters: R * (I + O)."""
        return self.rank * (self.in_features + self.out_features)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Inverse of ``to_dict``; unknown keys are a ValueError naming them, a non-mapping a TypeError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"LoraConfig.from_dict data is {type(data).__name__}; expected a mapping of field -> value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoraConfig.from_dict: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))
