"""Conformance checks for Adam / AdamW training steps (with LoRA+ learning rates and gradient clipping).

The candidate is one optimiser step on a LoRA pair, as a training loop runs it:

    step(params, grads, state, *, lr, betas, eps, weight_decay, amsgrad, maximize,
         loraplus_lr_ratio, max_norm) -> (new_params, new_state)

``params`` and ``grads`` are {"A": (R, I), "B": (O, R)} arrays of one dtype
(converted with ``to``, e.g. "torch"); ``state`` is None on the first call,
then whatever the candidate returned. The candidate must:
  1. if ``max_norm`` is not None, clip the gradients to that total 2-norm over
     A and B together (torch.nn.utils.clip_grad_norm_);
  2. take one torch.optim.AdamW step (``check_adamw``: decoupled decay) or
     torch.optim.Adam step (``check_adam``: L2 decay) with lr for A and
     lr * loraplus_lr_ratio for B (LoRA+), the same weight decay for both.

The reference is reflora's Adam/AdamW and clip_grad_norm in float64 on the
same inputs (the gradients are fixed per problem and fed to both, so an error
never feeds back through a loss). The tolerance, per tensor after step t, is

    K * E_t + F,   E_t = max over steps s <= t of |emulated - reference|,   F = K u max|reference|

where "emulated" runs the same algorithm the way torch runs it in the dtype
(each op in float32, rounded to the dtype), u is the dtype's unit roundoff and
K = 4 the same safety factor as the forward checks' (docs/derivations/tolerance.md).

Observability. Every option must change the result by more than the tolerance,
or a bug in it would pass. The problems are built on a dyadic grid (entries
k/8 scaled by powers of 2, exact in bfloat16) with hyper-parameters chosen for
that: lr 2^-3 moves |p| <= 1 by far more than bfloat16's 2^-8 per step; eps
2^-4 is comparable with sqrt(v) (|g| in [2^-5, 2^-1]), so eps inside the root
or bias-corrected is visible; weight decay 2^-2 gives lr wd = 2^-5, and 1 - 2^-5
is exact in bfloat16; betas (0.75, 0.875) make both bias corrections large
in the first steps (1 - 0.875 = 1/8); gradient scales that fall by 8x and
rise again, with betas (0.5, 0.5) in half the grid, make amsgrad's running
max of v differ from the current v by a factor of about 2; a LoRA+ ratio of
4 and max_norm 2^-1 (below most steps' gradient norm, two tensors of different
norms) make the group learning rates and joint clipping visible.
tests/testing/test_optim_checks.py shows each listed bug caught in float32,
float16 and bfloat16, and torch.optim passing in all three.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import numpy as np

from ..numerics.rounding import round_to_dtype
from ..optim import Adam, AdamW, clip_grad_norm
from .checks import CheckResult, converter

__all__ = ["AdamOptions", "adam_option_grid", "check_adam", "check_adam_problem", "check_adamw",
           "check_adamw_problem"]

K = 4.0
_UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@dataclasses.dataclass(frozen=True)
class AdamOptions:
    """The options of one Adam/AdamW training step, and the number of steps.

    Example:
      >>> AdamOptions(amsgrad=True).as_kwargs()["amsgrad"]
      True
    """

    lr: float = 2.0 ** -3
    betas: tuple = (0.75, 0.875)
    eps: float = 2.0 ** -4
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    loraplus_lr_ratio: float = 1.0
    max_norm: float | None = None
    steps: int = 5

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the candidate step (everything but ``steps``)."""
        d = dataclasses.asdict(self)
        d.pop("steps")
        d["betas"] = tuple(d["betas"])
        return d


def adam_option_grid(steps: int = 5) -> list[AdamOptions]:
    """Every option on and off: amsgrad, maximize, weight decay, betas, LoRA+ ratio, clipping (64 settings)."""
    return [AdamOptions(weight_decay=wd, amsgrad=a, maximize=m, betas=b, loraplus_lr_ratio=r, max_norm=c, steps=steps)
            for a, m, wd, b, r, c in itertools.product([False, True], [False, True], [0.0, 2.0 ** -2],
                                                       [(0.75, 0.875), (0.5, 0.5)], [1.0, 4.0], [None, 0.5])]


def adam_problem(seed: int, steps: int) -> dict[str, Any]:
    """A, B and a gradient sequence on the dyadic grid (exact in every dtype), from ``seed``."""
    rng = np.random.default_rng(seed)
    R, I, O = int(rng.integers(1, 4)), int(rng.integers(2, 7)), int(rng.integers(2, 6))
    A = rng.integers(-8, 9, (R, I)) / 8.0
    B = rng.integers(-8, 9, (O, R)) / 8.0
    # scales 2^-1 .. 2^-4 that fall and rise again: the second moment falls, so amsgrad's max matters
    expo = [1, 4, 4, 2, 4, 4, 1, 4]
    grads = [{"A": rng.integers(-8, 9, (R, I)) / 8.0 * 2.0 ** -expo[t % 8],
              "B": rng.integers(-8, 9, (O, R)) / 8.0 * 2.0 ** -(expo[t % 8] - 1)} for t in range(steps)]
    return {"A": A, "B": B, "grads": grads}


def _np_dtype(d: str) -> Any:
    if d == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)


def _reference(prob: dict, opts: AdamOptions, decoupled: bool) -> list[dict]:
    """reflora in float64: params after each step."""
    kw = opts.as_kwargs()
    lr, ratio, max_norm = kw.pop("lr"), kw.pop("loraplus_lr_ratio"), kw.pop("max_norm")
    cls = AdamW if decoupled else Adam
    opt = cls(lr, groups=[{"params": ["B"], "lr": lr * ratio}], **kw)
    params = {"A": prob["A"], "B": prob["B"]}
    state, out = opt.init(params), []
    for g in prob["grads"]:
        if max_norm is not None:
            g, _ = clip_grad_norm(g, max_norm)
        params, state = opt.step(params, g, state)
        out.append(params)
    return out


def _emulate(prob: dict, opts: AdamOptions, decoupled: bool, d: str) -> list[dict]:
    """The same step as torch runs it in ``d``: each op in float32, rounded to d (float64 arrays of d values)."""

    def rn(x):
        return round_to_dtype(np.asarray(x, np.float64).astype(np.float32).astype(np.float64), _np_dtype(d)
                              ).astype(np.float64)

    b1, b2 = opts.betas
    p = {"A": prob["A"].copy(), "B": prob["B"].copy()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    vmax = {k: np.zeros_like(v) for k, v in p.items()}
    lrs = {"A": opts.lr, "B": opts.lr * opts.loraplus_lr_ratio}
    out = []
    with np.errstate(all="ignore"):
        for t, g in enumerate(prob["grads"], start=1):
            g = dict(g)
            if opts.max_norm is not None:
                norms = [rn(np.sqrt(np.sum(x * x))) for x in g.values()]
                total = rn(np.sqrt(np.sum(np.square(norms))))
                coef = min(float(rn(rn(1.0 / rn(total + 1e-6)) * opts.max_norm)), 1.0)
                g = {k: rn(x * coef) for k, x in g.items()}
            new = {}
            for k in p:
                gk = -g[k] if opts.maximize else g[k]
                pk, lr, wd = p[k], lrs[k], opts.weight_decay
                if wd:
                    if decoupled:
                        pk = rn(pk * float(np.float32(1.0 - lr * wd)))
                    else:
                        gk = rn(gk + wd * pk)
                m[k] = rn(m[k] + (1.0 - b1) * (gk - m[k]))
                v[k] = rn(rn(v[k] * b2) + (1.0 - b2) * gk * gk)
                src = v[k]
                if opts.amsgrad:
                    vmax[k] = np.maximum(vmax[k], v[k])
                    src = vmax[k]
                denom = rn(rn(rn(np.sqrt(src)) / math.sqrt(1.0 - b2 ** t)) + opts.eps)
                new[k] = rn(pk + rn(rn(m[k] * (-lr / (1.0 - b1 ** t))) / denom))
            p = new
            out.append(dict(p))
    return out


def to_host(a: Any) -> tuple[np.ndarray, str]:
    """(float64 NumPy copy, dtype name) of a NumPy, torch, JAX, CuPy or array-API array."""
    if hasattr(a, "detach"):  # torch
        name = str(a.dtype).rsplit(".", 1)[-1]
        import torch  # noqa: PLC0415

        return a.detach().cpu().to(torch.float64).numpy(), name
    if hasattr(a, "get") and not isinstance(a, np.ndarray):  # cupy
        a = a.get()
    h = np.asarray(a)  # NumPy (ml_dtypes bfloat16 too), JAX, array_api_strict
    return h.astype(np.float64), h.dtype.name


class CheckFailure(Exception):
    pass


def _problem(check: str, step: Callable, seed: int, options: AdamOptions, *, dtype: str, to: Any,
             check_dtype: bool, decoupled: bool) -> dict[str, float]:
    prob = adam_problem(seed, options.steps)
    ref = _reference(prob, options, decoupled)
    emul = _emulate(prob, options, decoupled, dtype)
    conv = converter(to)
    nd = _np_dtype(dtype)

    def c(a):
        return conv(a.astype(nd))

    params, state = {"A": c(prob["A"]), "B": c(prob["B"])}, None
    err_emul = {"A": 0.0, "B": 0.0}
    ratios: dict[str, float] = {}
    for t, g in enumerate(prob["grads"]):
        try:
            out = step(params, {k: c(v) for k, v in g.items()}, state, **options.as_kwargs())
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(f"step {t + 1} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[0], dict):
            raise CheckFailure(f"step returned {type(out).__name__}; expected (params dict, state)")
        params, state = out
        for k in ("A", "B"):
            if k not in params:
                raise CheckFailure(f"the returned params have no {k!r}")
            h, name = to_host(params[k])
            r, e = ref[t][k], emul[t][k]
            if h.shape != r.shape:
                raise CheckFailure(f"{k} after step {t + 1} has shape {h.shape}; expected {r.shape}")
            if check_dtype and name != dtype:
                raise CheckFailure(f"{k} after step {t + 1} has dtype {name}; expected {dtype}, the dtype of the inputs")
            err_emul[k] = max(err_emul[k], float(np.max(np.abs(e - r))))
            bound = K * err_emul[k] + K * _UNIT[dtype] * float(np.max(np.abs(r)))
            if not np.isfinite(h).all():
                idx = tuple(int(i) for i in np.argwhere(~np.isfinite(h))[0])
                raise CheckFailure(f"{k} after step {t + 1}: candidate gives {float(h[idx])} at {idx} where the reference is "
                                   f"{float(r[idx])!r}")
            diff = np.abs(h - r)
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
            if diff[idx] > bound:
                raise CheckFailure(
                    f"{k} after step {t + 1} of {options.steps} is wrong: max abs error {diff[idx]:.4g} at "
                    f"{idx} (candidate {float(h[idx])!r}, reference {float(r[idx])!r}); "
                    f"{int(np.sum(diff > bound))} of {diff.size} elements outside the tolerance {bound:.4g} "
                    f"= {K:g} x emulated {dtype} error {err_emul[k]:.4g} + {K:g} u max|{k}|")
            ratios[k] = max(ratios.get(k, 0.0), float(diff[idx]) / bound if bound > 0 else 0.0)
    return ratios


def _label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check_problem(check: str, step: Callable, seed: int, options: AdamOptions, *, dtype: str, to: Any,
                   check_dtype: bool, decoupled: bool) -> dict[str, float]:
    if dtype not in _UNIT or dtype == "float64":
        raise TypeError(f"dtype is {dtype!r}; expected 'float32', 'float16' or 'bfloat16'")
    if not isinstance(options, AdamOptions):
        raise TypeError(f"options is {type(options).__name__}; expected reflora.testing.optim_checks.AdamOptions")
    if isinstance(options.steps, bool) or not isinstance(options.steps, int) or options.steps < 1:
        raise ValueError(f"options.steps is {options.steps!r}; expected an int >= 1 (no step checks nothing)")
    try:
        return _problem(check, step, seed, options, dtype=dtype, to=to, check_dtype=check_dtype,
                        decoupled=decoupled)
    except CheckFailure as f:
        raise AssertionError(
            f"reflora.testing.{check}: {_label(step)} fails in {dtype} with {options}, problem seed {seed}:\n"
            f"  {f}\nReproduce:\n    from reflora.testing.optim_checks import {check}_problem, AdamOptions\n"
            f"    {check}_problem(step, {seed}, {options!r}, dtype={dtype!r}, to={to!r})") from f.__cause__


def check_adamw_problem(step: Callable, seed: int, options: AdamOptions, *, dtype: str = "float32", to: Any = None,
                        check_dtype: bool = True) -> dict[str, float]:
    """One problem (``seed``) and one option setting for ``check_adamw``; returns err / tolerance per tensor."""
    return _check_problem("check_adamw", step, seed, options, dtype=dtype, to=to, check_dtype=check_dtype,
                          decoupled=True)


def check_adam_problem(step: Callable, seed: int, options: AdamOptions, *, dtype: str = "float32", to: Any = None,
                       check_dtype: bool = True) -> dict[str, float]:
    """One problem (``seed``) and one option setting for ``check_adam``; returns err / tolerance per tensor."""
    return _check_problem("check_adam", step, seed, options, dtype=dtype, to=to, check_dtype=check_dtype,
                          decoupled=False)


def _check(check: str, step: Callable, *, dtype: str, seeds: int, steps: int, to: Any, check_dtype: bool,
           decoupled: bool) -> CheckResult:
    # seeds = 0 or steps = 0 would pass any candidate; one step cannot see amsgrad (v_max = v until v falls,
    # at step 2 of every problem): tests/testing/test_optim_checks.py shows a wrong amsgrad passing steps=1
    for name, v, least in (("seeds", seeds, 1), ("steps", steps, 2)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} is {v!r} ({type(v).__name__}); expected an int >= {least}")
        if v < least:
            raise ValueError(f"{name} is {v}; expected an int >= {least}"
                             + (" (every option is observable only from step 2 on)" if name == "steps" else ""))
    result = CheckResult(check, dtype)
    for seed in range(seeds):
        for opts in adam_option_grid(steps):
            result._note(_check_problem(check, step, seed, opts, dtype=dtype, to=to, check_dtype=check_dtype,
                                        decoupled=decoupled))
    return result


def check_adamw(step: Callable, *, dtype: str = "float32", seeds: int = 2, steps: int = 5, to: Any = None,
                check_dtype: bool = True) -> CheckResult:
    """Check a candidate AdamW step (LoRA+ lr for B, joint clipping) over the option grid, ``seeds`` problems each.

    Args:
      step: see the module docstring for the protocol.
      dtype: "float32", "float16" or "bfloat16".
      seeds: problems per option setting (>= 1); steps: steps per problem (>= 2: amsgrad's
        running max differs from v only once v has fallen, at step 2).
      to: how to hand arrays to the candidate ("torch", "jax", a callable; None = NumPy).
      check_dtype: also require results in ``dtype``.

    Raises:
      AssertionError: the first failing problem, with the error, the tolerance and a reproducer.
      TypeError: a dtype other than those three; seeds or steps not an int.
      ValueError: seeds < 1 or steps < 2.

    Example:
      >>> import reflora, reflora.testing as rt
      >>> def step(params, grads, state, *, lr, loraplus_lr_ratio, max_norm, **kw):
      ...     if state is None:
      ...         state = reflora.AdamW(lr, groups=[{"params": ["B"], "lr": lr * loraplus_lr_ratio}], **kw)
      ...         state = (state, state.init(params))
      ...     opt, s = state
      ...     if max_norm is not None:
      ...         grads, _ = reflora.clip_grad_norm(grads, max_norm)
      ...     params, s = opt.step(params, grads, s)
      ...     return params, (opt, s)
      >>> rt.check_adamw(step, dtype="float32", seeds=1, steps=3).examples
      64
    """
    return _check("check_adamw", step, dtype=dtype, seeds=seeds, steps=steps, to=to, check_dtype=check_dtype,
                  decoupled=True)


def check_adam(step: Callable, *, dtype: str = "float32", seeds: int = 2, steps: int = 5, to: Any = None,
               check_dtype: bool = True) -> CheckResult:
    """As ``check_adamw`` for a torch.optim.Adam step (weight decay as L2 in the gradient)."""
    return _check("check_adam", step, dtype=dtype, seeds=seeds, steps=steps, to=to, check_dtype=check_dtype,
                  decoupled=False)
