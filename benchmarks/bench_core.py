"""Forward+backward speed of reflora's core, side by side with PEFT in one run.

    python benchmarks/bench_core.py [--repeats 15] [--tiny-calls 20000]

Large: float32, x (2048, 2048), W (2048, 2048), rank 16. Reports
  reflora / PEFT            (target <= 0.90)
  reflora / base-GEMM floor (x W^T plus dy W, the two GEMMs any LoRA fwd+bwd must do; target <= 1.10)
Tiny: float64, x (4, 16), W (16, 16), rank 2: microseconds per forward+backward
call including argument checks (target <= 25 us), PEFT's beside it.
Timings are the best of interleaved repeats, each block started after a pause
that lets the other library's spinning worker threads go idle; this is a
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def best_time(fn, repeats):
    # Let the other library's idle worker threads stop spinning first: OpenMP
    # (torch) and OpenBLAS (numpy) busy-wait for a while after a parallel region,
    # and would otherwise steal the cores from whichever contender runs next.
    time.sleep(0.5)
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    # best of N, as timeit advises: on a shared machine noise only ever adds time
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tiny-calls", type=int, default=20000)
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()

    import peft
    import torch
    from torch import nn

    import reflora

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}")

    def peft_layer(W, A, B, dtype):
        O, I = W.shape

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(I, O, bias=False, dtype=dtype)

        pm = peft.get_peft_model(One(), peft.LoraConfig(r=A.shape[0], lora_alpha=2 * A.shape[0],
                                                        target_modules=["lin"])).to(dtype)
        layer = pm.base_model.model.lin
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.from_numpy(W))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        return layer

    def setup(N, I, O, R, dtype):
        rng = np.random.default_rng(0)
        x, W = rng.standard_normal((N, I)).astype(dtype), rng.standard_normal((O, I)).astype(dtype)
        A, B = rng.standard_normal((R, I)).astype(dtype), rng.standard_normal((O, R)).astype(dtype)
        dy = rng.standard_normal((N, O)).astype(dtype)
        tdt = torch.float32 if dtype == np.float32 else torch.float64
        layer = peft_layer(W, A, B, tdt)
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

        def ours():
            y, cache = reflora.lora_forward(x, A, B, scale=2.0, W=W)
            return reflora.lora_backward(dy, cache)

        def theirs():
            xg = xt.detach().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            layer(xg).backward(dyt)
            return xg.grad

        def floor():
            return x @ W.T, dy @ W

        return ours, theirs, floor

    n = args.size
    ours, theirs, floor = setup(n, n, n, 16, np.float32)
    t_o, t_p, t_f = [], [], []
    for _ in range(3):  # interleave to share the machine's noise
        t_o.append(best_time(ours, args.repeats // 3 + 1))
        t_p.append(best_time(theirs, args.repeats // 3 + 1))
        t_f.append(best_time(floor, args.repeats // 3 + 1))
    to, tp, tf = min(t_o), min(t_p), min(t_f)
    print(f"large  x ({n}, {n}), W ({n}, {n}), rank 16, float32, forward+backward")
    print(f"  reflora {to * 1e3:8.1f} ms   PEFT {tp * 1e3:8.1f} ms   base-GEMM floor {tf * 1e3:8.1f} ms")
    print(f"  reflora / PEFT  = {to / tp:.3f}   (target <= 0.90)")
    print(f"  reflora / floor = {to / tf:.3f}   (target <= 1.10)")

    ours, theirs, _ = setup(4, 16, 16, 2, np.float64)
    calls = args.tiny_calls

    def loop(fn, k):
        def run():
            for _ in range(k):
                fn()
        return run

    to = best_time(loop(ours, calls), 5) / calls
    tp = best_time(loop(theirs, calls // 10), 5) / (calls // 10)
    print("tiny   x (4, 16), W (16, 16), rank 2, float64, forward+backward per call")
    print(f"  reflora {to * 1e6:8.2f} us   PEFT {tp * 1e6:8.2f} us   (target reflora <= 25 us; ratio {to / tp:.3f})")


if __name__ == "__main__":
    main()
