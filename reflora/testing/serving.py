"""Serving checks: run a candidate multi-adapter kernel against the reference on many problems.

Protocols (legend N rows, I in, O out, R rank, L adapters; stacks A (L, R, I),
B (L, O, R); ``indices`` (N,) integer, -1 = no adapter; ``scales`` a tuple of
L floats; every array in the candidate's dtype except the integer ones):

    shrink(x, A, indices, *, scale) -> h (N, R)           h_n = scale x_n A_l^T; 0 for -1 rows
    expand(h, B, indices, *, base, offset) -> y           base with h_n B_l^T added into columns
                                                          [offset, offset + O); -1 rows unchanged
    multi_forward(x, A, B, indices, *, scales, W=None, bias=None) -> y (N, O)
    multi_backward(x, A, B, indices, dy, *, scales, W=None, bias=None) -> (dx, dA, dB)
    embedding(ids, E, A, B, indices, *, scales[, extra]) -> y (N, D)
        E (V, D), A (L, R, V + X), B (L, D, R), extra (L, X, D) passed only when
        the problem has added tokens and the candidate takes ``extra``
    embedding_backward(ids, E, A, B, indices, dy, *, scales[, extra]) -> (dA, dB)
    sliced_forward(x, A_slices, B_slices, indices, *, scales, W=None, bias=None) -> y (N, sum O_k)
        K slices (fused qkv, gate_up): A_slices[k] (L, R, I), B_slices[k] (L, O_k, R);
        slice k in columns [O_0 + ... + O_{k-1}, ... + O_k) (vLLM's add_lora_linear)
    tp_forward(x, A, B, indices, *, scales, tp, mode, W=None, bias=None) -> [y_0, ..., y_{T-1}]
        rank t's output as ``reflora.serving.tp.tp_forward`` defines it per mode

``shrink`` receives one scale (the engines pass one; ``scales[0]`` of the
problem). The arrays reach the candidate as NumPy or converted by ``to=``
("torch", "cupy", "jax", "array_api_strict", a callable), as in
``reflora.testing.checks``.

Tolerance. Per element, the a-priori bound of ``reflora.serving.bounds``
(theta_d + theta_64) * magnitude + an underflow floor, with the counts K and
m of each op; zero where the problem is exact in the dtype (integer values,
power-of-two scales, small enough sums), and zero for the columns an expand
must leave untouched and the rows without an adapter. A failure raises
AssertionError naming the tensor, the worst element (candidate, reference,
tolerance there), how many elements are outside, and the lines that rerun
just that problem.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import numpy as np

from ..backend import to_numpy
from .serving_problems import ServingProblem, host_dtype
from .serving_reference import serving_reference

__all__ = ["ServingResult", "check_embedding", "check_embedding_backward", "check_embedding_backward_problem",
           "check_embedding_problem", "check_expand", "check_expand_problem", "check_multi_backward",
           "check_multi_backward_problem", "check_multi_forward", "check_multi_forward_problem", "check_shrink",
           "check_shrink_problem", "check_sliced_forward", "check_sliced_forward_problem", "check_tp", "check_tp_problem",
           "serving_reference"]


@dataclasses.dataclass
class ServingResult:
    """A passed check: how many problems, and the worst error / tolerance per tensor (0 where exact and equal)."""

    check: str
    dtype: str
    examples: int
    worst: dict


# ----------------------------------------------------------------- references and tolerances

def _converter(to):
    from . import converter  # noqa: PLC0415 - the kit's own conversion (torch bfloat16 etc.)

    return converter(to)


def _in(a: np.ndarray | None, p: ServingProblem, conv):
    if a is None:
        return None
    if a.dtype.kind in "iu":
        return conv(a)
    return conv(a.astype(host_dtype(p.dtype)))


def to_host(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        t = a.detach().cpu()
        return (t.float() if "bfloat16" in str(t.dtype) else t).numpy().astype(np.float64)
    return np.asarray(to_numpy(a)).astype(np.float64)


def accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(q.name == name or q.kind is inspect.Parameter.VAR_KEYWORD for q in params)


def _label(fn: Any) -> str:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{mod}:{qual}" if mod and qual and "<" not in qual else repr(fn)


def _report(check: str, name: str, fn: Any, p: ServingProblem, detail: str, extra_args: str = "") -> AssertionError:
    call = f"rt_serving.{check}_problem(candidate, problem{extra_args}, to=...)"
    return AssertionError(
        f"reflora.testing.serving.{check}: {name} {detail}\n"
        f"  problem: N = {p.N}, I = {p.I}, O = {p.O}, L = {p.L}, ranks {p.ranks}, R = {p.R}, dtype {p.dtype}, "
        f"scales {p.scales}\n"
        "Reproduce (reruns just this case):\n"
        "    import reflora.testing.serving as rt_serving\n"
        "    from reflora.testing.serving_problems import ServingProblem\n"
        f"    candidate = ...  # your candidate ({_label(fn)})\n"
        f"    problem = {p!r}\n"
        f"    {call}")


def compare_tensor(check: str, name: str, fn, p: ServingProblem, cand: Any, ref: np.ndarray, tol: np.ndarray,
                   extra_args: str = "") -> float:
    """Worst |cand - ref| / tol (0/0 counted as 0); AssertionError when any element is outside."""
    try:
        c = to_host(cand)
    except Exception as exc:
        raise _report(check, name, fn, p, f"could not be read back ({type(exc).__name__}: {exc})", extra_args) from None
    r = np.asarray(ref, dtype=np.float64)
    if c.shape != r.shape:
        raise _report(check, name, fn, p, f"has shape {c.shape}; expected {r.shape}", extra_args)
    with np.errstate(invalid="ignore", divide="ignore"):
        same = (c == r) | (np.isnan(c) & np.isnan(r))
        err = np.where(same, 0.0, np.abs(c - r))
        err = np.where(np.isnan(err), np.inf, err)
        bad = err > tol
        ratio = np.where(err == 0, 0.0, err / tol)
    if bad.any():
        k = np.unravel_index(int(np.argmax(np.where(bad, ratio, -1.0))), r.shape)
        k = tuple(int(i) for i in k)
        exact = " (exact problem: tolerance 0)" if tol[k] == 0 else ""
        raise _report(check, name, fn, p, (
            f"is wrong: {int(bad.sum())} of {r.size} elements outside the tolerance; worst at index {k}: "
            f"candidate {float(c[k])!r}, reference {float(r[k])!r}, error {err[k]:.4g}, tolerance {tol[k]:.4g}{exact}; "
            f"max abs error {float(np.max(np.where(np.isfinite(err), err, 0))):.4g}"), extra_args)
    return float(np.max(ratio)) if ratio.size else 0.0


def call_candidate(check: str, fn, p: ServingProblem, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise _report(check, "call", fn, p, f"raised {type(exc).__name__}: {exc}") from exc


def check_shrink_problem(shrink: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``shrink(x, A, indices, *, scale)`` on one problem (scale = p.scales[0])."""
    conv, a = _converter(to), p.arrays()
    h = call_candidate("check_shrink", shrink, p, _in(a["x"], p, conv), _in(a["A"], p, conv), _in(a["indices"], p, conv),
                       scale=float(p.scales[0]))
    ref, tol = serving_reference("shrink", p)["h"]
    return {"h": compare_tensor("check_shrink", "h", shrink, p, h, ref, tol)}


def check_expand_problem(expand: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``expand(h, B, indices, *, base, offset)`` on one problem."""
    conv, a = _converter(to), p.arrays()
    y = call_candidate("check_expand", expand, p, _in(a["h"], p, conv), _in(a["B"], p, conv), _in(a["indices"], p, conv),
                       base=_in(a["base"], p, conv), offset=p.offset)
    ref, tol = serving_reference("expand", p)["y"]
    return {"y": compare_tensor("check_expand", "y", expand, p, y, ref, tol)}


def _linear_args(p: ServingProblem, conv):
    a = p.arrays()
    return a, (_in(a["x"], p, conv), _in(a["A"], p, conv), _in(a["B"], p, conv), _in(a["indices"], p, conv)), \
        dict(scales=tuple(float(v) for v in p.scales), W=_in(a["W"], p, conv), bias=_in(a["bias"], p, conv))


def check_multi_forward_problem(forward: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``multi_forward(x, A, B, indices, *, scales, W=None, bias=None)`` on one problem."""
    a, args, kw = _linear_args(p, _converter(to))
    y = call_candidate("check_multi_forward", forward, p, *args, **kw)
    ref, tol = serving_reference("multi_forward", p)["y"]
    return {"y": compare_tensor("check_multi_forward", "y", forward, p, y, ref, tol)}


def check_multi_backward_problem(backward: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``multi_backward(x, A, B, indices, dy, *, scales, W=None, bias=None) -> (dx, dA, dB)``."""
    conv = _converter(to)
    a, args, kw = _linear_args(p, conv)
    out = call_candidate("check_multi_backward", backward, p, *args, _in(a["dy"], p, conv), **kw)
    refs = serving_reference("multi_backward", p)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise _report("check_multi_backward", "result", backward, p, f"is {type(out).__name__}; expected (dx, dA, dB)")
    return {k: compare_tensor("check_multi_backward", k, backward, p, v, *refs[k]) for k, v in zip(("dx", "dA", "dB"), out)}


def check_sliced_forward_problem(forward: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``sliced_forward(x, A_slices, B_slices, indices, *, scales, W=None, bias=None)`` (p.slices widths)."""
    if not p.slices:
        raise ValueError("the problem has no slices; expected ServingProblem(slices=(O_0, O_1, ...))")
    conv = _converter(to)
    a, args, kw = _linear_args(p, conv)
    As = [_in(v, p, conv) for v in a["A_slices"]]
    Bs = [_in(v, p, conv) for v in a["B_slices"]]
    y = call_candidate("check_sliced_forward", forward, p, args[0], As, Bs, args[3], **kw)
    ref, tol = serving_reference("sliced_forward", p)["y"]
    return {"y": compare_tensor("check_sliced_forward", "y", forward, p, y, ref, tol)}


def _emb_args(p: ServingProblem, conv, fn):
    a = p.arrays()
    args = (_in(a["ids"], p, conv), _in(a["E"], p, conv), _in(a["embA"], p, conv), _in(a["embB"], p, conv),
            _in(a["indices"], p, conv))
    kw = {"scales": tuple(float(v) for v in p.scales)}
    if p.X:
        if not accepts_keyword(fn, "extra"):
            raise _report("check_embedding", "call", fn, p, "has no `extra` parameter, but the problem has added tokens")
        kw["extra"] = _in(a["extra"], p, conv)
    return a, args, kw


def check_embedding_problem(embedding: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``embedding(ids, E, A, B, indices, *, scales[, extra])`` on one problem (E (V, D) with V = p.I)."""
    _, args, kw = _emb_args(p, _converter(to), embedding)
    y = call_candidate("check_embedding", embedding, p, *args, **kw)
    ref, tol = serving_reference("embedding", p)["y"]
    return {"y": compare_tensor("check_embedding", "y", embedding, p, y, ref, tol)}


def check_embedding_backward_problem(backward: Callable, p: ServingProblem, *, to: Any = None) -> dict:
    """Check ``embedding_backward(ids, E, A, B, indices, dy, *, scales[, extra]) -> (dA, dB)``."""
    conv = _converter(to)
    a, args, kw = _emb_args(p, conv, backward)
    out = call_candidate("check_embedding_backward", backward, p, *args, _in(a["dy"], p, conv), **kw)
    refs = serving_reference("embedding_backward", p)
    return {k: compare_tensor("check_embedding_backward", k, backward, p, v, *refs[k]) for k, v in zip(("dA", "dB"), out)}


def check_tp_problem(tp_forward: Callable, p: ServingProblem, *, tp: int, mode: str, to: Any = None) -> dict:
    """Check ``tp_forward(x, A, B, indices, *, scales, tp, mode, W=None, bias=None) -> [y_t]`` rank by rank."""
    a, args, kw = _linear_args(p, _converter(to))
    outs = call_candidate("check_tp", tp_forward, p, *args, tp=tp, mode=mode, **kw)
    refs = serving_reference("tp", p, tp=tp, mode=mode)
    if len(outs) != tp:
        raise _report("check_tp", "outputs", tp_forward, p, f"has {len(outs)} ranks; expected tp = {tp}")
    extra = f", tp={tp}, mode={mode!r}"
    return {k: compare_tensor("check_tp", k, tp_forward, p, outs[t], *refs[k], extra) for t, k in enumerate(refs)}


# ----------------------------------------------------------------- property-based drivers

def run_examples(check: str, dtype: str, strategy, body, *, max_examples: int, derandomize: bool) -> ServingResult:
    from hypothesis import HealthCheck, given, settings  # noqa: PLC0415 - the test extra

    worst: dict = {}
    count = [0]

    @settings(max_examples=max_examples, derandomize=derandomize, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(strategy)
    def run(p):
        for k, v in body(p).items():
            worst[k] = max(worst.get(k, 0.0), v)
        count[0] += 1

    run()
    return ServingResult(check, dtype, count[0], worst)


def draw_problems(dtype: str, **kw):
    from .serving_strategies import serving_problems  # noqa: PLC0415

    return serving_problems(dtypes=(dtype,), **kw)


def check_shrink(shrink: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                 derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a shrink kernel over ``serving_problems(**strategy)``."""
    return run_examples("check_shrink", dtype, draw_problems(dtype, **strategy), lambda p: check_shrink_problem(shrink, p, to=to),
                        max_examples=max_examples, derandomize=derandomize)


def check_expand(expand: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                 derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of an expand kernel (with slice offset and add_inputs) over ``serving_problems``."""
    return run_examples("check_expand", dtype, draw_problems(dtype, **strategy), lambda p: check_expand_problem(expand, p, to=to),
                        max_examples=max_examples, derandomize=derandomize)


def check_multi_forward(forward: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                        derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a batched multi-adapter forward over ``serving_problems``."""
    return run_examples("check_multi_forward", dtype, draw_problems(dtype, **strategy),
                        lambda p: check_multi_forward_problem(forward, p, to=to), max_examples=max_examples,
                        derandomize=derandomize)


def check_multi_backward(backward: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                         derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a batched multi-adapter backward (dx, per-adapter dA, dB)."""
    return run_examples("check_multi_backward", dtype, draw_problems(dtype, **strategy),
                        lambda p: check_multi_backward_problem(backward, p, to=to), max_examples=max_examples,
                        derandomize=derandomize)


def check_sliced_forward(forward: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                         derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a fused multi-slice forward (qkv, gate_up) over ``serving_problems(slices=True)``."""
    return run_examples("check_sliced_forward", dtype, draw_problems(dtype, slices=True, **strategy),
                        lambda p: check_sliced_forward_problem(forward, p, to=to), max_examples=max_examples,
                        derandomize=derandomize)


def check_embedding(embedding: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                    derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a multi-adapter embedding LoRA (``extra_vocab=True`` adds added tokens)."""
    return run_examples("check_embedding", dtype, draw_problems(dtype, **strategy),
                        lambda p: check_embedding_problem(embedding, p, to=to), max_examples=max_examples,
                        derandomize=derandomize)


def check_embedding_backward(backward: Callable, *, dtype: str = "float32", to: Any = None, max_examples: int = 50,
                             derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of an embedding LoRA backward (dA by scatter-add, dB)."""
    return run_examples("check_embedding_backward", dtype, draw_problems(dtype, **strategy),
                        lambda p: check_embedding_backward_problem(backward, p, to=to), max_examples=max_examples,
                        derandomize=derandomize)


def check_tp(tp_forward: Callable, *, tp: int, mode: str, dtype: str = "float32", to: Any = None,
             max_examples: int = 25, derandomize: bool = False, **strategy) -> ServingResult:
    """Property check of a tensor-parallel candidate, rank by rank, for one (tp, mode)."""
    strategy.setdefault("max_rows", 12)
    strategy.setdefault("layouts", ("unsorted", "sorted"))
    return run_examples("check_tp", dtype, draw_problems(dtype, tp=tp, **strategy),
                        lambda p: check_tp_problem(tp_forward, p, tp=tp, mode=mode, to=to), max_examples=max_examples,
                        derandomize=derandomize)
