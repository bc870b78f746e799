"""kohya-ss / diffusers LoRA files (sd-scripts ``networks/lora.py``; read by diffusers' loaders).

One safetensors file; per adapted module a *LoRA name* and three tensors
(legend: I in, O out, R rank):

    <name>.lora_down.weight   (R, I)   = PEFT's A
    <name>.lora_up.weight     (O, R)   = PEFT's B
    <name>.alpha              ()       scalar; s = alpha / R (missing: alpha = R, s = 1)

The name is a prefix for the model part plus the module path with every "." replaced
by "_": ``lora_unet_`` (the UNet, or a FLUX/SD3 transformer as kohya names it),
``lora_te_`` / ``lora_te1_`` (the first text encoder), ``lora_te2_`` (the second),
``lora_te3_`` (SD3's T5; read only),
``lora_transformer_`` (diffusers-named transformers). The mangling loses the dots
(``to_q`` vs ``to.q``), so a file alone does not give back module paths: diffusers
re-inserts them with per-model string rules (``lora_conversion_utils.py``). reflora
reads modules under their LoRA names, unless the file carries reflora's record
(``__metadata__["reflora"]``, written by ``save_kohya``), which names each module's path
and exact config. ``reflora.compare_adapters`` matches a dotted path to its mangled
name, so a kohya file can be compared with the PEFT adapter it came from.

What the format cannot hold: DoRA (``dora_scale`` is LyCORIS's, with another
convention), PEFT's lora_bias, an rsLoRA flag (alpha/sqrt(R) is stored as the
equivalent alpha_eff = s R), LoCon/LoHa/LoKr tensors, convolutions (4-D lora_down).
An ``alpha`` of 0 is refused: sd-scripts reads it as alpha = R (s = 1), diffusers' SD
converter as s = 0.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import to_numpy
from . import _common as c
from .safetensors import load_tensors, save_tensors

__all__ = ["KOHYA_PREFIXES", "kohya_name", "load_kohya", "save_kohya"]

#: module path's first component -> kohya LoRA name prefix (others get "lora_unet_" + the whole path).
KOHYA_PREFIXES = (("unet", "lora_unet_"), ("text_encoder_2", "lora_te2_"), ("text_encoder", "lora_te_"),
                  ("transformer", "lora_transformer_"))
_NAME_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
_KEY_RE = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<what>lora_down\.weight|lora_up\.weight|alpha)$")
#: kohya/LyCORIS tensors reflora does not read -> what they are.
_UNSUPPORTED = (
    (re.compile(r"\.dora_scale$"), "a DoRA magnitude (LyCORIS/kohya dora_scale); DoRA in kohya files is not supported"),
    (re.compile(r"\.lora_mid\.weight$"), "a LoCon Tucker core (lora_mid); only plain LoRA is supported"),
    (re.compile(r"\.hada_"), "a LoHa tensor; only plain LoRA is supported"),
    (re.compile(r"\.lokr_"), "a LoKr tensor; only plain LoRA is supported"),
    (re.compile(r"\.diff(_b)?$"), "a full weight/bias difference (diff, diff_b); only low-rank LoRA is supported"),
    (re.compile(r"\.lora_(A|B)\.weight$"), "a PEFT/diffusers-style key; read it with load_adapter / load_peft"),
)
_RECORD_KEY = "reflora"


def kohya_name(module: str) -> str:
    """The kohya LoRA name of a module path: prefix by model part, dots -> underscores.

    Example:
      >>> kohya_name("unet.down_blocks.0.attentions.0.proj_in")
      'lora_unet_down_blocks_0_attentions_0_proj_in'
      >>> kohya_name("model.layers.0.self_attn.q_proj")
      'lora_unet_model_layers_0_self_attn_q_proj'
    """
    head, _, rest = module.partition(".")
    for part, prefix in KOHYA_PREFIXES:
        if head == part and rest:
            return prefix + rest.replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def _alpha_eff(cfg) -> float:
    """The alpha kohya needs for the config's scale: alpha itself, or alpha_eff = s R for rsLoRA."""
    return cfg.alpha if not cfg.use_rslora else c.alpha_for_scale(cfg.scale, cfg.rank)


def save_kohya(path: Any, adapters: Mapping[str, LoraAdapter], *, overwrite: bool = True) -> None:
    """Write {module path: LoraAdapter} as a kohya-ss LoRA file (see the module docstring).

    lora_down = A (R, I), lora_up = B (O, R), alpha = alpha (float32 when exact, else
    float64); an rsLoRA module gets alpha_eff with alpha_eff / R == alpha / sqrt(R) where a
    float64 exists that does so. ``__metadata__["reflora"]`` records each module's path
    and exact config.

    Raises:
      ValueError: DoRA or lora_bias modules (kohya cannot hold them), two paths that
        mangle to one name.
      TypeError: not a mapping of LoraAdapter.
      FileExistsError: ``overwrite=False`` and the file exists.
    """
    mods = c.as_modules(adapters)
    c.refuse_extras(mods, "a kohya file", "kohya's format has lora_down, lora_up and alpha only (LyCORIS's "
                    "dora_scale follows another convention)", "kohya's format has no bias on lora_up")
    tensors: dict[str, Any] = {}
    names: dict[str, tuple[str, Any]] = {}
    for m, ad in mods.items():
        name = kohya_name(m)
        if name in names:
            raise ValueError(f"modules {names[name][0]!r} and {m!r} both become kohya name {name!r} (kohya replaces "
                             "'.' by '_'); rename one")
        names[name] = (m, ad.config)
        alpha = _alpha_eff(ad.config)
        tensors[f"{name}.lora_down.weight"] = to_numpy(ad.A)
        tensors[f"{name}.lora_up.weight"] = to_numpy(ad.B)
        tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32 if c.exact_float32(alpha) else np.float64)
    meta = {_RECORD_KEY: c.record_json("kohya", names), "ss_network_module": "networks.lora"}
    save_tensors(c.fspath(path), tensors, metadata=meta, overwrite=overwrite)


def is_kohya(names: Any) -> bool:
    """True when the tensor names are kohya's (``<name>.lora_down.weight`` ...)."""
    return any(n.endswith((".lora_down.weight", ".lora_up.weight")) for n in names)


def load_kohya(path: Any, *, xp: Any = None, dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read a kohya-ss LoRA file; {module: LoraAdapter} in file order.

    Modules are named by their kohya LoRA names, or by their module paths when the file
    carries reflora's record (checked against the tensors: rank, shapes and the stored
    alpha must be what ``save_kohya`` writes for the recorded config). Without a record:
    alpha from ``<name>.alpha`` (R when absent, as sd-scripts and diffusers read it),
    use_rslora False.

    Raises:
      reflora.FormatError: a malformed file, a key that is not kohya LoRA (DoRA, LoCon,
        LoHa, LoKr, diff tensors named), a missing half, a non-scalar or zero alpha,
        convolution weights, ranks that disagree, a record that contradicts the tensors.
    """
    where = c.fspath(path)
    tensors, metadata = load_tensors(where, xp="numpy")  # dtype applies to the factors only, never to alpha
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _KEY_RE.match(key)
        why = next((w for p, w in _UNSUPPORTED if p.search(key)), None)
        if why or m is None or not m["name"].startswith(_NAME_PREFIXES):
            raise FormatError(f"{where}: tensor {key!r} is " + (why or "not a kohya LoRA tensor; expected "
                              "'lora_unet_<module>.lora_down.weight', '.lora_up.weight' or '.alpha' (prefixes "
                              f"{', '.join(_NAME_PREFIXES)})"))
        groups.setdefault(m["name"], {})[m["what"]] = arr
    if not groups:
        raise FormatError(f"{where}: no kohya LoRA tensors")
    record = c.parse_record(metadata.get(_RECORD_KEY), "kohya", where)
    c.check_found(groups, record, where, kind="kohya LoRA")
    out: dict[str, LoraAdapter] = {}
    for name, parts in groups.items():
        label = f"LoRA {name!r}"
        for half in ("lora_down.weight", "lora_up.weight"):
            if half not in parts:
                raise FormatError(f"{where}: {label} has {sorted(parts)} but no {half}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if dtype is not None:
            down, up = down.astype(np.dtype(dtype)), up.astype(np.dtype(dtype))
        if down.ndim != 2 or up.ndim != 2:
            raise FormatError(f"{where}: {label}: lora_down {down.shape}, lora_up {up.shape}; expected 2-D (R, I) and "
                              "(O, R): convolution LoRA (4-D) is not supported")
        if up.shape[1] != down.shape[0]:
            raise FormatError(f"{where}: {label}: lora_down {down.shape} and lora_up {up.shape}; expected (R, I) and "
                              "(O, R) with one R")
        R = down.shape[0]
        if "alpha" in parts:
            a = parts["alpha"]
            if a.size != 1 or a.ndim > 1:
                raise FormatError(f"{where}: {label}: alpha has shape {a.shape}; expected a scalar")
            alpha = float(np.asarray(a, dtype=np.float64).reshape(()))
            if alpha == 0.0:
                raise FormatError(f"{where}: {label}: alpha is 0, which readers disagree on (sd-scripts: alpha = R, "
                                  "scale 1; diffusers' SD converter: scale 0); refusing rather than guessing")
        else:
            alpha = float(R)  # sd-scripts and diffusers: no alpha means alpha = rank
        module, rs, init = name, False, "kaiming_uniform"
        if record is not None:
            rec = record["modules"][name]
            cfg = rec["config"]
            c.check_against_record(where, label, cfg, R, down.shape[1], up.shape[0])
            if "alpha" not in parts or alpha != _alpha_eff(cfg):
                raise FormatError(f"{where}: {label}: alpha is {alpha!r} but reflora's record (alpha {cfg.alpha}, "
                                  f"use_rslora {cfg.use_rslora}) means {_alpha_eff(cfg)!r}: the file was changed "
                                  "after reflora wrote it")
            module, alpha, rs, init = rec["module"], cfg.alpha, cfg.use_rslora, cfg.init
        if module in out:
            raise FormatError(f"{where}: two LoRA names map to module {module!r}")
        out[module] = c.build(where, label, down, up, alpha=alpha, use_rslora=rs, init=init, xp=xp)
    return out

