"""GPU forward+backward: reflora on CuPy side by side with torch + PEFT on the same GPU.

    python benchmarks/bench_gpu.py [--repeats 30] [--markdown FILE]

Large: x (8192, 4096), W (4096, 4096), rank 16, float32 and float64.
  reflora / PEFT             (target <= 1.0)
  reflora / base-GEMM floor  (x W^T plus dy W on CuPy; target <= 1.10)
Tiny: x (4, 16), W (16, 16), rank 2: microseconds per forward+backward call,
  synchronised once per loop of calls (target reflora <= 0.5 x PEFT).
TF32 is off on both sides (CUPY_TF32 unset/0; torch allow_tf32 False), so
float32 means float32. Timings: medians over repeats after warm-up, with the
device synchronised around each timed region.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tiny-calls", type=int, default=2000)
    ap.add_argument("--markdown", default=None, help="also write the results table to this file")
    args = ap.parse_args()

    import cupy as cp
    import peft
    import torch
    from torch import nn

    import reflora

    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise SystemExit("CUPY_TF32 is set: unset it, reference timings are for true float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()

    def sync():
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()

    def timed(fn, repeats, inner=1):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            ts.append((time.perf_counter() - t0) / inner)
        return statistics.median(ts)

    def setup(N, I, O, R, dtype):
        rng = np.random.default_rng(0)
        h = {k: rng.standard_normal(s).astype(dtype) for k, s in
             dict(x=(N, I), W=(O, I), A=(R, I), B=(O, R), dy=(N, O)).items()}
        g = {k: cp.asarray(v) for k, v in h.items()}
        tdt = torch.float32 if dtype == np.float32 else torch.float64

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(I, O, bias=False, dtype=tdt)

        pm = peft.get_peft_model(One(), peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["lin"]))
        pm = pm.to(device=dev, dtype=tdt)
        layer = pm.base_model.model.lin
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.from_numpy(h["W"]))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(h["A"]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(h["B"]))
        xt, dyt = torch.from_numpy(h["x"]).to(dev), torch.from_numpy(h["dy"]).to(dev)

        def ours():
            y, cache = reflora.lora_forward(g["x"], g["A"], g["B"], scale=2.0, W=g["W"])
            return reflora.lora_backward(g["dy"], cache)

        def theirs():
            xg = xt.detach().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            layer(xg).backward(dyt)
            return xg.grad

        def floor():
            return g["x"] @ g["W"].T, g["dy"] @ g["W"]

        return ours, theirs, floor

    rows = []
    for dtype in (np.float32, np.float64):
        ours, theirs, floor = setup(8192, 4096, 4096, 16, dtype)
        to, tp, tf = timed(ours, args.repeats), timed(theirs, args.repeats), timed(floor, args.repeats)
        rows.append((f"x (8192, 4096), W (4096, 4096), r 16, {np.dtype(dtype).name}",
                     f"{to * 1e3:.2f} ms", f"{tp * 1e3:.2f} ms", f"{tf * 1e3:.2f} ms",
                     f"{to / tp:.3f}", f"{to / tf:.3f}"))
    for dtype in (np.float32, np.float64):
        ours, theirs, _ = setup(4, 16, 16, 2, dtype)
        to = timed(ours, 7, args.tiny_calls)
        tp = timed(theirs, 7, args.tiny_calls // 4)
        rows.append((f"tiny x (4, 16), W (16, 16), r 2, {np.dtype(dtype).name}",
                     f"{to * 1e6:.1f} us", f"{tp * 1e6:.1f} us", "-", f"{to / tp:.3f}", "-"))

    head = ("problem (forward+backward)", "reflora (CuPy)", "PEFT (torch)", "base-GEMM floor", "reflora/PEFT",
            "reflora/floor")
    lines = [
        f"GPU: {name}; CuPy {cp.__version__}, torch {torch.__version__}, peft {peft.__version__}, "
        f"numpy {np.__version__}; TF32 off; {datetime.date.today().isoformat()}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append("Targets: large reflora/PEFT <= 1.0 and reflora/floor <= 1.10; tiny reflora/PEFT <= 0.5.")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
