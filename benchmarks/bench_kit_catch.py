"""The kit judged both ways: false alarms on correct candidates, catch rates of mutants, per check and dtype.

    python benchmarks/bench_kit_catch.py [--examples 2000] [--dtypes float32,float16,bfloat16,float64]
                                         [--only forward,backward,sgd,merge,unmerge,lora_bias,dora,init] [--quick]

For each check and dtype, the same ``--examples`` problems (the checks' own
strategies, derandomized) are given to every candidate through the
``check_*_problem`` functions:

  correct  real libraries (PEFT lora.Linear, PEFT mixed precision, loralib
           lora.Linear) and hand-written legitimate orders (scale first, scale
           at the bottleneck, scale on B, addmm fusions, bias last; torchtune,
           PEFT CPU/GPU and addmm merges): a failure is a FALSE ALARM;
  mutants  one bug each: the fraction of problems on which the check fails is
           its catch rate (a check run of n examples misses a mutant with
           probability (1 - rate)^n).

Prints one table (markdown) and the seconds per check. ``--quick`` uses a subset of candidates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _draw(strategy, n):
    from hypothesis import HealthCheck, Phase, given, settings

    out = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(p):
        out.append(p)

    body()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64")
    ap.add_argument("--only", default="forward,backward,sgd,merge,unmerge,lora_bias,dora,init")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import numpy as np
    import torch

    import kit_library_candidates as kc
    import lora_candidates as lc
    import reflora.testing as rt
    from reflora.testing import strategies as rst

    torch.set_num_threads(1)
    checks = args.only.split(",")
    rows = []

    def run(kind, cands, problems, d, correct):
        for name, fn, kw in cands:
            t0 = time.perf_counter()
            fails = 0
            for p in problems:
                try:
                    if kind == "sgd":
                        rt.check_sgd_problem(fn, p[0], p[1], to="torch", **kw)
                    elif kind == "init":
                        rt.check_init_config(fn, p)
                    else:
                        getattr(rt, f"check_{kind}_problem")(fn, p, to="torch", **kw)
                except AssertionError:
                    fails += 1
            dt = time.perf_counter() - t0
            rows.append((kind, d, "correct" if correct else "mutant", name, len(problems), fails, dt))
            rate = fails / max(1, len(problems))
            print(f"{kind:8s} {d:9s} {'correct' if correct else 'mutant':7s} {name:28s} {fails:5d}/{len(problems):<5d}"
                  f" {rate:7.1%} {len(problems) / dt:8.0f} ex/s", flush=True)

    for d in args.dtypes.split(","):
        half = d in ("float16", "bfloat16")
        mixed = [("peft_mixed", kc.peft_mixed, {"check_dtype": False})] if half else []
        if "forward" in checks:
            probs = _draw(rst.problems(dtypes=[d], dropout=False, wide=True), args.examples)
            good = [("peft", kc.peft.forward, {}), ("loralib", kc.loralib.forward, {}),
                    *[(n, f, {}) for n, f in kc.HAND_FORWARDS.items()], ("reflora_suite_torch", lc.forward, {}),
                    *[(n, c.forward, k) for n, c, k in mixed]]
            if args.quick:
                good = good[:3]
            run("forward", good, probs, d, True)
            bad = [("scale_error_0.5%", lc.fwd_scale_error(1.005), {}), ("scale_or_one", lc.fwd_scale_or_one, {}),
                   ("acc_x_A_in_dtype", lc.fwd_acc_in_dtype, {}), ("scale_on_base", lc.fwd_scale_on_base, {}),
                   ("bias_twice", lc.fwd_bias_twice, {}), ("A_transposed", lc.fwd_A_transposed, {})]
            run("forward", bad, probs, d, False)
            probs_m = _draw(rst.problems(dtypes=[d], dropout=True), max(1, args.examples // 4))
            run("forward", [("dropout_on_base", lc.fwd_dropout_on_base, {})], probs_m, d, False)
        if "backward" in checks:
            probs = _draw(rst.problems(dtypes=[d], dropout=False, wide=True), args.examples)
            good = [("peft", kc.peft.backward, {}), ("loralib", kc.loralib.backward, {}),
                    *[(n, c.backward, {}) for n, c in kc.HAND.items()], ("reflora_suite_torch", lc.backward, {}),
                    *[(n, c.backward, k) for n, c, k in mixed]]
            if args.quick:
                good = good[:3]
            run("backward", good, probs, d, True)
            bad = [("no_scale_in_dA", lc.bwd_no_scale_in_dA, {}), ("dB_from_x", lc.bwd_dB_from_x, {}),
                   ("not_summed_leading", lc.bwd_not_summed_over_leading, {}), ("no_base_dx", lc.bwd_no_base_dx, {})]
            run("backward", bad, probs, d, False)
        if "sgd" in checks:
            n = max(1, args.examples // 4) if args.quick else args.examples
            probs = _draw(rst.training_problems(dtypes=[d]), n)
            good = [("peft", kc.peft.train_step, {}), ("loralib", kc.loralib.train_step, {}),
                    ("reflora_suite_torch", lc.train_step, {}), ("scale_first", kc.HAND["scale_first"].train_step, {}),
                    *[(n_, c.train_step, k) for n_, c, k in mixed]]
            run("sgd", good, probs, d, True)
            bad = [(b, lc.train_sgd_bug(b), {}) for b in lc.SGD_BUGS] + [
                ("momentum_buffer_at_zero", lc.train_zero_buffer, {}), ("bias_dropped", lc.train_bias_dropped, {})]
            run("sgd", bad, probs, d, False)
        if "merge" in checks:
            probs = _draw(rst.problems(dtypes=[d], W=True, dropout=False), args.examples)
            good = [(n, f, {}) for n, f in kc.MERGES.items()] + [("reflora_suite_torch", lc.merge, {})]
            run("merge", good, probs, d, True)
            run("merge", [("merge_without_scale", lc.merge_no_scale, {}),
                          ("merge_scale_error_0.5%", lambda W, A, B, *, scale: lc.merge(W, A, B, scale=1.005 * scale),
                           {})], probs, d, False)

        if "unmerge" in checks:
            probs = _draw(rst.problems(dtypes=[d], W=True, dropout=False), args.examples)
            run("unmerge", [("torch", lc.unmerge, {}), ("peft_layer", kc.peft_unmerge, {}),
                            ("loralib_layer", kc.loralib_unmerge, {})], probs, d, True)
            run("unmerge", [("merge_as_unmerge", lc.merge, {})], probs, d, False)
        if "lora_bias" in checks:
            probs = _draw(rst.problems(dtypes=[d], dropout=False, wide=True), args.examples)
            run("lora_bias_forward", [("peft", kc.peft_lora_bias_forward, {})], probs, d, True)
            run("lora_bias_forward", [("c_unscaled", kc.lora_bias_forward_c_unscaled, {})], probs, d, False)
            run("lora_bias_backward", [("peft", kc.peft_lora_bias_backward, {})], probs, d, True)
            run("lora_bias_backward", [("dc_unscaled", kc.lora_bias_backward_dc_unscaled, {})], probs, d, False)
        if "dora" in checks:
            probs = _draw(rst.problems(dtypes=[d], W=True, dropout=False), args.examples)
            run("dora_forward", [("peft", kc.peft_dora_forward, {})], probs, d, True)
            run("dora_forward", [("norm_without_scale", kc.dora_forward_norm_without_scale, {})], probs, d, False)
            run("dora_backward", [("peft", kc.peft_dora_backward, {})], probs, d, True)
            run("dora_backward", [("dm_not_divided", kc.dora_backward_dm_not_divided, {})], probs, d, False)
    if "init" in checks:
        from hypothesis import strategies as st

        from reflora import LoraConfig
        from reflora.ops.init import init_lora
        cfgs = _draw(st.tuples(rst.configs(max_size=64), st.sampled_from(("kaiming_uniform", "gaussian"))).map(
            lambda t: LoraConfig(rank=t[0].rank, alpha=t[0].alpha, in_features=t[0].in_features,
                                 out_features=t[0].out_features, init=t[1])), max(1, args.examples // 4))
        run("init", [("torch_peft_order", lc.init, {}),
                     ("reflora", lambda c, *, seed: init_lora(c, seed=seed, xp="numpy"), {})], cfgs, "float32", True)
        run("init", [(n, getattr(lc, n), {}) for n in ("init_seed_bound", "init_candle_normal", "init_gaussian_sqrt_r",
                                                       "init_B_nonzero")], cfgs, "float32", False)

    print()
    print("| check | dtype | candidate | kind | problems | failures | rate | examples/s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for kind, d, c, name, n, f, dt in rows:
        print(f"| {kind} | {d} | {name} | {'false alarms' if c == 'correct' else 'caught'} | {n} | {f} | "
              f"{f / max(1, n):.1%} | {n / dt:.0f} |")
    fa = sum(f for _, _, c, _, _, f, _ in rows if c == "correct")
    print(f"\nfalse alarms in total: {fa}; numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
