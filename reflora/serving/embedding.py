"""Embedding and lm_head (logits) LoRA, many adapters in one batch, with extra vocabulary.

Legend: N rows (tokens), V base vocabulary, X extra tokens per adapter,
D embedding dim, R rank (padded), L adapters.

Embedding LoRA (PEFT's ``lora.Embedding``, peft/tuners/lora/layer.py):
lora_embedding_A is (R, V) and lora_embedding_B is (D, R), and

    y_n = E[t_n] + s A[:, t_n]^T B^T          (PEFT: F.embedding(x, A.T) @ B.T * scaling)

for token t_n. Multi-adapter, l = idx[n], with stacks A (L, R, V + X) and
B (L, D, R) (vLLM's VocabParallelEmbeddingWithLoRA: ``lora_a_stacked`` is
(L, V + X, R), the transpose, looked up with F.embedding; the expand is
``add_lora_embedding``).

Extra vocabulary, as vLLM handled it while LoRA adapters could add tokens
(``lora_extra_vocab_size``; later vLLM versions removed it): an adapter's
added tokens t in [V, V + X) have their base embedding in that adapter's own
table ``extra`` (L, X, D) (vLLM copied ``embeddings_tensors`` into the rows
after the base vocabulary and offset the token by ``l * X``), and lora_A
covers them too (its V + X columns). So for t_n >= V the base row is
extra[l, t_n - V]. A row with no adapter (-1) and an added token is refused
here: vLLM would read adapter 0's table there (its embedding offset for -1
rows is 0), which is not a meaningful result.

Backward (E and the extra tables frozen in serving, but their gradients are
given for training):

    dB_l      = sum_{idx[n]=l} dy_n^T a_n,  a_n = s_l A_l[:, t_n]      (D, R)
    dA_l[:, v] = sum_{idx[n]=l, t_n=v} s_l B_l^T dy_n                  scatter-add over tokens
    dE[v]     = sum_{t_n=v<V} dy_n;   dextra[l, t-V] = sum_{idx[n]=l, t_n=t} dy_n

lm_head / logits LoRA (vLLM's LogitsProcessorWithLoRA and ``add_lora_logits``):
hidden h (N, D), lm_head weight W (V, D), stacks A (L, R, D) and B (L, V + X, R):

    logits[n, :V]       = h_n W^T (+ bias)
    logits[n, V:V+X]    = h_n extra_l^T   for rows with an adapter; -inf for rows without
    logits[n, :]       += s_l (h_n A_l^T) B_l^T

(vLLM fills the extra-vocabulary logits of adapter-less rows with -inf through
a padding slot.) The backward treats the -inf entries as constants.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _check as C
from . import _rows
from .multi import MultiLoraCache, row_scales, multi_lora_backward, multi_lora_forward

__all__ = ["EmbeddingCache", "EmbeddingGrads", "LogitsCache", "LogitsGrads", "lora_embedding_backward",
           "lora_embedding_forward", "lora_logits_backward", "lora_logits_forward"]


class EmbeddingGrads(NamedTuple):
    """dA (L, R, V + X), dB (L, D, R), dE (V, D), dextra (L, X, D) or None."""

    dA: Any
    dB: Any
    dE: Any
    dextra: Any


class EmbeddingCache(NamedTuple):
    ids_N: Any
    idx_N: Any
    s_N: Any
    a_NR: Any
    A: Any
    B: Any
    V: int
    extra: Any
    lead: tuple
    groups: Any


def _scatter_add_rows(xp, n_out: int, keys_N, vals_NK):
    """out[k] = sum of vals[n] over rows with keys[n] = k, out (n_out, K); keys in [0, n_out).

    Note: the array API has no scatter-add; NumPy uses ``np.add.at``, CuPy
    ``cupyx.scatter_add``, and other namespaces a one-hot product (small
    problems only: it forms an (N, n_out) matrix).
    """
    K = vals_NK.shape[1]
    if xp is np:
        out = np.zeros((n_out, K), dtype=vals_NK.dtype)
        np.add.at(out, keys_N, vals_NK)
        return out
    if "cupy" in getattr(xp, "__name__", ""):
        import cupy  # noqa: PLC0415
        import cupyx  # noqa: PLC0415

        out = cupy.zeros((n_out, K), dtype=vals_NK.dtype)
        cupyx.scatter_add(out, keys_N, vals_NK)
        return out
    oh = _rows.onehot(xp, keys_N, n_out, vals_NK.dtype)
    return xp.matmul(xp.matrix_transpose(oh), vals_NK)


def _check_embedding(ids, E, A, B, indices, extra):
    xp = C.namespace(("ids", "E", "A", "B", "indices", "extra"), (ids, E, A, B, indices, extra))
    C.check_int(xp, "ids", ids)
    C.check_float(xp, "E", E)
    C.check_same_dtype("E", E, (("A", A), ("B", B), ("extra", extra)))
    A = C.stacked("A", A, xp, "(L, R, V + X)")
    B = C.stacked("B", B, xp, "(L, D, R)")
    if E.ndim != 2:
        raise ValueError(f"E has shape {C.shape(E)}; expected (V, D)")
    V, D = E.shape
    L, R = A.shape[0], A.shape[1]
    X = 0 if extra is None else extra.shape[1]
    if extra is not None and (extra.ndim != 3 or extra.shape[0] != L or extra.shape[2] != D):
        raise ValueError(f"extra has shape {C.shape(extra)}; expected (L, X, D) = ({L}, X, {D})")
    if A.shape[2] != V + X:
        raise ValueError(f"A has shape {C.shape(A)}; expected (L, R, V + X) = ({L}, {R}, {V + X}), "
                         f"V = {V} from E and X = {X} from extra")
    if C.shape(B) != (L, D, R):
        raise ValueError(f"B has shape {C.shape(B)}; expected (L, D, R) = ({L}, {D}, {R})")
    lead = C.shape(ids)
    idx_N = C.check_indices(xp, indices, lead, L)
    ids_N = xp.reshape(ids, (-1,))
    if ids_N.shape[0]:
        lo, hi = int(xp.min(ids_N)), int(xp.max(ids_N))
        if lo < 0 or hi >= V + X:
            raise ValueError(f"ids range from {lo} to {hi}; expected tokens in [0, V + X) = [0, {V + X})")
        if X and bool(xp.any((ids_N >= V) & (idx_N < 0))):
            raise ValueError(f"a row without an adapter (index -1) has an added token (>= V = {V}); "
                             "expected added tokens only in rows whose adapter defines them")
    return xp, A, B, V, D, X, lead, idx_N, ids_N


def lora_embedding_forward(ids, E, A, B, indices, *, scales, extra=None):
    """Multi-adapter embedding LoRA: y_n = base(t_n) + s_l A_l[:, t_n]^T B_l^T.

    Args:
      ids: integer token ids, any shape (...,), in [0, V + X).
      E: (V, D) base embedding table.
      A: (L, R, V + X) stacked lora_embedding_A; B: (L, D, R) stacked lora_embedding_B.
      indices: adapter per token, ids' shape, in [-1, L).
      scales: one per adapter (L,) or one number.
      extra: optional (L, X, D) per-adapter tables of added tokens t in [V, V + X).

    Returns:
      (y, cache): y (..., D) in E's dtype; the cache for ``lora_embedding_backward``.

    Raises:
      TypeError / ValueError: dtypes, shapes, token or adapter ids out of range,
      an added token in a row without an adapter.

    Example:
      >>> import numpy as np
      >>> E = np.eye(3); A = np.ones((1, 1, 3)); B = np.ones((1, 3, 1))
      >>> y, _ = lora_embedding_forward(np.array([2, 0]), E, A, B, np.array([0, -1]), scales=0.5)
      >>> y.tolist()
      [[0.5, 0.5, 1.5], [1.0, 0.0, 0.0]]
    """
    xp, A, B, V, D, X, lead, idx_N, ids_N = _check_embedding(ids, E, A, B, indices, extra)
    L = A.shape[0]
    s_N = row_scales(xp, C.check_scales(scales, L), idx_N, E.dtype)
    sidx, valid = _rows.safe(xp, idx_N)
    base_ids = xp.where(ids_N < V, ids_N, xp.zeros_like(ids_N))
    # base rows E[t_n]; added tokens from the row's adapter table extra[l, t_n - V]
    y_ND = xp.take(E, base_ids, axis=0)
    if X:
        flat = xp.reshape(extra, (L * X, D))
        ek = xp.where(ids_N >= V, sidx * X + (ids_N - V), xp.zeros_like(ids_N))
        y_ND = xp.where((ids_N >= V)[:, None], xp.take(flat, ek, axis=0), y_ND)
    # lookup a_n = s_l A_l[:, t_n]: row (l, t_n) of A viewed as (L (V + X), R)
    A_flat = xp.reshape(xp.permute_dims(A, (0, 2, 1)), (L * (V + X), A.shape[1]))
    a_NR = s_N[:, None] * xp.take(A_flat, sidx * (V + X) + ids_N, axis=0)
    # expand a_n B_l^T, zero for rows without an adapter (s_N = 0 there)
    grp = _rows.groups(idx_N, L) if xp is np else None
    y_ND = y_ND + _rows.row_matvec(xp, a_NR, B, idx_N, grp)
    y = xp.reshape(y_ND, lead + (D,))
    return y, EmbeddingCache(ids_N, idx_N, s_N, a_NR, A, B, V, extra, lead, grp)


def lora_embedding_backward(dy, cache):
    """Gradients through ``lora_embedding_forward`` (scatter-adds over tokens).

    Args:
      dy: (..., D), y's shape and dtype.
      cache: the ``EmbeddingCache``.

    Returns:
      ``EmbeddingGrads(dA, dB, dE, dextra)`` (dextra None without extra tables).

    Example:
      >>> import numpy as np
      >>> E = np.eye(3); A = np.ones((1, 1, 3)); B = np.ones((1, 3, 1))
      >>> y, c = lora_embedding_forward(np.array([2, 2]), E, A, B, np.array([0, 0]), scales=0.5)
      >>> lora_embedding_backward(np.ones_like(y), c).dA.tolist()
      [[[0.0, 0.0, 3.0]]]
    """
    if not isinstance(cache, EmbeddingCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the EmbeddingCache from lora_embedding_forward")
    ids_N, idx_N, s_N, a_NR, A, B, V, extra, lead, grp = cache
    xp = C.namespace(("dy", "a"), (dy, a_NR))
    L, D, R = B.shape
    VX = A.shape[2]
    if dy.dtype != a_NR.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {a_NR.dtype}, the dtype of E")
    if C.shape(dy) != lead + (D,):
        raise ValueError(f"dy has shape {C.shape(dy)}; expected (..., D) = {lead + (D,)}, the shape of y")
    dy_ND = xp.reshape(dy, (-1, D))
    sidx, valid = _rows.safe(xp, idx_N)
    # dB_l = sum over the adapter's rows of dy_n^T a_n
    dB = _rows.per_adapter_outer(xp, dy_ND, a_NR, idx_N, L, grp)
    # dh_n = s_l B_l^T dy_n, then scatter-added into column t_n of dA_l
    dh_NR = s_N[:, None] * _rows.row_matvec_t(xp, dy_ND, B, idx_N, grp)
    dA_flat = _scatter_add_rows(xp, L * VX, sidx * VX + ids_N, dh_NR)
    dA = xp.permute_dims(xp.reshape(dA_flat, (L, VX, R)), (0, 2, 1))
    # dE[v] = sum of dy_n over base tokens t_n = v (added tokens and their rows go elsewhere)
    zeros = xp.zeros_like(dy_ND)
    is_base = (ids_N < V)[:, None]
    dE = _scatter_add_rows(xp, V, xp.where(ids_N < V, ids_N, xp.zeros_like(ids_N)), xp.where(is_base, dy_ND, zeros))
    dextra = None
    if extra is not None:
        X = extra.shape[1]
        key = xp.where(ids_N >= V, sidx * X + (ids_N - V), xp.zeros_like(ids_N))
        dextra = xp.reshape(_scatter_add_rows(xp, L * X, key, xp.where(is_base, zeros, dy_ND)), (L, X, D))
    return EmbeddingGrads(dA, dB, dE, dextra)


class LogitsGrads(NamedTuple):
    """dx (N, D), dA (L, R, D), dB (L, V + X, R), dextra (L, X, D) or None."""

    dx: Any
    dA: Any
    dB: Any
    dextra: Any


class LogitsCache(NamedTuple):
    lora: MultiLoraCache
    W: Any
    extra: Any
    idx_N: Any
    lead: tuple


def lora_logits_forward(hidden, W, A, B, indices, *, scales, extra=None, bias=None):
    """Logits with LoRA on the lm_head, per row's adapter (vLLM's LogitsProcessorWithLoRA).

        logits[:, :V] = h W^T + bias;  logits[:, V:] = h extra_l^T (-inf without adapter);
        logits += s_l (h A_l^T) B_l^T

    Args:
      hidden: (..., D). W: (V, D) lm_head weight. A: (L, R, D). B: (L, V + X, R).
      indices: adapter per row in [-1, L). scales: (L,) or one number.
      extra: optional (L, X, D) added-token embeddings (their logits rows);
      bias: optional (V,) lm_head bias.

    Returns:
      (logits (..., V + X), cache).

    Example:
      >>> import numpy as np
      >>> W = np.eye(2); A = np.ones((1, 1, 2)); B = np.ones((1, 3, 1)); extra = np.ones((1, 1, 2))
      >>> y, _ = lora_logits_forward(np.ones((2, 2)), W, A, B, np.array([0, -1]), scales=1.0, extra=extra)
      >>> y.tolist()
      [[3.0, 3.0, 4.0], [1.0, 1.0, -inf]]
    """
    xp = C.namespace(("hidden", "W", "extra", "bias"), (hidden, W, extra, bias))
    C.check_float(xp, "hidden", hidden)
    C.check_same_dtype("hidden", hidden, (("W", W), ("extra", extra), ("bias", bias)))
    x_ND, lead = C.rows(xp, "hidden", hidden, "D")
    if W.ndim != 2 or W.shape[1] != x_ND.shape[1]:
        raise ValueError(f"W has shape {C.shape(W)}; expected (V, D) = (V, {x_ND.shape[1]}), D taken from hidden")
    V, D = W.shape
    X = 0 if extra is None else extra.shape[1]
    Bs = C.stacked("B", B, xp, "(L, V + X, R)")
    if Bs.shape[1] != V + X:
        raise ValueError(f"B has shape {C.shape(B)}; expected (L, V + X, R) = (L, {V + X}, R), V from W, X from extra")
    if bias is not None and C.shape(bias) != (V,):
        raise ValueError(f"bias has shape {C.shape(bias)}; expected (V,) = ({V},)")
    # the LoRA term over all V + X columns
    y_lora, cache = multi_lora_forward(x_ND, A, Bs, xp.reshape(indices, (-1,)) if hasattr(indices, "shape") else indices,
                                       scales=scales)
    L = Bs.shape[0]
    if C.shape(indices) != lead:
        raise ValueError(f"indices has shape {C.shape(indices)}; expected the leading shape of hidden {lead}")
    # base logits h W^T (+ bias)
    base = xp.matmul(x_ND, xp.matrix_transpose(W))
    if bias is not None:
        base = base + bias
    idx_N = cache.idx_N
    if X:
        if extra.ndim != 3 or extra.shape[0] != L or extra.shape[2] != D:
            raise ValueError(f"extra has shape {C.shape(extra)}; expected (L, X, D) = ({L}, X, {D})")
        grp = cache.groups
        # added-token logits h_n extra_l^T, -inf where the row has no adapter
        ext = _rows.row_matvec(xp, x_ND, extra, idx_N, grp)
        ext = xp.where((idx_N >= 0)[:, None], ext, xp.full_like(ext, -float("inf")))
        base = xp.concat([base, ext], axis=1)
    y = base + y_lora
    return xp.reshape(y, lead + (V + X,)), LogitsCache(cache, W, extra, idx_N, lead)


def lora_logits_backward(dy, cache):
    """Gradients through ``lora_logits_forward``; -inf logits are constants.

    Returns:
      ``LogitsGrads(dx, dA, dB, dextra)``; dx has hidden's shape.

    Example:
      >>> import numpy as np
      >>> W = np.eye(2); A = np.ones((1, 1, 2)); B = np.ones((1, 2, 1))
      >>> y, c = lora_logits_forward(np.ones((1, 2)), W, A, B, np.array([0]), scales=1.0)
      >>> lora_logits_backward(np.ones_like(y), c).dx.tolist()
      [[3.0, 3.0]]
    """
    if not isinstance(cache, LogitsCache):
        raise TypeError(f"cache is {type(cache).__name__}; expected the LogitsCache from lora_logits_forward")
    lora, W, extra, idx_N, lead = cache
    xp = C.namespace(("dy", "W"), (dy, W))
    V, D = W.shape
    X = 0 if extra is None else extra.shape[1]
    if C.shape(dy) != lead + (V + X,):
        raise ValueError(f"dy has shape {C.shape(dy)}; expected (..., V + X) = {lead + (V + X,)}")
    dy_N = xp.reshape(dy, (-1, V + X))
    valid = (idx_N >= 0)[:, None]
    if X:
        # no gradient flows into the -inf entries of adapter-less rows
        dy_N = xp.concat([dy_N[:, :V], xp.where(valid, dy_N[:, V:], xp.zeros_like(dy_N[:, V:]))], axis=1)
    g = multi_lora_backward(dy_N, lora)
    # base path dy[:, :V] W
    dx = g.dx + xp.matmul(dy_N[:, :V], W)
    dextra = None
    if X:
        # added-token rows: dx_n += dy_n[V:] extra_l; dextra_l = sum dy_n[V:]^T h_n
        dx = dx + _rows.row_matvec_t(xp, dy_N[:, V:], extra, idx_N, lora.groups)
        dextra = _rows.per_adapter_outer(xp, dy_N[:, V:], lora.x_NI, idx_N, extra.shape[0], lora.groups)
    return LogitsGrads(xp.reshape(dx, lead + (D,)), g.dA, g.dB, dextra)
