"""The kohya, mlx-lm and GGUF side of ``reflora inspect`` and ``reflora convert`` (reflora/cli/adapter.py)."""

from __future__ import annotations

import os
from typing import Any

from ..io import gguf as _gguf
from ..io.formats import load_any
from ..io.mlx import MLX_WEIGHTS_NAME
from ..io.safetensors import read_header

__all__ = ["OTHER_FORMATS", "read_format"]

#: formats beyond the peft/seed layouts that adapter.py handles itself.
OTHER_FORMATS = ("kohya", "mlx", "gguf")

_HOW = {"kohya": "kohya-ss LoRA file (lora_down / lora_up / alpha)",
        "mlx": "mlx-lm adapter folder (adapters.safetensors + adapter_config.json)",
        "gguf": "llama.cpp GGUF LoRA adapter"}


def read_format(path: str, fmt: str, *, n_head: int | None = None,
                n_head_kv: int | None = None) -> tuple[dict[str, tuple[str, tuple]], dict[str, Any], str, str]:
    """({tensor: (dtype, shape)}, {module: LoraAdapter}, format, how it was decided) for ``inspect``."""
    if fmt == "gguf":
        kv = _gguf.read_summary(path)
        header = {n: (t, s) for n, t, s in kv["tensors"]}
        how = (f"{_HOW[fmt]}; architecture {kv['general.architecture']!r}, adapter.lora.alpha "
               f"{kv['adapter.lora.alpha']}")
    else:
        weights = os.path.join(path, MLX_WEIGHTS_NAME) if fmt == "mlx" else path
        header, _ = read_header(weights)
        how = _HOW[fmt]
    adapters = load_any(path, format=fmt, n_head=n_head, n_head_kv=n_head_kv, xp="numpy")
    return header, adapters, fmt, how
