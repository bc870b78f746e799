"""reflora: a golden reference for LoRA in pure NumPy/CuPy.

Canonical layout (PEFT's): A (R, I), B (O, R), W (O, I); legend N rows,
I in_features, O out_features, R rank. See ``reflora.ops.lora`` for the formulas
and docs/architecture.md for the package layout.
"""

from ._errors import FormatError
from .adapter import LoraAdapter
from .backend import asarray, get_namespace
from .config import LoraConfig
from .io.layouts import load_adapter, save_adapter
from .io.peft import load_peft, save_peft
from .io.safetensors import load_tensors, save_tensors
from .numerics.merge import Merged, merge, unmerge
from .ops.dora import DoraCache, DoraGrads, DoraMerged, dora_backward, dora_forward, dora_merge, dora_unmerge, dora_weight_norm
from .ops.dropout import dropout_mask
from .ops.init import init_lora
from .ops.lora import LoraCache, LoraGrads, lora_backward, lora_forward, mse_loss
from .ops.lora_bias import LoraBiasCache, LoraBiasGrads, lora_bias_backward, lora_bias_forward
from .ops.resize import Resized, resize_rank
from .ops.stack import LoraLayer, StackCache, StackGrads, stack_backward, stack_forward
from .optim.sgd import SGD, SGDState

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "FormatError",
    "LoraAdapter",
    "LoraCache",
    "LoraConfig",
    "LoraGrads",
    "SGDState",
    "asarray",
    "get_namespace",
    "init_lora",
    "load_adapter",
    "load_peft",
    "load_tensors",
    "lora_backward",
    "lora_forward",
    "mse_loss",
    "save_adapter",
    "save_peft",
    # beyond the basics (issue 5)
    "LoraBiasCache",
    "LoraBiasGrads",
    "DoraCache",
    "DoraGrads",
    "DoraMerged",
    "LoraLayer",
    "Merged",
    "Resized",
    "StackCache",
    "StackGrads",
    "dora_backward",
    "dora_forward",
    "dora_merge",
    "dora_unmerge",
    "dora_weight_norm",
    "dropout_mask",
    "lora_bias_backward",
    "lora_bias_forward",
    "merge",
    "resize_rank",
    "stack_backward",
    "stack_forward",
    "unmerge",
    "save_tensors",
]
