"""Optimisers as pure update rules over arrays, with torch.optim's semantics: SGD, Adam, AdamW;
gradient clipping (``clip_grad_norm``) and parameter groups (``loraplus_groups``)."""

from .adamw import Adam, AdamState, AdamW
from .clip import clip_grad_norm
from .groups import loraplus_groups

__all__ = ["Adam", "AdamState", "AdamW", "clip_grad_norm", "loraplus_groups"]
