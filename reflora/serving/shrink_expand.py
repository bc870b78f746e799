"""The engines' two halves, shrink and expand, and fused outputs of several slices.

Legend: N rows, I in, O out (of one slice), R rank (padded), L adapters.

vLLM's punica wrapper (vllm/lora/punica_wrapper/punica_cpu.py, ``add_lora_linear``)
computes a LoRA linear layer in two kernel launches per output slice:

    shrink (bgmv_shrink / sgmv_shrink):   h_n = scale * (x_n A_l^T)          (N, R), l = idx[n]
    expand (bgmv_expand_slice):           y[n, offset:offset+O] += h_n B_l^T  ("add_inputs")

Rows with index -1 are skipped by both kernels: the shrink leaves its
zero-initialised buffer (a float32 buffer in vLLM) at zero, the expand leaves
those output rows untouched (vllm/lora/ops/torch_ops/lora_ops.py masks them
with ``lora_indices_tensor >= 0``; gathering with -1 would read the last
adapter through negative indexing, which is the bug the kit's mutant
``minus_one_as_last`` models).

Several output slices of unequal widths (fused qkv: q 4096, k 1024, v 1024;
gate_up: two equal halves) have one A/B stack each and write into
consecutive column ranges of one output, the offsets being the running sum
of the slice widths (``add_expand``'s ``offset_left``). ``sliced_lora_forward``
is that composition as one function; in exact arithmetic it equals
``multi_lora_forward`` with the slices' ranks concatenated (A stacked along R)
and B block-diagonal, which the tests check.

Scales: vLLM passes one ``scale`` to the shrink (1.0; adapters' scalings are
folded into lora_b at load time). ``lora_shrink`` takes one number or one per
adapter (L,).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _check as C
from . import _rows
from .multi import row_scales

__all__ = ["lora_expand", "lora_shrink", "sliced_lora_forward"]


def lora_shrink(x, A, indices, *, scale):
    """The shrink half: h_n = s_l (x_n A_l^T) for l = indices[n]; zero rows for -1.

    Args:
      x: (..., I) input rows.
      A: (L, R, I) stacked lora_A (or vLLM's (L, 1, R, I)).
      indices: adapter per row, x's leading shape, in [-1, L).
      scale: one real number (vLLM's ``scaling`` argument) or one per adapter (L,).

    Returns:
      h (..., R) in x's namespace and dtype.

    Raises:
      TypeError / ValueError: as ``multi_lora_forward``.

    Example:
      >>> import numpy as np
      >>> lora_shrink(np.ones((2, 3)), np.ones((1, 2, 3)), np.array([0, -1]), scale=0.5).tolist()
      [[1.5, 1.5], [0.0, 0.0]]
    """
    xp = C.namespace(("x", "A", "indices"), (x, A, indices))
    C.check_float(xp, "x", x)
    C.check_same_dtype("x", x, (("A", A),))
    A = C.stacked("A", A, xp, "(L, R, I)")
    x_NI, lead = C.rows(xp, "x", x, "I")
    L, R, I = A.shape
    if x_NI.shape[1] != I:
        raise ValueError(f"A has shape {C.shape(A)}; expected (L, R, I) = ({L}, {R}, {x_NI.shape[1]}), I taken from x")
    idx_N = C.check_indices(xp, indices, lead, L)
    s_N = row_scales(xp, C.check_scales(scale, L, "scale"), idx_N, x.dtype)
    h_NR = _shrink(xp, x_NI, A, idx_N, s_N, _rows.groups(idx_N, L) if xp is np else None)
    return h_NR if x.ndim == 2 else xp.reshape(h_NR, lead + (R,))


def _shrink(xp, x_NI, A, idx_N, s_N, grp):
    # h_n = s_l (x_n A_l^T); rows without an adapter stay zero (s_N is 0 there)
    return s_N[:, None] * _rows.row_matvec(xp, x_NI, A, idx_N, grp)


def _expand_into(xp, y_NT, h_NR, B, idx_N, offset, grp):
    # the product h_n B_l^T (zero for rows without an adapter) added into columns [offset, offset + O)
    O, total = B.shape[1], y_NT.shape[1]
    p_NO = _rows.row_matvec(xp, h_NR, B, idx_N, grp)
    parts = [y_NT[:, :offset], y_NT[:, offset:offset + O] + p_NO, y_NT[:, offset + O:]]
    return xp.concat([q for q in parts if q.shape[1]], axis=1) if total else y_NT


def lora_expand(h, B, indices, *, base=None, offset=0):
    """The expand half: y = base with h_n B_l^T added into columns [offset, offset + O) of row n.

    ``base`` given is vLLM's ``add_inputs=True`` on ``output_tensor``; rows
    with index -1 keep base unchanged. Without ``base`` the result is the
    product alone, (..., O), zero in rows with index -1 (``offset`` must be 0).

    Args:
      h: (..., R) shrink output.
      B: (L, O, R) stacked lora_B (or vLLM's (L, 1, O, R)).
      indices: adapter per row, h's leading shape, in [-1, L).
      base: optional (..., O_total) output to add into, h's dtype; never written.
      offset: first column of the slice in base (``slice_offset``);
        offset + O must not exceed O_total.

    Returns:
      y: a new array, base's shape (or (..., O)).

    Raises:
      TypeError / ValueError: dtypes, shapes, an offset past base's width.

    Example:
      >>> import numpy as np
      >>> lora_expand(np.ones((2, 1)), np.ones((1, 2, 1)), np.array([0, -1]), base=np.zeros((2, 4)), offset=1).tolist()
      [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    xp = C.namespace(("h", "B", "indices", "base"), (h, B, indices, base))
    C.check_float(xp, "h", h)
    C.check_same_dtype("h", h, (("B", B), ("base", base)))
    B = C.stacked("B", B, xp, "(L, O, R)")
    offset = C.check_offset(offset)
    h_NR, lead = C.rows(xp, "h", h, "R")
    L, O, R = B.shape
    if h_NR.shape[1] != R:
        raise ValueError(f"B has shape {C.shape(B)}; expected (L, O, R) = ({L}, {O}, {h_NR.shape[1]}), R taken from h")
    idx_N = C.check_indices(xp, indices, lead, L)
    grp = _rows.groups(idx_N, L) if xp is np else None
    # the product h_n B_l^T, zero for rows without an adapter
    p_NO = _rows.row_matvec(xp, h_NR, B, idx_N, grp)
    if base is None:
        if offset:
            raise ValueError(f"offset is {offset} without base; expected base (..., O_total) to place the slice in")
        return p_NO if h.ndim == 2 else xp.reshape(p_NO, lead + (O,))
    if C.shape(base)[:-1] != lead or base.ndim < 1:
        raise ValueError(f"base has shape {C.shape(base)}; expected (..., O_total) with h's leading shape {lead}")
    total = base.shape[-1]
    if offset + O > total:
        raise ValueError(f"offset {offset} + O {O} = {offset + O} exceeds base's width O_total = {total}")
    base_NO = base if base.ndim == 2 else xp.reshape(base, (h_NR.shape[0], total))
    # add into the slice [offset, offset + O), other columns copied unchanged
    parts = [base_NO[:, :offset], base_NO[:, offset:offset + O] + p_NO, base_NO[:, offset + O:]]
    y = xp.concat([p for p in parts if p.shape[1]], axis=1) if total else base_NO
    return y if base.ndim == 2 else xp.reshape(y, C.shape(base))


def sliced_lora_forward(x, A_slices: Sequence[Any], B_slices: Sequence[Any], indices, *, scales, W=None, bias=None):
    """A fused output of K slices (qkv, gate_up): slice k in columns [off_k, off_k + O_k).

        y_n = x_n W^T + bias + concat_k( s_l (x_n A_{k,l}^T) B_{k,l}^T ),   off_k = O_0 + ... + O_{k-1}

    as vLLM's ``add_lora_linear`` (shrink per slice, then expand per slice at
    the running offset, ``add_inputs=True``).

    Args:
      x: (..., I). A_slices: K stacks (L, R_k, I). B_slices: K stacks (L, O_k, R_k).
      indices: adapter per row in [-1, L). scales: per adapter (L,) or one number,
        the same for every slice of an adapter (one adapter, one scaling).
      W: optional (sum O_k, I) fused base weight; bias: optional (sum O_k,).

    Returns:
      y (..., sum O_k).

    Raises:
      ValueError: no slices, or slices whose L or I disagree.

    Example:
      >>> import numpy as np
      >>> A = [np.ones((1, 1, 2))] * 2; B = [np.ones((1, 3, 1)), 2 * np.ones((1, 1, 1))]
      >>> sliced_lora_forward(np.ones((1, 2)), A, B, np.array([0]), scales=1.0).tolist()
      [[2.0, 2.0, 2.0, 4.0]]
    """
    if len(A_slices) == 0 or len(A_slices) != len(B_slices):
        raise ValueError(f"{len(A_slices)} A slices and {len(B_slices)} B slices; expected the same number K >= 1")
    K = len(A_slices)
    xp = C.namespace(("x", "W", "bias", "indices") + tuple(f"A_slices[{k}]" for k in range(K))
                     + tuple(f"B_slices[{k}]" for k in range(K)), (x, W, bias, indices, *A_slices, *B_slices))
    widths = []
    for k, Bk in enumerate(B_slices):
        if not hasattr(Bk, "shape") or Bk.ndim not in (3, 4):
            raise ValueError(f"B_slices[{k}] has shape {getattr(Bk, 'shape', None)}; expected (L, O_k, R_k)")
        widths.append(Bk.shape[-2])
    total = sum(widths)
    x_NI, lead = C.rows(xp, "x", x, "I")
    if W is not None and C.shape(W) != (total, x_NI.shape[1]):
        raise ValueError(f"W has shape {C.shape(W)}; expected (sum O_k, I) = ({total}, {x_NI.shape[1]})")
    if bias is not None and C.shape(bias) != (total,):
        raise ValueError(f"bias has shape {C.shape(bias)}; expected (sum O_k,) = ({total},)")
    C.check_float(xp, "x", x)
    A_s = [C.stacked(f"A_slices[{k}]", a, xp, "(L, R_k, I)") for k, a in enumerate(A_slices)]
    B_s = [C.stacked(f"B_slices[{k}]", b, xp, "(L, O_k, R_k)") for k, b in enumerate(B_slices)]
    L = A_s[0].shape[0]
    for k, (Ak, Bk) in enumerate(zip(A_s, B_s)):
        C.check_same_dtype("x", x, ((f"A_slices[{k}]", Ak), (f"B_slices[{k}]", Bk)))
        if Ak.shape[0] != L or Bk.shape[0] != L:
            raise ValueError(f"slice {k}: A has {Ak.shape[0]} and B {Bk.shape[0]} adapters; expected L = {L} (slice 0)")
        if Ak.shape[2] != x_NI.shape[1] or Bk.shape[2] != Ak.shape[1]:
            raise ValueError(f"slice {k}: A {C.shape(Ak)} and B {C.shape(Bk)}; expected (L, R_k, I) and (L, O_k, R_k) "
                             f"with I = {x_NI.shape[1]} from x")
    # indices and scales checked once for all slices
    idx = C.check_indices(xp, indices, lead, L)
    s_N = row_scales(xp, C.check_scales(scales, L), idx, x.dtype)
    grp = _rows.groups(idx, L) if xp is np else None
    # base output x W^T + bias, or zeros: the buffer every slice is added into
    if W is not None:
        y = xp.matmul(x_NI, xp.matrix_transpose(W))
    elif xp is np:
        y = np.zeros((x_NI.shape[0], total), dtype=x.dtype)
    else:
        y = xp.zeros((x_NI.shape[0], total), dtype=x.dtype, device=x.device)
    if bias is not None:
        y = y + bias
    off = 0
    for k, (Ak, Bk) in enumerate(zip(A_s, B_s)):
        # shrink with slice k's A, then expand into columns [off, off + O_k)
        y = _expand_into(xp, y, _shrink(xp, x_NI, Ak, idx, s_N, grp), Bk, idx, off, grp)
        off += widths[k]
    return y if x.ndim == 2 else xp.reshape(y, lead + (total,))
