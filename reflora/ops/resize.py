"""Rank resizing: the best rank-k adapter for an update s B A, from thin factorizations.

Legend: I in_features, O out_features, R the current rank, k the new rank.
With M = s B A (O x I), never formed:

    B   = Q_B R_B                 thin QR, Q_B (O, r_B) orthonormal columns, r_B = min(O, R)
    A^T = Q_A R_A                 thin QR, Q_A (I, r_A), r_A = min(I, R)
    C   = s R_B R_A^T             the small core, r_B x r_A:  M = Q_B C Q_A^T
    C   = U diag(sigma) V^T       SVD of the core; sigma are M's singular values
    M_k = (Q_B U_k) diag(sigma_k) (Q_A V_k)^T     the best rank-k approximation (Eckart-Young)

so ||M - M_k||_F = sqrt(sum_{j > k} sigma_j^2) and ||M - M_k||_2 = sigma_{k+1}.
The new factors split sigma evenly and carry the new scale s' (alpha/k, or
alpha/sqrt(k) with rsLoRA: take it from ``config.replace(rank=k).scale``):

    B' = Q_B U_k diag(sqrt(sigma_k / |s'|))         (O, k)
    A' = sign(s') diag(sqrt(sigma_k / |s'|)) V_k^T Q_A^T   (k, I)       s' B' A' = M_k

Cost O((I + O) R^2); memory O((I + O) R). Growing (k >= R) pads A with zero
rows and B with zero columns (B scaled by s / s' if the scale changes): the
layer's output is unchanged and training can grow into the new directions
(B's new columns are 0 as at PEFT's init, A's new rows are 0 too: re-draw them
with ``init_lora`` if they should receive gradient through B).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._validate import _check_scale
from ..backend import array_namespace

__all__ = ["Resized", "resize_rank"]


class Resized(NamedTuple):
    """A (k, I), B (O, k), and the singular values of s B A (descending, min(O, I, R) of them)."""

    A: Any
    B: Any
    singular_values: Any


def resize_rank(A, B, *, scale, new_rank, new_scale=None) -> Resized:
    """The best rank-k approximation of s B A as a new pair (A', B') with s' B' A' = M_k.

    Args:
      A: (R, I); B: (O, R); one namespace (with a ``linalg`` extension) and floating dtype.
      scale: s, the adapter's current scale.
      new_rank: k >= 1. k < R truncates (Eckart-Young); k >= R pads with zeros (exact).
      new_scale: s' of the resized adapter; None keeps s. With rsLoRA or a fixed alpha
        the scale depends on the rank: pass ``config.replace(rank=k).scale``.

    Returns:
      ``Resized(A', B', singular_values)`` in A's namespace and dtype.

    Raises:
      ValueError: shapes that do not fit, k < 1, or s' = 0.
      TypeError: non-arrays, mixed dtypes or libraries.

    Example:
      >>> import numpy as np
      >>> A = np.array([[1.0, 0.0], [0.0, 1.0]]); B = np.array([[3.0, 0.0], [0.0, 0.5]])
      >>> r = resize_rank(A, B, scale=1.0, new_rank=1)
      >>> (r.B @ r.A).round(12).tolist(), r.singular_values.tolist()
      ([[3.0, 0.0], [0.0, 0.0]], [3.0, 0.5])
    """
    s = _check_scale(scale)
    s_new = s if new_scale is None else _check_scale(new_scale)
    if s_new == 0.0:
        raise ValueError("new_scale is 0; expected a nonzero scale (s' B' A' must equal the update)")
    if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank < 1:
        raise ValueError(f"new_rank is {new_rank!r}; expected an int k >= 1")
    for name, a in (("A", A), ("B", B)):
        if not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array")
    xp = array_namespace(A, B, names=("A", "B"))
    if A.ndim != 2:
        raise ValueError(f"A has shape {tuple(A.shape)}; expected (R, I)")
    R, I = A.shape
    if B.ndim != 2 or B.shape[1] != R:
        raise ValueError(f"B has shape {tuple(B.shape)}; expected (O, R) = (O, {R}), R taken from A")
    if A.dtype != B.dtype or not xp.isdtype(A.dtype, "real floating"):
        raise TypeError(f"A has dtype {A.dtype} and B {B.dtype}; expected one real floating dtype")
    O = B.shape[0]
    k = new_rank
    mT = xp.matrix_transpose
    # thin QR of both factors: B = Q_B R_B, A^T = Q_A R_A
    Q_B, R_B = xp.linalg.qr(B)
    Q_A, R_A = xp.linalg.qr(mT(A))
    # the small core C = s R_B R_A^T, so that s B A = Q_B C Q_A^T
    C = s * xp.matmul(R_B, mT(R_A))
    # its SVD: sigma are the singular values of s B A
    U, sigma, Vt = xp.linalg.svd(C, full_matrices=False)
    if k >= R:
        # grow: zero rows in A, zero columns in B; s' B' A' = s B A exactly when s' = s
        A_new = xp.concat([A, xp.zeros((k - R, I), dtype=A.dtype)], axis=0)
        B_kept = B if s_new == s else (s / s_new) * B
        B_new = xp.concat([B_kept, xp.zeros((O, k - R), dtype=B.dtype)], axis=1)
        return Resized(A_new, B_new, sigma)
    # keep the k largest (all of them when s B A has fewer than k: min(O, I) < k < R)
    kk = min(k, sigma.shape[0])
    # split sigma_k evenly between the factors, |s'| taken out
    root = xp.sqrt(sigma[:kk] / abs(s_new))
    sign = 1.0 if s_new > 0 else -1.0
    # B' = Q_B U_k diag(root), (O, k)
    B_new = xp.matmul(Q_B, U[:, :kk]) * root
    # A' = sign(s') diag(root) V_k^T Q_A^T, (k, I)
    A_new = sign * (xp.reshape(root, (kk, 1)) * xp.matmul(Vt[:kk, :], mT(Q_A)))
    # fewer than k singular values when min(O, I) < k < R: pad the factors up to rank k
    have = A_new.shape[0]
    if have < k:
        A_new = xp.concat([A_new, xp.zeros((k - have, I), dtype=A.dtype)], axis=0)
        B_new = xp.concat([B_new, xp.zeros((O, k - have), dtype=B.dtype)], axis=1)
    return Resized(A_new, B_new, sigma)
