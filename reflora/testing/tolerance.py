"""The tolerance of the conformance kit (kept as one import place; the parts live in three modules).

* ``reflora.testing.envelope``: the error envelope, a rigorous per-element
  bound over every legitimate evaluation in dtype d (the derivation);
* ``reflora.testing.policy``: ``TolerancePolicy`` and ``Tolerance``, turning
  the envelope into the bound a check applies;
* ``reflora.testing.emulation``: one concrete emulated evaluation per op
  (``emulate_forward`` ...), and dtype helpers.

See docs/derivations/tolerance.md.
"""

from __future__ import annotations

from .emulation import (ACCUMULATE, DTYPES, emulate_backward, emulate_forward, emulate_merge, emulate_train,
                        magnitude_backward, magnitude_forward, np_dtype, to_dtype)
from .envelope import backward_envelope, forward_envelope, merge_envelope
from .envelope_train import train_envelope
from .policy import DEFAULTS, F64_SLACK, TENSOR_DEFAULTS, TENSORS, Tolerance, TolerancePolicy

__all__ = [
    "ACCUMULATE",
    "DEFAULTS",
    "DTYPES",
    "F64_SLACK",
    "TENSORS",
    "TENSOR_DEFAULTS",
    "Tolerance",
    "TolerancePolicy",
    "backward_envelope",
    "emulate_backward",
    "emulate_forward",
    "emulate_merge",
    "emulate_train",
    "forward_envelope",
    "magnitude_backward",
    "magnitude_forward",
    "merge_envelope",
    "np_dtype",
    "to_dtype",
    "train_envelope",
]
