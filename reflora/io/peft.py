"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT directory is ``adapter_config.json`` + ``adapter_model.safetensors``
as ``PeftModel.save_pretrained`` writes them. ``load_peft`` honours r,
lora_alpha, use_rslora, rank_pattern and alpha_pattern (matched against module
paths exactly as PEFT matches them), use_dora (``lora_magnitude_vector`` ->
``LoraAdapter.magnitude``) and lora_bias (``lora_B.bias`` -> ``.lora_bias``), and
refuses what it cannot represent (embeddings, convolutions, modules_to_save,
trainable tokens, base-modifying inits such as PiSSA, DoRA together with
lora_bias) rather than mis-read it.

All refusals of PEFT features live in ``reflora.io._config.UNSUPPORTED_CONFIG``: extend there.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import asarray, to_numpy
from ._config import pattern_key, read_peft_config
from ._keys import (PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, adapter_tensors, as_mapping, build_adapter,
                    metadata_for, parse_key, read_record, unsupported_reason)
from .atomic import atomic_write, exists_message, read_consistently, replace_folder
from .safetensors import load_tensors, save_tensors

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft", "pattern_key", "read_peft_config", "save_peft"]


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

    The two files are read as one version: ``save_peft`` replaces the folder as a
    whole, so when the folder at ``directory`` is another one after the read than
    before it, the read is done again (at most three times).

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
    return read_consistently(directory, lambda: _load_peft(directory, xp=xp, dtype=dtype))


def _load_peft(directory: str, *, xp: Any, dtype: Any) -> dict[str, LoraAdapter]:
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
              fan_in_fan_out: bool = False, task_type: str | None = None, overwrite: bool = True,
              config_template: Mapping[str, Any] | None = None) -> None:
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
      config_template: an adapter_config.json dict whose keys are kept where they
        still hold (``reflora convert`` passes the source's, so a diff shows only
        what changed: peft_version, task_type, auto_mapping, target_modules, ...).

    The two files change together: they are written into a fresh folder beside
    ``directory``, other files of ``directory`` are carried over (hard links),
    and the new folder takes its place in one step (``reflora.io.atomic``). A
    reader sees the old pair or the new pair. Where the folder cannot be swapped
    (a mount point, the working directory, a read-only parent) the files are
    replaced one by one, and ``load_peft`` refuses a pair from two saves.

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
    if config_template is not None and not isinstance(config_template, Mapping):
        raise TypeError(f"config_template is {type(config_template).__name__}; expected a mapping (an "
                        f"{PEFT_CONFIG_NAME} read with json) or None")
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not overwrite:
        for p in (cfg_path, weights):
            if os.path.lexists(p):
                raise FileExistsError(exists_message(p))

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
    if config_template is not None:
        config = _from_template(config, config_template, mods)
    tensors = {**adapter_tensors(mods, "peft"), **_peft_extras(mods)}
    text = json.dumps(config, indent=2) + "\n"  # not sort_keys: pattern order matters to PEFT

    def build(folder: str) -> None:
        save_tensors(os.path.join(folder, PEFT_WEIGHTS_NAME), tensors, metadata=metadata_for(mods, "peft"))
        atomic_write(os.path.join(folder, PEFT_CONFIG_NAME), lambda tmp: _write_text(tmp, text), overwrite=True)

    # the pair is replaced together (weights first where the folder cannot be swapped; load_peft then
    # detects a pair torn by a crash through reflora's config record)
    replace_folder(directory, build, names=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


#: adapter_config.json keys save_peft decides from the adapters (a template's other keys are kept as given).
_DERIVED = ("peft_type", "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")


def _from_template(config: dict, template: Mapping, mods: Mapping[str, LoraAdapter]) -> dict:
    """``template`` (e.g. the source's adapter_config.json when converting) with only what must change changed.

    r, lora_alpha, rank_pattern and alpha_pattern stay as given when they give every module its own rank and
    alpha (as PEFT resolves them); target_modules stays as given; the flags in ``_DERIVED`` come from the adapters.
    """
    out = dict(template)
    for k in _DERIVED:
        if k != "fan_in_fan_out" or k not in out:
            out[k] = config[k]
    try:
        kept = {k: template.get(k) for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
        rp, ap = dict(kept["rank_pattern"] or {}), dict(kept["alpha_pattern"] or {})
        same = all(
            (rp[k] if (k := pattern_key(rp, m)) is not None else kept["r"]) == ad.config.rank
            and float(ap[k] if (k := pattern_key(ap, m)) is not None else kept["lora_alpha"]) == ad.config.alpha
            for m, ad in mods.items())
    except (TypeError, ValueError, re.error):
        same = False
    if not same:
        for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            out[k] = config[k]
    if not out.get("target_modules"):
        out["target_modules"] = config["target_modules"]
    return out
