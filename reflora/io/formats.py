"""Every adapter format reflora reads and writes, behind one pair of functions.

    format  what                                        reader / writer
    peft    PEFT folder (adapter_config.json + adapter_model.safetensors)   load_peft / save_peft
    seed    one safetensors file, lora_a (I, R) / lora_b (R, O)             load_adapter / save_adapter
            (a single file in PEFT's key layout is read here too, as layout "peft")
    kohya   kohya-ss / diffusers lora_down / lora_up / alpha file           load_kohya / save_kohya
    mlx     mlx-lm folder (adapters.safetensors + adapter_config.json)      load_mlx / save_mlx
    gguf    llama.cpp GGUF LoRA adapter                                     load_gguf / save_gguf

``detect_format`` decides from the path alone: a folder with adapters.safetensors is
mlx, one with adapter_config.json is PEFT; a file starting with "GGUF" is gguf; a
safetensors file with ``lora_down`` / ``lora_up`` keys is kohya, else a peft/seed layout file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .._errors import FormatError
from ..adapter import LoraAdapter
from . import _common as c
from .safetensors import read_header
from .gguf import is_gguf, load_gguf, save_gguf
from .kohya import is_kohya, load_kohya, save_kohya
from .layouts import load_adapter, save_adapter
from .mlx import MLX_WEIGHTS_NAME, load_mlx, save_mlx
from .peft import load_peft, save_peft

__all__ = ["FORMATS", "detect_format", "load_any", "save_any"]

FORMATS = ("peft", "seed", "kohya", "mlx", "gguf")


def detect_format(path: Any) -> str:
    """"peft", "mlx", "gguf", "kohya" or "file" (a peft- or seed-layout safetensors file) for a path.

    Raises:
      reflora.FormatError: a folder that is neither a PEFT nor an mlx-lm adapter, or a
        file that is neither GGUF nor a readable safetensors file.
      FileNotFoundError: nothing at the path.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, MLX_WEIGHTS_NAME)):
            return "mlx"
        if os.path.exists(os.path.join(p, "adapter_config.json")):
            return "peft"
        raise FormatError(f"{p}: a folder without adapter_config.json or {MLX_WEIGHTS_NAME}; expected a PEFT or "
                          "mlx-lm adapter folder")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_gguf(p):
        return "gguf"
    header, _ = read_header(p)
    return "kohya" if is_kohya(header) else "file"


def load_any(path: Any, *, format: str | None = None, layout: str | None = None, alpha: Any = None,
             use_rslora: bool | None = None, n_head: int | None = None, n_head_kv: int | None = None,
             xp: Any = None, dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read an adapter of any format as {module: LoraAdapter}.

    Args:
      path: file or folder.
      format: one of FORMATS, or None to detect it (``detect_format``).
      layout, alpha, use_rslora: for peft/seed layout files (see ``load_adapter``).
      n_head, n_head_kv: for Llama GGUF files without reflora's record.
      xp, dtype: namespace and dtype of the returned arrays.

    Raises:
      reflora.FormatError: a malformed file, or one that does not hold the format asked for.
      ValueError: an unknown format, or options the file needs (alpha, n_head).
    """
    p = os.fspath(path)
    fmt = detect_format(p) if format is None else format
    if fmt not in FORMATS + ("file",):
        raise ValueError(f"format is {format!r}; expected one of {FORMATS}")
    if fmt == "peft" and os.path.isdir(p):
        return load_peft(p, xp=xp, dtype=dtype)
    if fmt in ("peft", "seed", "file"):
        lay = layout if layout is not None else (fmt if format is not None else None)
        got = load_adapter(p, layout=lay, alpha=alpha, use_rslora=use_rslora, xp=xp, dtype=dtype)
        if isinstance(got, LoraAdapter):
            header, _ = read_header(p)
            name = next(iter(header)).rsplit("lora_", 1)[0].removeprefix("base_model.model.").rstrip(".")
            return {name or "linear": got}
        return got
    if fmt == "kohya":
        return load_kohya(p, xp=xp, dtype=dtype)
    if fmt == "mlx":
        return load_mlx(p, xp=xp, dtype=dtype)
    return load_gguf(p, n_head=n_head, n_head_kv=n_head_kv, xp=xp, dtype=dtype)


def save_any(path: Any, adapters: Mapping[str, LoraAdapter], format: str, *, n_head: int | None = None,
             n_head_kv: int | None = None, arch: str = "llama", overwrite: bool = True) -> None:
    """Write {module: LoraAdapter} in ``format`` (one of FORMATS; "peft" writes a folder).

    ``n_head``, ``n_head_kv`` and ``arch`` are for GGUF (see ``save_gguf``).

    Raises:
      ValueError: what the format cannot hold (DoRA or lora_bias outside PEFT, several
        ranks or scales in mlx, several alphas in GGUF, ...), with the reason.
    """
    if format not in FORMATS:
        raise ValueError(f"format is {format!r}; expected one of {FORMATS}")
    mods = c.as_modules(adapters)
    if format == "peft":
        save_peft(path, mods, overwrite=overwrite)
    elif format == "seed":
        c.refuse_extras(mods, "a seed-layout file", "the seed's layout holds lora_a and lora_b only",
                        "the seed's layout holds lora_a and lora_b only")
        save_adapter(path, mods, layout="seed", overwrite=overwrite)
    elif format == "kohya":
        save_kohya(path, mods, overwrite=overwrite)
    elif format == "mlx":
        save_mlx(path, mods, overwrite=overwrite)
    else:
        save_gguf(path, mods, arch=arch, n_head=n_head, n_head_kv=n_head_kv, overwrite=overwrite)
