"""Combining adapters at rank k: reflora's thin path against PEFT's dense SVD, side by side in one run.

    python benchmarks/bench_combine.py [--size 4096] [--rank 16] [--n 3] [--k 16] [--repeats 3]

One Linear(size -> size), n adapters of rank R, float32, weights [1, -0.5, 0.25, ...].
  reflora.combine(method="exact", rank=k)      QR of the stacked factors + SVD of the nR x nR core
  reflora.combine(method="svd", svd_rank=k)    PEFT's semantics: the dense ΔW, then its SVD
  PEFT add_weighted_adapter("svd", svd_rank=k) torch.linalg.svd of the dense O x I update
Reports seconds (best of repeats), the ratio reflora-exact / PEFT, the peak traced host memory
of reflora's two paths (tracemalloc; torch's allocations are not traced), and each result's
Frobenius error against the best rank-k error sqrt(Σ_{j>k} σ_j²) from a float64 dense SVD
(the same for all three when each is the Eckart-Young optimum). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc
import warnings

import numpy as np


def best(fn, repeats):
    time.sleep(0.3)
    out = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import peft
    import torch
    from torch import nn

    import reflora

    O = I = args.size
    R, n, k = args.rank, args.n, args.k
    weights = [(-0.5) ** i for i in range(n)]
    rng = np.random.default_rng(0)
    As = [rng.standard_normal((R, I)).astype(np.float32) for _ in range(n)]
    Bs = [rng.standard_normal((O, R)).astype(np.float32) for _ in range(n)]
    ads = [reflora.LoraAdapter.from_arrays(A, B, alpha=2.0 * R) for A, B in zip(As, Bs)]

    torch.manual_seed(0)
    model = None
    for i in range(n):
        cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["lin"])
        if model is None:
            model = peft.get_peft_model(nn.ModuleDict({"lin": nn.Linear(I, O)}), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model["lin"]
    with torch.no_grad():
        for i in range(n):
            layer.lora_A[f"a{i}"].weight.copy_(torch.from_numpy(As[i]))
            layer.lora_B[f"a{i}"].weight.copy_(torch.from_numpy(Bs[i]))
    count = [0]

    def peft_svd():
        count[0] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter([f"a{i}" for i in range(n)], weights, f"c{count[0]}",
                                       combination_type="svd", svd_rank=k)
        name = f"c{count[0]}"
        out = (layer.lora_B[name].weight.detach().numpy().copy(), layer.lora_A[name].weight.detach().numpy().copy())
        model.delete_adapter(name)
        return out

    def peak(fn):
        tracemalloc.start()
        fn()
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    t_exact, ex = best(lambda: reflora.combine(ads, weights, rank=k), args.repeats)
    t_dense, dn = best(lambda: reflora.combine(ads, weights, method="svd", svd_rank=k), args.repeats)
    t_peft, (pB, pA) = best(peft_svd, args.repeats)
    m_exact = peak(lambda: reflora.combine(ads, weights, rank=k))
    m_dense = peak(lambda: reflora.combine(ads, weights, method="svd", svd_rank=k))

    M = sum(w * ad.scale * ad.B.astype(np.float64) @ ad.A.astype(np.float64) for ad, w in zip(ads, weights))
    s = np.linalg.svd(M, compute_uv=False)
    opt = math.sqrt(float(np.sum(s[k:] ** 2)))

    def err(B, A):
        return float(np.linalg.norm(M - B.astype(np.float64) @ A.astype(np.float64)))

    print(f"O = I = {O}, {n} adapters of rank {R}, k = {k}, float32; best of {args.repeats}")
    print(f"{'':34s}{'seconds':>10s}{'peak MiB':>10s}{'err / optimum':>15s}")
    print(f"{'reflora exact, rank=k (thin)':34s}{t_exact:10.3f}{m_exact / 2**20:10.1f}{err(ex.B, ex.A) / opt:15.6f}")
    print(f"{'reflora svd (dense, PEFT semantics)':34s}{t_dense:10.3f}{m_dense / 2**20:10.1f}"
          f"{err(dn.B, dn.A) / opt:15.6f}")
    print(f"{'PEFT add_weighted_adapter svd':34s}{t_peft:10.3f}{'n/a':>10s}{err(pB, pA) / opt:15.6f}")
    print(f"ratio reflora-exact / PEFT: {t_exact / t_peft:.4f}")


if __name__ == "__main__":
    main()
