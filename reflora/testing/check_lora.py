"""Checks of the LoRA layer: forward, backward and the metamorphic properties of a forward (and merge)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..ops.lora import lora_backward, lora_forward
from ._report import (CheckResult, accepts_keyword, call_candidate, compare_tensor, dtype_arg, as_f64, raise_failure, CheckFailure, to_host, candidate_kwargs, tensor_pair, resolve_policy,
                      draw_problems, run_examples, converter)
from .envelope import Q, backward_envelope, forward_envelope, merge_envelope
from .policy import TolerancePolicy
from .problems import Problem

__all__ = ["check_backward", "check_backward_problem", "check_forward", "check_forward_problem",
           "check_metamorphic", "check_metamorphic_problem"]


def check_forward_problem(forward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                          to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``forward`` on one Problem; return {"y": worst err / bound}. Raises AssertionError on failure."""
    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d = problem.dtype
    try:
        if a["dropout_mask"] is not None and not accepts_keyword(forward, "dropout_mask"):
            raise CheckFailure("the problem has a dropout mask but forward takes no dropout_mask parameter")
        f = {k: as_f64(v) for k, v in a.items()}
        ref, _ = lora_forward(f["x"], f["A"], f["B"], scale=problem.scale, W=f["W"], bias=f["bias"],
                              dropout_mask=f["dropout_mask"])
        env = forward_envelope(f["x"], f["A"], f["B"], scale=problem.scale, W=f["W"], bias=f["bias"],
                               dropout_mask=f["dropout_mask"], dtype=d, accumulate=policy.accumulate)
        y = call_candidate("forward", forward, conv(a["x"]), conv(a["A"]), conv(a["B"]), scale=problem.scale,
                           W=None if a["W"] is None else conv(a["W"]),
                           bias=None if a["bias"] is None else conv(a["bias"]),
                           **candidate_kwargs(forward, a["dropout_mask"], conv))
        return {"y": compare_tensor("y", y, ref, env, policy, d, check_dtype=check_dtype)}
    except CheckFailure as f_:
        raise raise_failure("check_forward", [("forward", forward)], problem, str(f_),
                            "check_forward_problem(forward, problem", to=to, exc=f_.__cause__) from None


def check_backward_problem(backward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                           to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``backward`` on one Problem; return {"dx", "dA", "dB": worst err / bound}."""
    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    try:
        if a["dropout_mask"] is not None and not accepts_keyword(backward, "dropout_mask"):
            raise CheckFailure("the problem has a dropout mask but backward takes no dropout_mask parameter")
        f = {k: as_f64(v) for k, v in a.items()}
        _, cache = lora_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                                dropout_mask=f["dropout_mask"])
        ref = lora_backward(f["dy"], cache)
        env = backward_envelope(f["x"], f["A"], f["B"], f["dy"], scale=s, W=f["W"], dropout_mask=f["dropout_mask"],
                                dtype=d, accumulate=policy.accumulate)
        out = call_candidate("backward", backward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(a["dy"]), scale=s,
                            W=None if a["W"] is None else conv(a["W"]),
                            bias=None if a["bias"] is None else conv(a["bias"]),
                            **candidate_kwargs(backward, a["dropout_mask"], conv))
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise CheckFailure(f"backward returned {type(out).__name__}; expected a tuple (dx, dA, dB)")
        ratios = {}
        for name, c, r, e in zip(("dx", "dA", "dB"), out, ref, env):
            ratios[name] = compare_tensor(name, c, np.asarray(r), e, policy, d, check_dtype=check_dtype)
        return ratios
    except CheckFailure as f_:
        raise raise_failure("check_backward", [("backward", backward)], problem, str(f_),
                            "check_backward_problem(backward, problem", to=to, exc=f_.__cause__) from None


def check_metamorphic_problem(forward: Callable, problem: Problem, *, merge: Callable | None = None,
                              policy: TolerancePolicy | None = None, to: Any = None,
                              check_dtype: bool = True) -> dict[str, float]:
    """The metamorphic properties on one Problem (with W): batched = looped over rows; zero-padding the
    rank changes nothing; B = 0 gives the base output; merged forward = unmerged (when ``merge`` is given).

    Two candidate outputs may differ by twice the forward's envelope (each is within it of the exact
    result); an output against the float64 reference by its own envelope. The forward through the
    candidate's merged weight is judged with that weight held within the merge envelope.
    """
    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: as_f64(v) for k, v in a.items()}
    mask_kw = candidate_kwargs(forward, a["dropout_mask"], conv)

    def fwd(x, A, B, W=a["W"], mask_kw=mask_kw, native_W=None):
        return call_candidate("forward", forward, conv(x), conv(A), conv(B), scale=s,
                              W=native_W if native_W is not None else (None if W is None else conv(W)),
                              bias=None if a["bias"] is None else conv(a["bias"]), **mask_kw)

    def env_of(A, B, W=f["W"], mask=f["dropout_mask"]):
        return forward_envelope(f["x"], A, B, scale=s, W=W, bias=f["bias"], dropout_mask=mask, dtype=d,
                                accumulate=policy.accumulate)

    ratios = {}
    try:
        if a["dropout_mask"] is not None and not accepts_keyword(forward, "dropout_mask"):
            raise CheckFailure("the problem has a dropout mask but forward takes no dropout_mask parameter")
        bound = 2 * policy.bound("y", d, env_of(f["A"], f["B"]))
        y, dt = to_host(fwd(a["x"], a["A"], a["B"]))
        # batched equals looped over rows
        x_NI = a["x"].reshape(-1, problem.I)
        m_NI = None if a["dropout_mask"] is None else a["dropout_mask"].reshape(-1, problem.I)
        rows = []
        for i in range(x_NI.shape[0]):
            kw = {} if m_NI is None else {"dropout_mask": conv(m_NI[i:i + 1])}
            rows.append(to_host(fwd(x_NI[i:i + 1], a["A"], a["B"], mask_kw=kw))[0])
        looped = np.concatenate(rows, axis=0).reshape(y.shape) if rows else y
        ratios["y_looped"] = tensor_pair("batched vs looped over rows: y_looped", y, looped, bound)
        # zero rows of A and zero columns of B leave the update unchanged
        P = 2
        A_pad = np.concatenate([a["A"], np.zeros((P, problem.I), a["A"].dtype)], axis=0)
        B_pad = np.concatenate([a["B"], np.zeros((problem.O, P), a["B"].dtype)], axis=1)
        y_pad, _ = to_host(fwd(a["x"], A_pad, B_pad))
        ratios["y_padded"] = tensor_pair(f"rank R = {problem.R} padded with {P} zero rows of A and zero columns of B: "
                                         "y_padded", y, y_pad, bound)
        # B = 0 gives the base output x W^T + bias
        B0 = np.zeros_like(a["B"])
        ref0, _ = lora_forward(f["x"], f["A"], as_f64(B0), scale=s, W=f["W"], bias=f["bias"],
                               dropout_mask=f["dropout_mask"])
        y0 = fwd(a["x"], a["A"], B0)
        ratios["y_B0"] = compare_tensor("y_B0", y0, ref0, env_of(f["A"], as_f64(B0)), policy, d, check_dtype=check_dtype,
                                        what="(B = 0 must give the base output x W^T + bias)")
        if merge is not None and a["W"] is not None:
            Wm = call_candidate("merge", merge, conv(a["W"]), conv(a["A"]), conv(a["B"]), scale=s)
            env_W = merge_envelope(f["W"], f["A"], f["B"], scale=s, dtype=d, accumulate=policy.accumulate)
            ref_nomask, _ = lora_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"])
            # the merged weight is held within its envelope (the exact W + s B A, error env_W.e)
            env_m = forward_envelope(f["x"], f["A"], as_f64(B0), scale=s, W=Q(env_W.v, env_W.e, env_W.m),
                                     bias=f["bias"], dtype=d, accumulate=policy.accumulate)
            ym = call_candidate("forward", forward, conv(a["x"]), conv(a["A"]), conv(B0), scale=s, W=Wm,
                                bias=None if a["bias"] is None else conv(a["bias"]))
            ratios["y_merged"] = compare_tensor(
                "y_merged", ym, ref_nomask, env_m, policy, d, check_dtype=check_dtype,
                what="(forward through merge(W, A, B) with B = 0, against the unmerged y)")
        return ratios
    except CheckFailure as f_:
        vars_ = [("forward", forward)] + ([("merge", merge)] if merge is not None else [])
        call = "check_metamorphic_problem(forward, problem" + (", merge=merge" if merge is not None else "")
        raise raise_failure("check_metamorphic", vars_, problem, str(f_), call, to=to, exc=f_.__cause__) from None


# ---------------------------------------------------------------- hypothesis drivers


def check_forward(forward: Callable, *, dtype: str = "float32", max_examples: int = 100, derandomize: bool = False,
                  seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                  dropout: bool | None = None, check_dtype: bool = True, max_size: int = 32,
                  shrink: bool = True) -> CheckResult:
    """Check a candidate forward(x, A, B, *, scale, W=None, bias=None) -> y on ``max_examples`` problems.

    Passes when, for every problem, |y_cand - y_ref64| <= the envelope, elementwise
    (``reflora.testing.policy``: any legitimate evaluation in ``dtype`` passes).

    Args:
      forward: the candidate (see the module docstring for the protocol).
      dtype: the dtype the candidate computes in: "float32", "float16", "bfloat16" or "float64".
      max_examples, derandomize, seed: hypothesis settings (``seed`` fixes a randomized run).
      shrink: shrink a failure to the smallest failing problem (default; False reports the first found).
      policy: a ``TolerancePolicy`` (default: the envelope with float32 accumulation).
      to: how arrays reach the candidate ("numpy", "torch", "jax", "cupy", or a callable).
      dropout: test dropout masks; None = when forward has a ``dropout_mask`` parameter.
      check_dtype: require outputs in ``dtype``.
      max_size: largest I and O drawn.

    Returns:
      ``CheckResult`` with the worst err / tolerance seen.

    Raises:
      AssertionError: the first (shrunk) failing problem, with a reproduction.

    Example:
      >>> import numpy as np
      >>> def fwd(x, A, B, *, scale, W=None, bias=None):
      ...     y = scale * (x @ A.T) @ B.T + (0 if bias is None else bias)
      ...     return y if W is None else y + x @ W.T
      >>> check_forward(fwd, max_examples=5).examples
      5
    """
    d = dtype_arg(dtype)
    use_dropout = accepts_keyword(forward, "dropout_mask") if dropout is None else dropout
    strat = draw_problems(d, dropout=None if use_dropout else False, max_size=max_size, wide=True)
    return run_examples("check_forward", d, strat,
                        lambda p: check_forward_problem(forward, p, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_backward(backward: Callable, *, dtype: str = "float32", max_examples: int = 100, derandomize: bool = False,
                   seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                   dropout: bool | None = None, check_dtype: bool = True, max_size: int = 32,
                   shrink: bool = True) -> CheckResult:
    """Check a candidate backward(x, A, B, dy, *, scale, W=None, bias=None) -> (dx, dA, dB).

    dx (..., I), dA (R, I), dB (O, R) are the gradients of sum(y * dy), summed
    over all leading dimensions; each is compared as ``check_forward`` compares y.
    Arguments as ``check_forward``.
    """
    d = dtype_arg(dtype)
    use_dropout = accepts_keyword(backward, "dropout_mask") if dropout is None else dropout
    strat = draw_problems(d, dropout=None if use_dropout else False, max_size=max_size, wide=True)
    return run_examples("check_backward", d, strat,
                        lambda p: check_backward_problem(backward, p, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_metamorphic(forward: Callable, *, merge: Callable | None = None, dtype: str = "float32",
                      max_examples: int = 50, derandomize: bool = False, seed: int | None = None,
                      policy: TolerancePolicy | None = None, to: Any = None, dropout: bool | None = None,
                      check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check the metamorphic properties of a forward (and a merge, if given); see
    ``check_metamorphic_problem``. Arguments as ``check_forward``."""
    d = dtype_arg(dtype)
    use_dropout = accepts_keyword(forward, "dropout_mask") if dropout is None else dropout
    strat = draw_problems(d, dropout=None if use_dropout else False, W=True, min_rows=2, max_size=16)
    return run_examples("check_metamorphic", d, strat,
                        lambda p: check_metamorphic_problem(forward, p, merge=merge, policy=policy, to=to,
                                                    check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)
