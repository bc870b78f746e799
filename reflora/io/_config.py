"""adapter_config.json: the one reader and validator of a PEFT config, for load_peft and reflora merge alike.

Every config value that reaches arithmetic is checked here, once: r and rank_pattern
values (ints >= 1), lora_alpha and alpha_pattern values (finite, within float64),
pattern keys (PEFT's regexes, matched in bounded time by ``reflora.io._pattern``),
booleans; the file itself through ``reflora.io._files.read_json`` (a regular file,
no NaN/Infinity, no nesting deep enough to overflow the parser).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from .._errors import FormatError
from .._validate import check_real
from . import _pattern
from ._files import read_json
from ._keys import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

__all__ = ["UNSUPPORTED_CONFIG", "pattern_key", "read_peft_config", "seed_file_message"]

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
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module), or None.

    Matched by ``reflora.io._pattern`` in time linear in the path (a Thompson NFA
    built from re's own parse of the same string), so a hostile key such as
    ``(a+)+`` cannot hang; keys it cannot bound are refused by ``read_peft_config``.
    """
    return _pattern.pattern_key(patterns, module)


def seed_file_message(adapter: str, folder: str) -> str:
    """The message for a single adapter file (no adapter_config.json beside it) given where a PEFT folder is needed."""
    return (f"{adapter} is an adapter file, and its folder {folder} has no {PEFT_CONFIG_NAME}: expected a PEFT "
            f"adapter folder ({PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME}). Make one with "
            f"`reflora convert {adapter} NEW_DIR --to peft` (add --alpha A if the file has no reflora config) "
            "and pass NEW_DIR")


def read_peft_config(directory: str, *, allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """adapter_config.json, checked: the one validator of every config value that reaches arithmetic.

    ``load_peft`` and ``reflora merge`` both read configs here. r and every rank_pattern value are ints >= 1;
    lora_alpha and every alpha_pattern value finite numbers (NaN, Infinity and numbers beyond float64 are
    refused); pattern keys are regexes PEFT's way that ``pattern_key`` can match in bounded time; use_rslora
    and fan_in_fan_out booleans. Fields in ``allow`` are not refused (``reflora merge`` handles DoRA, lora_bias).
    """
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.lexists(path):
        raise FormatError(f"{directory}: no {PEFT_CONFIG_NAME}; expected a PEFT adapter folder "
                          f"({PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME}, as PeftModel.save_pretrained writes)")
    cfg = read_json(path, PEFT_CONFIG_NAME)
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: a JSON {type(cfg).__name__}; expected an object")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise FormatError(f"{path}: peft_type is {ptype!r:.80}; expected 'LORA'")
    for field, bad, why in UNSUPPORTED_CONFIG:
        if field not in allow and bad(cfg.get(field)):
            raise FormatError(f"{path}: {field} = {cfg.get(field)!r:.80}: {why}; refusing rather than mis-reading")
    cfg["r"] = check_real(cfg.get("r"), f"{path}: r", error=FormatError, integer=True, minimum=1)
    cfg["lora_alpha"] = check_real(cfg.get("lora_alpha"), f"{path}: lora_alpha", error=FormatError)
    for field in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(field) or {}
        if not isinstance(v, dict):
            raise FormatError(f"{path}: {field} is {v!r:.80}; expected an object of pattern -> number")
        for p, x in v.items():
            v[p] = check_real(x, f"{path}: {field}[{p!r:.80}]", error=FormatError, integer=field == "rank_pattern",
                              minimum=1 if field == "rank_pattern" else None)
            try:
                _pattern.check_pattern(p)
            except re.error as exc:
                raise FormatError(f"{path}: {field} key {p!r:.80} is not a valid regular expression ({exc})") from None
            except _pattern.PatternError as exc:
                raise FormatError(f"{path}: {field} key {p!r:.80} {exc}; expected a module name or a plain regex "
                                  "(reflora matches patterns in bounded time, see reflora.io.peft.pattern_key)"
                                  ) from None
        cfg[field] = v
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(field, False), bool):
            raise FormatError(f"{path}: {field} is {cfg.get(field)!r:.80}; expected true or false")
    return cfg
