"""Checks of files and configuration: the adapter save/load round trip and the scale formula."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np

from ..config import LoraConfig
from ._report import CheckResult, call_candidate, dtype_arg, raise_failure, CheckFailure, to_host, import_line, draw_problems, run_examples, converter
from .problems import Problem

__all__ = ["SCALE_GRID", "check_roundtrip", "check_roundtrip_problem", "check_scale"]


def _loaded(out: Any) -> Any:
    """load's result, after checking it is a pair (A, B)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise CheckFailure(f"load returned {type(out).__name__}; expected (A, B)")
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
        h, dt = to_host(got)
        if h.shape != want.shape:
            raise CheckFailure(f"{what}: {name} has shape {h.shape}; expected {want.shape}")
        if dt != want.dtype.name:
            raise CheckFailure(f"{what}: {name} has dtype {dt}; expected {want.dtype.name} (a round trip keeps the dtype)")
        w = want.astype(np.float64)
        if not np.array_equal(h, w, equal_nan=True):
            idx = tuple(int(i) for i in np.argwhere(h != w)[0])
            raise CheckFailure(f"{what}: {name} differs at {idx}: {h[idx]!r} instead of {w[idx]!r} (expected bit-exact)")

    try:
        with tempfile.TemporaryDirectory(prefix="reflora-roundtrip-") as tmp:
            path = os.path.join(tmp, "adapter.safetensors")
            call_candidate("save", save, path, conv(a["A"]), conv(a["B"]))
            if not os.path.exists(path):
                raise CheckFailure(f"save wrote nothing at {path}")
            try:
                load_tensors(path, xp="numpy")
            except Exception as exc:  # noqa: BLE001
                raise CheckFailure(f"the file save wrote is not valid safetensors: {exc}") from exc
            out = _loaded(call_candidate("load", load, path))
            same("load(save(A, B))", out[0], a["A"], "A (R, I)")
            same("load(save(A, B))", out[1], a["B"], "B (O, R)")
            if layout is not None:
                try:
                    ad = load_adapter(path, layout=layout, alpha=1.0, xp="numpy")
                except Exception as exc:  # noqa: BLE001
                    raise CheckFailure(f"reflora.load_adapter(layout={layout!r}) cannot read the candidate's file: "
                                       f"{exc}") from exc
                same(f"reflora.load_adapter(layout={layout!r}) of the candidate's file", ad.A, a["A"], "A (R, I)")
                same(f"reflora.load_adapter(layout={layout!r}) of the candidate's file", ad.B, a["B"], "B (O, R)")
                path2 = os.path.join(tmp, "reflora.safetensors")
                save_adapter(path2, LoraAdapter.from_arrays(a["A"], a["B"], alpha=1.0), layout=layout)
                out2 = _loaded(call_candidate("load", load, path2))
                same(f"load of a file reflora.save_adapter wrote (layout {layout!r})", out2[0], a["A"], "A (R, I)")
                same(f"load of a file reflora.save_adapter wrote (layout {layout!r})", out2[1], a["B"], "B (O, R)")
        return {}
    except CheckFailure as f_:
        call = "check_roundtrip_problem(save, load, problem" + (f", layout={layout!r}" if layout else "")
        raise raise_failure("check_roundtrip", [("save", save), ("load", load)], problem, str(f_), call, to=to,
                            exc=f_.__cause__) from None


# ---------------------------------------------------------------- hypothesis drivers


def check_roundtrip(save: Callable, load: Callable, *, dtype: str = "float32", layout: str | None = None,
                    max_examples: int = 20, derandomize: bool = False, seed: int | None = None,
                    to: Any = None, shrink: bool = True) -> CheckResult:
    """Check save(path, A, B) / load(path) -> (A, B): bit-exact, and readable by reflora in ``layout``.

    See ``check_roundtrip_problem``; other arguments as ``check_forward``.
    """
    d = dtype_arg(dtype)
    strat = draw_problems(d, W=False, bias=False, dropout=False, max_size=16)
    return run_examples("check_roundtrip", d, strat,
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
                f"Reproduce:\n    {import_line(scaling, 'scaling')}\n    scaling({r}, {alpha}, use_rslora={rs})")
        result._note({"scale": err / rtol})
    return result
