"""LoRA+ parameter groups, as PEFT's ``create_loraplus_optimizer`` builds them.

LoRA+ (Hayou et al. 2024) trains B with a learning rate ``loraplus_lr_ratio``
times A's. PEFT (peft/optimizers/loraplus.py) sorts the trainable parameters
into four groups, in this order:

    groupA          everything else (lora_A, ...)          lr                      wd = loraplus_weight_decay
    embedding       lora_embedding_A/B of an Embedding     loraplus_lr_embedding   wd = loraplus_weight_decay
    groupB          "lora_B" in the name, or 1-d tensors   lr * ratio              wd = loraplus_weight_decay
    groupB_no_decay  those of groupB with "bias" in the name  lr * ratio           wd = 0

So a DoRA magnitude (1-d) trains at B's rate with decay, and PEFT's
``lora_bias`` (``lora_B.<adapter>.bias``) at B's rate without decay. Note
that every group carries ``loraplus_weight_decay`` (default 0.0): the
optimiser's own ``weight_decay`` (AdamW's 1e-2) applies to no parameter at
all. The embedding lr defaults to 1e-6, whatever ``lr`` is.

PEFT's own decay exclusion also drops parameters inside LayerNorm modules
(transformers' ALL_LAYERNORM_LAYERS): adapters' LoRA parameters never are, but
a LayerNorm in ``modules_to_save`` is (its 1-d weight goes to groupB_no_decay).
reflora cannot see module types: name such parameters in ``no_decay``.
reflora works from names: PEFT's (``...q_proj.lora_B.default.weight``) or a
``LoraAdapter``'s (``A``, ``B``, ``m``, ``lora_bias``: B is lora_B).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

__all__ = ["loraplus_groups"]


def _is_b(name: str) -> bool:
    return "lora_B" in name or name == "B" or name.endswith(".B")


def loraplus_groups(params: Mapping[str, Any], *, lr: float, loraplus_lr_ratio: float,
                    loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0,
                    no_decay: Iterable[str] = ()) -> list[dict]:
    """PEFT's four LoRA+ groups for ``reflora.Adam``/``AdamW``'s ``groups=`` (empty groups kept, as PEFT).

    Args:
      params: name -> array (the trainable parameters; only names and ndim are read).
      lr: A's learning rate; B's is ``lr * loraplus_lr_ratio``.
      loraplus_lr_ratio: eta_B / eta_A (PEFT recommends >= 1; not enforced, as PEFT).
      loraplus_lr_embedding: the lr of LoRA embedding matrices (PEFT's default 1e-6).
      loraplus_weight_decay: every group's weight decay except B's no-decay group.
      no_decay: names of parameters inside LayerNorm modules (e.g. a ``modules_to_save``
        LayerNorm's weight), which PEFT excludes from decay like "bias" names; used
        where PEFT uses it, in B's groups.

    Returns:
      ``[{"params": [names], "lr": ..., "weight_decay": ...}]`` for groupA, embedding, groupB,
      groupB_no_decay.

    Raises:
      ValueError: a non-finite or negative number; a no_decay name not in params.
      TypeError: a number that is not a real; params not a mapping of names; no_decay
        not a collection of names.

    Example:
      >>> import numpy as np
      >>> g = loraplus_groups({"A": np.ones((2, 3)), "B": np.ones((4, 2))}, lr=1e-4, loraplus_lr_ratio=16)
      >>> [(x["params"], x["lr"]) for x in g if x["params"]]
      [(['A'], 0.0001), (['B'], 0.0016)]
    """
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"params is {type(params).__name__}; expected a dict of name -> array")
    for name, v in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                    ("loraplus_lr_embedding", loraplus_lr_embedding),
                    ("loraplus_weight_decay", loraplus_weight_decay)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} is {v!r} ({type(v).__name__}); expected a finite number >= 0")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} is {v!r}; expected a finite number >= 0")
    if isinstance(no_decay, (str, bytes)) or not isinstance(no_decay, Iterable):
        raise TypeError(f"no_decay is {no_decay!r}; expected a list of parameter names")
    no_decay = set(no_decay)
    unknown = sorted(n for n in no_decay if n not in params)
    if unknown:
        raise ValueError(f"no_decay names {unknown}; expected names of params")
    groups: dict[str, list[str]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in params.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_embedding_A", "lora_embedding_B"):
            # PEFT: the module two levels up is a LoRA Embedding layer
            groups["embedding"].append(name)
        elif _is_b(name) or getattr(p, "ndim", None) == 1:
            # PEFT: "bias" in the name is excluded from decay (lora_bias = lora_B.<adapter>.bias), and so is
            # anything inside a LayerNorm (no_decay)
            groups["B_no_decay" if "bias" in name or name in no_decay else "B"].append(name)
        else:
            groups["A"].append(name)
    wd = float(loraplus_weight_decay)
    return [
        {"params": groups["A"], "lr": float(lr), "weight_decay": wd},
        {"params": groups["embedding"], "lr": float(loraplus_lr_embedding), "weight_decay": wd},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": wd},
        {"params": groups["B_no_decay"], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
