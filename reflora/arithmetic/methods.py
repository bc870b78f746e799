"""The combination methods, one module (layer) at a time; ``reflora.arithmetic.combine`` dispatches.

Legend: I in_features, O out_features, R_i ranks, k a target rank. ``items`` is a list
of (index, adapter, weight): adapter i has A_i (R_i, I), B_i (O, R_i), its scale s_i,
and optionally magnitude (O,) and W (O, I) (DoRA), lora_bias (O,), bias (O,). Every
result has scale 1 (alpha = rank, no rsLoRA). The formulas and why: the module
docstring of ``reflora.arithmetic.combine`` and docs/derivations/combine.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ..ops.dora import dora_weight_norm
from ..ops.resize import resize_rank
from .rules import merge_rule, quantile

__all__ = ["Combined", "exact", "peft_method"]

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


class Combined(NamedTuple):
    """A combined adapter: A (R', I), B (O, R'), alpha = R' and no rsLoRA (scale 1), the base W and
    bias it applies to (the first adapter's, or the DoRA adapters' W), a DoRA magnitude (O,) and a
    lora_bias (O,) when the inputs had them. ``reflora.LoraAdapter.from_arrays(**c._asdict())``
    makes it a layer."""

    A: Any
    B: Any
    alpha: float
    use_rslora: bool = False
    W: Any = None
    bias: Any = None
    magnitude: Any = None
    lora_bias: Any = None

    @property
    def rank(self) -> int:
        """R', the number of rows of A."""
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """alpha / R' = 1.0: the inputs' scales and weights sit in the factors."""
        return self.alpha / self.rank


def _get(ad, name):
    return getattr(ad, name, None)


def _result(xp, A, B, ref, *, magnitude=None, lora_bias=None, W=None) -> Combined:
    # scale 1: alpha = R, no rsLoRA; the base (W, bias) of the first adapter, or the DoRA adapters' W
    R = int(A.shape[0])
    dt = ref.A.dtype

    def own(a):
        # Note: NumPy promotes ml_dtypes' bfloat16 times a Python float to float32; round back once
        return a if a is None or a.dtype == dt else xp.astype(a, dt)

    A, B, magnitude, lora_bias = own(A), own(B), own(magnitude), own(lora_bias)
    return Combined(A, B, alpha=float(R), use_rslora=False, W=_get(ref, "W") if W is None else W,
                    bias=_get(ref, "bias"), magnitude=magnitude, lora_bias=lora_bias)


def _combined_bias(xp, items):
    if not any(_get(ad, "lora_bias") is not None for _, ad, _ in items):
        return None
    O = items[0][1].B.shape[0]
    total = xp.zeros((O,), dtype=items[0][1].A.dtype)
    for _, ad, w in items:
        if _get(ad, "lora_bias") is not None:
            total = total + (_get(ad, "lora_bias") * w) * ad.scale
    return total


def _same_base(xp, mod, items):
    """The base weight W every DoRA adapter of the module was trained on (all equal)."""
    where = f"module {mod!r}: " if mod else ""
    W = None
    for i, ad, _ in items:
        if _get(ad, "magnitude") is None:
            continue
        if _get(ad, "W") is None:
            raise ValueError(f"{where}adapters[{i}] is DoRA but has no base weight W; DoRA's update depends on W "
                             "(build it with LoraAdapter.from_arrays(..., W=W, magnitude=m))")
        if W is None:
            W = _get(ad, "W")
        elif W.shape != _get(ad, "W").shape or not bool(xp.all(W == _get(ad, "W"))):
            raise ValueError(f"{where}the DoRA adapters carry different base weights W; combining needs one base")
    return W


def _row_norms(xp, W, A, B, s):
    """||W + s B A||_row (``reflora.ops.dora.dora_weight_norm``); bfloat16 through float32, rounded back once."""
    if getattr(W.dtype, "name", "") == "bfloat16":
        f = [xp.astype(t, xp.float32) for t in (W, A, B)]
        return xp.astype(dora_weight_norm(*f, scale=s), W.dtype)
    return dora_weight_norm(W, A, B, scale=s)


def exact(xp, mod, items, rank) -> Combined:
    """Σ w_i ΔW_i with concatenated ranks (scale 1), or its best rank-k approximation (``rank``);
    DoRA adapters on one W as the DoRA adapter derived in docs/derivations/combine.md."""
    where = f"module {mod!r}: " if mod else ""
    W = _same_base(xp, mod, items)
    if W is None:
        # A = [(w_i A_i) s_i], B = [B_i]: B A = Σ w_i s_i B_i A_i (PEFT's cat, same rounding order)
        A = xp.concat([(ad.A * w) * ad.scale for _, ad, w in items], axis=0)
        B = xp.concat([ad.B for _, ad, _ in items], axis=1)
        lb = _combined_bias(xp, items)
        if rank is not None:
            r = resize_rank(A, B, scale=1.0, new_rank=rank)
            A, B = r.A, r.B
        return _result(xp, A, B, items[0][1], lora_bias=lb)
    if rank is not None:
        raise ValueError(f"{where}rank= with DoRA adapters: the result's update is diag(d)(W + B'A') - W, whose best "
                         "rank-k approximation is not a DoRA adapter; combine exactly (rank=None)")
    for i, ad, _ in items:
        if _get(ad, "lora_bias") is not None:
            raise ValueError(f"{where}adapters[{i}] has lora_bias and the module has DoRA adapters; reflora does not "
                             "support DoRA with lora_bias (PEFT's merge of the pair disagrees with its own forward)")
    O = W.shape[0]
    one = xp.ones((O,), dtype=W.dtype)
    # c_i = m_i / ||W + s_i B_i A_i||_row (1 for plain LoRA); d = 1 + Σ w_i (c_i - 1)
    cs = [one if _get(ad, "magnitude") is None else _get(ad, "magnitude") / _row_norms(xp, W, ad.A, ad.B, ad.scale)
          for _, ad, _ in items]
    d = one
    for (_, _, w), c in zip(items, cs):
        d = d + w * (c - one)
    if bool(xp.any(d == 0)):
        raise ValueError(f"{where}the combined DoRA update has d = 1 + Σ w_i (m_i/n_i - 1) = 0 in some row: that row "
                         "of W + Σ w_i ΔW_i is LoRA-only and no DoRA adapter on W represents it")
    # B' = [diag(w_i c_i / d) B_i], A' = [s_i A_i]: W + B'A' = diag(1/d)(W + Σ w_i ΔW_i)
    B = xp.concat([xp.reshape((w * c) / d, (O, 1)) * ad.B for (_, ad, w), c in zip(items, cs)], axis=1)
    A = xp.concat([ad.A * ad.scale for _, ad, _ in items], axis=0)
    # m' = d * ||W + B'A'||_row, so that m'/||W + B'A'|| = d
    m = d * _row_norms(xp, W, A, B, 1.0)
    return _result(xp, A, B, items[0][1], magnitude=m, W=W)


def peft_method(xp, mod, method, items, *, new_rank, density, majority, masks, clamp, full_matrices) -> Combined:
    """PEFT's add_weighted_adapter ``method`` on one module (``masks``: DARE's, per adapter index)."""
    where = f"module {mod!r}: " if mod else ""
    for i, ad, _ in items:
        if _get(ad, "magnitude") is not None:
            raise ValueError(f"{where}adapters[{i}] is DoRA; method {method!r} has no DoRA semantics (PEFT keeps the "
                             "new magnitude at its initial ||W||, PEFT #3761); use method='exact' or 'cat'")
        if _get(ad, "lora_bias") is not None and method not in ("cat", "linear", "svd"):
            raise ValueError(f"{where}adapters[{i}] has lora_bias; method {method!r} prunes, and pruning a bias has no "
                             "PEFT definition; use 'exact', 'cat', 'linear' or 'svd'")
    lb = _combined_bias(xp, items)
    if method == "cat":
        return exact(xp, mod, items, None)
    if method in FACTORWISE:
        ranks = sorted({int(ad.A.shape[0]) for _, ad, _ in items})
        if len(ranks) > 1:
            raise ValueError(f"{where}ranks {ranks}; method {method!r} adds the factors entrywise and needs one rank "
                             "(use 'exact', 'cat' or an svd method)")
        wA, wB = [], []
        for _, ad, w in items:
            ws = w * ad.scale
            # sqrt|w s| on both factors, the sign on A only
            wA.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            wB.append(math.sqrt(abs(ws)))
        mA = mB = None
        if masks is not None:
            mA = [masks[i]["A"] for i, _, _ in items]
            mB = [masks[i]["B"] for i, _, _ in items]
        A = merge_rule(xp, method, [ad.A for _, ad, _ in items], wA, density, majority, mA)
        B = merge_rule(xp, method, [ad.B for _, ad, _ in items], wB, density, majority, mB)
        return _result(xp, A, B, items[0][1], lora_bias=lb)
    # the svd family: the rule on the dense updates ΔW_i = (B_i A_i) s_i, then a truncated SVD
    deltas = [xp.matmul(ad.B, ad.A) * ad.scale for _, ad, _ in items]
    md = None if masks is None else [masks[i]["delta"] for i, _, _ in items]
    M = merge_rule(xp, method, deltas, [w for _, _, w in items], density, majority, md)
    U, S, Vh = xp.linalg.svd(M, full_matrices=full_matrices)
    k = min(new_rank, S.shape[0])
    # B = U_k diag(σ_k), A = V_k^T
    B = U[:, :k] * S[:k]
    A = Vh[:k, :]
    if clamp is not None:
        hi = quantile(xp, xp.concat([xp.reshape(B, (-1,)), xp.reshape(A, (-1,))]), clamp)
        B = xp.clip(B, -hi, hi)
        A = xp.clip(A, -hi, hi)
    if k < new_rank:
        # min(O, I) < svd_rank: pad to the asked rank with zeros (the update is unchanged)
        O, I = M.shape
        A = xp.concat([A, xp.zeros((new_rank - k, I), dtype=A.dtype)], axis=0)
        B = xp.concat([B, xp.zeros((O, new_rank - k), dtype=B.dtype)], axis=1)
    return _result(xp, A, B, items[0][1], lora_bias=lb)
