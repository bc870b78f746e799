"""Shared helpers of the format modules (kohya, mlx, gguf): one place for the scale arithmetic,
reflora's exact-config record, refusals and atomic writes.

Every format stores the scale its own way (kohya: an ``alpha`` per module with s = alpha/R;
mlx-lm: the scale itself; GGUF: one float32 alpha for the file with s = alpha/R). A format
that cannot store a module's exact (alpha, use_rslora) gets the *effective* value it needs
(alpha_eff = s R) plus reflora's record of the exact config, so a file reflora wrote reloads
bit-exact, while every other reader sees the same update up to the rounding of that value.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import asarray, to_numpy
from ..config import LoraConfig
from .atomic import atomic_write

RECORD_VERSION = 1


def write_text(path: str, text: str, *, overwrite: bool) -> None:
    """Write a text file atomically (temporary file, fsync, rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, overwrite=overwrite)


def alpha_for_scale(scale: float, rank: int) -> float:
    """A float64 alpha with fl(alpha / rank) == scale when one exists, else the nearest try.

    alpha = s R is exact when s R is representable; otherwise fl(s R) / R can be one ulp off s,
    and a neighbour of fl(s R) gives s back. Searching 8 ulps either side finds it when it
    exists (the interval of alphas that divide back to s is R ulp(s) wide; the grid spacing
    there is at most 2 R ulp(s)). Returns fl(s R) when none does (then the scale read back
    differs from s by at most one ulp, a relative 2^-52).

    Example:
      >>> alpha_for_scale(16 / math.sqrt(16), 16) / 16 == 16 / math.sqrt(16)
      True
    """
    x0 = scale * rank
    if x0 / rank == scale:
        return x0
    lo = hi = x0
    for _ in range(8):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        for x in (lo, hi):
            if x / rank == scale:
                return x
    return x0


def exact_float32(x: float) -> bool:
    return bool(np.isfinite(np.float32(x))) and float(np.float32(x)) == x


def refuse_extras(adapters: Mapping[str, LoraAdapter], fmt: str, why_dora: str, why_bias: str) -> None:
    """ValueError naming the first module whose DoRA magnitude or lora_bias the format cannot hold."""
    for m, ad in adapters.items():
        if ad.magnitude is not None:
            raise ValueError(f"module {m!r} is a DoRA adapter (it has a magnitude vector); {fmt} cannot hold it: "
                             f"{why_dora}. Keep it as PEFT (or merge it into the base weight)")
        if ad.lora_bias is not None:
            raise ValueError(f"module {m!r} has a lora_bias (PEFT lora_bias=True); {fmt} cannot hold it: {why_bias}. "
                             "Keep it as PEFT (or merge it into the base weight and bias)")


def check_found(found: Mapping[str, Any], record: Mapping[str, Any] | None, where: str, *, kind: str = "LoRA",
                record_where: str | None = None, thing: str = "file") -> None:
    """FormatError for a file with no LoRA tensors, or whose tensors are not the modules reflora's record names."""
    if not found:
        raise FormatError(f"{where}: no {kind} tensors")
    if record is not None and sorted(record["modules"]) != sorted(found):
        raise FormatError(f"{record_where or where}: reflora's record names {sorted(record['modules'])[:5]} but the "
                          f"tensors are for {sorted(found)[:5]}: the {thing} was changed after reflora wrote it")


def check_dtype(ad: LoraAdapter, m: str, allowed: tuple[str, ...], fmt: str) -> None:
    name = np.dtype(to_numpy(ad.A).dtype).name
    if name not in allowed:
        raise ValueError(f"module {m!r} has dtype {name}; {fmt} holds {', '.join(allowed)}: cast first "
                         f"(e.g. load with dtype='float32')")


def record_json(fmt: str, modules: Mapping[str, tuple[str, LoraConfig]], **extra: Any) -> str:
    """reflora's record of the exact config: {"version", "format", "modules": {stored name: {"module", "config"}}}."""
    return json.dumps({"version": RECORD_VERSION, "format": fmt, **extra,
                       "modules": {k: {"module": m, "config": c.to_dict()} for k, (m, c) in modules.items()}},
                      sort_keys=True)


def parse_record(text: Any, fmt: str, where: str) -> dict[str, Any] | None:
    """The record's dict (checked), or None when the file has none."""
    if text is None:
        return None
    try:
        rec = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        raise FormatError(f"{where}: reflora's record is not valid JSON ({exc})") from None
    ok = (isinstance(rec, dict) and rec.get("version") == RECORD_VERSION and rec.get("format") == fmt
          and isinstance(rec.get("modules"), dict)
          and all(isinstance(v, dict) and isinstance(v.get("module"), str) and isinstance(v.get("config"), dict)
                  for v in rec["modules"].values()))
    if not ok:
        raise FormatError(f"{where}: reflora's record is {str(text)[:200]!r}; expected {{'version': "
                          f"{RECORD_VERSION}, 'format': {fmt!r}, 'modules': {{name: {{'module', 'config'}}}}}}")
    for name, v in rec["modules"].items():
        try:
            v["config"] = LoraConfig.from_dict(v["config"])
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{where}: reflora's record for {name!r} holds an invalid config ({exc})") from None
    return rec


def build(where: str, label: str, A_RI: np.ndarray, B_OR: np.ndarray, *, alpha: float, use_rslora: bool = False,
          init: str = "kaiming_uniform", xp: Any = None) -> LoraAdapter:
    """A LoraAdapter from host arrays (moved to ``xp``); FormatError naming the file for bad shapes/dtypes."""
    if A_RI.ndim != 2 or B_OR.ndim != 2 or A_RI.shape[0] != B_OR.shape[1]:
        raise FormatError(f"{where}: {label}: A {A_RI.shape} and B {B_OR.shape}; expected (R, I) and (O, R) with one R")
    if A_RI.dtype != B_OR.dtype:
        raise FormatError(f"{where}: {label}: the two halves have dtypes {A_RI.dtype} and {B_OR.dtype}; expected one")
    if A_RI.dtype.kind != "f" and A_RI.dtype.name != "bfloat16":
        raise FormatError(f"{where}: {label}: dtype {A_RI.dtype}; expected a floating dtype")
    if not math.isfinite(alpha):
        raise FormatError(f"{where}: {label}: alpha is {alpha}; expected a finite number")
    A = asarray(np.ascontiguousarray(A_RI), xp=xp)
    B = asarray(np.ascontiguousarray(B_OR), xp=xp)
    try:
        return LoraAdapter.from_arrays(A, B, alpha=float(alpha), use_rslora=use_rslora, init=init)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{where}: {label}: {exc}") from None


def check_against_record(where: str, label: str, cfg: LoraConfig, R: int, I: int, O: int) -> None:
    if (cfg.rank, cfg.in_features, cfg.out_features) != (R, I, O):
        raise FormatError(f"{where}: {label}: reflora's record says (R, I, O) = ({cfg.rank}, {cfg.in_features}, "
                          f"{cfg.out_features}); the tensors give ({R}, {I}, {O}): the file was changed after "
                          "reflora wrote it")


def as_modules(adapters: Any) -> dict[str, LoraAdapter]:
    if isinstance(adapters, LoraAdapter):
        raise TypeError("adapters is a single LoraAdapter; expected {module path: LoraAdapter} (the format's key "
                        "names need the module path)")
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapters is {type(adapters).__name__}; expected a non-empty mapping of module path -> "
                        "reflora.LoraAdapter")
    for m, ad in adapters.items():
        if not isinstance(m, str) or not m or m != m.strip("."):
            raise ValueError(f"module path {m!r}; expected a dotted path such as 'model.layers.0.self_attn.q_proj'")
        if not isinstance(ad, LoraAdapter):
            raise TypeError(f"adapters[{m!r}] is {type(ad).__name__}; expected a reflora.LoraAdapter")
    return dict(adapters)


def fspath(path: Any) -> str:
    return os.fspath(path)
