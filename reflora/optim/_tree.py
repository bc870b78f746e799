"""Parameter trees: a dict, tuple or list of arrays (SGD, Adam and AdamW share these)."""

from __future__ import annotations

from typing import Any, Mapping


def items(tree: Any, what: str) -> tuple[list, list]:
    """(keys, values) of a dict, or of a tuple/list (keys are the positions)."""
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        return keys, [tree[k] for k in keys]
    if isinstance(tree, (tuple, list)):
        return list(range(len(tree))), list(tree)
    raise TypeError(f"{what} is {type(tree).__name__}; expected a dict, tuple or list of arrays")


def rebuild(like: Any, values: list) -> Any:
    """values in like's structure (a dict with like's keys, else a tuple)."""
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), values))
    return tuple(values)
