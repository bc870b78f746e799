"""Batched multi-adapter LoRA: a different adapter for every row of one batch.

Dimension legend (as ``reflora.core``, plus L):

    N  rows (all leading dimensions of x flattened)
    I  in_features     O  out_features
    R  rank, padded with zeros to the largest adapter's (rank 0 allowed)
    L  adapters in the stack

Stacks: A (L, R, I) and B (L, O, R) (PEFT's per-adapter layout, stacked on a
leading adapter axis, as vLLM's ``lora_a_stacked`` (L, 1, R, I) and
``lora_b_stacked`` (L, 1, O, R) without the layer axis, which is accepted
too), one scale s_l per adapter, and an adapter index idx[n] per row, where
-1 means "no adapter: base only" (vLLM's ``token_lora_indices``; PEFT's
"__base__").

Forward, row by row, with l = idx[n] (rows with l = -1 have no LoRA term):

    hs_n = s_l (x_n A_l^T)               shrink, R values per row
    y_n  = x_n W^T + bias + hs_n B_l^T   expand, added into the base output

Backward, given dy = dL/dy:

    dh_n = s_l (dy_n B_l)                gradient at the bottleneck (0 for l = -1)
    dx_n = dh_n A_l + dy_n W
    dA_l = sum_{n: idx[n] = l} dh_n^T x_n        (R, I) per adapter
    dB_l = sum_{n: idx[n] = l} dy_n^T hs_n       (O, R) per adapter

An adapter with no rows in the batch gets zero gradients. A zero-padded rank
slot r of adapter l (A_l[r] = 0 and B_l[:, r] = 0) contributes nothing and
gets zero gradient in both A and B, so padding changes no result.

Segments. The engines' prefill kernels (vLLM's ``sgmv_*``, punica's SGMV)
take sequences as segments: start locations, lengths and one adapter per
segment. ``segments_to_indices`` converts them to the per-row form used here,
exactly as vLLM's torch reference does (``torch.repeat_interleave(
lora_indices_tensor, seq_len_tensor)`` in vllm/lora/ops/torch_ops/lora_ops.py).

Where vLLM differs: vLLM passes one ``scale`` (1.0) to its kernels and folds
each adapter's scaling into its lora_b when the adapter is loaded
(``LoRALayerWeights.optimize``); reflora keeps B unscaled and takes the
per-adapter scales explicitly, which is the same product.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _check as C
from . import _rows

__all__ = ["MultiLoraCache", "MultiLoraGrads", "multi_lora_backward", "multi_lora_forward", "segments_to_indices"]


class MultiLoraGrads(NamedTuple):
    """Gradients of a scalar loss: dx (x's shape), dA (L, R, I), dB (L, O, R)."""

    dx: Any
    dA: Any
    dB: Any


class MultiLoraCache(NamedTuple):
    """What ``multi_lora_backward`` needs: references to the inputs, plus hs (N, R)."""

    x_NI: Any
    A: Any
    B: Any
    W: Any
    idx_N: Any
    s_N: Any
    hs_NR: Any
    x_shape: tuple
    groups: Any


def segments_to_indices(seq_starts, seq_lens, adapters, *, num_rows=None):
    """Per-row adapter indices from the engines' segment form (vLLM sgmv / punica SGMV).

        indices = repeat_interleave(adapters, seq_lens)

    Args:
      seq_starts: (S,) start row of each segment (vLLM's ``b_seq_start_loc``);
        must be the running sum of the lengths: 0, len_0, len_0 + len_1, ...
        (segments are contiguous and in order, which vLLM's kernels assume).
      seq_lens: (S,) non-negative segment lengths (``seq_len_tensor``).
      adapters: (S,) adapter of each segment, -1 for none (``lora_indices_tensor``).
      num_rows: optional N; the segments must then cover exactly N rows.

    Returns:
      (N,) integer array of adapters, one per row, in the arrays' namespace.

    Raises:
      TypeError: non-integer arrays, mixed libraries.
      ValueError: shapes that differ, negative lengths, starts that are not
        the running sum of the lengths, or a total other than ``num_rows``.

    Example:
      >>> import numpy as np
      >>> segments_to_indices(np.array([0, 2, 2]), np.array([2, 0, 3]), np.array([1, 0, -1])).tolist()
      [1, 1, -1, -1, -1]
    """
    xp = C.namespace(("seq_starts", "seq_lens", "adapters"), (seq_starts, seq_lens, adapters))
    for name, a in (("seq_starts", seq_starts), ("seq_lens", seq_lens), ("adapters", adapters)):
        C.check_int(xp, name, a)
        if a.ndim != 1:
            raise ValueError(f"{name} has shape {C.shape(a)}; expected (S,), one entry per segment")
    S = seq_lens.shape[0]
    if C.shape(seq_starts) != (S,) or C.shape(adapters) != (S,):
        raise ValueError(f"seq_starts {C.shape(seq_starts)}, seq_lens {C.shape(seq_lens)} and adapters "
                         f"{C.shape(adapters)}; expected all (S,) = ({S},)")
    if S and int(xp.min(seq_lens)) < 0:
        raise ValueError(f"seq_lens has a negative entry ({int(xp.min(seq_lens))}); expected lengths >= 0")
    ends = xp.cumulative_sum(seq_lens) if S else seq_lens
    if S and not bool(xp.all(seq_starts == ends - seq_lens)):
        raise ValueError("seq_starts is not the running sum of seq_lens (0, len_0, len_0 + len_1, ...); "
                         "expected contiguous segments in order")
    total = int(ends[-1]) if S else 0
    if num_rows is not None and total != num_rows:
        raise ValueError(f"the segments cover {total} rows; expected num_rows = {num_rows}")
    if S == 0:
        return xp.zeros((0,), dtype=adapters.dtype)
    return xp.repeat(adapters, seq_lens)


def _prepare(x, A, B, indices, scales, W, bias):
    xp = C.namespace(("x", "A", "B", "indices", "W", "bias"), (x, A, B, indices, W, bias))
    C.check_float(xp, "x", x)
    C.check_same_dtype("x", x, (("A", A), ("B", B), ("W", W), ("bias", bias)))
    A = C.stacked("A", A, xp, "(L, R, I)")
    B = C.stacked("B", B, xp, "(L, O, R)")
    x_NI, lead = C.rows(xp, "x", x, "I")
    I = x_NI.shape[1]
    L, R = A.shape[0], A.shape[1]
    if A.shape[2] != I:
        raise ValueError(f"A has shape {C.shape(A)}; expected (L, R, I) = ({L}, {R}, {I}), I taken from x")
    if B.shape[0] != L or B.shape[2] != R:
        raise ValueError(f"B has shape {C.shape(B)}; expected (L, O, R) = ({L}, O, {R}), L and R taken from A")
    O = B.shape[1]
    if W is not None and C.shape(W) != (O, I):
        raise ValueError(f"W has shape {C.shape(W)}; expected (O, I) = ({O}, {I}), O taken from B and I from x")
    if bias is not None and C.shape(bias) != (O,):
        raise ValueError(f"bias has shape {C.shape(bias)}; expected (O,) = ({O},), O taken from B")
    idx_N = C.check_indices(xp, indices, lead, L)
    s_L = C.check_scales(scales, L)
    return xp, x_NI, lead, A, B, idx_N, s_L


def row_scales(xp, s_L: np.ndarray, idx_N, dtype):
    """s[idx[n]] per row (0 for -1 rows), in x's namespace and dtype."""
    s_dev = s_L.astype(dtype) if xp is np else xp.asarray(s_L.tolist(), dtype=dtype)
    sidx, valid = _rows.safe(xp, idx_N)
    s_N = xp.take(s_dev, sidx, axis=0)
    return xp.where(valid, s_N, xp.zeros_like(s_N))


def multi_lora_forward(x, A, B, indices, *, scales, W=None, bias=None):
    """Batched multi-adapter LoRA: y_n = x_n W^T + bias + s_l (x_n A_l^T) B_l^T, l = indices[n].

    Args:
      x: (..., I) input rows.
      A: (L, R, I) stacked down-projections (or vLLM's (L, 1, R, I)); ranks
        below R padded with zero rows.
      B: (L, O, R) stacked up-projections (or (L, 1, O, R)); padded with zero columns.
      indices: integer array with x's leading shape: the adapter of each row
        in [0, L), or -1 for none (base output only).
      scales: one real number per adapter (sequence or array of L), or one
        number for all (e.g. alpha/r or alpha/sqrt(r) with rsLoRA).
      W: optional (O, I) frozen base weight; bias: optional (O,).

    Returns:
      (y, cache): y (..., O) in x's namespace and dtype; the ``MultiLoraCache``
      that ``multi_lora_backward`` takes.

    Raises:
      TypeError: non-arrays, non-float x, mixed dtypes or libraries, non-integer indices.
      ValueError: shapes that do not fit, an index outside [-1, L), the wrong number of scales.

    Example:
      >>> import numpy as np
      >>> x = np.ones((3, 2)); A = np.ones((2, 1, 2)); B = np.ones((2, 2, 1))
      >>> y, _ = multi_lora_forward(x, A, B, np.array([0, 1, -1]), scales=[1.0, 0.5])
      >>> y.tolist()
      [[2.0, 2.0], [1.0, 1.0], [0.0, 0.0]]
    """
    xp, x_NI, lead, A, B, idx_N, s_L = _prepare(x, A, B, indices, scales, W, bias)
    grp = _rows.groups(idx_N, A.shape[0]) if xp is np else None
    s_N = row_scales(xp, s_L, idx_N, x.dtype)
    # shrink: hs_n = s_l (x_n A_l^T), zero for rows without an adapter
    hs_NR = s_N[:, None] * _rows.row_matvec(xp, x_NI, A, idx_N, grp)
    # expand: the LoRA term hs_n B_l^T, N x O
    y_NO = _rows.row_matvec(xp, hs_NR, B, idx_N, grp)
    if W is not None:
        # base path x W^T, the LoRA term added into it
        y_NO = xp.matmul(x_NI, xp.matrix_transpose(W)) + y_NO
    if bias is not None:
        y_NO = y_NO + bias
    y = y_NO if x.ndim == 2 else xp.reshape(y_NO, lead + (B.shape[1],))
    return y, MultiLoraCache(x_NI, A, B, W, idx_N, s_N, hs_NR, C.shape(x), grp)


def multi_lora_backward(dy, cache):
    """Gradients of a scalar loss through ``multi_lora_forward``.

        dh_n = s_l dy_n B_l,   dx_n = dh_n A_l + dy_n W,
        dA_l = sum_{idx[n]=l} dh_n^T x_n,   dB_l = sum_{idx[n]=l} dy_n^T hs_n

    Args:
      dy: (..., O) upstream gradient, y's shape, namespace and dtype.
      cache: the ``MultiLoraCache`` from ``multi_lora_forward``.

    Returns:
      ``MultiLoraGrads(dx, dA, dB)``: dx with x's shape, dA (L, R, I), dB (L, O, R);
      adapters without rows get zeros.

    Raises:
      TypeError / ValueError: dy of the wrong library, dtype or shape.

    Example:
      >>> import numpy as np
      >>> x = np.ones((2, 2)); A = np.ones((2, 1, 2)); B = np.ones((2, 2, 1))
      >>> y, cache = multi_lora_forward(x, A, B, np.array([1, -1]), scales=[1.0, 2.0])
      >>> g = multi_lora_backward(np.ones_like(y), cache)
      >>> g.dA[1].tolist(), g.dB[0].tolist(), g.dx.tolist()
      ([[4.0, 4.0]], [[0.0], [0.0]], [[4.0, 4.0], [0.0, 0.0]])
    """
    if not isinstance(cache, MultiLoraCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the MultiLoraCache returned by multi_lora_forward")
    x_NI, A, B, W, idx_N, s_N, hs_NR, x_shape, grp = cache
    xp = C.namespace(("dy", "x"), (dy, x_NI))
    if dy.dtype != x_NI.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x_NI.dtype}, the dtype of x")
    N, I = x_NI.shape
    L, O = B.shape[0], B.shape[1]
    expected = tuple(x_shape[:-1]) + (O,)
    if C.shape(dy) != expected:
        raise ValueError(f"dy has shape {C.shape(dy)}; expected (..., O) = {expected}, the shape of y")
    dy_NO = dy if dy.ndim == 2 else xp.reshape(dy, (N, O))
    # dB_l = sum over the adapter's rows of dy_n^T hs_n
    dB = _rows.per_adapter_outer(xp, dy_NO, hs_NR, idx_N, L, grp)
    # dh_n = s_l dy_n B_l (zero for rows without an adapter: s_N is 0 there)
    dh_NR = s_N[:, None] * _rows.row_matvec_t(xp, dy_NO, B, idx_N, grp)
    # dA_l = sum over the adapter's rows of dh_n^T x_n
    dA = _rows.per_adapter_outer(xp, dh_NR, x_NI, idx_N, L, grp)
    # dx_n = dh_n A_l, plus the base path dy_n W
    dx_NI = _rows.row_matvec_t(xp, dh_NR, A, idx_N, grp)
    if W is not None:
        dx_NI = xp.matmul(dy_NO, W) + dx_NI
    dx = dx_NI if len(x_shape) == 2 else xp.reshape(dx_NI, x_shape)
    return MultiLoraGrads(dx, dA, dB)
