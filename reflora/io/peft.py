"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT directory is ``adapter_config.json`` + ``adapter_model.safetensors``
as ``PeftModel.save_pretrained`` writes them. ``load_peft`` honours r,
lora_alpha, use_rslora, rank_pattern and alpha_pattern (matched against module
paths exactly as PEFT matches them), use_dora (``lora_magnitude_vector`` ->
``LoraAdapter.magnitude``) and lora_bias (``lora_B.bias`` -> ``.lora_bias``), and
refuses what it cannot represent (embeddings, convolutions, modules_to_save,
trainable tokens, base-modifying inits such as PiSSA, DoRA together with
lora_bias) rather than mis-read it.

All refusals of PEFT features live in ``UNSUPPORTED_CONFIG``: extend there.
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
from ..backend import asarray, to_numpy
from ._keys import (PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, adapter_tensors, as_mapping, build_adapter,
                    metadata_for, parse_key, read_record, unsupported_reason)
from .atomic import atomic_write
from .safetensors import load_tensors, save_tensors

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft", "pattern_key", "read_peft_config", "save_peft"]


#: adapter_config.json fields whose non-default value reflora cannot represent -> why.
UNSUPPORTED_CONFIG = (
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=True) is not supported yet"),
    ("lora_bias", lambda v: bool(v), "lora_bias=True (a bias on lora_B) is not supported yet"),
    ("bias", lambda v: v not in (None, "none"), "bias other than 'none' saves base-layer biases"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save stores full copies of other modules"),
    ("trainable_token_indices", lambda v: bool(v), "trainable tokens are not a LoRA adapter"),
    ("layer_replication", lambda v: bool(v), "layer_replication changes the base model's structure"),
    ("target_parameters", lambda v: bool(v), "LoRA on nn.Parameter (target_parameters) is not supported"),
    ("use_qalora", lambda v: bool(v), "QALoRA is not supported"),
    ("alora_invocation_tokens", lambda v: bool(v), "aLoRA (activated LoRA) is not supported"),
    ("megatron_config", lambda v: bool(v), "Megatron-parallel LoRA is not supported"),
    ("arrow_config", lambda v: bool(v), "Arrow routing is not supported"),
    ("use_bdlora", lambda v: bool(v), "BD-LoRA is not supported"),
    ("monteclora_config", lambda v: bool(v), "MonteCLoRA changes the LoRA forward; not supported"),
    ("kasa_config", lambda v: bool(v), "KaSA changes the LoRA forward; not supported"),
    ("velora_config", lambda v: bool(v), "VeLoRA is not supported"),
    ("init_lora_weights", lambda v: isinstance(v, str) and v.lower().startswith(("pissa", "olora", "corda",
                                                                                  "loftq", "lora_ga")),
     "this init rewrites the base weight (the adapter is relative to a residual model); convert it with "
     "PEFT's path_initial_model_for_weight_conversion first"),
)


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def read_peft_config(directory: str, *, allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """adapter_config.json, checked; fields in ``allow`` are not refused (``reflora merge`` handles DoRA, lora_bias)."""
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{directory}: no {PEFT_CONFIG_NAME}; expected a PEFT adapter directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: a JSON {type(cfg).__name__}; expected an object")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise FormatError(f"{path}: peft_type is {ptype!r}; expected 'LORA'")
    for field, bad, why in UNSUPPORTED_CONFIG:
        if field not in allow and bad(cfg.get(field)):
            raise FormatError(f"{path}: {field} = {cfg.get(field)!r}: {why}; refusing rather than mis-reading")
    for field in ("r", "lora_alpha"):
        v = cfg.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FormatError(f"{path}: {field} is {v!r}; expected a number")
    for field in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(field) or {}
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in v.values()):
            raise FormatError(f"{path}: {field} is {v!r}; expected an object of pattern -> number")
        for p in v:
            try:
                re.compile(rf"(.*\.)?({p})$")  # as PEFT's get_pattern_key uses it
            except re.error as exc:
                raise FormatError(f"{path}: {field} key {p!r} is not a valid regular expression ({exc})") from None
        cfg[field] = v
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(field, False), bool):
            raise FormatError(f"{path}: {field} is {cfg.get(field)!r}; expected true or false")
    return cfg


_PEFT_EXTRA_RE = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.(lora_magnitude_vector|lora_B\.bias)$")


def _attach_extras(ad: LoraAdapter, extra: Mapping[str, np.ndarray], cfg: Mapping[str, Any], label: str,
                   weights: str, xp: Any) -> None:
    """Set a loaded adapter's DoRA magnitude and lora_bias, checked against use_dora / lora_bias."""
    for key, flag, what in (("magnitude", "use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_bias",
                                                                               "lora_B.bias")):
        if bool(cfg.get(flag)) != (key in extra):
            raise FormatError(f"{weights}: {label}: {flag} is {bool(cfg.get(flag))} in {PEFT_CONFIG_NAME} but the "
                              f"file {'lacks' if cfg.get(flag) else 'has'} {what}")
    if len(extra) == 2:
        raise FormatError(f"{weights}: {label}: DoRA with lora_bias is not supported (PEFT's merge of the pair "
                          "disagrees with its own forward)")
    try:
        for key, arr in extra.items():
            setattr(ad, key, ad._extra(asarray(np.ascontiguousarray(arr), xp=ad.xp), key))
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{weights}: {label}: {exc}") from None


def _peft_extras(mods: Mapping[str, LoraAdapter]) -> dict[str, Any]:
    """PEFT's keys for DoRA magnitudes and lora_B biases of the adapters that have them."""
    out = {}
    for m, ad in mods.items():
        if ad.magnitude is not None:
            out[f"{PEFT_PREFIX}{m}.lora_magnitude_vector"] = to_numpy(ad.magnitude)
        if ad.lora_bias is not None:
            out[f"{PEFT_PREFIX}{m}.lora_B.bias"] = to_numpy(ad.lora_bias)
    return out


def load_peft(directory: Any, *, xp: Any = None, dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

    For each module path m with ``base_model.model.m.lora_A.weight`` (R, I) and
    ``...lora_B.weight`` (O, R): R = rank_pattern's match for m, else r;
    alpha = alpha_pattern's match, else lora_alpha (patterns matched as PEFT
    does: the first p with m matching ``(.*\\.)?(p)$``); scale = alpha / R, or
    alpha / sqrt(R) with use_rslora. ``fan_in_fan_out`` (GPT-2 Conv1D) only
    transposes the *base* weight: A and B keep these shapes, so it does not
    change the adapter. Dropout does not apply at inference.

    Args:
      directory: the folder ``save_pretrained`` wrote.
      xp: namespace of the returned arrays; None = default backend.
      dtype: e.g. "float64" to upcast on load.

    Returns:
      {module path: LoraAdapter} in file order.

    Raises:
      reflora.FormatError: missing/malformed files, a config reflora cannot
        represent (modules_to_save, PiSSA-style inits, embeddings, convolutions,
        DoRA with lora_bias, ...), or ranks (or use_dora / lora_bias) contradicting
        the config. DoRA modules come back with ``magnitude`` set, lora_bias
        modules with ``lora_bias`` set; a DoRA adapter needs its base ``W`` to run.

    Example:
      >>> import reflora, tempfile
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> d = tempfile.mkdtemp()
      >>> save_peft(d, {"layers.0.q_proj": ad})
      >>> load_peft(d)["layers.0.q_proj"].scale
      8.0
    """
    directory = os.fspath(directory)
    cfg = read_peft_config(directory, allow=("use_dora", "lora_bias"))
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(directory, "adapter_model.bin")):
            raise FormatError(f"{directory}: only adapter_model.bin (a pickle) is present; reflora reads "
                              "safetensors only (re-save with safe_serialization=True)")
        raise FormatError(f"{directory}: no {PEFT_WEIGHTS_NAME}")
    tensors, metadata = load_tensors(weights, xp="numpy", dtype=dtype)
    record = read_record(metadata, weights)
    modules: dict[str, dict[str, str]] = {}
    extras: dict[str, dict[str, np.ndarray]] = {}  # DoRA magnitudes and lora_B biases (reflora.ops.dora, .lora_bias)
    for name in tensors:
        extra = _PEFT_EXTRA_RE.match(name)
        if extra is not None:
            extras.setdefault(extra[1], {})["magnitude" if extra[2] == "lora_magnitude_vector" else "lora_bias"] = \
                tensors[name]
            continue
        why = unsupported_reason(name)
        parsed = parse_key(name)
        if why or parsed is None or not name.startswith(PEFT_PREFIX) or parsed[2] != "peft":
            raise FormatError(f"{weights}: tensor {name!r} is "
                              + (why or f"not a PEFT LoRA tensor; expected '{PEFT_PREFIX}<module>.lora_A.weight' "
                                        "or '.lora_B.weight'"))
        module, half, _ = parsed
        if half in modules.setdefault(module, {}):
            raise FormatError(f"{weights}: module {module!r} has two {half} tensors")
        modules[module][half] = name
    out = {}
    for module, halves in modules.items():
        label = f"module {module!r}"
        if set(halves) != {"A", "B"}:
            (have,) = halves.values()
            raise FormatError(f"{weights}: {label} has {have!r} but not its other half")
        A, B = tensors[halves["A"]], tensors[halves["B"]]
        if A.ndim != 2 or B.ndim != 2:
            raise FormatError(f"{weights}: {label}: lora_A {A.shape}, lora_B {B.shape}; expected 2-D (R, I) and "
                              "(O, R): only Linear (and Conv1D) layers are supported, not convolutions")
        rk = pattern_key(cfg["rank_pattern"], module)
        ak = pattern_key(cfg["alpha_pattern"], module)
        R = cfg["rank_pattern"][rk] if rk is not None else cfg["r"]
        alpha = cfg["alpha_pattern"][ak] if ak is not None else cfg["lora_alpha"]
        if A.shape[0] != R or B.shape[1] != R:
            src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
            raise FormatError(f"{weights}: {label}: lora_A has shape {A.shape} and lora_B {B.shape}; expected "
                              f"(R, I) and (O, R) with R = {R} from {src} in {PEFT_CONFIG_NAME}")
        init = "gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming_uniform"
        out[module] = build_adapter(label, A, B, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                             init=init, xp=xp, where=weights)
        saved = (record or {}).get("modules", {}).get(module)
        if isinstance(saved, dict) and any(saved.get(k) != v for k, v in (
                ("rank", R), ("alpha", float(alpha)), ("use_rslora", bool(cfg.get("use_rslora", False))))):
            # a reflora-written file records each module's config: a disagreement means the two
            # files come from different saves (e.g. one interrupted between its two writes)
            raise FormatError(f"{directory}: {label}: {PEFT_CONFIG_NAME} says rank {R}, alpha {alpha}, "
                              f"use_rslora {cfg.get('use_rslora', False)} but {PEFT_WEIGHTS_NAME} was saved with "
                              f"{saved}; expected the two files of one save")
        _attach_extras(out[module], extras.pop(module, {}), cfg, label, weights, xp)
    if extras:
        raise FormatError(f"{weights}: {sorted(extras)[:5]} have a magnitude vector or lora_B.bias but no "
                          "lora_A/lora_B weights")
    if not out:
        raise FormatError(f"{weights}: no LoRA tensors")
    return out


def save_peft(directory: Any, adapters: Mapping[str, LoraAdapter], *, base_model_name_or_path: str | None = None,
              fan_in_fan_out: bool = False, task_type: str | None = None, overwrite: bool = True) -> None:
    """Write a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads.

    adapter_model.safetensors holds ``base_model.model.<m>.lora_A.weight``
    (R, I) and ``...lora_B.weight`` (O, R) with metadata {"format": "pt"}
    (plus reflora's config record). adapter_config.json targets exactly the
    given module paths (``target_modules`` is an anchored regex, which PEFT
    full-matches) and lists every module's rank and alpha in rank_pattern /
    alpha_pattern (escaped, longest path first, so PEFT's suffix matching
    picks each module's own entry); r and lora_alpha are the most common values.

    Args:
      directory: created if missing.
      adapters: {module path: LoraAdapter}; paths as in ``model.named_modules()``.
      base_model_name_or_path: recorded in the config (PEFT uses it only to
        fetch the base model when you ask it to).
      fan_in_fan_out: set True for GPT-2 style Conv1D targets (base weight (I, O)).
      task_type: PEFT's task type (e.g. "CAUSAL_LM"), or None.
      overwrite: False refuses to replace existing files.

    Raises:
      ValueError: adapters that disagree on use_rslora (one PEFT config holds
        one), an empty mapping, or malformed module paths.
      TypeError: values that are not LoraAdapter.
      FileExistsError: ``overwrite=False`` and a file exists.

    Example:
      >>> import reflora, tempfile, os
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> d = tempfile.mkdtemp()
      >>> save_peft(d, {"fc": ad})
      >>> sorted(os.listdir(d))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    if isinstance(adapters, LoraAdapter):
        raise TypeError("adapters is a single LoraAdapter; expected {module path: LoraAdapter} "
                        "(PEFT keys need the module path)")
    mods, _ = as_mapping(adapters, None)
    rslora = {ad.config.use_rslora for ad in mods.values()}
    if len(rslora) > 1:
        raise ValueError("adapters disagree on use_rslora; a PEFT config has one use_rslora for all modules")
    dora = {ad.magnitude is not None for ad in mods.values()}
    lbias = {ad.lora_bias is not None for ad in mods.values()}
    if len(dora) > 1 or len(lbias) > 1:
        raise ValueError("adapters disagree on DoRA (magnitude) or lora_bias; a PEFT config has one use_dora and "
                         "one lora_bias for all modules")
    if not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"fan_in_fan_out is {fan_in_fan_out!r}; expected True or False")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not overwrite:
        for p in (cfg_path, weights):
            if os.path.lexists(p):
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")

    def most_common(values: list) -> Any:
        return max(sorted(set(values)), key=values.count)

    ranks = [ad.config.rank for ad in mods.values()]
    alphas = [ad.config.alpha for ad in mods.values()]
    order = sorted(mods, key=lambda m: (-len(m), m))  # longest first: PEFT returns the first matching pattern
    alpha_int = {m: (int(a) if float(a).is_integer() else a) for m, a in zip(mods, alphas)}
    inits = {ad.config.init for ad in mods.values()}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": most_common(ranks),
        "lora_alpha": alpha_int[next(m for m in mods if mods[m].config.alpha == most_common(alphas))],
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in order) + ")$",
        "rank_pattern": {re.escape(m): mods[m].config.rank for m in order},
        "alpha_pattern": {re.escape(m): alpha_int[m] for m in order},
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": dora.pop(),
        "lora_bias": lbias.pop(),
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if inits == {"gaussian"} else True,
    }
    save_tensors(weights, {**adapter_tensors(mods, "peft"), **_peft_extras(mods)}, metadata=metadata_for(mods, "peft"),
                 overwrite=overwrite)
    text = json.dumps(config, indent=2) + "\n"  # not sort_keys: pattern order matters to PEFT

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(cfg_path, write, overwrite=overwrite)
