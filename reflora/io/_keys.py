"""Adapter tensor key names and reflora's metadata record, shared by layouts.py and peft.py.

All key names live in ``KEY_FORMATS`` / ``parse_key`` and all refusals of
unsupported tensors in ``UNSUPPORTED_KEYS``: extend there.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import asarray, to_numpy
from ..config import LoraConfig

LAYOUTS = ("peft", "seed")
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
META_KEY = "reflora"
META_VERSION = 1

# ---------------------------------------------------------------- key names (the one place)

#: (layout, half) -> key format; "{m}" is the module path ("" for the seed's bare keys).
KEY_FORMATS = {
    ("peft", "A"): PEFT_PREFIX + "{m}.lora_A.weight",
    ("peft", "B"): PEFT_PREFIX + "{m}.lora_B.weight",
    ("seed", "A"): "{m}lora_a",
    ("seed", "B"): "{m}lora_b",
}
# Both families' names are recognised for either half; which layout a name *suggests* is recorded.
KEY_RE = re.compile(r"^(?P<prefix>base_model\.model\.)?(?:(?P<m>.+)\.)?lora_(?P<half>[ABab])(?P<w>\.weight)?$")
#: PEFT tensors reflora cannot represent yet -> what they are (the DoRA / lora_bias issue extends this).
UNSUPPORTED_KEYS = (
    (re.compile(r"\.lora_magnitude_vector$"), "a DoRA magnitude vector (use_dora); read DoRA adapters from their "
                                                "PEFT folder with load_peft"),
    (re.compile(r"\.lora_B\.bias$"), "a LoRA bias (lora_bias=True); read it from its PEFT folder with load_peft"),
    (re.compile(r"\.lora_embedding_[AB]$"), "a LoRA embedding; only Linear layers are supported"),
    (re.compile(r"modules_to_save|\.original_module\."), "a modules_to_save copy; not part of a LoRA adapter"),
    (re.compile(r"token_adapter|trainable_tokens"), "a trainable-tokens delta; not supported"),
)


def key(layout: str, half: str, module: str) -> str:
    if layout == "seed":
        return KEY_FORMATS[(layout, half)].format(m=f"{module}." if module else "")
    return KEY_FORMATS[(layout, half)].format(m=module)


def parse_key(name: str) -> tuple[str, str, str] | None:
    """'base_model.model.q.lora_A.weight' -> ('q', 'A', 'peft'); 'lora_b' -> ('', 'B', 'seed'); else None."""
    m = KEY_RE.match(name)
    if m is None:
        return None
    half = m["half"]
    suggests = "peft" if (half in "AB" and m["w"]) else "seed" if (half in "ab" and not m["w"] and not m["prefix"]) \
        else None
    return m["m"] or "", half.upper(), suggests


def unsupported_reason(name: str) -> str | None:
    for pattern, what in UNSUPPORTED_KEYS:
        if pattern.search(name):
            return what
    return None


# ---------------------------------------------------------------- reflora metadata


def config_record(config: LoraConfig) -> dict[str, Any]:
    return config.to_dict()


def metadata_for(adapters: Mapping[str, LoraAdapter], layout: str) -> dict[str, str]:
    record = {"version": META_VERSION, "layout": layout,
              "modules": {m: config_record(ad.config) for m, ad in adapters.items()}}
    meta = {META_KEY: json.dumps(record, sort_keys=True)}
    if layout == "peft":
        meta["format"] = "pt"  # what PEFT (and transformers) write and check
    return meta


def read_record(metadata: Mapping[str, str], where: str) -> dict[str, Any] | None:
    if META_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[META_KEY])
    except ValueError as exc:
        raise FormatError(f"{where}: __metadata__[{META_KEY!r}] is not valid JSON ({exc})") from None
    if not (isinstance(record, dict) and record.get("version") == META_VERSION
            and record.get("layout") in LAYOUTS and isinstance(record.get("modules"), dict)):
        raise FormatError(f"{where}: __metadata__[{META_KEY!r}] is {metadata[META_KEY][:200]!r}; expected "
                          f"{{'version': {META_VERSION}, 'layout': 'peft'|'seed', 'modules': {{...}}}}")
    return record


# ---------------------------------------------------------------- saving


def as_mapping(adapters: Any, module: str | None) -> tuple[dict[str, LoraAdapter], bool]:
    """({module: adapter}, single) from one LoraAdapter or a mapping of them."""
    if isinstance(adapters, LoraAdapter):
        return {module or "": adapters}, True
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapter is {type(adapters).__name__}; expected a reflora.LoraAdapter or a non-empty "
                        "mapping of module path -> LoraAdapter")
    out = {}
    for m, ad in adapters.items():
        if not isinstance(m, str) or not m or m != m.strip(".") or m.startswith(PEFT_PREFIX):
            raise ValueError(f"module path {m!r}; expected a dotted path such as 'layers.0.q_proj' "
                             f"(without '{PEFT_PREFIX}')")
        if not isinstance(ad, LoraAdapter):
            raise TypeError(f"adapters[{m!r}] is {type(ad).__name__}; expected a reflora.LoraAdapter")
        out[m] = ad
    return out, False


def adapter_tensors(adapters: Mapping[str, LoraAdapter], layout: str) -> dict[str, Any]:
    tensors = {}
    for m, ad in adapters.items():
        A, B = to_numpy(ad.A), to_numpy(ad.B)  # host copies (CuPy -> .get()); writer makes them contiguous
        if layout == "peft":
            tensors[key("peft", "A", m)], tensors[key("peft", "B", m)] = A, B
        else:  # the seed's candle layout is the transpose: a = A^T (I, R), b = B^T (R, O)
            tensors[key("seed", "A", m)], tensors[key("seed", "B", m)] = A.T, B.T
    return tensors


def build_adapter(module_label: str, A_RI: np.ndarray, B_OR: np.ndarray, *, alpha: float, use_rslora: bool,
           init: str, xp: Any, where: str) -> LoraAdapter:
    if A_RI.dtype != B_OR.dtype:
        raise FormatError(f"{where}: {module_label}: A is {A_RI.dtype} and B {B_OR.dtype}; expected one dtype")
    if A_RI.dtype.kind != "f" and A_RI.dtype.name not in ("bfloat16",):  # ml_dtypes' bfloat16 has kind "V"
        raise FormatError(f"{where}: {module_label}: dtype {A_RI.dtype}; expected a floating dtype")
    A = asarray(np.ascontiguousarray(A_RI), xp=xp)
    B = asarray(np.ascontiguousarray(B_OR), xp=xp)
    try:
        return LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=use_rslora, init=init)
    except ValueError as exc:
        raise FormatError(f"{where}: {module_label}: {exc}") from None
