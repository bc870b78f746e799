"""PEFT's merge rules (``peft.utils.merge_utils``) in array-API operations, on same-shape tensors.

Legend: T_i the i-th tensor (a factor A_i or B_i, or a dense update ΔW_i), c_i its weight.

    task arithmetic      Σ c_i T_i
    magnitude prune      keep the int(density * size) largest |T_i| entries of each T_i
                         (equal magnitudes by position; torch.topk's order is unspecified)
    DARE                 T_i * mask_i / density, mask_i a 0/1 keep-mask (density 1: nothing pruned)
    ties, dare_ties      prune (magnitude / DARE); the majority sign of each entry from the
                         *pruned, unweighted* T_i: sign of Σ T_i ("total") or of Σ sign(T_i)
                         ("frequency"), 0 counting as +; then Σ c_i T_i over the i whose sign
                         agrees, divided by their number (at least 1)

These are the building blocks of ``reflora.arithmetic.combine``; public names, not exported
from ``reflora``.
"""

from __future__ import annotations

import math

__all__ = ["dare_prune", "magnitude_prune", "merge_rule", "quantile"]


def magnitude_prune(xp, t, density):
    """t with all but its int(density * size) largest |t| set to 0 (PEFT: magnitude_based_pruning)."""
    if density >= 1:
        return t
    flat = xp.reshape(t, (-1,))
    k = int(density * flat.shape[0])
    order = xp.argsort(-xp.abs(flat), stable=True)  # largest |t| first, equal ones by position
    keep = xp.zeros(flat.shape, dtype=t.dtype)
    if k:
        rank_of = xp.argsort(order, stable=True)  # position of each entry in the descending order
        keep = xp.where(rank_of < k, xp.ones(flat.shape, dtype=t.dtype), keep)
    return t * xp.reshape(keep, t.shape)


def dare_prune(t, mask, density):
    """t * mask / density (PEFT: random_pruning(rescale=True)); density >= 1 prunes nothing."""
    if density >= 1:
        return t
    return (t * mask) / density


def merge_rule(xp, method, tensors, weights, density, majority, masks):
    """PEFT's merge_utils rule for ``method`` ("linear", "ties", "dare_linear", "dare_ties",
    "magnitude_prune", or their "_svd" forms) on same-shape tensors with weights c_i.

    ``masks`` (DARE only): one 0/1 keep-mask per tensor.
    """
    base = method.removesuffix("_svd")
    if base in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(xp, t, density) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        tensors = [dare_prune(t, m, density) for t, m in zip(tensors, masks)]
    T = xp.stack(tensors, axis=0)
    c = xp.reshape(xp.asarray(weights, dtype=T.dtype), (len(weights),) + (1,) * (T.ndim - 1))
    if base not in ("ties", "dare_ties"):
        # task arithmetic: Σ c_i T_i
        return xp.sum(T * c, axis=0)
    # elect the sign per entry from the pruned, unweighted tensors
    sign = xp.sign(T)
    votes = xp.sum(T, axis=0) if majority == "total" else xp.sum(sign, axis=0)
    one = xp.ones(votes.shape, dtype=T.dtype)
    elected = xp.where(votes >= 0, one, -one)
    agree = xp.astype(sign == elected, T.dtype)
    # disjoint mean: Σ c_i T_i over the agreeing i, divided by their number (at least 1)
    count = xp.maximum(xp.sum(agree, axis=0), one)
    return xp.sum(T * c * agree, axis=0) / count


def quantile(xp, v, q):
    """The q-quantile of v's entries, linear between order statistics (torch.quantile's default)."""
    s = xp.sort(xp.reshape(v, (-1,)))
    pos = q * (s.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.shape[0] - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
