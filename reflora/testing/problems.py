"""Problems: small, printable descriptions of one LoRA test case, turned into arrays from a seed.

A ``Problem`` holds shapes, dtype, scale, which optional parts are present and
a seed; ``Problem.arrays()`` draws every array from ``reflora.backend.host_rng``
(PCG64) and rounds it to the dtype. The repr of a Problem is therefore a
complete, copy-pasteable reproduction: the same Problem gives the same arrays,
bit for bit, on every machine.

Values: "normal" draws x, dy, target, bias ~ N(0, 1), A ~ N(0, 1/I),
B ~ N(0, 1/R), W ~ N(0, 1/I), so every term of y is O(1) and nothing
overflows float16; "integers" draws small integers in [-3, 3] (A, B, W
divided by 4), where most arithmetic is exact (the simplest values hypothesis
shrinks towards); "positive" draws x and A as |N(0, 1)| and |N(0, 1/I)| (activations
after a ReLU), so the sums x A^T grow with I instead of cancelling: the values
where accumulating in half precision instead of float32 shows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..backend import host_rng
from .tolerance import DTYPES, to_dtype

__all__ = ["Problem", "SGDOptions"]

VALUE_KINDS = ("integers", "normal", "positive")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One forward/backward problem.

    Args:
      lead: leading dimensions of x (() for x of shape (I,)); N = prod(lead).
      I, O, R: in_features, out_features, rank.
      dtype: "float64", "float32", "float16" or "bfloat16".
      seed: seed of the host generator the arrays come from.
      scale: s (alpha / R or alpha / sqrt(R)).
      W, bias: whether the base weight (O, I) and base bias (O,) are present.
      dropout: drop probability p of the LoRA-branch mask (0 = no mask).
      values: "normal", "integers" or "positive" (see the module docstring).

    Example:
      >>> p = Problem(lead=(2,), I=3, O=4, R=2, dtype="float16", seed=0)
      >>> {k: v.shape for k, v in p.arrays().items() if v is not None}["A"]
      (2, 3)
    """

    lead: tuple = (2,)
    I: int = 4
    O: int = 3
    R: int = 2
    dtype: str = "float32"
    seed: int = 0
    scale: float = 2.0
    W: bool = True
    bias: bool = False
    dropout: float = 0.0
    values: str = "normal"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Problem.dtype is {self.dtype!r}; expected one of {DTYPES}")
        if self.values not in VALUE_KINDS:
            raise ValueError(f"Problem.values is {self.values!r}; expected one of {VALUE_KINDS}")
        for name in ("I", "O", "R"):
            if getattr(self, name) < 1:
                raise ValueError(f"Problem.{name} is {getattr(self, name)}; expected >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Problem.dropout is {self.dropout}; expected 0 <= p < 1")
        object.__setattr__(self, "lead", tuple(int(n) for n in self.lead))

    @property
    def N(self) -> int:
        """Rows: the product of the leading dimensions."""
        return math.prod(self.lead)

    def shapes(self) -> str:
        """A one-line summary in legend letters."""
        return (f"x {self.lead + (self.I,)}, A (R, I) = ({self.R}, {self.I}), B (O, R) = ({self.O}, {self.R}), "
                f"N = {self.N}, dtype {self.dtype}, scale {self.scale!r}, W {self.W}, bias {self.bias}, "
                f"dropout {self.dropout}")

    def arrays(self) -> dict[str, Any]:
        """{x, A, B, W, bias, dropout_mask, dy, target}: NumPy arrays of ``dtype`` (None where absent)."""
        rng = host_rng(self.seed)
        xs, ys = self.lead + (self.I,), self.lead + (self.O,)

        def draw(shape, std):
            if self.values == "integers":
                v = rng.integers(-3, 4, size=shape).astype(np.float64)
                return v if std == 1.0 else v / 4.0
            return rng.standard_normal(shape) * std

        def draw_pos(shape, std):
            v = draw(shape, std)
            return np.abs(v) if self.values == "positive" else v

        raw = {
            "x": draw_pos(xs, 1.0),
            "A": draw_pos((self.R, self.I), 1.0 / math.sqrt(self.I)),
            "B": draw((self.O, self.R), 1.0 / math.sqrt(self.R)),
            "W": draw((self.O, self.I), 1.0 / math.sqrt(self.I)),
            "bias": draw((self.O,), 1.0),
            "dy": draw(ys, 1.0),
            "target": draw(ys, 1.0),
        }
        keep = rng.random(xs) >= self.dropout
        raw["dropout_mask"] = np.where(keep, 1.0 / (1.0 - self.dropout), 0.0)
        if not self.W:
            raw["W"] = None
        if not self.bias:
            raw["bias"] = None
        if self.dropout == 0.0:
            raw["dropout_mask"] = None
        return {k: None if v is None else to_dtype(v, self.dtype) for k, v in raw.items()}


@dataclasses.dataclass(frozen=True)
class SGDOptions:
    """``torch.optim.SGD``'s options for a training problem, and the number of steps.

    Example:
      >>> SGDOptions(lr=0.1, momentum=0.9).as_kwargs()["momentum"]
      0.9
    """

    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    steps: int = 3

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a training step (everything but ``steps``)."""
        d = dataclasses.asdict(self)
        d.pop("steps")
        return d
