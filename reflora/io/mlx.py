"""mlx-lm LoRA adapters (``mlx_lm/tuner/lora.py``, ``tuner/utils.py``: ``load_adapters``).

A folder with two files (legend: I in, O out, R rank):

    adapters.safetensors   <module path>.lora_a  (I, R)  = A^T   (transposed against PEFT)
                           <module path>.lora_b  (R, O)  = B^T
    adapter_config.json    {"fine_tune_type": "lora", "num_layers": N,
                            "lora_parameters": {"rank": R, "scale": s, "dropout": p, "keys": [...]}}

mlx-lm's LoRALinear computes y = x W^T + s (x lora_a) lora_b, so ΔW = s lora_b^T lora_a^T
= s B A: the **scale** s is stored, not alpha (mlx-lm refuses a config with "alpha" but
no "scale"). Module paths are the mlx model's (``model.layers.0.self_attn.q_proj`` for
Llama-family models, as in transformers); ``keys`` are paths relative to a layer
(``self_attn.q_proj``) and ``num_layers`` counts layers from the last (-1: all).

What the format cannot hold: one rank and one scale serve every module (mlx-lm creates
each LoRA layer from ``lora_parameters`` and checks the file's shapes against it), so
rank_pattern adapters with different ranks, or modules with different scales, are
refused; DoRA (mlx-lm's own DoRA stores ``.m`` with another convention: not written or
read by reflora yet); lora_bias; an rsLoRA flag (s is stored, so none is needed).
reflora adds ``"reflora"`` to adapter_config.json (mlx-lm ignores unknown keys) with
each module's exact config.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import to_numpy
from . import _common as c
from .atomic import read_consistently, replace_folder
from .safetensors import load_tensors, save_tensors

__all__ = ["MLX_CONFIG_NAME", "MLX_WEIGHTS_NAME", "is_mlx_dir", "load_mlx", "save_mlx"]

MLX_CONFIG_NAME = "adapter_config.json"
MLX_WEIGHTS_NAME = "adapters.safetensors"
_KEY_RE = re.compile(r"^(?P<m>.+)\.lora_(?P<half>[ab])$")
_LAYER_RE = re.compile(r"^model\.layers\.\d+\.(?P<key>.+)$")


def is_mlx_dir(path: Any) -> bool:
    """True for a folder holding adapters.safetensors (mlx-lm's adapter folder)."""
    p = os.fspath(path)
    return os.path.isdir(p) and os.path.exists(os.path.join(p, MLX_WEIGHTS_NAME))


def save_mlx(directory: Any, adapters: Mapping[str, LoraAdapter], *, overwrite: bool = True) -> None:
    """Write {module path: LoraAdapter} as an mlx-lm adapter folder (see the module docstring).

    Raises:
      ValueError: modules with different ranks or scales (mlx-lm holds one of each),
        DoRA or lora_bias modules.
      TypeError: not a mapping of LoraAdapter.
      FileExistsError: ``overwrite=False`` and a file exists.
    """
    mods = c.as_modules(adapters)
    c.refuse_extras(mods, "an mlx-lm adapter", "reflora does not write mlx-lm's DoRA ('m') yet",
                    "mlx-lm's LoRALinear has no bias on lora_b")
    ranks = {m: ad.config.rank for m, ad in mods.items()}
    scales = {m: ad.scale for m, ad in mods.items()}
    for what, vals in (("ranks", ranks), ("scales", scales)):
        if len(set(vals.values())) > 1:
            shown = dict(list(vals.items())[:6])
            raise ValueError(f"modules have different {what} {shown}; an mlx-lm adapter holds one rank and one scale "
                             "for all modules (lora_parameters), and mlx-lm checks every tensor's shape against it. "
                             "Keep it as PEFT, or convert the modules in groups of one rank and scale")
    (R,), (s,) = set(ranks.values()), set(scales.values())
    tensors: dict[str, Any] = {}
    keys: list[str] = []
    for m, ad in mods.items():
        tensors[f"{m}.lora_a"] = to_numpy(ad.A).T  # (I, R); the writer makes it contiguous
        tensors[f"{m}.lora_b"] = to_numpy(ad.B).T  # (R, O)
        k = _LAYER_RE.match(m)
        key = k["key"] if k else m
        if key not in keys:
            keys.append(key)
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1,  # mlx-lm: model.layers[-max(num_layers, 0):] = every layer; keys pick the modules
        "lora_parameters": {"rank": R, "scale": s, "dropout": 0.0, "keys": keys},
        "reflora": json.loads(c.record_json("mlx", {m: (m, ad.config) for m, ad in mods.items()})),
    }
    directory = os.fspath(directory)
    cfg_path, weights = os.path.join(directory, MLX_CONFIG_NAME), os.path.join(directory, MLX_WEIGHTS_NAME)
    if not overwrite:
        for p in (cfg_path, weights):
            if os.path.lexists(p):
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")

    def build(folder: str) -> None:
        save_tensors(os.path.join(folder, MLX_WEIGHTS_NAME), tensors, metadata={"format": "mlx"}, overwrite=overwrite)
        c.write_text(os.path.join(folder, MLX_CONFIG_NAME), json.dumps(config, indent=4) + "\n", overwrite=overwrite)

    # the pair is replaced together: new weights beside an old config (another scale) would read silently wrong
    replace_folder(directory, build, names=(MLX_CONFIG_NAME, MLX_WEIGHTS_NAME))


def _number(cfg: Mapping[str, Any], key: str, where: str, *, integer: bool = False) -> float:
    v = cfg.get(key)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    try:
        ok = ok and math.isfinite(v)
    except OverflowError:  # an int of hundreds of digits (JSON allows it) is beyond float64
        ok = False
    if isinstance(v, bool) or not ok:
        raise FormatError(f"{where}: lora_parameters[{key!r}] is {v!r}; expected {'an int' if integer else 'a number'}")
    return v


def load_mlx(directory: Any, *, xp: Any = None, dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read an mlx-lm adapter folder; {module path: LoraAdapter} in file order.

    A = lora_a^T (R, I), B = lora_b^T (O, R); the scale s is lora_parameters' ``scale``,
    held as alpha = s R (the float64 nearest that gives s back) unless reflora's record
    gives the exact config (checked against rank and scale).

    Raises:
      reflora.FormatError: missing/malformed files, fine_tune_type other than "lora",
        a config without ``scale`` (mlx-lm refuses it too), keys that are not
        ``<module>.lora_a`` / ``.lora_b``, a missing half, shapes that do not match
        lora_parameters' rank, a record that contradicts the file.
    """
    directory = os.fspath(directory)
    # save_mlx swaps the whole folder: a read that straddled a swap is done again (config and weights of one version)
    return read_consistently(directory, lambda: _load_mlx(directory, xp=xp, dtype=dtype))


def _load_mlx(directory: str, *, xp: Any, dtype: Any) -> dict[str, LoraAdapter]:
    cfg_path, weights = os.path.join(directory, MLX_CONFIG_NAME), os.path.join(directory, MLX_WEIGHTS_NAME)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{directory}: no {MLX_CONFIG_NAME}; expected an mlx-lm adapter folder") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: a JSON {type(cfg).__name__}; expected an object")
    ftype = cfg.get("fine_tune_type", "lora")  # mlx-lm's default
    if ftype != "lora":
        raise FormatError(f"{cfg_path}: fine_tune_type is {ftype!r}; reflora reads 'lora' adapters only "
                          "('dora' and 'full' are not supported)")
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        raise FormatError(f"{cfg_path}: lora_parameters is {lp!r}; expected an object with rank and scale")
    if "scale" not in lp:
        raise FormatError(f"{cfg_path}: lora_parameters has no 'scale'" + (" (it has 'alpha': mlx-lm's config stores "
                          "the scale s, not alpha; s = alpha / rank)" if "alpha" in lp else ""))
    R, s = _number(lp, "rank", cfg_path, integer=True), float(_number(lp, "scale", cfg_path))
    if R < 1:
        raise FormatError(f"{cfg_path}: lora_parameters['rank'] is {R}; expected an int >= 1")
    if not os.path.exists(weights):
        raise FormatError(f"{directory}: no {MLX_WEIGHTS_NAME}")
    tensors, _ = load_tensors(weights, xp="numpy", dtype=dtype)
    record = c.parse_record(cfg.get("reflora"), "mlx", cfg_path)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        k = _KEY_RE.match(key)
        if k is None:
            why = " (a DoRA magnitude: not supported)" if key.endswith(".m") else ""
            raise FormatError(f"{weights}: tensor {key!r} is not an mlx-lm LoRA tensor{why}; expected "
                              "'<module>.lora_a' (I, R) or '<module>.lora_b' (R, O)")
        halves.setdefault(k["m"], {})[k["half"]] = arr
    c.check_found(halves, record, weights, record_where=cfg_path, thing="folder")
    out: dict[str, LoraAdapter] = {}
    for m, h in halves.items():
        label = f"module {m!r}"
        if set(h) != {"a", "b"}:
            raise FormatError(f"{weights}: {label} has only lora_{next(iter(h))}; expected lora_a and lora_b")
        a, b = h["a"], h["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != R or b.shape[0] != R:
            raise FormatError(f"{weights}: {label}: lora_a {a.shape} and lora_b {b.shape}; expected (I, R) and (R, O) "
                              f"with R = {R} from lora_parameters (mlx-lm checks the same; a (R, I) lora_a is a PEFT "
                              "layout that was not transposed)")
        alpha, rs, init = c.alpha_for_scale(s, R), False, "kaiming_uniform"
        if record is not None:
            cfg_m = record["modules"][m]["config"]
            c.check_against_record(cfg_path, label, cfg_m, R, a.shape[0], b.shape[1])
            if cfg_m.scale != s:
                raise FormatError(f"{cfg_path}: {label}: lora_parameters scale {s!r} but reflora's record means "
                                  f"{cfg_m.scale!r}: the folder was changed after reflora wrote it")
            alpha, rs, init = cfg_m.alpha, cfg_m.use_rslora, cfg_m.init
        out[m] = c.build(weights, label, a.T, b.T, alpha=alpha, use_rslora=rs, init=init, xp=xp)
    return out
