"""Shared machinery of the checks: array conversion, comparison against the envelope, reports, hypothesis runs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from ..backend import dtype_name, to_numpy
from .emulation import DTYPES
from .envelope import Q
from .policy import TolerancePolicy
from .problems import Problem, SGDOptions

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


def to_host(a: Any) -> tuple[np.ndarray, str]:
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


def accepts_keyword(fn: Callable, name: str) -> bool:
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


def import_line(fn: Any, var: str) -> str:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if mod and qual and "<" not in qual and "." not in qual and mod != "__main__":
        return f"from {mod} import {qual} as {var}"
    return f"{var} = ...  # your candidate ({_label(fn)})"


# ---------------------------------------------------------------- reporting


class CheckFailure(Exception):
    """Internal: a failed comparison (turned into AssertionError with the reproduction)."""

def compare_tensor(name: str, cand: Any, ref: np.ndarray, env: Q, policy: TolerancePolicy, dtype: str, *,
                   check_dtype: bool, what: str = "") -> float:
    """Compare one tensor elementwise with the envelope's bound; return the worst err / bound, or raise CheckFailure."""
    h, got_dtype = to_host(cand)
    label = f"{name} {what}" if what else name
    ref = np.asarray(ref, dtype=np.float64)
    if h.shape != ref.shape:
        raise CheckFailure(f"{label} has shape {h.shape}; expected {ref.shape}")
    if check_dtype and got_dtype != dtype:
        raise CheckFailure(f"{label} has dtype {got_dtype}; expected {dtype}, the dtype of the inputs")
    if not ref.size:
        return 0.0
    bound = np.broadcast_to(policy.bound(name, dtype, env), ref.shape)
    # where a legitimate evaluation may overflow d (the envelope is inf) the dtype cannot represent the
    # problem: those elements are left out, and the others are compared as usual
    judged = np.isfinite(ref) & np.isfinite(bound)
    if not judged.any():
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        bad_finite = ~np.isfinite(h) & judged
        if bad_finite.any():
            idx = tuple(int(i) for i in np.argwhere(bad_finite)[0])
            raise CheckFailure(f"{label}: candidate gives {h[idx]} at {idx} where the reference is {ref[idx]!r}")
        diff = np.where(judged, np.abs(h - ref), 0.0)
        ratio = np.where(judged, diff / np.where(bound > 0, bound, 1.0), 0.0)
        ratio = np.where(judged & (bound == 0) & (diff > 0), np.inf, ratio)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), ratio.shape))
    worst = float(ratio[idx])
    if worst <= 1:
        return worst
    err, b, e = float(diff[idx]), float(bound[idx]), float(np.broadcast_to(env.e, ref.shape)[idx])
    top = float(np.max(np.abs(ref[judged])))
    rel = err / top if top > 0 else float("inf")
    count = int(np.sum(diff > bound))
    skipped = f" ({int(np.sum(~judged))} left out where {dtype} may overflow)" if not judged.all() else ""
    how = ("every legitimate evaluation in this dtype is exact here (dyadic values, no partial sum outgrows "
           "the precision)" if e == 0 else f"envelope {e:.4g}")
    tol = policy.tolerance(name, dtype)
    extra = "" if (tol.k, tol.floor_rel, tol.floor_abs) == (1.0, 0.0, 0.0) else (
        f" (k {tol.k:g}, floor_rel {tol.floor_rel:.3g}, floor_abs {tol.floor_abs:.3g})")
    raise CheckFailure(
        f"{label} is wrong: abs error {err:.4g} at index {idx} (candidate {float(h[idx])!r}, reference "
        f"{float(ref[idx])!r}); relative to max|{name}| = {top:.4g}: {rel:.3g}; {count} of {diff.size} elements "
        f"outside the tolerance{skipped}\n"
        f"  tolerance there {b:.4g}: {how}{extra}, over every legitimate {dtype} evaluation "
        f"(accumulate {policy.accumulate}; reflora.testing.envelope)")


def raise_failure(check: str, fn_vars: Sequence[tuple[str, Any]], problem: Problem, detail: str, call: str,
                  extra: Problem | SGDOptions | None = None, to: Any = None,
                  exc: BaseException | None = None) -> AssertionError:
    lines = [f"reflora.testing.{check}: {detail}", f"  problem: {problem.shapes()}"]
    if extra is not None:
        lines.append(f"  options: {extra!r}")
    lines.append("Reproduce (reruns just this case):")
    lines.append("    import reflora.testing as rt")
    lines += [f"    {import_line(fn, var)}" for var, fn in fn_vars]
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


def call_candidate(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any candidate exception is a reported failure
        raise CheckFailure(f"the candidate {what} raised {type(exc).__name__}: {exc}") from exc


def as_f64(a):
    return None if a is None else a.astype(np.float64)


_DEFAULT_POLICY = TolerancePolicy()


def resolve_policy(policy: TolerancePolicy | None) -> TolerancePolicy:
    if policy is None:
        return _DEFAULT_POLICY
    if not isinstance(policy, TolerancePolicy):
        raise TypeError(f"policy is {type(policy).__name__}; expected reflora.testing.TolerancePolicy")
    return policy


def candidate_kwargs(fn, mask, conv):
    return {"dropout_mask": conv(mask)} if mask is not None else {}


def tensor_pair(label: str, y: np.ndarray, y2: np.ndarray, bound: np.ndarray) -> float:
    """Two candidate outputs, each within ``bound / 2`` of the exact result: they differ by at most ``bound``."""
    if y2.shape != y.shape:
        raise CheckFailure(f"{label} has shape {y2.shape}; expected {y.shape}")
    if not y.size:
        return 0.0
    bound = np.broadcast_to(bound, y.shape)
    judged = np.isfinite(bound)
    with np.errstate(invalid="ignore"):
        diff = np.where(judged, np.abs(y - y2), 0.0)
    if np.isnan(diff).any():
        raise CheckFailure(f"{label}: NaN where the other output is finite")
    over = diff > bound
    if over.any():
        idx = tuple(int(i) for i in np.argwhere(over)[0])
        raise CheckFailure(f"{label} differs: abs difference {float(diff[idx]):.4g} at index {idx} ({float(y[idx])!r} vs "
                           f"{float(y2[idx])!r}); allowed {float(bound[idx]):.4g} (twice the forward's envelope)")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(bound > 0, diff / np.where(bound > 0, bound, 1.0), 0.0)
    return float(np.max(r))


# ---------------------------------------------------------------- hypothesis drivers


def run_examples(check: str, dtype: str, strategy, body: Callable, *, max_examples: int, derandomize: bool,
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


def dtype_arg(dtype: str) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype is {dtype!r}; expected one of {DTYPES}")
    return name


def draw_problems(dtype, **kw):
    from . import strategies  # noqa: PLC0415 - hypothesis only when a check runs

    return strategies.problems(dtypes=[dtype], **kw)

