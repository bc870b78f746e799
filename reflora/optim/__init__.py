"""Optimisers with torch.optim's semantics (pure ``init`` / ``step``), gradient clipping, parameter groups."""

from .adamw import Adam, AdamState, AdamW
from .clip import clip_grad_norm
from .groups import loraplus_groups

__all__ = ["Adam", "AdamState", "AdamW", "clip_grad_norm", "loraplus_groups"]
