"""Checks: run a candidate LoRA implementation against the reference on many problems.

Protocols (A (R, I), B (O, R), W (O, I), bias (O,), x (..., I), as everywhere in reflora):

    forward(x, A, B, *, scale, W=None, bias=None[, dropout_mask=None]) -> y (..., O)
    backward(x, A, B, dy, *, scale, W=None, bias=None[, dropout_mask=None]) -> (dx, dA, dB)
    train_step(x, target, params, state, *, scale, lr, momentum, dampening,
               weight_decay, nesterov, maximize) -> (params, state)
        params = {"A", "B", "W", "bias"} (W, bias None when absent; frozen:
        they must come back unchanged); state is the candidate's own (None
        on the first step). One step: y = forward, L = mean((y - target)^2),
        backward, torch.optim.SGD update of A and B.
    merge(W, A, B, *, scale) -> W' (O, I)            W' = W + s B A
    unmerge(W', A, B, *, scale) -> W (O, I)          W = W' - s B A
    init(config, *, seed) -> (A, B)                  a fresh adapter (judged statistically)
    scaling(rank, alpha, *, use_rslora) -> float     alpha / R, or alpha / sqrt(R)
    save(path, A, B) -> None;  load(path) -> (A, B)  an adapter file round trip

``dropout_mask`` is passed only to callables whose signature has that
parameter (or ``**kwargs``): an inverted-dropout mask with x's shape, entries
0 or 1/(1-p), applied to the LoRA branch only.

Arrays reach the candidate in its dtype (``dtype=``) as NumPy arrays, or
converted by ``to=``: "numpy" (default), "torch", "jax", "cupy",
"array_api_strict", or any callable taking a NumPy array. Results may be any
DLPack-capable array (torch, jax, NumPy, CuPy); they are brought back to the
host. bfloat16 travels as ml_dtypes.bfloat16 (NumPy) or torch.bfloat16.

Every check draws problems with hypothesis (``reflora.testing.strategies``),
computes the float64 reference (``reflora.lora_forward`` / ``lora_backward`` /
``SGD`` / ``merge``) from the same rounded inputs, and compares element by
element with the error envelope (``reflora.testing.envelope``): a rigorous
bound over every legitimate evaluation in the dtype, 0 where every such
evaluation is exact (``reflora.testing.policy``). A failure raises AssertionError naming the
tensor, the max absolute and relative error and where, the tolerance and how
it was made, and a copy-pasteable reproduction (the Problem and the call that
reruns just that case). A candidate that raises is a failure too, reported
with the problem that made it raise. On success a check returns a
``CheckResult`` with the worst error/tolerance ratio per tensor.

The checks live in ``check_lora`` (forward, backward, metamorphic), ``check_stats`` (init),
``check_train`` (SGD, merge, unmerge), ``check_variants`` (lora_bias, DoRA) and ``check_io`` (round trip, scale); this
module gathers them.
"""

from __future__ import annotations

from ._report import CheckResult, compare_tensor, CheckFailure, converter  # noqa: F401 (compare_tensor, CheckFailure: for tests)
from .check_io import SCALE_GRID, check_roundtrip, check_roundtrip_problem, check_scale  # noqa: F401
from .check_lora import (check_backward, check_backward_problem, check_forward, check_forward_problem,
                         check_metamorphic, check_metamorphic_problem)
from .check_stats import check_init, check_init_config
from .check_variants import (check_dora_backward, check_dora_backward_problem, check_dora_forward,
                             check_dora_forward_problem, check_lora_bias_backward, check_lora_bias_backward_problem, check_lora_bias_forward,
                             check_lora_bias_forward_problem)
from .check_train import (check_merge, check_merge_problem, check_sgd, check_sgd_problem, check_unmerge,
                          check_unmerge_problem)

__all__ = [
    "CheckResult",
    "check_backward",
    "check_backward_problem",
    "check_forward",
    "check_dora_backward",
    "check_dora_backward_problem",
    "check_dora_forward",
    "check_dora_forward_problem",
    "check_forward_problem",
    "check_init",
    "check_init_config",
    "check_lora_bias_backward",
    "check_lora_bias_backward_problem",
    "check_lora_bias_forward",
    "check_lora_bias_forward_problem",
    "check_merge",
    "check_merge_problem",
    "check_metamorphic",
    "check_metamorphic_problem",
    "check_roundtrip",
    "check_roundtrip_problem",
    "check_scale",
    "check_sgd",
    "check_sgd_problem",
    "check_unmerge",
    "check_unmerge_problem",
    "converter",
]
