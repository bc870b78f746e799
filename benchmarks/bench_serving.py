"""Reference outputs over a vLLM-sized grid of multi-adapter LoRA layers: cases/second and total time.

    python benchmarks/bench_serving.py --grid reduced                    # CPU here (NumPy)
    REFLORA_BACKEND=cupy python benchmarks/bench_serving.py --grid full  # the whole grid on a GPU (goal < 60 s on an H200)

Grid (--grid full, 4,800 cases): hidden sizes 2048, 4096, 5120, 8192 (with
their models' intermediate and key/value widths) x tensor-parallel shard
sizes for tp = 1, 2, 4, 8 x layers of 1 slice (o_proj, row-parallel: I = H/tp,
O = H), 2 slices (gate_up: I = H, O_k = inter/tp) and 3 slices (qkv: I = H,
O = H/tp, kv/tp, kv/tp) x ranks 1, 8, 16, 64, 256 x 1, 4, 16, 128 adapters
x 1, 8, 32, 128, 512 tokens. Cases whose adapter stacks would pass 2^28
elements per slice are skipped (listed as "skipped (memory)"); their count is
printed. --grid reduced is the same grid with hidden sizes 256 and 512
(scaled-down widths), ranks 1, 8, 64, adapters 1, 4, 16 and tokens 1, 8, 32.

Each case computes the reference output of one rank's shard:
``reflora.sliced_lora_forward`` (shrink + expand per slice at the running
offset, per-adapter scales, index -1 rows without adapter, unsorted rows) in
float64 (--dtype to change). Arrays are made on the device with array-API
calls (a sine of an arange: deterministic, no host RNG, no transfer); the
adapter stacks are made once per (layer, L, R) and shared by the token
counts. A device-side checksum of every output is brought to the host once,
at the end, so the timing includes all device work. Per case the reference
does one device-to-host transfer of two scalars (the index range check) and
one small host-to-device copy (the L scales).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

MODELS = {  # hidden: (intermediate, key/value width)
    2048: (5632, 256), 4096: (14336, 1024), 5120: (13824, 1024), 8192: (28672, 1024),
    256: (704, 64), 512: (1408, 128),
}
GRIDS = {
    "full": dict(hidden=(2048, 4096, 5120, 8192), tp=(1, 2, 4, 8), slices=(1, 2, 3), ranks=(1, 8, 16, 64, 256),
                 adapters=(1, 4, 16, 128), tokens=(1, 8, 32, 128, 512)),
    "reduced": dict(hidden=(256, 512), tp=(1, 2, 4, 8), slices=(1, 2, 3), ranks=(1, 8, 64), adapters=(1, 4, 16),
                    tokens=(1, 8, 32)),
}
MAX_STACK = 1 << 28


def layer_shape(H: int, tp: int, slices: int) -> tuple[int, list[int]]:
    """(I, [O_k]) of one rank's shard."""
    inter, kv = MODELS[H]
    if slices == 1:
        return H // tp, [H]                      # o_proj, row-parallel: input split
    if slices == 2:
        return H, [inter // tp] * 2              # gate_up, column-parallel
    return H, [H // tp, kv // tp, kv // tp]      # qkv, column-parallel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="reduced")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many cases (0: all)")
    args = ap.parse_args()

    import numpy as np

    import reflora
    from reflora.backend import default_namespace, device_name, to_numpy

    xp = default_namespace()
    dt = getattr(xp, args.dtype)
    g = GRIDS[args.grid]
    print(f"# bench_serving: grid {args.grid}, dtype {args.dtype}, backend {xp.__name__} on {device_name(xp)}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")

    dev = {} if xp.__name__.endswith("numpy") else {"device": xp.asarray(0).device}

    def make(shape, phase):
        n = 1
        for s in shape:
            n *= s
        v = xp.sin(xp.arange(n, dtype=dt, **dev) * 0.7548776662466927 + phase)
        return xp.reshape(v, shape)

    cases = skipped = 0
    acc = xp.zeros((), dtype=dt, **dev)
    t_setup = t_compute = 0.0
    t0 = time.perf_counter()
    done = False
    for H in g["hidden"]:
        for tp in g["tp"]:
            for k in g["slices"]:
                I, widths = layer_shape(H, tp, k)
                for R in g["ranks"]:
                    for L in g["adapters"]:
                        if any(L * R * max(I, o) > MAX_STACK for o in widths):
                            skipped += len(g["tokens"])
                            continue
                        ts = time.perf_counter()
                        A = [make((L, R, I), 0.1 * j) for j in range(k)]
                        B = [make((L, o, R), 1.0 + 0.1 * j) for j, o in enumerate(widths)]
                        scales = [1.0 / (1 + (j % 5)) for j in range(L)]
                        t_setup += time.perf_counter() - ts
                        for N in g["tokens"]:
                            ts = time.perf_counter()
                            x = make((N, I), 2.0)
                            # adapter per token, unsorted, with -1 rows: (7919 n + N) mod (L + 1) - 1
                            idx = (xp.arange(N, dtype=xp.int64, **dev) * 7919 + N) % (L + 1) - 1
                            tc = time.perf_counter()
                            y = reflora.sliced_lora_forward(x, A, B, idx, scales=scales)
                            acc = acc + xp.sum(y)
                            t_compute += time.perf_counter() - tc
                            t_setup += tc - ts
                            cases += 1
                            if args.limit and cases >= args.limit:
                                done = True
                                break
                        if done:
                            break
                    if done:
                        break
                if done:
                    break
            if done:
                break
        if done:
            break
    ts = time.perf_counter()
    checksum = float(to_numpy(acc))          # waits for all device work
    total = time.perf_counter() - t0
    t_compute += time.perf_counter() - ts
    print(f"cases: {cases} computed, {skipped} skipped (memory: a stack above 2^28 elements)")
    print(f"total {total:.2f} s, {cases / total:.1f} cases/s (array creation {t_setup:.2f} s, "
          f"reference {t_compute:.2f} s host-side incl. the final wait); checksum {checksum:.6e}")


if __name__ == "__main__":
    main()
