"""Golden cases for an adapter-format converter written in another language (Rust, JS, C++, ...).

``write_format_cases(folder)`` writes, per case, the same adapter in every format that
can hold it, and the update every one of them must make:

    folder/manifest.json                   cases, modules, formats, refusals (below)
    folder/<case>/peft/                    adapter_config.json + adapter_model.safetensors
    folder/<case>/seed.safetensors         lora_a (I, R) / lora_b (R, O) per module
    folder/<case>/kohya.safetensors        lora_unet_<path>.lora_down / .lora_up / .alpha
    folder/<case>/mlx/                     adapters.safetensors + adapter_config.json
    folder/<case>/llama.gguf               llama.cpp GGUF LoRA adapter (q/k lora_b rows permuted)
    folder/<case>/expected_delta.safetensors   float64 ΔW (O, I) per module path

A converter is graded in both directions: convert any input of a case to format F and
``check_converted(case_dir, output, F)`` (or ``reflora diff <case>/peft OUTPUT``, exit 0/1)
checks that the output holds every module with the expected ΔW, bit for bit (A, B and
the scale copied) unless ``rtol`` is given, and names the cause otherwise (rsLoRA √R,
alpha vs scale, transposed, missing module, permuted rows). For a case the format
cannot hold, the manifest gives ``"refuse": reason``: the converter must refuse.

The expected ΔW is computed here with NumPy from the arrays the case was built from,
s (B A) in float64 with s = alpha / R (alpha / sqrt(R) for rsLoRA): not by the readers
or writers whose output it grades. ``check_converted`` compares the output with the
case's PEFT input (so that a verdict can name R and s) after checking that this input
makes exactly expected_delta.safetensors. Reading a produced file goes through reflora's
strict readers, so a malformed output is a FormatError naming the file and key.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

__all__ = ["FORMAT_CASES", "FORMAT_MANIFEST", "check_converted", "write_format_cases"]

FORMAT_MANIFEST = "manifest.json"
N_HEAD, N_HEAD_KV = 4, 2  # the Llama shape of every case: d = 16, 4 heads, 2 kv heads (k_proj O = 8)
_SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.k_proj": (16, 8),
           "model.layers.1.mlp.down_proj": (24, 16)}
#: case -> (dtype, use_rslora, {module: (R, alpha)}, use_dora)
FORMAT_CASES: dict[str, tuple[str, bool, dict[str, tuple[int, float]], bool]] = {
    "plain": ("float32", False, {m: (4, 8.0) for m in _SHAPES}, False),
    "rslora": ("float32", True, {m: (4, 8.0) for m in _SHAPES}, False),
    "rank_pattern": ("float32", False, dict(zip(_SHAPES, [(2, 16.0), (4, 16.0), (8, 16.0)])), False),
    "alpha_pattern": ("float32", False, dict(zip(_SHAPES, [(4, 8.0), (4, 32.0), (4, 8.0)])), False),
    "rslora_rank_pattern": ("float32", True, dict(zip(_SHAPES, [(2, 8.0), (4, 8.0), (8, 8.0)])), False),
    "float16": ("float16", False, {m: (4, 8.0) for m in _SHAPES}, False),
    "dora": ("float32", False, {m: (4, 8.0) for m in _SHAPES}, True),
}
_FILES = {"peft": "peft", "seed": "seed.safetensors", "kohya": "kohya.safetensors", "mlx": "mlx", "gguf": "llama.gguf"}


def _adapters(case: str, seed: int):
    from ..adapter import LoraAdapter  # noqa: PLC0415

    dtype, rs, mods, dora = FORMAT_CASES[case]
    rng = np.random.default_rng([seed, list(FORMAT_CASES).index(case)])
    out, delta = {}, {}
    for m, (I, O) in _SHAPES.items():
        R, alpha = mods[m]
        A = rng.standard_normal((R, I)).astype(dtype)
        B = rng.standard_normal((O, R)).astype(dtype)
        ad = LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=rs)
        if dora:
            ad.magnitude = (1.0 + rng.random(O)).astype(dtype)
        out[m] = ad
        s = alpha / (math.sqrt(R) if rs else R)
        delta[m] = s * (B.astype(np.float64) @ A.astype(np.float64))  # the expected ΔW, from the arrays
    return out, delta


def write_format_cases(folder: Any, *, seed: int = 0) -> list[str]:
    """Write every case of FORMAT_CASES under ``folder`` (see the module docstring); return the case names.

    All or nothing: the cases are written into a fresh folder beside ``folder`` that then
    takes its place in one step (``reflora.io.atomic.atomic_folder``); other files kept.
    """
    from ..io.atomic import atomic_folder, owned_names  # noqa: PLC0415

    atomic_folder(os.fspath(folder), lambda tmp: _write_cases_into(tmp, seed), overwrite=True,
                  keep=owned_names([FORMAT_MANIFEST, *FORMAT_CASES]))
    return list(FORMAT_CASES)


def _write_cases_into(folder: str, seed: int) -> None:
    from ..io.formats import save_any  # noqa: PLC0415
    from ..io.safetensors import save_tensors  # noqa: PLC0415

    manifest: dict[str, Any] = {
        "version": 1,
        "llama": {"n_head": N_HEAD, "n_head_kv": N_HEAD_KV},
        "rules": "every produced file must hold every module with the expected ΔW = s (B A), float64, bit for bit "
                 "(rtol 0) unless stated; a format marked 'refuse' must be refused with a message",
        "cases": {},
    }
    for case in FORMAT_CASES:
        mods, delta = _adapters(case, seed)
        cdir = os.path.join(folder, case)
        os.makedirs(cdir, exist_ok=True)
        entry: dict[str, Any] = {"dtype": FORMAT_CASES[case][0], "use_rslora": FORMAT_CASES[case][1],
                                 "use_dora": FORMAT_CASES[case][3], "modules": {}, "formats": {}}
        for m, ad in mods.items():
            entry["modules"][m] = {"R": ad.config.rank, "I": ad.config.in_features, "O": ad.config.out_features,
                                   "alpha": ad.config.alpha, "scale": ad.scale}
        for fmt, name in _FILES.items():
            try:
                save_any(os.path.join(cdir, name), mods, fmt, n_head=N_HEAD, n_head_kv=N_HEAD_KV)
                entry["formats"][fmt] = {"path": name}
            except ValueError as exc:
                entry["formats"][fmt] = {"refuse": str(exc)}
        if not FORMAT_CASES[case][3]:  # DoRA's ΔW needs a base weight: that case checks refusals only
            save_tensors(os.path.join(cdir, "expected_delta.safetensors"), delta)
            entry["expected_delta"] = "expected_delta.safetensors"
        manifest["cases"][case] = entry
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    from ..io._common import write_text  # noqa: PLC0415

    write_text(os.path.join(folder, FORMAT_MANIFEST), text, overwrite=True)


def check_converted(case_dir: Any, output: Any, fmt: str | None = None, *, rtol: float = 0.0,
                    n_head: int = N_HEAD, n_head_kv: int = N_HEAD_KV):
    """Grade a converter's output for one case against the expected ΔW.

    Args:
      case_dir: ``folder/<case>`` written by ``write_format_cases``.
      output: the file or folder the converter produced.
      fmt: its format (None: detected).
      rtol: 0 demands bit-identical ΔW; > 0 accepts max|ΔW - expected| <= rtol max|expected|.

    Returns:
      ``reflora.AdapterDiff`` against the expected ΔW (``.ok``, ``.format()``).

    Raises:
      reflora.FormatError: the output is malformed (named file and key).
    """
    from ..arithmetic.compare import compare_adapters  # noqa: PLC0415
    from ..arithmetic.delta import delta_weight  # noqa: PLC0415
    from ..io.formats import load_any  # noqa: PLC0415
    from ..io.peft import load_peft  # noqa: PLC0415
    from ..io.safetensors import load_tensors  # noqa: PLC0415

    case_dir = os.fspath(case_dir)
    expected, _ = load_tensors(os.path.join(case_dir, "expected_delta.safetensors"), xp="numpy")
    # the case's own input, so that a verdict can name R and s; it must make exactly the expected ΔW
    want = load_peft(os.path.join(case_dir, "peft"), xp="numpy")
    for m, d in delta_weight(want).items():
        if m not in expected or not np.array_equal(d, expected[m]):
            raise ValueError(f"{case_dir}: the case's PEFT input does not make expected_delta.safetensors for "
                             f"{m!r}; the case folder was changed")
    got = load_any(output, format=fmt, n_head=n_head, n_head_kv=n_head_kv, xp="numpy")
    return compare_adapters(got, want, rtol=rtol)
