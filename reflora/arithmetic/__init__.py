"""Adapter arithmetic, checked by the update ΔW an adapter makes.

``reflora.arithmetic.combine``: ``combine`` (PEFT's add_weighted_adapter methods and an
exact one) and ``dare_masks``; the names are exported from ``reflora``.
"""
