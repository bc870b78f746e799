"""The serving kit's reference: exact float64 results, magnitudes and per-element tolerances.

``serving_reference(op, problem)`` computes, for one ``ServingProblem``, each output
the candidate must produce, its magnitude (the same op on absolute values) and the
a-priori tolerance of ``reflora.serving.bounds`` (zero where the problem is exact in
its dtype). ``reflora.testing.serving`` compares candidates against it.
"""

from __future__ import annotations

import numpy as np

from ..serving import bounds as SB
from ..serving.embedding import lora_embedding_backward, lora_embedding_forward
from ..serving.multi import multi_lora_backward, multi_lora_forward
from ..serving.shrink_expand import lora_expand, lora_shrink, sliced_lora_forward
from ..serving.tp import tp_forward as ref_tp_forward
from .serving_problems import ServingProblem

__all__ = ["serving_reference"]


def _abs(a):
    return None if a is None else np.abs(a)


def _pmax(*arrays) -> float:
    return max([0.0] + [float(np.max(a)) for a in arrays if a is not None and a.size])


def serving_reference(op: str, p: ServingProblem, *, tp: int = 1, mode: str = "column") -> dict[str, tuple]:
    """{tensor: (float64 reference, per-element tolerance)} for one op on one problem.

    ``op`` is "shrink", "expand", "multi_forward", "multi_backward", "embedding",
    "embedding_backward" or "tp" (then ``tp`` and ``mode`` apply).
    """
    a = p.arrays()
    d = p.dtype
    x, A, B, W, bias, idx = a["x"], a["A"], a["B"], a["W"], a["bias"], a["indices"]
    s = np.asarray(p.scales, dtype=np.float64)
    N, I, O, R = p.N, p.I, p.O, p.R
    ints = [x, A, B, W, bias]
    if op == "shrink":
        s0 = float(s[0]) if s.size else 1.0
        ref = lora_shrink(x, A, idx, scale=s0)
        mag = lora_shrink(_abs(x), _abs(A), idx, scale=abs(s0))
        unscaled = lora_shrink(_abs(x), _abs(A), idx, scale=1.0)
        ex = SB.exact(d, [x, A], [s0], _pmax(unscaled, mag))
        return {"h": (ref, SB.tolerance(mag, dtype=d, K=I + 3, m=4, factor=SB.floor_factor([s0], x, A), is_exact=ex))}
    if op == "expand":
        h, base = a["h"], a["base"]
        ref = lora_expand(h, B, idx, base=base, offset=p.offset)
        mag = lora_expand(_abs(h), _abs(B), idx, base=_abs(base), offset=p.offset)
        ex = SB.exact(d, [h, B, base], [1.0], _pmax(mag))
        tol = SB.tolerance(mag, dtype=d, K=R + 3, m=3, factor=SB.floor_factor([1.0], h, B), is_exact=ex)
        # columns outside the slice, and rows without an adapter, are base itself: exactly
        keep = np.ones_like(tol, dtype=bool)
        keep[:, p.offset:p.offset + O] = idx[:, None] < 0
        tol[keep] = 0.0
        return {"y": (ref, tol)}
    if op in ("multi_forward", "multi_backward", "tp"):
        abs_args = (_abs(x), _abs(A), _abs(B), idx)
        mag_y, _ = multi_lora_forward(*abs_args, scales=np.abs(s), W=_abs(W), bias=_abs(bias))
        unscaled_y, c1 = multi_lora_forward(*abs_args, scales=np.ones_like(s), W=_abs(W), bias=_abs(bias))
        partial = _pmax(mag_y, unscaled_y, c1.hs_NR)
        factor = SB.floor_factor(s, x, A, B, W, bias)
        if op == "multi_forward":
            ref, _ = multi_lora_forward(x, A, B, idx, scales=s, W=W, bias=bias)
            ex = SB.exact(d, ints, s, partial)
            return {"y": (ref, SB.tolerance(mag_y, dtype=d, K=I + R + 3, m=7, factor=factor, is_exact=ex))}
        if op == "tp":
            outs = ref_tp_forward(x, A, B, idx, scales=s, tp=tp, mode=mode, W=W, bias=bias).outputs
            mags = ref_tp_forward(*abs_args, scales=np.abs(s), tp=tp, mode=mode, W=_abs(W), bias=_abs(bias)).outputs
            ex = SB.exact(d, ints, s, partial)
            row = mode.startswith("row")
            # the output all-reduce: T more accumulation steps and T - 1 roundings to d; row_sharded
            # also all-reduces h (vLLM in a float32 buffer, a candidate possibly in d)
            K = I + R + 3 + (2 * tp if row else 0)
            m = 7 + (tp - 1) * (2 if mode == "row_sharded" else 1 if row else 0)
            return {f"y[{t}]": (outs[t], SB.tolerance(mags[t], dtype=d, K=K, m=m, factor=factor, is_exact=ex))
                    for t in range(tp)}
        dy = a["dy"]
        _, cache = multi_lora_forward(x, A, B, idx, scales=s, W=W, bias=bias)
        g = multi_lora_backward(dy, cache)
        _, cabs = multi_lora_forward(*abs_args, scales=np.abs(s), W=_abs(W))
        gm = multi_lora_backward(np.abs(dy), cabs)
        _, c1 = multi_lora_forward(*abs_args, scales=np.ones_like(s), W=_abs(W))
        g1 = multi_lora_backward(np.abs(dy), c1)
        partial = max(partial, _pmax(*gm, *g1))
        ex = SB.exact(d, ints + [dy], s, partial)
        f = SB.floor_factor(s, x, A, B, W, dy)
        return {"dx": (g.dx, SB.tolerance(gm.dx, dtype=d, K=O + R + 3, m=7, factor=f, is_exact=ex)),
                "dA": (g.dA, SB.tolerance(gm.dA, dtype=d, K=O + N + 3, m=5, factor=f, is_exact=ex)),
                "dB": (g.dB, SB.tolerance(gm.dB, dtype=d, K=I + N + 3, m=5, factor=f, is_exact=ex))}
    if op == "sliced_forward":
        As, Bs = a["A_slices"], a["B_slices"]
        ref = sliced_lora_forward(x, As, Bs, idx, scales=s, W=W, bias=bias)
        kw = dict(W=_abs(W), bias=_abs(bias))
        mag = sliced_lora_forward(_abs(x), [np.abs(v) for v in As], [np.abs(v) for v in Bs], idx, scales=np.abs(s), **kw)
        unsc = sliced_lora_forward(_abs(x), [np.abs(v) for v in As], [np.abs(v) for v in Bs], idx,
                                   scales=np.ones_like(s), **kw)
        hmax = _pmax(*(lora_shrink(_abs(x), np.abs(v), idx, scale=1.0) for v in As))
        ex = SB.exact(d, [x, W, bias, *As, *Bs], s, max(_pmax(mag, unsc), hmax))
        return {"y": (ref, SB.tolerance(mag, dtype=d, K=I + R + 3, m=7, factor=SB.floor_factor(s, x, W, bias, *As, *Bs),
                                        is_exact=ex))}
    if op in ("embedding", "embedding_backward"):
        ids, E, eA, eB, extra = a["ids"], a["E"], a["embA"], a["embB"], a["extra"]
        y, cache = lora_embedding_forward(ids, E, eA, eB, idx, scales=s, extra=extra)
        my, cm = lora_embedding_forward(ids, _abs(E), _abs(eA), _abs(eB), idx, scales=np.abs(s), extra=_abs(extra))
        uy, cu = lora_embedding_forward(ids, _abs(E), _abs(eA), _abs(eB), idx, scales=np.ones_like(s), extra=_abs(extra))
        partial = _pmax(my, uy, cu.a_NR)
        ints = [E, eA, eB, extra]
        factor = SB.floor_factor(s, E, eA, eB, extra)
        if op == "embedding":
            ex = SB.exact(d, ints, s, partial)
            return {"y": (y, SB.tolerance(my, dtype=d, K=R + 3, m=5, factor=factor, is_exact=ex))}
        dy = a["dy"]
        g = lora_embedding_backward(dy, cache)
        gm = lora_embedding_backward(np.abs(dy), cm)
        g1 = lora_embedding_backward(np.abs(dy), cu)
        ex = SB.exact(d, ints + [dy], s, max(partial, _pmax(gm.dA, gm.dB, g1.dA, g1.dB)))
        f = SB.floor_factor(s, E, eA, eB, dy)
        return {"dA": (g.dA, SB.tolerance(gm.dA, dtype=d, K=O + N + 3, m=5, factor=f, is_exact=ex)),
                "dB": (g.dB, SB.tolerance(gm.dB, dtype=d, K=N + 3, m=5, factor=f, is_exact=ex))}
    raise ValueError(f"op is {op!r}; expected shrink, expand, multi_forward, multi_backward, sliced_forward, "
                     "embedding, embedding_backward or tp")


# ----------------------------------------------------------------- running a candidate
