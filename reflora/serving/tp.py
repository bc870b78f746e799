"""Tensor-parallel LoRA shards simulated on one machine, with a fixed reduction order.

Legend: N rows, I in, O out, R rank (padded), L adapters, T = tp ranks, rank t.

vLLM's LoRA layers (vllm/lora/layers/column_parallel_linear.py,
row_parallel_linear.py; the fully sharded variants follow S-LoRA, Sheng et
al. 2023) split a linear layer over T ranks. Every rank computes on its
shard; the collectives are simulated here on the list of per-rank arrays:

    all_gather(p_0, ..., p_{T-1}) = concat(p_0, ..., p_{T-1}) along the split axis   (exact)
    all_reduce(p_0, ..., p_{T-1}) = (((p_0 + p_1) + p_2) + ... ) + p_{T-1}             (rank order)

and every rank receives the same result. The left fold in rank order is the
documented reduction order; NCCL's ring or tree orders differ, and the
tolerance of ``reflora.serving.bounds`` covers any order (T - 1 more
additions, each possibly rounded to the dtype).

Modes (shard t of an axis of length K is [t K/T, (t + 1) K/T); K % T == 0):

"column"          ColumnParallelLinearWithLoRA / MergedColumnParallel / QKVParallel.
                  W, bias and B split along O (per slice); A replicated.
                  rank t: y_t = x W_t^T + bias_t + s (x A^T) B_t^T   (N, O/T per slice)
                  No collective (gather_output=False, vLLM's default there).
"column_sharded"  ...WithShardedLoRA (fully_sharded_loras=True): A split along R too.
                  rank t: h_t = s x A_t^T (N, R/T);  h = all_gather(h_0..h_{T-1}) (N, R);
                  y_t = x W_t^T + bias_t + h B_t^T.
                  The all-gather is right only because A is split along R; gathering
                  when A is replicated (vLLM #45691) inflates the rank to T R.
"row"             RowParallelLinearWithLoRA: x, W and A split along I; B replicated.
                  rank t: p_t = x_t W_t^T + s (x_t A_t^T) B^T;  y = all_reduce(p) + bias.
"row_sharded"     RowParallelLinearWithShardedLoRA: also B split along O.
                  rank t: g_t = s x_t A_t^T;  h = all_reduce(g) (N, R);
                  p_t = x_t W_t^T + [h B_t^T in columns of shard t, 0 elsewhere];
                  y = all_reduce(p) + bias.

Several slices (qkv, gate_up) in the column modes: A and B are lists, one
stack per slice; each slice's O_k is split over the ranks and rank t holds
its shard of every slice, packed in slice order (vLLM's packed layout).
``gather_columns`` recombines rank outputs into the unsharded column order.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

from . import _check as C
from .multi import multi_lora_forward
from .shrink_expand import lora_expand, lora_shrink

__all__ = ["MODES", "TPResult", "all_gather", "all_reduce", "gather_columns", "tp_forward", "unsharded"]

MODES = ("column", "column_sharded", "row", "row_sharded")


class TPResult(NamedTuple):
    """partials[t]: what rank t computed locally before the output collective
    (None in the column modes, which have none); outputs[t]: what rank t returns."""

    partials: Any
    outputs: list


def all_reduce(parts: Sequence[Any], xp: Any) -> Any:
    """Sum of the ranks' arrays as the left fold (((p_0 + p_1) + p_2) + ...), rank order."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def all_gather(parts: Sequence[Any], xp: Any, axis: int = -1) -> Any:
    """Concatenation of the ranks' arrays in rank order (exact)."""
    return xp.concat(list(parts), axis=axis)


def _split(K: int, T: int, what: str) -> int:
    if K % T:
        raise ValueError(f"{what} = {K} is not divisible by tp = {T}; expected equal shards (vLLM pads to a multiple)")
    return K // T


def gather_columns(outputs: Sequence[Any], widths: Sequence[int], *, xp=None) -> Any:
    """Unsharded (N, sum O_k) from column-parallel rank outputs packed by slice.

    Rank t's output holds, for every slice k in order, the shard
    [t O_k/T, (t + 1) O_k/T) of that slice.
    """
    xp = C.namespace(tuple(f"outputs[{t}]" for t in range(len(outputs))), tuple(outputs)) if xp is None else xp
    T = len(outputs)
    cols, off = [], 0
    for k, Ok in enumerate(widths):
        w = _split(Ok, T, f"O_{k}")
        cols.extend(o[:, off:off + w] for o in outputs)
        off += w
    return xp.concat(cols, axis=1)


def tp_forward(x, A, B, indices, *, scales, tp: int, mode: str, W=None, bias=None) -> TPResult:
    """Simulate one tensor-parallel LoRA linear layer on ``tp`` ranks (see the module docstring).

    Args:
      x: (N, I) full input (the row modes split it along I, as the previous
        column-parallel layer leaves it).
      A: (L, R, I) stack, or a list of stacks, one per output slice (column modes).
      B: (L, O, R) stack, or a list (O_k per slice).
      indices: (N,) adapter per row in [-1, L). scales: (L,) or one number.
      tp: number of ranks T >= 1. mode: "column", "column_sharded", "row", "row_sharded".
      W: optional (sum O_k, I) fused base weight; bias: optional (sum O_k,).

    Returns:
      ``TPResult``: in the column modes outputs[t] is (N, sum O_k / T), slices
      packed; in the row modes every outputs[t] is the reduced (N, O) and
      partials[t] the rank's (N, O) contribution before the all-reduce.

    Raises:
      ValueError: an unknown mode, tp < 1, axes not divisible by tp, slices in a row mode.

    Example:
      >>> import numpy as np
      >>> x = np.ones((1, 4)); A = np.ones((1, 2, 4)); B = np.ones((1, 2, 2))
      >>> r = tp_forward(x, A, B, np.array([0]), scales=1.0, tp=2, mode="row")
      >>> [o.tolist() for o in r.partials], r.outputs[0].tolist()
      ([[[4.0, 4.0]], [[4.0, 4.0]]], [[8.0, 8.0]])
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES}")
    if isinstance(tp, bool) or not isinstance(tp, numbers.Integral) or tp < 1:
        raise ValueError(f"tp is {tp!r}; expected an int >= 1")
    T = int(tp)
    sliced = isinstance(A, (list, tuple))
    A_s = list(A) if sliced else [A]
    B_s = list(B) if isinstance(B, (list, tuple)) else [B]
    if len(A_s) != len(B_s) or not A_s:
        raise ValueError(f"{len(A_s)} A stacks and {len(B_s)} B stacks; expected one of each per slice")
    if mode.startswith("row") and len(A_s) != 1:
        raise ValueError(f"mode {mode!r} takes one A and one B stack; got {len(A_s)} slices")
    xp = C.namespace(("x", "W", "bias", "indices"), (x, W, bias, indices))
    if x.ndim != 2:
        raise ValueError(f"x has shape {C.shape(x)}; expected (N, I)")
    N, I = x.shape
    widths = [Bk.shape[-2] for Bk in B_s]
    total = sum(widths)
    if W is not None and C.shape(W) != (total, I):
        raise ValueError(f"W has shape {C.shape(W)}; expected (sum O_k, I) = ({total}, {I})")
    if bias is not None and C.shape(bias) != (total,):
        raise ValueError(f"bias has shape {C.shape(bias)}; expected (sum O_k,) = ({total},)")
    if mode.startswith("column"):
        return TPResult(None, [_column_rank(x, A_s, B_s, indices, scales, T, t, mode, W, bias, widths, xp)
                               for t in range(T)])
    return _row(x, A_s[0], B_s[0], indices, scales, T, mode, W, bias, xp)


def _column_rank(x, A_s, B_s, indices, scales, T, t, mode, W, bias, widths, xp):
    outs, w_off = [], 0
    for k, (Ak, Bk) in enumerate(zip(A_s, B_s)):
        Ak = C.stacked(f"A[{k}]", Ak, xp, "(L, R, I)")
        Bk = C.stacked(f"B[{k}]", Bk, xp, "(L, O, R)")
        Ok, Rk = Bk.shape[1], Bk.shape[2]
        w = _split(Ok, T, f"O_{k}")
        # rank t's shard of slice k's base output and of B (rows [t w, (t + 1) w))
        base = None
        if W is not None:
            base = xp.matmul(x, xp.matrix_transpose(W[w_off + t * w:w_off + (t + 1) * w, :]))
        if bias is not None:
            b = bias[w_off + t * w:w_off + (t + 1) * w]
            base = b + xp.zeros((x.shape[0], w), dtype=x.dtype) if base is None else base + b
        if base is None:
            base = xp.zeros((x.shape[0], w), dtype=x.dtype)
        B_t = Bk[:, t * w:(t + 1) * w, :]
        if mode == "column":
            # A replicated: every rank shrinks with the whole A
            h = lora_shrink(x, Ak, indices, scale=scales)
        else:
            # A split along R: each rank shrinks with its R/T rows, then all-gather along R
            r = _split(Rk, T, f"R (slice {k})")
            h = all_gather([lora_shrink(x, Ak[:, u * r:(u + 1) * r, :], indices, scale=scales) for u in range(T)], xp)
        outs.append(lora_expand(h, B_t, indices, base=base, offset=0))
        w_off += Ok
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=1)


def _row(x, A, B, indices, scales, T, mode, W, bias, xp):
    A = C.stacked("A", A, xp, "(L, R, I)")
    B = C.stacked("B", B, xp, "(L, O, R)")
    N, I = x.shape
    O = B.shape[1]
    c = _split(I, T, "I")
    x_t = [x[:, t * c:(t + 1) * c] for t in range(T)]
    A_t = [A[:, :, t * c:(t + 1) * c] for t in range(T)]
    # each rank's base partial x_t W_t^T (no bias: it is added once, after the reduce)
    base_t = [xp.zeros((N, O), dtype=x.dtype) if W is None else xp.matmul(x_t[t], xp.matrix_transpose(W[:, t * c:(t + 1) * c]))
              for t in range(T)]
    if mode == "row":
        # partial LoRA product on the rank's input columns, full B
        partials = [lora_expand(lora_shrink(x_t[t], A_t[t], indices, scale=scales), B, indices, base=base_t[t])
                    for t in range(T)]
    else:
        # S-LoRA: all-reduce the shrink, then each rank expands into its own output columns
        h = all_reduce([lora_shrink(x_t[t], A_t[t], indices, scale=scales) for t in range(T)], xp)
        w = _split(O, T, "O")
        partials = [lora_expand(h, B[:, t * w:(t + 1) * w, :], indices, base=base_t[t], offset=t * w) for t in range(T)]
    y = all_reduce(partials, xp)
    if bias is not None:
        y = y + bias
    return TPResult(partials, [y] * T)


def unsharded(x, A, B, indices, *, scales, W=None, bias=None):
    """The same layer on one device (``multi_lora_forward`` per slice, concatenated): the identity's other side."""
    A_s = list(A) if isinstance(A, (list, tuple)) else [A]
    B_s = list(B) if isinstance(B, (list, tuple)) else [B]
    xp = C.namespace(("x",), (x,))
    cols = [multi_lora_forward(x, Ak, Bk, indices, scales=scales)[0] for Ak, Bk in zip(A_s, B_s)]
    y = cols[0] if len(cols) == 1 else xp.concat(cols, axis=1)
    if W is not None:
        y = xp.matmul(x, xp.matrix_transpose(W)) + y
    if bias is not None:
        y = y + bias
    return y
