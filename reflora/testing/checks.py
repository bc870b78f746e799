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
``SGD`` / ``merge``) and the emulated reduced-precision reference from the
same rounded inputs, and compares with the derived tolerance
(``reflora.testing.tolerance``). A failure raises AssertionError naming the
tensor, the max absolute and relative error and where, the tolerance and how
it was made, and a copy-pasteable reproduction (the Problem and the call that
reruns just that case). A candidate that raises is a failure too, reported
with the problem that made it raise. On success a check returns a
``CheckResult`` with the worst error/tolerance ratio per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from ..backend import dtype_name, to_numpy
from ..config import LoraConfig
from ..ops.lora import lora_backward, lora_forward, mse_loss
from ..optim.sgd import SGD
from .problems import Problem, SGDOptions
from .tolerance import (DTYPES, TolerancePolicy, emulate_backward, emulate_forward, emulate_merge, emulate_train,
                        magnitude_backward, magnitude_forward, np_dtype)

__all__ = [
    "CheckResult",
    "check_backward",
    "check_backward_problem",
    "check_forward",
    "check_forward_problem",
    "check_merge",
    "check_merge_problem",
    "check_metamorphic",
    "check_metamorphic_problem",
    "check_roundtrip",
    "check_roundtrip_problem",
    "check_scale",
    "check_sgd",
    "check_sgd_problem",
    "converter",
]


@dataclasses.dataclass
class CheckResult:
    """What a passing check saw: examples run and the worst err / tolerance per tensor (< 1 passes)."""

    check: str
    dtype: str
    examples: int = 0
    worst: dict = dataclasses.field(default_factory=dict)

    def _note(self, ratios: dict) -> None:
        self.examples += 1
        for k, v in ratios.items():
            self.worst[k] = max(self.worst.get(k, 0.0), v)


# ---------------------------------------------------------------- conversions


def _torch_from_numpy(a: np.ndarray):
    import torch  # noqa: PLC0415 - only when the user asks for torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def converter(to: Any) -> Callable[[np.ndarray], Any]:
    """The function that turns the kit's NumPy arrays into the candidate's arrays.

    Args:
      to: None or "numpy" (a copy), "torch", "jax", "cupy", "array_api_strict",
        or a callable taking a NumPy array.

    Raises:
      ValueError: an unknown name.
    """
    if callable(to):
        return to
    if to is None or to == "numpy":
        return lambda a: a.copy()
    if to == "torch":
        return _torch_from_numpy
    if to == "jax":
        import jax.numpy as jnp  # noqa: PLC0415

        return jnp.asarray
    if to == "cupy":
        import cupy  # noqa: PLC0415

        return cupy.asarray
    if to == "array_api_strict":
        import array_api_strict  # noqa: PLC0415

        return lambda a: array_api_strict.asarray(a.copy())
    raise ValueError(f"to is {to!r}; expected 'numpy', 'torch', 'jax', 'cupy', 'array_api_strict' or a callable")


def _host(a: Any) -> tuple[np.ndarray, str]:
    """(float64 host copy, dtype name) of any array a candidate returns."""
    mod = type(a).__module__
    if mod.startswith("torch"):
        t = a.detach().cpu()
        name = str(t.dtype).rsplit(".", 1)[-1]
        h = (t.float() if name == "bfloat16" else t).numpy()
    else:
        h = np.asarray(to_numpy(a))
        name = h.dtype.name
    return h.astype(np.float64), name


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return _accepts_cached(fn, name)
    except TypeError:  # unhashable callable
        return _accepts_cached.__wrapped__(fn, name)


@functools.lru_cache(maxsize=256)
def _accepts_cached(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _label(fn: Any) -> str:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if mod and qual and "<" not in qual and mod != "__main__":
        return f"{mod}:{qual}"
    return repr(fn)


def _import_line(fn: Any, var: str) -> str:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if mod and qual and "<" not in qual and "." not in qual and mod != "__main__":
        return f"from {mod} import {qual} as {var}"
    return f"{var} = ...  # your candidate ({_label(fn)})"


# ---------------------------------------------------------------- reporting


class _Fail(Exception):
    """Internal: a failed comparison (turned into AssertionError with the reproduction)."""


def _compare(name: str, cand: Any, ref: np.ndarray, emul: np.ndarray, mag: float, policy: TolerancePolicy,
             dtype: str, *, check_dtype: bool, what: str = "") -> float:
    """Compare one tensor; return err / tolerance, or raise _Fail with a readable report."""
    h, got_dtype = _host(cand)
    label = f"{name} {what}" if what else name
    if h.shape != ref.shape:
        raise _Fail(f"{label} has shape {h.shape}; expected {ref.shape}")
    if check_dtype and got_dtype != dtype:
        raise _Fail(f"{label} has dtype {got_dtype}; expected {dtype}, the dtype of the inputs")
    tol = policy.tolerance(name, dtype)
    if not ref.size:
        return 0.0
    # where the emulated reference itself overflows, the dtype cannot represent the problem: those elements are
    # left out, and the others are compared as usual
    finite = np.isfinite(ref) & np.isfinite(emul)
    if not finite.any():
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        emul_err = float(np.max(np.abs(emul[finite] - ref[finite])))
        bound = tol.bound(emul_err, mag)
        if not math.isfinite(bound):
            return 0.0
        bad_finite = ~np.isfinite(h) & finite
        if bad_finite.any():
            idx = tuple(int(i) for i in np.argwhere(bad_finite)[0])
            raise _Fail(f"{label}: candidate gives {h[idx]} at {idx} where the reference is {ref[idx]!r}")
        diff = np.where(finite, np.abs(h - ref), 0.0)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    err = float(diff[idx])
    if err <= bound:
        return err / bound if bound > 0 else 0.0
    top = float(np.max(np.abs(ref[finite])))
    rel = err / top if top > 0 else float("inf")
    count = int(np.sum(diff > bound))
    skipped = f" ({int(np.sum(~finite))} left out where the emulated {dtype} overflows)" if not finite.all() else ""
    raise _Fail(
        f"{label} is wrong: max abs error {err:.4g} at index {idx} (candidate {float(h[idx])!r}, reference "
        f"{float(ref[idx])!r}); relative to max|{name}| = {top:.4g}: {rel:.3g}; {count} of {diff.size} elements "
        f"outside the tolerance{skipped}\n"
        f"  tolerance {bound:.4g} = k {tol.k:g} x emulated {dtype} error {emul_err:.4g} + floor_rel {tol.floor_rel:.3g}"
        f" x max|terms| {mag:.4g} + floor_abs {tol.floor_abs:.3g} (accumulate {policy.accumulate})")


def _fail(check: str, fn_vars: Sequence[tuple[str, Any]], problem: Problem, detail: str, call: str,
          extra: Problem | SGDOptions | None = None, to: Any = None,
          exc: BaseException | None = None) -> AssertionError:
    lines = [f"reflora.testing.{check}: {detail}", f"  problem: {problem.shapes()}"]
    if extra is not None:
        lines.append(f"  options: {extra!r}")
    lines.append("Reproduce (reruns just this case):")
    lines.append("    import reflora.testing as rt")
    lines += [f"    {_import_line(fn, var)}" for var, fn in fn_vars]
    lines.append(f"    problem = rt.{problem!r}")
    if extra is not None:
        lines.append(f"    options = rt.{extra!r}")
    if to is None or to == "numpy":
        to_arg = ""
    elif isinstance(to, str):
        to_arg = f", to={to!r}"
    else:
        lines.append("    to = ...  # your converter")
        to_arg = ", to=to"
    lines.append(f"    rt.{call}{to_arg})")
    err = AssertionError("\n".join(lines))
    if exc is not None:
        err.__cause__ = exc
    return err


def _call(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any candidate exception is a reported failure
        raise _Fail(f"the candidate {what} raised {type(exc).__name__}: {exc}") from exc


def _f64(a):
    return None if a is None else a.astype(np.float64)


_DEFAULT_POLICY = TolerancePolicy()


def _policy(policy: TolerancePolicy | None) -> TolerancePolicy:
    if policy is None:
        return _DEFAULT_POLICY
    if not isinstance(policy, TolerancePolicy):
        raise TypeError(f"policy is {type(policy).__name__}; expected reflora.testing.TolerancePolicy")
    return policy


def _kw(fn, mask, conv):
    return {"dropout_mask": conv(mask)} if mask is not None else {}


# ---------------------------------------------------------------- single problems


def check_forward_problem(forward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                          to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``forward`` on one Problem; return {"y": err / tolerance}. Raises AssertionError on failure."""
    policy, conv, a = _policy(policy), converter(to), problem.arrays()
    d = problem.dtype
    try:
        if a["dropout_mask"] is not None and not _accepts(forward, "dropout_mask"):
            raise _Fail("the problem has a dropout mask but forward takes no dropout_mask parameter")
        f = {k: _f64(v) for k, v in a.items()}
        ref, _ = lora_forward(f["x"], f["A"], f["B"], scale=problem.scale, W=f["W"], bias=f["bias"],
                              dropout_mask=f["dropout_mask"])
        emul = emulate_forward(a["x"], a["A"], a["B"], scale=problem.scale, W=a["W"], bias=a["bias"],
                               dropout_mask=a["dropout_mask"], dtype=d, accumulate=policy.accumulate)
        mag = magnitude_forward(f["x"], f["A"], f["B"], scale=problem.scale, W=f["W"], bias=f["bias"],
                                dropout_mask=f["dropout_mask"])
        y = _call("forward", forward, conv(a["x"]), conv(a["A"]), conv(a["B"]), scale=problem.scale,
                  W=None if a["W"] is None else conv(a["W"]), bias=None if a["bias"] is None else conv(a["bias"]),
                  **_kw(forward, a["dropout_mask"], conv))
        return {"y": _compare("y", y, ref, emul, mag, policy, d, check_dtype=check_dtype)}
    except _Fail as f_:
        raise _fail("check_forward", [("forward", forward)], problem, str(f_),
                    "check_forward_problem(forward, problem", to=to, exc=f_.__cause__) from None


def check_backward_problem(backward: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                           to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``backward`` on one Problem; return {"dx", "dA", "dB": err / tolerance}."""
    policy, conv, a = _policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    try:
        if a["dropout_mask"] is not None and not _accepts(backward, "dropout_mask"):
            raise _Fail("the problem has a dropout mask but backward takes no dropout_mask parameter")
        f = {k: _f64(v) for k, v in a.items()}
        _, cache = lora_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                                dropout_mask=f["dropout_mask"])
        ref = lora_backward(f["dy"], cache)
        emul = emulate_backward(a["x"], a["A"], a["B"], a["dy"], scale=s, W=a["W"], bias=a["bias"],
                                dropout_mask=a["dropout_mask"], dtype=d, accumulate=policy.accumulate)
        mag = magnitude_backward(f["x"], f["A"], f["B"], f["dy"], scale=s, W=f["W"], dropout_mask=f["dropout_mask"])
        out = _call("backward", backward, conv(a["x"]), conv(a["A"]), conv(a["B"]), conv(a["dy"]), scale=s,
                    W=None if a["W"] is None else conv(a["W"]), bias=None if a["bias"] is None else conv(a["bias"]),
                    **_kw(backward, a["dropout_mask"], conv))
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Fail(f"backward returned {type(out).__name__}; expected a tuple (dx, dA, dB)")
        ratios = {}
        for name, c, r, e in zip(("dx", "dA", "dB"), out, ref, emul):
            ratios[name] = _compare(name, c, np.asarray(r), e, mag[name], policy, d, check_dtype=check_dtype)
        return ratios
    except _Fail as f_:
        raise _fail("check_backward", [("backward", backward)], problem, str(f_),
                    "check_backward_problem(backward, problem", to=to, exc=f_.__cause__) from None


def check_metamorphic_problem(forward: Callable, problem: Problem, *, merge: Callable | None = None,
                              policy: TolerancePolicy | None = None, to: Any = None,
                              check_dtype: bool = True) -> dict[str, float]:
    """The metamorphic properties on one Problem (with W): batched = looped over rows; zero-padding the
    rank changes nothing; B = 0 gives the base output; merged forward = unmerged (when ``merge`` is given).

    Each is compared within the derived tolerance: two candidate outputs may differ by the sum of their
    two tolerances; an output against the float64 reference by its own.
    """
    policy, conv, a = _policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: _f64(v) for k, v in a.items()}
    tol = policy.tolerance("y", d)
    mask_kw = _kw(forward, a["dropout_mask"], conv)

    def fwd(x, A, B, W=a["W"], mask_kw=mask_kw, native_W=None):
        return _call("forward", forward, conv(x), conv(A), conv(B), scale=s,
                     W=native_W if native_W is not None else (None if W is None else conv(W)),
                     bias=None if a["bias"] is None else conv(a["bias"]), **mask_kw)

    def refs(A, B, W=f["W"], mask=f["dropout_mask"]):
        ref, _ = lora_forward(f["x"], _f64(A), _f64(B), scale=s, W=_f64(W), bias=f["bias"], dropout_mask=mask)
        emul = emulate_forward(a["x"], A, B, scale=s, W=W, bias=a["bias"],
                               dropout_mask=a["dropout_mask"] if mask is not None else None,
                               dtype=d, accumulate=policy.accumulate)
        mag = magnitude_forward(f["x"], _f64(A), _f64(B), scale=s, W=_f64(W), bias=f["bias"], dropout_mask=mask)
        return ref, emul, mag, tol.bound(float(np.max(np.abs(emul - ref))) if ref.size else 0.0, mag)

    ratios = {}
    try:
        if a["dropout_mask"] is not None and not _accepts(forward, "dropout_mask"):
            raise _Fail("the problem has a dropout mask but forward takes no dropout_mask parameter")
        ref, emul, mag, bound = refs(a["A"], a["B"])
        y, dt = _host(fwd(a["x"], a["A"], a["B"]))
        # batched equals looped over rows
        x_NI = a["x"].reshape(-1, problem.I)
        m_NI = None if a["dropout_mask"] is None else a["dropout_mask"].reshape(-1, problem.I)
        rows = []
        for i in range(x_NI.shape[0]):
            kw = {} if m_NI is None else {"dropout_mask": conv(m_NI[i:i + 1])}
            rows.append(_host(fwd(x_NI[i:i + 1], a["A"], a["B"], mask_kw=kw))[0])
        looped = np.concatenate(rows, axis=0).reshape(y.shape) if rows else y
        ratios["y_looped"] = _pair("batched vs looped over rows: y_looped", y, looped, 2 * bound)
        # zero rows of A and zero columns of B leave the update unchanged
        P = 2
        A_pad = np.concatenate([a["A"], np.zeros((P, problem.I), a["A"].dtype)], axis=0)
        B_pad = np.concatenate([a["B"], np.zeros((problem.O, P), a["B"].dtype)], axis=1)
        y_pad, _ = _host(fwd(a["x"], A_pad, B_pad))
        ratios["y_padded"] = _pair(f"rank R = {problem.R} padded with {P} zero rows of A and zero columns of B: "
                                   "y_padded", y, y_pad, 2 * bound)
        # B = 0 gives the base output x W^T + bias
        B0 = np.zeros_like(a["B"])
        ref0, emul0, mag0, _ = refs(a["A"], B0)
        y0 = fwd(a["x"], a["A"], B0)
        ratios["y_B0"] = _compare("y_B0", y0, ref0, emul0, mag0, policy, d, check_dtype=check_dtype,
                                  what="(B = 0 must give the base output x W^T + bias)")
        if merge is not None and a["W"] is not None:
            Wm = _call("merge", merge, conv(a["W"]), conv(a["A"]), conv(a["B"]), scale=s)
            emul_W = emulate_merge(a["W"], a["A"], a["B"], scale=s, dtype=d, accumulate=policy.accumulate)
            ref_nomask, _ = lora_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"])
            emul_m = emulate_forward(a["x"], a["A"], B0, scale=s, W=emul_W, bias=a["bias"], dtype=d,
                                     accumulate=policy.accumulate)
            mag_m = magnitude_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"])
            ym = _call("forward", forward, conv(a["x"]), conv(a["A"]), conv(B0), scale=s, W=Wm,
                       bias=None if a["bias"] is None else conv(a["bias"]))
            ratios["y_merged"] = _compare("y_merged", ym, ref_nomask, emul_m, mag_m, policy, d,
                                          check_dtype=check_dtype,
                                          what="(forward through merge(W, A, B) with B = 0, against the unmerged y)")
        return ratios
    except _Fail as f_:
        vars_ = [("forward", forward)] + ([("merge", merge)] if merge is not None else [])
        call = "check_metamorphic_problem(forward, problem" + (", merge=merge" if merge is not None else "")
        raise _fail("check_metamorphic", vars_, problem, str(f_), call, to=to, exc=f_.__cause__) from None


def _pair(label: str, y: np.ndarray, y2: np.ndarray, bound: float) -> float:
    if y2.shape != y.shape:
        raise _Fail(f"{label} has shape {y2.shape}; expected {y.shape}")
    if not y.size:
        return 0.0
    diff = np.abs(y - y2)
    if np.isnan(diff).any():
        raise _Fail(f"{label}: NaN where the other output is finite")
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    err = float(diff[idx])
    if err > bound:
        raise _Fail(f"{label} differs: max abs difference {err:.4g} at index {idx} ({float(y[idx])!r} vs "
                    f"{float(y2[idx])!r}); "
                    f"allowed {bound:.4g} (twice the forward's tolerance)")
    return err / bound if bound > 0 else 0.0


def check_sgd_problem(train_step: Callable, problem: Problem, options: SGDOptions, *,
                      policy: TolerancePolicy | None = None, to: Any = None,
                      check_dtype: bool = True) -> dict[str, float]:
    """Run ``options.steps`` training steps of ``train_step`` and compare A, B after every step."""
    policy, conv, a = _policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: _f64(v) for k, v in a.items()}
    kw = options.as_kwargs()
    try:
        emul = emulate_train(a["x"], a["target"], a["A"], a["B"], scale=s, W=a["W"], bias=a["bias"],
                             steps=options.steps, sgd=kw, dtype=d, accumulate=policy.accumulate)
        opt = SGD(**kw)
        params = {"A": conv(a["A"]), "B": conv(a["B"]), "W": None if a["W"] is None else conv(a["W"]),
                  "bias": None if a["bias"] is None else conv(a["bias"])}
        ref = {"A": f["A"], "B": f["B"]}
        ref_state = opt.init(ref)
        state = None
        ratios: dict[str, float] = {}
        top = {"A": float(np.max(np.abs(f["A"]))), "B": float(np.max(np.abs(f["B"])))}
        for t in range(options.steps):
            y, cache = lora_forward(f["x"], ref["A"], ref["B"], scale=s, W=f["W"], bias=f["bias"])
            _, dy = mse_loss(y, f["target"])
            g = lora_backward(dy, cache)
            ref, ref_state = opt.step(ref, {"A": g.dA, "B": g.dB}, ref_state)
            out = _call(f"train_step (step {t + 1})", train_step, conv(a["x"]), conv(a["target"]), params, state,
                        scale=s, **kw)
            if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[0], dict):
                raise _Fail(f"train_step returned {type(out).__name__}; expected (params dict, state)")
            new, state = out
            for key in ("W", "bias"):
                if a[key] is not None:
                    if key not in new:
                        raise _Fail(f"train_step's params have no {key!r}; expected it back unchanged (frozen)")
                    h, _ = _host(new[key])
                    if h.shape != a[key].shape or not np.array_equal(h, f[key]):
                        diff = float(np.max(np.abs(h - f[key]))) if h.shape == a[key].shape else float("nan")
                        raise _Fail(f"{key} changed in training step {t + 1} (max change {diff:.4g}); "
                                    f"expected it frozen: only A and B are trained")
            for name in ("A", "B"):
                if name not in new:
                    raise _Fail(f"train_step's params have no {name!r}")
                top[name] = max(top[name], float(np.max(np.abs(ref[name]))))
                r = _compare(name, new[name], ref[name], emul[t][0 if name == "A" else 1], (t + 1) * top[name],
                             policy, d, check_dtype=check_dtype, what=f"after SGD step {t + 1} of {options.steps}")
                ratios[name] = max(ratios.get(name, 0.0), r)
            params = new
        return ratios
    except _Fail as f_:
        raise _fail("check_sgd", [("train_step", train_step)], problem, str(f_),
                    "check_sgd_problem(train_step, problem, options", extra=options, to=to,
                    exc=f_.__cause__) from None


def check_merge_problem(merge: Callable, problem: Problem, *, policy: TolerancePolicy | None = None,
                        to: Any = None, check_dtype: bool = True) -> dict[str, float]:
    """Check ``merge(W, A, B, *, scale)`` on one Problem against W + s B A (float64)."""
    from ..numerics.merge import merge as ref_merge  # noqa: PLC0415

    policy, conv, a = _policy(policy), converter(to), problem.arrays()
    d, s = problem.dtype, problem.scale
    f = {k: _f64(v) for k, v in a.items()}
    W = a["W"] if a["W"] is not None else to_dtype_like(np.zeros((problem.O, problem.I)), a["A"])
    W64 = W.astype(np.float64)
    try:
        ref = np.asarray(ref_merge(W64, f["A"], f["B"], scale=s).weight)
        emul = emulate_merge(W, a["A"], a["B"], scale=s, dtype=d, accumulate=policy.accumulate)
        mag = float(np.max(np.abs(W64) + abs(s) * (np.abs(f["B"]) @ np.abs(f["A"]))))
        out = _call("merge", merge, conv(W), conv(a["A"]), conv(a["B"]), scale=s)
        return {"W": _compare("W", out, ref, emul, mag, policy, d, check_dtype=check_dtype,
                              what="(merged weight W + s B A)")}
    except _Fail as f_:
        raise _fail("check_merge", [("merge", merge)], problem, str(f_), "check_merge_problem(merge, problem",
                    to=to, exc=f_.__cause__) from None


def to_dtype_like(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    return a.astype(like.dtype)


def _loaded(out: Any) -> Any:
    """load's result, after checking it is a pair (A, B)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _Fail(f"load returned {type(out).__name__}; expected (A, B)")
    return out


def check_roundtrip_problem(save: Callable, load: Callable, problem: Problem, *, layout: str | None = None,
                            to: Any = None) -> dict[str, float]:
    """save(path, A, B) then load(path) must give A and B back bit for bit, in their dtype.

    With ``layout`` ("peft" or "seed"), the file must also read back through
    ``reflora.load_adapter(path, layout=layout)`` as the same A, B, and
    ``load`` must read a file ``reflora.save_adapter`` wrote in that layout.
    Without it, the file must still pass reflora's strict safetensors reader.
    """
    from ..adapter import LoraAdapter  # noqa: PLC0415
    from ..io.layouts import load_adapter, save_adapter  # noqa: PLC0415
    from ..io.safetensors import load_tensors  # noqa: PLC0415

    conv, a = converter(to), problem.arrays()
    if layout not in (None, "peft", "seed"):
        raise ValueError(f"layout is {layout!r}; expected None, 'peft' or 'seed'")

    def same(what: str, got: Any, want: np.ndarray, name: str):
        h, dt = _host(got)
        if h.shape != want.shape:
            raise _Fail(f"{what}: {name} has shape {h.shape}; expected {want.shape}")
        if dt != want.dtype.name:
            raise _Fail(f"{what}: {name} has dtype {dt}; expected {want.dtype.name} (a round trip keeps the dtype)")
        w = want.astype(np.float64)
        if not np.array_equal(h, w, equal_nan=True):
            idx = tuple(int(i) for i in np.argwhere(h != w)[0])
            raise _Fail(f"{what}: {name} differs at {idx}: {h[idx]!r} instead of {w[idx]!r} (expected bit-exact)")

    try:
        with tempfile.TemporaryDirectory(prefix="reflora-roundtrip-") as tmp:
            path = os.path.join(tmp, "adapter.safetensors")
            _call("save", save, path, conv(a["A"]), conv(a["B"]))
            if not os.path.exists(path):
                raise _Fail(f"save wrote nothing at {path}")
            try:
                load_tensors(path, xp="numpy")
            except Exception as exc:  # noqa: BLE001
                raise _Fail(f"the file save wrote is not valid safetensors: {exc}") from exc
            out = _loaded(_call("load", load, path))
            same("load(save(A, B))", out[0], a["A"], "A (R, I)")
            same("load(save(A, B))", out[1], a["B"], "B (O, R)")
            if layout is not None:
                try:
                    ad = load_adapter(path, layout=layout, alpha=1.0, xp="numpy")
                except Exception as exc:  # noqa: BLE001
                    raise _Fail(f"reflora.load_adapter(layout={layout!r}) cannot read the candidate's file: "
                                f"{exc}") from exc
                same(f"reflora.load_adapter(layout={layout!r}) of the candidate's file", ad.A, a["A"], "A (R, I)")
                same(f"reflora.load_adapter(layout={layout!r}) of the candidate's file", ad.B, a["B"], "B (O, R)")
                path2 = os.path.join(tmp, "reflora.safetensors")
                save_adapter(path2, LoraAdapter.from_arrays(a["A"], a["B"], alpha=1.0), layout=layout)
                out2 = _loaded(_call("load", load, path2))
                same(f"load of a file reflora.save_adapter wrote (layout {layout!r})", out2[0], a["A"], "A (R, I)")
                same(f"load of a file reflora.save_adapter wrote (layout {layout!r})", out2[1], a["B"], "B (O, R)")
        return {}
    except _Fail as f_:
        call = "check_roundtrip_problem(save, load, problem" + (f", layout={layout!r}" if layout else "")
        raise _fail("check_roundtrip", [("save", save), ("load", load)], problem, str(f_), call, to=to,
                    exc=f_.__cause__) from None


# ---------------------------------------------------------------- hypothesis drivers


def _run(check: str, dtype: str, strategy, body: Callable, *, max_examples: int, derandomize: bool,
         seed: int | None, shrink: bool = True) -> CheckResult:
    from hypothesis import HealthCheck, Phase, given, settings  # noqa: PLC0415
    from hypothesis import seed as hseed  # noqa: PLC0415

    result = CheckResult(check, dtype)

    @settings(max_examples=max_examples, derandomize=derandomize, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else []))
    @given(strategy)
    def run(args):
        with np.errstate(all="ignore"):  # overflow to inf in float16 is data here, not an accident
            result._note(body(*args) if isinstance(args, tuple) else body(args))

    if seed is not None and not derandomize:
        run = hseed(seed)(run)
    run()
    return result


def _dtype(dtype: str) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype is {dtype!r}; expected one of {DTYPES}")
    return name


def _problems(dtype, **kw):
    from . import strategies  # noqa: PLC0415 - hypothesis only when a check runs

    return strategies.problems(dtypes=[dtype], **kw)


def check_forward(forward: Callable, *, dtype: str = "float32", max_examples: int = 100, derandomize: bool = False,
                  seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                  dropout: bool | None = None, check_dtype: bool = True, max_size: int = 32,
                  shrink: bool = True) -> CheckResult:
    """Check a candidate forward(x, A, B, *, scale, W=None, bias=None) -> y on ``max_examples`` problems.

    Passes when, for every problem, max|y_cand - y_ref64| <= k max|y_emul - y_ref64| + floor
    (``reflora.testing.tolerance``).

    Args:
      forward: the candidate (see the module docstring for the protocol).
      dtype: the dtype the candidate computes in: "float32", "float16", "bfloat16" or "float64".
      max_examples, derandomize, seed: hypothesis settings (``seed`` fixes a randomized run).
      shrink: shrink a failure to the smallest failing problem (default; False reports the first found).
      policy: a ``TolerancePolicy`` (default k = 2, float32 accumulation).
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
    d = _dtype(dtype)
    use_dropout = _accepts(forward, "dropout_mask") if dropout is None else dropout
    strat = _problems(d, dropout=None if use_dropout else False, max_size=max_size)
    return _run("check_forward", d, strat,
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
    d = _dtype(dtype)
    use_dropout = _accepts(backward, "dropout_mask") if dropout is None else dropout
    strat = _problems(d, dropout=None if use_dropout else False, max_size=max_size)
    return _run("check_backward", d, strat,
                lambda p: check_backward_problem(backward, p, policy=policy, to=to, check_dtype=check_dtype),
                max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_metamorphic(forward: Callable, *, merge: Callable | None = None, dtype: str = "float32",
                      max_examples: int = 50, derandomize: bool = False, seed: int | None = None,
                      policy: TolerancePolicy | None = None, to: Any = None, dropout: bool | None = None,
                      check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check the metamorphic properties of a forward (and a merge, if given); see
    ``check_metamorphic_problem``. Arguments as ``check_forward``."""
    d = _dtype(dtype)
    use_dropout = _accepts(forward, "dropout_mask") if dropout is None else dropout
    strat = _problems(d, dropout=None if use_dropout else False, W=True, min_rows=2, max_size=16)
    return _run("check_metamorphic", d, strat,
                lambda p: check_metamorphic_problem(forward, p, merge=merge, policy=policy, to=to,
                                                    check_dtype=check_dtype),
                max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_sgd(train_step: Callable, *, dtype: str = "float32", steps: int | None = None, max_examples: int = 50,
              derandomize: bool = False, seed: int | None = None, policy: TolerancePolicy | None = None,
              to: Any = None, check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a candidate training step (forward, MSE, backward, torch.optim.SGD) over several steps.

    Args:
      train_step: see the module docstring for the protocol.
      steps: steps per problem (None: hypothesis draws 1-4). Problems come from
        ``strategies.training_problems``: s <= 2 and lr capped so training stays smooth.
      Others as ``check_forward``.
    """
    from . import strategies  # noqa: PLC0415

    d = _dtype(dtype)
    strat = strategies.training_problems(dtypes=[d], steps=steps)
    return _run("check_sgd", d, strat,
                lambda p, o: check_sgd_problem(train_step, p, o, policy=policy, to=to, check_dtype=check_dtype),
                max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_merge(merge: Callable, *, dtype: str = "float32", max_examples: int = 50, derandomize: bool = False,
                seed: int | None = None, policy: TolerancePolicy | None = None, to: Any = None,
                check_dtype: bool = True, shrink: bool = True) -> CheckResult:
    """Check a candidate merge(W, A, B, *, scale) -> W + s B A (O, I). Arguments as ``check_forward``."""
    d = _dtype(dtype)
    strat = _problems(d, W=True, dropout=False)
    return _run("check_merge", d, strat,
                lambda p: check_merge_problem(merge, p, policy=policy, to=to, check_dtype=check_dtype),
                max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


def check_roundtrip(save: Callable, load: Callable, *, dtype: str = "float32", layout: str | None = None,
                    max_examples: int = 20, derandomize: bool = False, seed: int | None = None,
                    to: Any = None, shrink: bool = True) -> CheckResult:
    """Check save(path, A, B) / load(path) -> (A, B): bit-exact, and readable by reflora in ``layout``.

    See ``check_roundtrip_problem``; other arguments as ``check_forward``.
    """
    d = _dtype(dtype)
    strat = _problems(d, W=False, bias=False, dropout=False, max_size=16)
    return _run("check_roundtrip", d, strat,
                lambda p: check_roundtrip_problem(save, load, p, layout=layout, to=to),
                max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)


SCALE_GRID = tuple((r, alpha, rs) for r in (1, 2, 3, 4, 8, 16, 64) for alpha in (1.0, 8.0, 16.0, 32.0)
                   for rs in (False, True))


def check_scale(scaling: Callable, *, rtol: float = 1e-6) -> CheckResult:
    """Check scaling(rank, alpha, *, use_rslora) -> alpha / R (or alpha / sqrt(R) with rsLoRA) on a grid.

    Raises:
      AssertionError: the first (rank, alpha, use_rslora) where the candidate's scale is off by more
        than ``rtol`` relative, with the expected formula.
    """
    result = CheckResult("check_scale", "float64")
    for r, alpha, rs in SCALE_GRID:
        want = LoraConfig(rank=r, alpha=alpha, in_features=1, out_features=1, use_rslora=rs).scale
        try:
            got = float(scaling(r, alpha, use_rslora=rs))
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"reflora.testing.check_scale: scaling({r}, {alpha}, use_rslora={rs}) raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        err = abs(got - want) / abs(want)
        if not err <= rtol:
            formula = "alpha / sqrt(R)" if rs else "alpha / R"
            raise AssertionError(
                f"reflora.testing.check_scale: scaling(rank={r}, alpha={alpha}, use_rslora={rs}) is {got!r}; "
                f"expected {formula} = {want!r} (relative error {err:.3g} > {rtol:g})\n"
                f"Reproduce:\n    {_import_line(scaling, 'scaling')}\n    scaling({r}, {alpha}, use_rslora={rs})")
        result._note({"scale": err / rtol})
    return result
