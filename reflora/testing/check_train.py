"""Checks of training and merging: several SGD steps on the MSE loss, and merge W' = W + s B A."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..ops.lora import lora_backward, lora_forward, mse_loss
from ..optim.sgd import SGD
from ._report import CheckResult, call_candidate, compare_tensor, dtype_arg, as_f64, raise_failure, CheckFailure, to_host, resolve_policy, draw_problems, run_examples, converter
from .envelope import merge_envelope
from .envelope_train import train_envelope
from .policy import TolerancePolicy
from .problems import Problem, SGDOptions

__all__ = ["check_merge", "check_merge_problem", "check_sgd", "check_sgd_problem", "check_unmerge",
           "check_unmerge_problem"]


def check_sgd_problem(train_step: Callable, problem: Problem, options: SGDOptions, *,
                      policy: TolerancePolicy | None = None, to: Any = None,
                      check_dtype: bool = True) -> dict[str, float]:
    """Run ``options.steps`` training steps of ``train_step`` and compare A, B after every step."""
    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: as_f64(v) for k, v in a.items()}
    kw = options.as_kwargs()
    try:
        env = train_envelope(f["x"], f["target"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                             steps=options.steps, sgd=kw, dtype=d, accumulate=policy.accumulate)
        opt = SGD(**kw)
        params = {"A": conv(a["A"]), "B": conv(a["B"]), "W": None if a["W"] is None else conv(a["W"]),
                  "bias": None if a["bias"] is None else conv(a["bias"])}
        ref = {"A": f["A"], "B": f["B"]}
        ref_state = opt.init(ref)
        state = None
        ratios: dict[str, float] = {}
        for t in range(options.steps):
            y, cache = lora_forward(f["x"], ref["A"], ref["B"], scale=s, W=f["W"], bias=f["bias"])
            _, dy = mse_loss(y, f["target"])
            g = lora_backward(dy, cache)
            ref, ref_state = opt.step(ref, {"A": g.dA, "B": g.dB}, ref_state)
            out = call_candidate(f"train_step (step {t + 1})", train_step, conv(a["x"]), conv(a["target"]), params, state,
                                 scale=s, **kw)
            if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[0], dict):
                raise CheckFailure(f"train_step returned {type(out).__name__}; expected (params dict, state)")
            new, state = out
            for key in ("W", "bias"):
                if a[key] is not None:
                    if key not in new:
                        raise CheckFailure(f"train_step's params have no {key!r}; expected it back unchanged (frozen)")
                    h, _ = to_host(new[key])
                    if h.shape != a[key].shape or not np.array_equal(h, f[key]):
                        diff = float(np.max(np.abs(h - f[key]))) if h.shape == a[key].shape else float("nan")
                        raise CheckFailure(f"{key} changed in training step {t + 1} (max change {diff:.4g}); "
                                           f"expected it frozen: only A and B are trained")
            for i, name in enumerate(("A", "B")):
                if name not in new:
                    raise CheckFailure(f"train_step's params have no {name!r}")
                r = compare_tensor(name, new[name], ref[name], env[t][i], policy, d, check_dtype=check_dtype,
                                   what=f"after SGD step {t + 1} of {options.steps}")
                ratios[name] = max(ratios.get(name, 0.0), r)
            params = new
        return ratios
    except CheckFailure as f_:
        raise raise_failure("check_sgd", [("train_step", train_step)], problem, str(f_),
                            "check_sgd_problem(train_step, problem, options", extra=options, to=to,
                            exc=f_.__cause__) from None


def check_merge_problem(merge: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                        to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``merge(W, A, B, *, scale)`` on one Problem against W + s B A (float64), elementwise within the
    merge envelope (PEFT's CPU and GPU orders, torchtune's W + (s B) A, loralib's, addmm all pass)."""
    from ..numerics.merge import merge as ref_merge  # noqa: PLC0415

    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: as_f64(v) for k, v in a.items()}
    W = a["W"] if a["W"] is not None else np.zeros((problem.O, problem.I)).astype(a["A"].dtype)
    W64 = W.astype(np.float64)
    try:
        ref = np.asarray(ref_merge(W64, f["A"], f["B"], scale=s).weight)
        env = merge_envelope(W64, f["A"], f["B"], scale=s, dtype=d, accumulate=policy.accumulate)
        out = call_candidate("merge", merge, conv(W), conv(a["A"]), conv(a["B"]), scale=s)
        return {"W": compare_tensor("W", out, ref, env, policy, d, check_dtype=check_dtype,
                                    what="(merged weight W + s B A)")}
    except CheckFailure as f_:
        raise raise_failure("check_merge", [("merge", merge)], problem, str(f_), "check_merge_problem(merge, problem",
                            to=to, exc=f_.__cause__) from None


def check_unmerge_problem(unmerge: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                          to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``unmerge(W', A, B, *, scale) -> W' - s B A`` on one Problem (the problem's W plays the merged
    weight W'), elementwise within the merge envelope with the scale negated."""
    from ..numerics.merge import unmerge as ref_unmerge  # noqa: PLC0415

    policy, conv, a = resolve_policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: as_f64(v) for k, v in a.items()}
    W = a["W"] if a["W"] is not None else np.zeros((problem.O, problem.I)).astype(a["A"].dtype)
    W64 = W.astype(np.float64)
    try:
        ref = np.asarray(ref_unmerge(W64, f["A"], f["B"], scale=s).weight)
        env = merge_envelope(W64, f["A"], f["B"], scale=-s, dtype=d, accumulate=policy.accumulate)
        out = call_candidate("unmerge", unmerge, conv(W), conv(a["A"]), conv(a["B"]), scale=s)
        return {"W_unmerged": compare_tensor("W_unmerged", out, ref, env, policy, d, check_dtype=check_dtype,
                                             what="(unmerged weight W' - s B A)")}
    except CheckFailure as f_:
        raise raise_failure("check_unmerge", [("unmerge", unmerge)], problem, str(f_),
                            "check_unmerge_problem(unmerge, problem", to=to, exc=f_.__cause__) from None


# ---------------------------------------------------------------- hypothesis drivers


def check_sgd(train_step: Callable, *, dtype: str = "float32", steps: int | None = None, max_examples: int = 50,
              derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
              to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a candidate training step (forward, MSE, backward, torch.optim.SGD) over several steps.

    Args:
      train_step: see the module docstring for the protocol.
      steps: steps per problem (None: hypothesis draws 1-4). Problems come from
        ``strategies.training_problems``: |s| <= 2, lr near the stable cap and weight decay
        large enough that every option's effect is above the dtype's resolution.
      Others as ``check_forward``.
    """
    from . import strategies  # noqa: PLC0415

    d = dtype_arg(dtype)
    strat = strategies.training_problems(dtypes=[d], steps=steps)
    return run_examples("check_sgd", d, strat,
                        lambda p, o: check_sgd_problem(train_step, p, o, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_merge(merge: Callable, *, dtype: str = "float32", max_examples: int = 50, derandomize: bool = False,
                seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a candidate merge(W, A, B, *, scale) -> W + s B A (O, I). Arguments as ``check_forward``."""
    d = dtype_arg(dtype)
    strat = draw_problems(d, W=True, dropout=False)
    return run_examples("check_merge", d, strat,
                        lambda p: check_merge_problem(merge, p, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_unmerge(unmerge: Callable, *, dtype: str = "float32", max_examples: int = 50, derandomize: bool = False,
                  seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                  check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a candidate unmerge(W', A, B, *, scale) -> W' - s B A (O, I). Arguments as ``check_forward``."""
    d = dtype_arg(dtype)
    strat = draw_problems(d, W=True, dropout=False)
    return run_examples("check_unmerge", d, strat,
                        lambda p: check_unmerge_problem(unmerge, p, policy=policy, to=to, check_dtype=check_dtype),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)
