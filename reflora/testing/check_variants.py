"""Checks of LoRA variants: PEFT's lora_bias (a bias c on lora_B, scaled with the branch) and the DoRA forward.

Protocols (A (R, I), B (O, R), c (O,), W (O, I), x (..., I)):

    forward(x, A, B, lora_bias, *, scale, W=None, bias=None) -> y
        y = x W^T + bias + s ((x A^T) B^T + c)
    backward(x, A, B, lora_bias, dy, *, scale, W=None, bias=None) -> (dx, dA, dB, dlora_bias)
        dlora_bias = s sum_N dy

    dora_forward(x, A, B, m, W, *, scale, bias=None) -> y
        y = g * (x W^T + s (x A^T) B^T) + bias,  g = m / ||W + s B A||_row
    dora_backward(x, A, B, m, W, dy, *, scale, bias=None) -> (dx, dA, dB, dm)
        the norm detached (PEFT's and the DoRA paper's gradient; reflora.ops.dora)

c and m are drawn from the problem's seed (``lora_bias_of``, ``magnitude_of``). Every output is judged
elementwise against the error envelope (c in lora_B's accumulator, as
nn.Linear does, or added after; the scale anywhere).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..backend import host_rng
from ..ops.lora_bias import lora_bias_backward, lora_bias_forward
from ._report import CheckResult, call_candidate, compare_tensor, dtype_arg, as_f64, raise_failure, CheckFailure, resolve_policy, draw_problems, run_examples, converter
from .emulation import to_dtype
from .envelope import backward_envelope, forward_envelope, lora_bias_grad_envelope
from .policy import TolerancePolicy
from .problems import Problem

__all__ = ["check_dora_backward", "check_dora_backward_problem", "check_dora_forward", "check_dora_forward_problem", "magnitude_of", "check_lora_bias_backward", "check_lora_bias_backward_problem", "check_lora_bias_forward",
           "check_lora_bias_forward_problem", "lora_bias_of"]


def lora_bias_of(problem: Problem) -> np.ndarray:
    """c (O,) of ``problem``'s dtype, from its seed: N(0, 1), or integers in [-3, 3] for "integers" problems."""
    rng = host_rng(problem.seed + 7919)
    c = rng.integers(-3, 4, size=(problem.O,)).astype(np.float64) if problem.values == "integers" else \
        rng.standard_normal(problem.O)
    return to_dtype(c, problem.dtype)


def _args(problem: Problem, policy, to):
    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    c = lora_bias_of(problem)
    f = {k: as_f64(v) for k, v in a.items()}
    return policy, conv, a, f, c, c.astype(np.float64)


def check_lora_bias_forward_problem(forward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                                    to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check forward(x, A, B, lora_bias, *, scale, W, bias) on one Problem (no dropout)."""
    policy, conv, a, f, c, c64 = _args(problem, policy, to)
    d, s = problem.dtype, problem.scale
    try:
        ref, _ = lora_bias_forward(f["x"], f["A"], f["B"], c64, scale=s, W=f["W"], bias=f["bias"])
        env = forward_envelope(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"], lora_bias=c64, dtype=d,
                               accumulate=policy.accumulate)
        y = call_candidate("forward", forward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(c), scale=s,
                           W=None if a["W"] is None else conv(a["W"]),
                           bias=None if a["bias"] is None else conv(a["bias"]))
        return {"y": compare_tensor("y", y, ref, env, policy, d, check_dtype=check_dtype, what="(with lora_bias)")}
    except CheckFailure as f_:
        raise raise_failure("check_lora_bias_forward", [("forward", forward)], problem, str(f_),
                            "check_lora_bias_forward_problem(forward, problem", to=to, exc=f_.__cause__) from None


def check_lora_bias_backward_problem(backward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                                     to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check backward(x, A, B, lora_bias, dy, *, scale, W, bias) -> (dx, dA, dB, dlora_bias) on one Problem."""
    policy, conv, a, f, c, c64 = _args(problem, policy, to)
    d, s = problem.dtype, problem.scale
    try:
        _, cache = lora_bias_forward(f["x"], f["A"], f["B"], c64, scale=s, W=f["W"], bias=f["bias"])
        ref = lora_bias_backward(f["dy"], cache)
        envs = backward_envelope(f["x"], f["A"], f["B"], f["dy"], scale=s, W=f["W"], dtype=d,
                                 accumulate=policy.accumulate)
        envs = (*envs, lora_bias_grad_envelope(f["dy"], scale=s, dtype=d, accumulate=policy.accumulate))
        out = call_candidate("backward", backward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(c), conv(a["dy"]),
                            scale=s, W=None if a["W"] is None else conv(a["W"]),
                            bias=None if a["bias"] is None else conv(a["bias"]))
        if not isinstance(out, (tuple, list)) or len(out) != 4:
            raise CheckFailure(f"backward returned {type(out).__name__}; expected a tuple (dx, dA, dB, dlora_bias)")
        ratios = {}
        for name, got, r, e in zip(("dx", "dA", "dB", "dlora_bias"), out, ref, envs):
            ratios[name] = compare_tensor(name, got, np.asarray(r), e, policy, d, check_dtype=check_dtype)
        return ratios
    except CheckFailure as f_:
        raise raise_failure("check_lora_bias_backward", [("backward", backward)], problem, str(f_),
                            "check_lora_bias_backward_problem(backward, problem", to=to, exc=f_.__cause__) from None


def check_lora_bias_forward(forward: Callable, *, dtype: str = "float32", max_examples: int = 100,
                            derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
                            to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a lora_bias forward on ``max_examples`` problems (see the module docstring)."""
    d = dtype_arg(dtype)
    return run_examples("check_lora_bias_forward", d, draw_problems(d, dropout=False, wide=True),
                        lambda p: check_lora_bias_forward_problem(forward, p, policy=policy, to=to,
                                                                  check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_lora_bias_backward(backward: Callable, *, dtype: str = "float32", max_examples: int = 100,
                             derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
                             to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a lora_bias backward on ``max_examples`` problems (see the module docstring)."""
    d = dtype_arg(dtype)
    return run_examples("check_lora_bias_backward", d, draw_problems(d, dropout=False),
                        lambda p: check_lora_bias_backward_problem(backward, p, policy=policy, to=to,
                                                           check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


# ---------------------------------------------------------------- DoRA forward


def magnitude_of(problem: Problem) -> np.ndarray:
    """m (O,) of ``problem``'s dtype: the row norms of W + s B A times 1 + U(-1/4, 1/4), from its seed."""
    a = {k: as_f64(v) for k, v in problem.arrays().items()}
    n = np.linalg.norm(a["W"] + problem.scale * a["B"] @ a["A"], axis=1)
    return to_dtype(n * (1 + 0.25 * host_rng(problem.seed + 104729).uniform(-1, 1, problem.O)), problem.dtype)


def check_dora_forward_problem(forward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                               to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check dora_forward(x, A, B, m, W, *, scale, bias) on one Problem (with W, no dropout)."""
    from ..ops.dora import dora_forward  # noqa: PLC0415
    from .envelope_dora import dora_forward_envelope  # noqa: PLC0415

    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    f = {k: as_f64(v) for k, v in a.items()}
    d, s = problem.dtype, problem.scale
    m = magnitude_of(problem)
    try:
        n = np.linalg.norm(f["W"] + s * f["B"] @ f["A"], axis=1)
        if not np.all(n > 0):
            return {}  # a row of W + s B A that vanishes has no direction: DoRA is undefined there
        ref, _ = dora_forward(f["x"], f["A"], f["B"], m.astype(np.float64), f["W"], scale=s, bias=f["bias"])
        env = dora_forward_envelope(f["x"], f["A"], f["B"], m.astype(np.float64), f["W"], scale=s, bias=f["bias"],
                                    dtype=d, accumulate=policy.accumulate)
        y = call_candidate("forward", forward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(m), conv(a["W"]), scale=s,
                           bias=None if a["bias"] is None else conv(a["bias"]))
        return {"y": compare_tensor("y", y, np.asarray(ref), env, policy, d, check_dtype=check_dtype, what="(DoRA)")}
    except CheckFailure as f_:
        raise raise_failure("check_dora_forward", [("forward", forward)], problem, str(f_),
                            "check_dora_forward_problem(forward, problem", to=to, exc=f_.__cause__) from None


def check_dora_forward(forward: Callable, *, dtype: str = "float32", max_examples: int = 100,
                       derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
                       to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a DoRA forward on ``max_examples`` problems with W (see the module docstring)."""
    d = dtype_arg(dtype)
    return run_examples("check_dora_forward", d, draw_problems(d, W=True, dropout=False),
                        lambda p: check_dora_forward_problem(forward, p, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_dora_backward_problem(backward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                                to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check dora_backward(x, A, B, m, W, dy, *, scale, bias) -> (dx, dA, dB, dm) on one Problem."""
    from ..ops.dora import dora_backward, dora_forward  # noqa: PLC0415
    from .envelope_dora import dora_backward_envelope  # noqa: PLC0415

    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    f = {k: as_f64(v) for k, v in a.items()}
    d, s = problem.dtype, problem.scale
    m = magnitude_of(problem)
    try:
        if not np.all(np.linalg.norm(f["W"] + s * f["B"] @ f["A"], axis=1) > 0):
            return {}  # a vanishing row has no direction: DoRA is undefined there
        _, cache = dora_forward(f["x"], f["A"], f["B"], m.astype(np.float64), f["W"], scale=s, bias=f["bias"])
        ref = dora_backward(f["dy"], cache)
        envs = dora_backward_envelope(f["x"], f["A"], f["B"], m.astype(np.float64), f["W"], f["dy"], scale=s,
                                      bias=f["bias"], dtype=d, accumulate=policy.accumulate)
        out = call_candidate("backward", backward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(m), conv(a["W"]),
                            conv(a["dy"]), scale=s, bias=None if a["bias"] is None else conv(a["bias"]))
        if not isinstance(out, (tuple, list)) or len(out) != 4:
            raise CheckFailure(f"backward returned {type(out).__name__}; expected a tuple (dx, dA, dB, dm)")
        ratios = {}
        for name, got, r, e in zip(("dx", "dA", "dB", "dm"), out, ref, envs):
            ratios[name] = compare_tensor(name, got, np.asarray(r), e, policy, d, check_dtype=check_dtype, what="(DoRA)")
        return ratios
    except CheckFailure as f_:
        raise raise_failure("check_dora_backward", [("backward", backward)], problem, str(f_),
                            "check_dora_backward_problem(backward, problem", to=to, exc=f_.__cause__) from None


def check_dora_backward(backward: Callable, *, dtype: str = "float32", max_examples: int = 100,
                        derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
                        to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a DoRA backward (norm detached) on ``max_examples`` problems with W (see the module docstring)."""
    d = dtype_arg(dtype)
    return run_examples("check_dora_backward", d, draw_problems(d, W=True, dropout=False),
                        lambda p: check_dora_backward_problem(backward, p, policy=policy, to=to,
                                                              check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)
