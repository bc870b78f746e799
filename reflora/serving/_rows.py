"""Row-wise gathered products: each row n uses adapter idx[n] (private).

Two evaluation paths of the same sums, chosen by namespace:

* NumPy: rows are grouped by adapter on the host (a stable argsort of the
  (N,) index vector) and each adapter's rows go through one BLAS product.
* Any other namespace (CuPy, array_api_strict): the adapter's matrices are
  gathered per row with ``xp.take`` and multiplied as a batch, in row chunks
  that keep the gathered block below 2^26 elements; the per-adapter sums of
  the backward are one product with a one-hot expansion. No host round trip.

Rows with index -1 get zeros ("no adapter"). Callers have checked that every
index is in [-1, L).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 1 << 26


def groups(idx_N: np.ndarray, L: int) -> list[tuple[int, np.ndarray]]:
    """NumPy only: [(adapter, row numbers)] for every adapter that has rows."""
    order = np.argsort(idx_N, kind="stable")
    bounds = np.searchsorted(idx_N[order], np.arange(0, L + 1), side="left")
    return [(lv, order[bounds[lv]:bounds[lv + 1]]) for lv in range(L) if bounds[lv + 1] > bounds[lv]]


def safe(xp: Any, idx_N: Any) -> tuple[Any, Any]:
    """(index with -1 replaced by 0, boolean mask of rows that have an adapter)."""
    valid = idx_N >= 0
    return xp.where(valid, idx_N, xp.zeros_like(idx_N)), valid


def _chunks(n: int, per_row: int):
    step = max(1, _CHUNK // max(per_row, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]


def row_matvec(xp: Any, v_NK: Any, M_LJK: Any, idx_N: Any, grp=None) -> Any:
    """out[n] = M[idx[n]] @ v[n] (J,), zeros where idx[n] = -1: (N, J)."""
    N, J = v_NK.shape[0], M_LJK.shape[1]
    if xp is np:
        out = np.zeros((N, J), dtype=v_NK.dtype)
        for lv, sel in grp:
            out[sel] = v_NK[sel] @ M_LJK[lv].T
        return out
    sidx, valid = safe(xp, idx_N)
    parts = []
    for a, b in _chunks(N, J * M_LJK.shape[2]):
        Mg = xp.take(M_LJK, sidx[a:b], axis=0)                     # (n, J, K) gathered per row
        p = xp.matmul(Mg, v_NK[a:b, :, None])[:, :, 0]               # (n, J)
        parts.append(xp.where(valid[a:b, None], p, xp.zeros_like(p)))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def row_matvec_t(xp: Any, v_NJ: Any, M_LJK: Any, idx_N: Any, grp=None) -> Any:
    """out[n] = M[idx[n]]^T @ v[n] (K,), zeros where idx[n] = -1: (N, K)."""
    N, K = v_NJ.shape[0], M_LJK.shape[2]
    if xp is np:
        out = np.zeros((N, K), dtype=v_NJ.dtype)
        for lv, sel in grp:
            out[sel] = v_NJ[sel] @ M_LJK[lv]
        return out
    sidx, valid = safe(xp, idx_N)
    parts = []
    for a, b in _chunks(N, K * M_LJK.shape[1]):
        Mg = xp.take(M_LJK, sidx[a:b], axis=0)                                  # (n, J, K)
        p = xp.matmul(xp.matrix_transpose(Mg), v_NJ[a:b, :, None])[:, :, 0]       # (n, K)
        parts.append(xp.where(valid[a:b, None], p, xp.zeros_like(p)))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def onehot(xp: Any, idx_N: Any, L: int, dtype: Any) -> Any:
    """(N, L) with 1 where idx[n] = l; rows with -1 are all zero."""
    return xp.astype(idx_N[:, None] == xp.arange(L, dtype=idx_N.dtype)[None, :], dtype)


def per_adapter_outer(xp: Any, u_NJ: Any, v_NK: Any, idx_N: Any, L: int, grp=None) -> Any:
    """out[l] = sum over rows n with idx[n] = l of u[n]^T v[n]: (L, J, K); zeros for unused adapters."""
    N, J = u_NJ.shape
    K = v_NK.shape[1]
    if xp is np:
        out = np.zeros((L, J, K), dtype=u_NJ.dtype)
        for lv, sel in grp:
            out[lv] = u_NJ[sel].T @ v_NK[sel]
        return out
    # one product: (u one-hot-expanded to (N, L*J))^T v, each adapter's rows in its own J-block
    oh = onehot(xp, idx_N, L, u_NJ.dtype)
    u_big = xp.reshape(oh[:, :, None] * u_NJ[:, None, :], (N, L * J))
    return xp.reshape(xp.matmul(xp.matrix_transpose(u_big), v_NK), (L, J, K))
