"""Throughput of the conformance kit: check_forward + check_backward against a torch float32 candidate.

    python benchmarks/bench_kit.py [--examples 500] [--max-size 4] [--repeats 3]

Tiny shapes (I, O <= --max-size, R <= 8, up to 3 leading dims), hypothesis
overhead included (generation, the database is off, no shrinking needed since
the candidate is correct). Printed side by side, measured in this run:

  kit        check_forward + check_backward, --examples each (one "pair" = one
             forward example + one backward example)
  candidate  the torch candidate alone on the same kind of problems (forward,
             then backward through autograd): the floor the kit cannot beat
  reference  reflora's float64 reference + the error envelopes alone
  draw       hypothesis drawing the problems alone (a @given body that does nothing)

and the ratios kit / candidate. The best of --repeats runs is reported.
Target from the issue: >= 200 pairs/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--max-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from hypothesis import HealthCheck, Phase, given, settings

    import lora_candidates as lc
    import reflora.testing as rt
    from reflora.ops.lora import lora_backward, lora_forward
    from reflora.testing import strategies as rst
    from reflora.testing.envelope import backward_envelope, forward_envelope

    torch.set_num_threads(1)  # tiny shapes: threads only add overhead
    n, ms = args.examples, args.max_size
    problems = [rt.Problem(lead=lead, I=i, O=o, R=r, dtype="float32", seed=k, scale=2.0, W=k % 2 == 0,
                           bias=k % 3 == 0, dropout=0.5 if k % 4 == 0 else 0.0)
                for k, (lead, i, o, r) in enumerate(
                    [((k % 3 + 1,) * (k % 3), k % ms + 1, (k // 2) % ms + 1, k % 8 + 1) for k in range(n)])]
    conv = rt.converter("torch")

    def kit():
        rt.check_forward(lc.forward, dtype="float32", to="torch", max_examples=n, max_size=ms)
        rt.check_backward(lc.backward, dtype="float32", to="torch", max_examples=n, max_size=ms)

    def candidate():
        for p in problems:
            a = {k: None if v is None else conv(v) for k, v in p.arrays().items()}
            kw = dict(scale=p.scale, W=a["W"], bias=a["bias"], dropout_mask=a["dropout_mask"])
            lc.forward(a["x"], a["A"], a["B"], **kw).numpy()
            [g.numpy() for g in lc.backward(a["x"], a["A"], a["B"], a["dy"], **kw)]

    def reference():
        for p in problems:
            a = p.arrays()
            f = {k: None if v is None else v.astype(np.float64) for k, v in a.items()}
            kw = dict(scale=p.scale, W=f["W"], bias=f["bias"], dropout_mask=f["dropout_mask"])
            _, cache = lora_forward(f["x"], f["A"], f["B"], **kw)
            lora_backward(f["dy"], cache)
            forward_envelope(f["x"], f["A"], f["B"], dtype="float32", **kw)
            backward_envelope(f["x"], f["A"], f["B"], f["dy"], dtype="float32", scale=p.scale, W=f["W"],
                              dropout_mask=f["dropout_mask"])

    def draw():
        for _ in range(2):
            @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.generate])
            @given(rst.problems(dtypes=["float32"], max_size=ms))
            def body(p):
                pass
            body()

    def best(fn):
        fn() if fn is kit else None  # warm-up (imports, torch kernels)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = [("kit (check_forward + check_backward)", best(kit)), ("candidate alone (torch fwd + bwd)", best(candidate)),
            ("reference + envelopes alone", best(reference)), ("hypothesis draws alone", best(draw))]
    print(f"bench_kit: {n} pairs (forward + backward examples), I, O <= {ms}, float32, torch "
          f"{torch.__version__}, 1 torch thread, load average {os.getloadavg()[0]:.2f}, best of {args.repeats}")
    print(f"{'':<40} {'seconds':>8} {'pairs/s':>9} {'examples/s':>11}")
    for name, t in rows:
        print(f"{name:<40} {t:>8.3f} {n / t:>9.0f} {2 * n / t:>11.0f}")
    kit_t, cand_t = rows[0][1], rows[1][1]
    print(f"kit / candidate alone: {kit_t / cand_t:.1f}x the time; kit overhead per pair "
          f"{1e3 * (kit_t - cand_t) / n:.2f} ms; target >= 200 pairs/s: {'met' if n / kit_t >= 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
