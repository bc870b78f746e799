"""Torch serving kernels for the kit tests: correct ones, and mutants with real engines' bugs.

The correct candidates are written the way vLLM's torch reference ops are
(vllm/lora/ops/torch_ops/lora_ops.py: gather the row's adapter with
``lora_b_weights[indices]``, ``torch.einsum("bi, boi -> bo", ...)``, skip rows
with index -1), computing in the input dtype; gradients come from autograd.
"""

from __future__ import annotations

import torch


def _valid(indices):
    return indices >= 0


def shrink(x, A, indices, *, scale):
    """bgmv_shrink: h = scale * x A_l^T, rows with -1 stay 0 (a zero buffer, as vLLM's)."""
    out = torch.zeros((x.shape[0], A.shape[1]), dtype=x.dtype)
    v = _valid(indices)
    if v.any():
        out[v] = scale * torch.einsum("bi, bri -> br", x[v], A[indices[v]])
    return out


def expand(h, B, indices, *, base, offset):
    """bgmv_expand_slice with add_inputs=True: base[:, offset:offset+O] += h B_l^T for rows with an adapter."""
    y = base.clone()
    v = _valid(indices)
    O = B.shape[1]
    if v.any():
        y[v, offset:offset + O] += torch.einsum("br, bor -> bo", h[v], B[indices[v]])
    return y


def row_scales(indices, scales, dtype):
    s = torch.tensor(scales, dtype=dtype)
    return torch.where(_valid(indices), s[indices.clamp(min=0)], torch.zeros((), dtype=dtype))


def multi_forward(x, A, B, indices, *, scales, W=None, bias=None):
    """Per-row gather, masked, per-adapter scale on h."""
    safe = indices.clamp(min=0)
    s = row_scales(indices, scales, x.dtype)
    h = torch.einsum("ni, nri -> nr", x, A[safe]) * s[:, None]
    y = torch.einsum("nr, nor -> no", h, B[safe])
    if W is not None:
        y = y + x @ W.T
    if bias is not None:
        y = y + bias
    return y


def multi_backward(x, A, B, indices, dy, *, scales, W=None, bias=None):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    multi_forward(x, A, B, indices, scales=scales, W=W, bias=bias).backward(dy)
    return x.grad, A.grad, B.grad


def embedding(ids, E, A, B, indices, *, scales, extra=None):
    """vLLM-style: added tokens from the row's adapter table, A looked up with F.embedding on the flat stack."""
    L, R, VX = A.shape
    V = E.shape[0]
    safe = indices.clamp(min=0)
    base = E[ids.clamp(max=V - 1)]
    if extra is not None:
        X = extra.shape[1]
        added = extra.reshape(L * X, -1)[(safe * X + (ids - V)).clamp(min=0)]
        base = torch.where((ids >= V)[:, None], added, base)
    a = torch.nn.functional.embedding(safe * VX + ids, A.permute(0, 2, 1).reshape(L * VX, R))
    s = row_scales(indices, scales, E.dtype)
    return base + torch.einsum("nr, ndr -> nd", a * s[:, None], B[safe])


def embedding_backward(ids, E, A, B, indices, dy, *, scales, extra=None):
    A, B = (t.detach().clone().requires_grad_(True) for t in (A, B))
    embedding(ids, E, A, B, indices, scales=scales, extra=extra).backward(dy)
    return A.grad, B.grad


def _shard(t, T, dim, k):
    n = t.shape[dim] // T
    return t.narrow(dim, k * n, n)


def tp_forward(x, A, B, indices, *, scales, tp, mode, W=None, bias=None, gather_when_replicated=False):
    """Simulated tensor parallelism the way vLLM's layers split the work (one slice)."""
    T = tp
    s = row_scales(indices, scales, x.dtype)
    safe = indices.clamp(min=0)

    def shrink_(xx, AA):
        return torch.einsum("ni, nri -> nr", xx, AA[safe]) * s[:, None]

    def expand_(h, BB):
        return torch.einsum("nr, nor -> no", h, BB[safe])

    if mode.startswith("column"):
        outs = []
        for t in range(T):
            base = torch.zeros((x.shape[0], B.shape[1] // T), dtype=x.dtype)
            if W is not None:
                base = base + x @ _shard(W, T, 0, t).T
            if bias is not None:
                base = base + _shard(bias, T, 0, t)
            if mode == "column_sharded":
                h = torch.cat([shrink_(x, _shard(A, T, 1, u)) for u in range(T)], dim=1)   # all-gather
            else:
                h = shrink_(x, A)
                if gather_when_replicated:
                    # vLLM #45691: all_gather of the shrink buffer although A is replicated; the expand
                    # kernel reads the (N, T R) buffer as if it were a contiguous (N, R) one
                    g = torch.cat([h] * T, dim=1)
                    h = g.reshape(-1)[: h.numel()].reshape(h.shape)
            outs.append(base + expand_(h, _shard(B, T, 1, t)))
        return outs
    parts, hs = [], []
    for t in range(T):
        xt, At = _shard(x, T, 1, t), _shard(A, T, 2, t)
        base = torch.zeros((x.shape[0], B.shape[1]), dtype=x.dtype) if W is None else xt @ _shard(W, T, 1, t).T
        parts.append(base)
        hs.append(shrink_(xt, At))
    if mode == "row":
        parts = [p + expand_(h, B) for p, h in zip(parts, hs)]
    else:
        h = sum(hs[1:], hs[0])
        w = B.shape[1] // T
        for t in range(T):
            parts[t] = parts[t].clone()
            parts[t][:, t * w:(t + 1) * w] += expand_(h, _shard(B, T, 1, t))
    y = sum(parts[1:], parts[0])
    if bias is not None:
        y = y + bias
    return [y] * T


# ------------------------------------------------------------------ mutants (real engines' bugs)

def multi_forward_long_segment_bug(x, A, B, indices, *, scales, W=None, bias=None):
    """punica's add_lora_sgmv_cutlass: silently wrong for one segment of more than 144 tokens.
    Modelled as: rows past the 144th of a run of one adapter get no LoRA term."""
    y_base = multi_forward(x, A, B, torch.full_like(indices, -1), scales=scales, W=W, bias=bias)
    y = multi_forward(x, A, B, indices, scales=scales, W=W, bias=bias)
    pos = torch.zeros_like(indices)
    for n in range(1, indices.shape[0]):
        pos[n] = pos[n - 1] + 1 if indices[n] == indices[n - 1] else 0
    return torch.where((pos >= 144)[:, None], y_base, y)


def multi_forward_minus_one_as_last(x, A, B, indices, *, scales, W=None, bias=None):
    """Gathering with -1 reads the last adapter (negative indexing), the unmasked torch reference's bug."""
    s = torch.tensor(scales, dtype=x.dtype)[indices]
    h = torch.einsum("ni, nri -> nr", x, A[indices]) * s[:, None]
    y = torch.einsum("nr, nor -> no", h, B[indices])
    if W is not None:
        y = y + x @ W.T
    if bias is not None:
        y = y + bias
    return y


def multi_forward_one_scale(x, A, B, indices, *, scales, W=None, bias=None):
    """Per-adapter scales ignored: adapter 0's scale for everyone (rsLoRA/alpha bugs: vLLM #6909, LoRAX #299)."""
    return multi_forward(x, A, B, indices, scales=[scales[0]] * len(scales), W=W, bias=bias)


def multi_forward_moe_transposed_b(x, A, B, indices, *, scales, W=None, bias=None):
    """vLLM #31534: lora_b read in the other layout, (L, R, O) memory taken for (L, O, R)."""
    L, O, R = B.shape
    Bt = B.reshape(L, R, O).transpose(1, 2)
    return multi_forward(x, A, Bt, indices, scales=scales, W=W, bias=bias)


def expand_minus_one_as_last(h, B, indices, *, base, offset):
    """bgmv_expand without the -1 mask."""
    y = base.clone()
    y[:, offset:offset + B.shape[1]] += torch.einsum("br, bor -> bo", h, B[indices])
    return y


def tp_forward_gather_replicated(x, A, B, indices, *, scales, tp, mode, W=None, bias=None):
    """vLLM #45691: all_gather of the shrink output in the column-parallel layer where A is not sharded."""
    return tp_forward(x, A, B, indices, scales=scales, tp=tp, mode=mode, W=W, bias=bias, gather_when_replicated=True)


# settings read by the conformance suite (pytest --pyargs reflora.testing.suite)
to = "torch"
dtypes = ("float32", "bfloat16")


def sliced_forward(x, A_slices, B_slices, indices, *, scales, W=None, bias=None):
    """vLLM's add_lora_linear: shrink per slice into a buffer, expand per slice at the running offset."""
    y = torch.zeros((x.shape[0], sum(b.shape[1] for b in B_slices)), dtype=x.dtype)
    if W is not None:
        y = y + x @ W.T
    if bias is not None:
        y = y + bias
    s = row_scales(indices, scales, x.dtype)
    off = 0
    for A, B in zip(A_slices, B_slices):
        h = shrink(x, A, indices, scale=1.0) * s[:, None]
        y = expand(h, B, indices, base=y, offset=off)
        off += B.shape[1]
    return y


def sliced_forward_offset_by_rank(x, A_slices, B_slices, indices, *, scales, W=None, bias=None):
    """A slice-offset bug: the running offset advanced by the rank instead of the slice width."""
    y = torch.zeros((x.shape[0], sum(b.shape[1] for b in B_slices)), dtype=x.dtype)
    if W is not None:
        y = y + x @ W.T
    if bias is not None:
        y = y + bias
    s = row_scales(indices, scales, x.dtype)
    off = 0
    for A, B in zip(A_slices, B_slices):
        h = shrink(x, A, indices, scale=1.0) * s[:, None]
        w = min(B.shape[1], y.shape[1] - off)
        y = expand(h, B[:, :w], indices, base=y, offset=off)
        off = min(off + B.shape[2], y.shape[1] - 1)
    return y
