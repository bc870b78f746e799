"""Optimisers as pure update rules over arrays (SGD; AdamW joins later)."""
