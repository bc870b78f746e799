"""Combining LoRA adapters: PEFT's ``add_weighted_adapter`` methods, and an exact one.

Legend: I in_features, O out_features, R_i the rank of adapter i, k a target rank.
Adapter i has factors A_i (R_i, I), B_i (O, R_i), scale s_i (alpha/R_i, or
alpha/sqrt(R_i) with rsLoRA) and weight w_i. Its update is ΔW_i = s_i B_i A_i.
Every result carries scale 1 (alpha = rank, no rsLoRA): the scales sit in the factors.

    exact, cat     A = [w_1 s_1 A_1; ...; w_n s_n A_n]   (ΣR_i, I)
                   B = [B_1, ..., B_n]                  (O, ΣR_i)      B A = Σ w_i ΔW_i exactly
    exact, rank=k  the best rank-k approximation of Σ w_i ΔW_i (Eckart-Young) from the
                   thin factors: QR of B and A^T, SVD of the ΣR x ΣR core
                   (``reflora.ops.resize.resize_rank``); O x I is never formed
    linear         A = Σ sign(w_i s_i) sqrt|w_i s_i| A_i,  B = Σ sqrt|w_i s_i| B_i   (equal R_i)
                   B A = Σ_i Σ_j ... : cross terms B_i A_j, i != j. Not Σ w_i ΔW_i: PEFT's
                   "very rough approximation", kept for compatibility (PEFT #3004)
    ties, dare_linear, dare_ties, magnitude_prune
                   the same two factor-wise sums, each through PEFT's merge_utils rule
                   (prune to ``density``, elect signs, disjoint mean; see below)
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                   the rule applied to the dense ΔW_i (O x I, formed: the rules are
                   elementwise), then the rank-k truncated SVD of the result:
                   B = U_k diag(σ_k), A = V_k^T, optionally clamped at the ``svd_clamp``
                   quantile of their entries; k = svd_rank or the largest input rank

The rules (``peft.utils.merge_utils``: task arithmetic, magnitude pruning, DARE, TIES)
are in ``reflora.arithmetic.rules``; the per-module math in ``reflora.arithmetic.methods``.

Where reflora differs from PEFT 0.21.2 on purpose (docs/derivations/combine.md):
- rsLoRA inputs: the result has scale 1. PEFT's combined adapter inherits use_rslora
  from the first adapter, so its scale is new_rank / sqrt(new_rank) = sqrt(new_rank):
  ΔW comes out sqrt(new_rank) too large (PEFT #3449, #3473, #3761).
- lora_bias: combined like the update, c = Σ w_i s_i c_i (PEFT leaves the new bias at
  zero, #3761), for exact, cat, linear and svd; the pruning methods refuse it.
- DoRA: exact and cat give the exact combination of the adapters' effective updates
  (a DoRA adapter on the same base W, see below); every other method refuses DoRA
  (PEFT keeps the new adapter's magnitude at its initial ||W||, #3761).
- rank_pattern: each module keeps its own rank in the result (PEFT writes one r and
  an empty rank_pattern, so linear/ties/dare/magnitude_prune results cannot be
  reloaded, #3737).
- density must lie in [0, 1] ((0, 1] for DARE); PEFT skips pruning above 1 and divides
  by 0 at 0. DARE's randomness is explicit: ``seed`` or ``masks``.
- magnitude pruning breaks ties by position (stable sort); torch.topk's order is unspecified.
- svd methods with svd_rank > min(O, I): the factors are padded with zeros to svd_rank
  (PEFT's come out of rank min(O, I), or fail to multiply with full_matrices=True).
- Weights are used in the adapters' dtype. PEFT builds ``torch.tensor(weights)`` in
  torch's default dtype, so in float64 its weights are rounded to float32 unless
  ``torch.set_default_dtype(torch.float64)``.

DoRA, exactly. With c_i = m_i / ||W + s_i B_i A_i||_row (c_i = 1 for a plain adapter),
ΔW_i = diag(c_i)(W + s_i B_i A_i) - W, and

    W + Σ w_i ΔW_i = diag(d) (W + B' A'),   d = 1 + Σ w_i (c_i - 1),
    B' = [diag(w_1 c_1 / d) B_1, ...],  A' = [s_1 A_1; ...],
    m' = d * ||W + B' A'||_row,

which is a DoRA adapter (m', A', B', scale 1) on W. It needs d != 0 in every row.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from ..backend import array_namespace
from .methods import Combined, exact, peft_method

__all__ = ["COMBINE_METHODS", "Combined", "combine", "dare_masks"]

PEFT_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
COMBINE_METHODS = ("exact",) + PEFT_METHODS
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
            "magnitude_prune_svd")
_DARE = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


# ---------------------------------------------------------------- inputs


def _is_adapter(a: Any) -> bool:
    # reflora.LoraAdapter, or anything with its A, B and scale (arithmetic sits below adapter.py)
    return all(hasattr(a, n) for n in ("A", "B", "scale")) and not isinstance(a, Mapping)


def _modules(adapters: Any) -> tuple[list[dict[str, Any]], bool]:
    """The adapters as [{module: adapter}], and whether they came as single adapters."""
    if _is_adapter(adapters) or isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) \
            or not len(adapters):
        raise TypeError(f"adapters is {type(adapters).__name__}; expected a non-empty list of reflora.LoraAdapter "
                        "(one module) or of {module path: LoraAdapter} dicts")
    single = [_is_adapter(a) for a in adapters]
    if all(single):
        return [{"": a} for a in adapters], True
    out = []
    for i, a in enumerate(adapters):
        if not isinstance(a, Mapping) or not a:
            raise TypeError(f"adapters[{i}] is {type(a).__name__}; expected a non-empty {{module path: LoraAdapter}} "
                            "dict like the others (do not mix single adapters and dicts)")
        for m, ad in a.items():
            if not _is_adapter(ad):
                raise TypeError(f"adapters[{i}][{m!r}] is {type(ad).__name__}; expected reflora.LoraAdapter")
        out.append(dict(a))
    return out, False


def _weights(weights: Any, n: int) -> list[float]:
    if isinstance(weights, np.ndarray) and weights.ndim == 1:
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights is {type(weights).__name__}; expected a list of {n} real numbers")
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries; expected {n}, one per adapter")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{i}] is {w!r} ({type(w).__name__}); expected a finite real number")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights[{i}] is {w!r}; expected a finite real number")
        out.append(float(w))
    return out


def _density(method: str, density: Any) -> float | None:
    if method not in _DENSITY:
        if density is not None:
            raise ValueError(f"density is {density!r}, but method {method!r} prunes nothing; expected None")
        return None
    if density is None:
        raise ValueError(f"density is None; method {method!r} needs the fraction of entries kept, in [0, 1]")
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density is {density!r} ({type(density).__name__}); method {method!r} needs the fraction "
                        "of entries kept, a number in [0, 1]")
    d = float(density)
    lo_ok = d > 0 if method in _DARE else d >= 0
    if not (lo_ok and d <= 1):
        want = "(0, 1] (DARE divides by it)" if method in _DARE else "[0, 1]"
        raise ValueError(f"density is {density!r}; expected a number in {want}")
    return d


def _real_floating(xp, dtype) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:  # Note: ml_dtypes' bfloat16 is outside NumPy's isdtype kinds
        return getattr(dtype, "name", "") == "bfloat16"


def _module_inputs(mod: str, items: list[tuple[int, Any, float]]) -> None:
    """Shapes and dtypes of one module's adapters agree."""
    where = f"module {mod!r}: " if mod else ""
    _, a0, _ = items[0]
    xp = array_namespace(a0.A)
    for i, ad, _ in items:
        array_namespace(a0.A, ad.A, ad.B, names=("adapters[0].A", f"adapters[{i}].A", f"adapters[{i}].B"))
        if ad.A.dtype != a0.A.dtype:
            raise TypeError(f"{where}adapters[{i}] has dtype {ad.A.dtype}; expected {a0.A.dtype}, the dtype of "
                            "the first")
        if not _real_floating(xp, ad.A.dtype):
            raise TypeError(f"{where}adapters[{i}] has dtype {ad.A.dtype}; expected a real floating dtype")
        if (ad.A.ndim != 2 or ad.B.ndim != 2 or ad.B.shape[1] != ad.A.shape[0] or ad.A.shape[1] != a0.A.shape[1]
                or ad.B.shape[0] != a0.B.shape[0]):
            raise ValueError(f"{where}adapters[{i}] has A {tuple(ad.A.shape)}, B {tuple(ad.B.shape)}; expected "
                             f"(R, I) = (R, {a0.A.shape[1]}) and (O, R) = ({a0.B.shape[0]}, R) like the first")
        # duck-typed adapters are welcome, so what LoraAdapter guarantees is checked here
        s = ad.scale
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise (ValueError if isinstance(s, numbers.Real) and not isinstance(s, bool) else TypeError)(
                f"{where}adapters[{i}].scale is {s!r}; expected a finite real number")
        O, I = a0.B.shape[0], a0.A.shape[1]
        for name, shape in (("B", None), ("W", (O, I)), ("bias", (O,)), ("magnitude", (O,)), ("lora_bias", (O,))):
            v = getattr(ad, name, None)
            if v is not None and shape is not None and tuple(v.shape) != shape:
                raise ValueError(f"{where}adapters[{i}].{name} has shape {tuple(v.shape)}; expected {shape}")
            if v is not None and v.dtype != ad.A.dtype:
                raise TypeError(f"{where}adapters[{i}].{name} has dtype {v.dtype}; expected {ad.A.dtype}, A's")
        if getattr(ad, "merged", False):
            raise ValueError(f"{where}adapters[{i}] is merged into its W; unmerge() it before combining")


# ---------------------------------------------------------------- DARE masks


def _mask_shapes(method: str, ad: Any) -> dict[str, tuple]:
    if method.endswith("_svd"):
        return {"delta": (int(ad.B.shape[0]), int(ad.A.shape[1]))}
    return {"A": tuple(int(n) for n in ad.A.shape), "B": tuple(int(n) for n in ad.B.shape)}


def dare_masks(adapters, *, method, density, seed) -> Any:
    """The DARE keep-masks ``combine(..., seed=seed)`` uses, to hand to another implementation.

    Drawn on the host with ``numpy.random.default_rng(seed)``: entry kept (1) where
    ``rng.random(shape) < density``, in this order: modules in first-seen order,
    then adapters, then "A" before "B" (or the one "delta" for the *_svd methods).

    Args:
      adapters: as for ``combine``.
      method: "dare_linear", "dare_ties" (masks "A" (R, I), "B" (O, R) per adapter) or
        "dare_linear_svd", "dare_ties_svd" (mask "delta" (O, I)).
      density: the keep probability, in (0, 1].
      seed: an int.

    Returns:
      For a list of LoraAdapter: a list, one {name: mask} per adapter. For a list of
      dicts: {module: that list}, with None for an adapter that lacks the module.
      Masks hold 0 and 1 in the adapters' namespace and dtype.

    Example:
      >>> import numpy as np, reflora
      >>> ad = reflora.LoraAdapter.from_arrays(np.ones((1, 3)), np.ones((2, 1)), alpha=1.0)
      >>> m = dare_masks([ad, ad], method="dare_linear", density=0.5, seed=0)
      >>> len(m), sorted(m[0]), m[0]["A"].shape
      (2, ['A', 'B'], (1, 3))
    """
    if method not in _DARE:
        raise ValueError(f"method is {method!r}; expected one of {_DARE}")
    d = _density(method, density)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed is {seed!r} ({type(seed).__name__}); expected an int >= 0")
    if seed < 0:
        raise ValueError(f"seed is {seed}; expected an int >= 0 (numpy.random.default_rng's seeds)")
    mods, single = _modules(adapters)
    rng = np.random.default_rng(int(seed))
    order = list(dict.fromkeys(m for a in mods for m in a))
    out: dict[str, list] = {}
    for m in order:
        row = []
        for a in mods:
            ad = a.get(m)
            if ad is None:
                row.append(None)
                continue
            masks = {}
            for name, shape in _mask_shapes(method, ad).items():
                # Note: drawn with NumPy on the host (one generator for every backend), then moved to ad.A's
                host = (rng.random(shape) < d).astype(np.float64)
                masks[name] = array_namespace(ad.A).asarray(host, dtype=ad.A.dtype)
            row.append(masks)
        out[m] = row
    return out[""] if single else out


def _check_masks(xp, mod, method, items, masks):
    where = f"module {mod!r}: " if mod else ""
    if not isinstance(masks, Sequence) or len(masks) < 1 + max(i for i, _, _ in items):
        raise ValueError(f"{where}masks is {type(masks).__name__}; expected a list with one mask dict per adapter")
    for i, ad, _ in items:
        entry = masks[i]
        shapes = _mask_shapes(method, ad)
        if not isinstance(entry, Mapping) or set(entry) != set(shapes):
            raise ValueError(f"{where}masks[{i}] is {entry!r:.80}; expected a dict with keys {sorted(shapes)}")
        for name, shape in shapes.items():
            m = entry[name]
            array_namespace(ad.A, m, names=("A", f"masks[{i}][{name!r}]"))
            if tuple(m.shape) != shape:
                raise ValueError(f"{where}masks[{i}][{name!r}] has shape {tuple(m.shape)}; expected {shape}")
            if m.dtype != ad.A.dtype:
                raise TypeError(f"{where}masks[{i}][{name!r}] has dtype {m.dtype}; expected {ad.A.dtype}, the "
                                "adapters' dtype (0.0 / 1.0 entries)")
            if not bool(xp.all((m == 0) | (m == 1))):
                raise ValueError(f"{where}masks[{i}][{name!r}] holds values other than 0 and 1; expected a keep-mask")


# ---------------------------------------------------------------- public


def combine(adapters, weights, *, method="exact", rank=None, density=None, majority_sign_method="total", seed=None,
            masks=None, svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None) -> Any:
    """A new adapter for the weighted combination of adapters; PEFT's methods and an exact one.

    ``method="exact"`` (the default): B A = Σ w_i s_i B_i A_i exactly, ranks
    concatenated and scales folded into A (scale 1); with ``rank=k`` the best rank-k
    approximation of that sum (Eckart-Young), from QR of the thin factors and an SVD
    of the small core, never forming O x I. The other methods are PEFT's
    ``add_weighted_adapter(combination_type=...)`` with its semantics and its result
    factors, except where PEFT 0.21.2 is wrong (rsLoRA, lora_bias, DoRA, rank_pattern:
    see the module docstring and docs/derivations/combine.md). As in PEFT, a single
    adapter is combined with "linear" whatever the PEFT method.

    Args:
      adapters: a list of ``reflora.LoraAdapter`` (one module each), or a list of
        {module path: LoraAdapter} dicts (a whole model each; a module missing
        from an adapter is combined from the others, as PEFT does). Each module's
        own rank and alpha (PEFT's rank_pattern / alpha_pattern) and rsLoRA scale
        are read from its LoraAdapter (A, B, scale, and magnitude, W, lora_bias,
        bias when present: any object with those attributes will do).
      weights: one finite real per adapter (negative subtracts).
      method: one of ``COMBINE_METHODS``.
      rank: "exact" only: k >= 1 for the best rank-k approximation; None keeps all.
      density: kept fraction for ties, dare_*, magnitude_prune(_svd): [0, 1] ((0, 1] for DARE).
      majority_sign_method: "total" or "frequency" (ties, dare_ties and their svd forms).
      seed: DARE only: an int; the masks are ``dare_masks(adapters, ..., seed=seed)``.
      masks: DARE only, instead of seed: the keep-masks, as ``dare_masks`` returns them.
      svd_rank: svd methods: the result's rank (default: the largest rank of any input
        module; PEFT's default is the largest *configured* rank, max(r, *rank_pattern
        values), larger when a rank_pattern lowers every module below r: pass svd_rank=r).
      svd_clamp: svd methods: clamp the new factors' entries to ±(this quantile of them), in [0, 1].
      svd_full_matrices, svd_driver: accepted for PEFT compatibility; they do not change
        the result (the truncation keeps the same singular vectors; the driver is cuSOLVER's).

    Returns:
      A ``Combined`` (for a list of adapters) or {module: Combined}, in the inputs'
      namespace and dtype: A, B, alpha = rank and use_rslora False (scale 1), the first
      adapter's base W and bias, lora_bias when an input has one, and a DoRA magnitude
      when an input is DoRA ("exact"/"cat" only). ``reflora.LoraAdapter.from_arrays(**c._asdict())``
      turns one into a layer (``reflora.arithmetic`` sits below ``reflora.adapter``, so it
      returns plain data).

    Raises:
      ValueError: an unknown method, non-finite weights or values out of range, options
        that do not belong to the method, unequal ranks for a factor-wise method, DoRA or
        lora_bias where the method cannot combine them.
      TypeError: inputs that are not adapters, a weight, density, seed, rank or svd option
        of the wrong type, mixed dtypes or libraries.

    Example:
      >>> import numpy as np, reflora
      >>> a = reflora.LoraAdapter.from_arrays(np.eye(2), np.eye(2), alpha=4.0, use_rslora=True)   # s = 4/sqrt(2)
      >>> c = combine([a, a], [0.5, -1.5])
      >>> c.rank, c.scale, np.allclose(c.B @ c.A, -4 / np.sqrt(2) * np.eye(2))
      (4, 1.0, True)
      >>> layer = reflora.LoraAdapter.from_arrays(**c._asdict())
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"method is {method!r}; expected one of {COMBINE_METHODS}")
    mods, single = _modules(adapters)
    ws = _weights(weights, len(mods))
    if rank is not None:
        if method != "exact":
            raise ValueError(f"rank={rank!r} is for method='exact'; the svd methods take svd_rank (PEFT's name)")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank is {rank!r} ({type(rank).__name__}); expected an int >= 1")
        if rank < 1:
            raise ValueError(f"rank is {rank!r}; expected an int >= 1")
        rank = int(rank)
    svd_opts = {"svd_rank": svd_rank, "svd_clamp": svd_clamp}
    if method not in _SVD:
        bad = [k for k, v in svd_opts.items() if v is not None]
        if bad:
            raise ValueError(f"{bad[0]} is set, but method {method!r} takes no SVD; expected None")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral)):
        raise TypeError(f"svd_rank is {svd_rank!r} ({type(svd_rank).__name__}); expected an int >= 1")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank is {svd_rank!r}; expected an int >= 1")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)):
        raise TypeError(f"svd_clamp is {svd_clamp!r} ({type(svd_clamp).__name__}); expected a quantile in [0, 1]")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is {svd_clamp!r}; expected a quantile in [0, 1]")
    if not isinstance(svd_full_matrices, bool):
        raise TypeError(f"svd_full_matrices is {svd_full_matrices!r}; expected True or False")
    if svd_driver not in _SVD_DRIVERS:
        raise ValueError(f"svd_driver is {svd_driver!r}; expected one of {_SVD_DRIVERS}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method is {majority_sign_method!r}; expected 'total' or 'frequency'")
    density = _density(method, density)
    if method in _DARE:
        if (seed is None) == (masks is None):
            raise ValueError(f"method {method!r} is random: give exactly one of seed= (an int) or masks= "
                             "(see reflora.dare_masks)")
        if seed is not None:
            masks = dare_masks(adapters, method=method, density=density, seed=seed)
    elif seed is not None or masks is not None:
        raise ValueError(f"seed/masks are for the DARE methods; method {method!r} draws nothing")
    # PEFT: one adapter is always combined with "linear"
    eff = "linear" if method in PEFT_METHODS and len(mods) == 1 else method
    new_rank = svd_rank or max(int(ad.A.shape[0]) for a in mods for ad in a.values())
    order = list(dict.fromkeys(m for a in mods for m in a))
    out = {}
    for m in order:
        items = [(i, a[m], w) for i, (a, w) in enumerate(zip(mods, ws)) if m in a]
        _module_inputs(m, items)
        xp = array_namespace(items[0][1].A)
        mm = None
        if eff in _DARE:
            mm = masks if single else (masks.get(m) if isinstance(masks, Mapping) else None)
            if mm is None and not single:
                raise ValueError(f"masks has no entry for module {m!r}; expected {{module: [mask dicts]}}")
            _check_masks(xp, m, eff, items, mm)
        if eff == "exact" or (method == "cat" and any(getattr(ad, "magnitude", None) is not None
                                                      for _, ad, _ in items)):
            # cat of DoRA adapters is the exact DoRA combination (one adapter too: not PEFT's "linear")
            out[m] = exact(xp, m, items, rank)
        else:
            out[m] = peft_method(xp, m, eff, items, new_rank=new_rank, density=density, majority=majority_sign_method,
                           masks=mm, clamp=None if svd_clamp is None else float(svd_clamp),
                           full_matrices=svd_full_matrices)
    return out[""] if single else out
