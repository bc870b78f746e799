"""The tolerance policy: how close a candidate of dtype d must come to the exact result, element by element.

The rule
--------
For every element i of an output tensor T of a candidate computing in dtype d:

    |cand_i - ref64_i|  <=  k * env_i  +  floor_rel * mag_i  +  floor_abs  +  2^-39 * mag_i

* ref64: reflora's float64 result from the candidate's own inputs (already
  values of d: input rounding is not counted as error);
* env: the error envelope of ``reflora.testing.envelope``, a rigorous bound
  on |computed - exact| over EVERY legitimate evaluation in d (any summation
  order, float32 or wider accumulation, the scale on any factor, bias fused or
  added separately, intermediates rounded to d at any product boundary, the
  merge as PEFT, torchtune or loralib do it). Where every legitimate
  evaluation is exact (values on a dyadic grid that no partial sum outgrows),
  env is 0;
* mag: the same computation on absolute values; 2^-39 mag bounds float64's
  own error in ref64 (depth up to ~8000 roundings of 2^-53);
* k, floor_rel, floor_abs: 1, 0, 0 by default, so a correct candidate passes
  by construction and nothing is loosened; ``overrides`` may loosen (a
  candidate outside the class, e.g. accumulating in d) but never tightens
  below the envelope except through k < 1, which is refused.

Tensor names: "y" (forward), "dx", "dA", "dB" (backward), "A", "B" (after SGD
steps), "W" (merge), "W_unmerged" (unmerge), "y_B0" and "y_merged" (the
metamorphic forwards with B = 0 and through a merged weight). Two candidate
outputs (batched vs looped, rank padding) may differ by twice the envelope.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from .._validate import check_real
from ..backend import dtype_name
from .emulation import DTYPES, check_accumulate

__all__ = ["DEFAULTS", "F64_SLACK", "TENSORS", "TENSOR_DEFAULTS", "Tolerance", "TolerancePolicy"]

#: The tensor names a tolerance can be set for (see the module docstring).
TENSORS = ("y", "dx", "dA", "dB", "A", "B", "W", "W_unmerged", "y_B0", "y_merged", "dlora_bias")
#: Relative slack for float64's own rounding in the reference (times mag).
F64_SLACK = 2.0**-39


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """One (tensor, dtype) setting: bound = k * envelope + floor_rel * mag + floor_abs (elementwise)."""

    k: float
    floor_rel: float
    floor_abs: float

    def bound(self, envelope: Any, mag: Any) -> Any:
        """The largest acceptable |cand - ref64| (scalars or arrays, elementwise), before float64's slack."""
        return self.k * envelope + self.floor_rel * mag + self.floor_abs


#: Per-dtype defaults: the envelope itself, nothing added.
DEFAULTS: dict[str, Tolerance] = {d: Tolerance(1.0, 0.0, 0.0) for d in DTYPES}

#: Per-(tensor, dtype) defaults that replace DEFAULTS: none are needed, since the envelope already
#: follows every tensor's own evaluation class (kept for existing code that reads it).
TENSOR_DEFAULTS: dict[tuple[str, str], Tolerance] = {}


@dataclasses.dataclass(frozen=True)
class TolerancePolicy:
    """Which Tolerance applies to a (tensor, dtype), and which accumulation is legitimate.

    Args:
      k: the multiple of the envelope (default 1: the derived bound itself).
      accumulate: the coarsest legitimate accumulation: "float32" (default), "float64" (stricter)
        or "dtype" (allows accumulating in d itself, e.g. a bfloat16 sum).
      overrides: {key: {"k": ..., "floor_rel": ..., "floor_abs": ...}} where key
        is a dtype ("float16"), a tensor ("dA") or both ("dA/float16"); more
        specific keys win: "dA/float16" over "dA" over "float16" over the defaults.

    Raises:
      ValueError: an unknown accumulate, override key (a dtype, a name in TENSORS, or
        "tensor/dtype") or field, or a field value that is not finite (k >= 1, floors >= 0).

    Example:
      >>> p = TolerancePolicy(overrides={"dA/bfloat16": {"k": 4}})
      >>> p.tolerance("dA", "bfloat16").k, p.tolerance("dB", "bfloat16").k
      (4.0, 1.0)
    """

    k: float = 1.0
    accumulate: str = "float32"
    overrides: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "_cache", {})
        check_accumulate(self.accumulate)
        check_real(self.k, "k", minimum=1)  # the one number rule: NaN, inf, 400-digit integers refused
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

    def bound(self, tensor: str, dtype: Any, envelope: Any) -> np.ndarray:
        """The elementwise bound on |cand - ref64| for an envelope ``Q`` (v, e, m), float64's slack included."""
        tol = self.tolerance(tensor, dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            return tol.bound(envelope.e * (1 + 2.0**-20), envelope.m) + F64_SLACK * envelope.m

    def to_dict(self) -> dict:
        """A JSON-ready description (for golden manifests)."""
        return {"k": self.k, "accumulate": self.accumulate, "overrides": {k: dict(v) for k, v in self.overrides.items()},
                "defaults": {d: dataclasses.asdict(t) for d, t in DEFAULTS.items()},
                "rule": "|cand - ref64| <= k envelope + floor_rel mag + floor_abs + 2^-39 mag, elementwise "
                        "(reflora.testing.envelope)"}

