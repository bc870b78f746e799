"""Check of a candidate initialisation ``init(config, *, seed) -> (A, B)``, judged statistically.

Each configuration is drawn from several seeds (0, 1, ...) until A has
n >= ``min_samples`` entries, assumed independent across seeds. With
b = 1/sqrt(I) for "kaiming_uniform" (torch's kaiming_uniform_(a=sqrt(5)), PEFT
and loralib) and sigma = 1/R for "gaussian" (PEFT's std 1/R):

    B                    exactly 0 (both schemes)
    kaiming_uniform      every |A| <= b (1 + 2 u), u the dtype's unit roundoff;
                         |mean| <= b sqrt(2 ln(2/alpha) / n)           (Hoeffding, A in [-b, b])
                         |mean(A^2) - b^2/3| <= b^2 sqrt(ln(2/alpha) / (2n)) + 4 u b^2
                                                                       (Hoeffding, A^2 in [0, b^2])
    gaussian             |mean| <= z sigma / sqrt(n), z = 4.892        (exact: the mean is normal)
                         n - 2 sqrt(n x) <= sum(A^2)/sigma^2 <= n + 2 sqrt(n x) + 2x, x = ln(2/alpha)
                                                                       (Laurent-Massart, chi-square n)
                         max |A| >= 2 sigma               (fails with probability 0.9545^n < alpha)

with alpha = 1e-6 per test: a correct initialisation fails a configuration
with probability at most 3e-6 (the union of three tests), so a check of 100
configurations raises a false alarm with probability at most 3e-4. The
seed's bound sqrt(12/I), torch's a = 0 bound sqrt(6/I), candle-lora's Kaiming
normal (std sqrt(2/I)), PEFT's gaussian with std 1/sqrt(R), and a nonzero B
each fail.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..config import LoraConfig
from ._report import CheckResult, to_host, import_line, run_examples

__all__ = ["ALPHA", "check_init", "check_init_config"]

#: false-alarm probability of each statistical test
ALPHA = 1e-6
_Z = 4.891638475698  # two-sided normal quantile for 1e-6
_U = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _draws(init: Callable, config: LoraConfig, min_samples: int, max_seeds: int = 256):
    As, R, I, O = [], config.rank, config.in_features, config.out_features
    n, seed, dtype = 0, 0, "float64"
    while n < min_samples and seed < max_seeds:
        try:
            out = init(config, seed=seed)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"reflora.testing.check_init: init(config, seed={seed}) raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AssertionError(f"reflora.testing.check_init: init returned {type(out).__name__}; expected (A, B)")
        A, dtype = to_host(out[0])
        B, _ = to_host(out[1])
        if A.shape != (R, I) or B.shape != (O, R):
            raise AssertionError(f"reflora.testing.check_init: init returned A {A.shape}, B {B.shape}; expected (R, I) = ({R}, {I}) and "
                                 f"(O, R) = ({O}, {R})")
        if np.any(B != 0):
            raise AssertionError(f"reflora.testing.check_init: B has {int(np.count_nonzero(B))} nonzero entries (seed {seed}); expected zeros, "
                                 "so the adapter starts as the identity on the base layer")
        As.append(A.ravel())
        n += A.size
        seed += 1
    return np.concatenate(As), seed, dtype


def check_init_config(init: Callable, config: LoraConfig, *, min_samples: int = 4096) -> dict[str, float]:
    """Check one configuration; return {test: statistic / threshold} (< 1 passes). Raises AssertionError."""
    a, seeds, dtype = _draws(init, config, min_samples)
    n, u = a.size, _U.get(dtype, 2.0**-24)
    x = math.log(2 / ALPHA)
    mean, m2 = float(np.mean(a)), float(np.mean(a * a))
    where = f"{config!r}, seeds 0..{seeds - 1} ({n} entries of A, dtype {dtype})"

    def fail(what):
        return AssertionError(f"reflora.testing.check_init: {what}\n  config: {where}\n"
                              f"  false-alarm probability of this test for a correct init: {ALPHA:g}\n"
                              f"Reproduce:\n    import reflora\n    import reflora.testing as rt\n    {import_line(init, 'init')}\n"
                              f"    rt.check_init_config(init, reflora.{config!r})")

    if config.init == "kaiming_uniform":
        b = 1 / math.sqrt(config.in_features)
        top = float(np.max(np.abs(a)))
        r_max = top / (b * (1 + 2 * u))
        if r_max > 1:
            raise fail(f"max |A| = {top:.6g} exceeds the kaiming_uniform(a=sqrt(5)) bound 1/sqrt(I) = {b:.6g} "
                       f"(I = {config.in_features}); sqrt(12/I) (the seed's) = {math.sqrt(12) * b:.4g}, "
                       f"sqrt(6/I) (a = 0) = {math.sqrt(6) * b:.4g}")
        t_mean = b * math.sqrt(2 * x / n)
        t_m2 = b * b * (math.sqrt(x / (2 * n)) + 4 * u)
        if abs(mean) > t_mean:
            raise fail(f"mean(A) = {mean:.4g}; expected 0 within {t_mean:.3g} for U(-b, b)")
        if abs(m2 - b * b / 3) > t_m2:
            raise fail(f"mean(A^2) = {m2:.6g}; expected b^2/3 = {b * b / 3:.6g} within {t_m2:.3g} for "
                       f"U(-b, b), b = 1/sqrt(I) = {b:.6g} (std {math.sqrt(m2):.4g} vs {b / math.sqrt(3):.4g})")
        return {"max": r_max, "mean": abs(mean) / t_mean, "m2": abs(m2 - b * b / 3) / t_m2}
    sigma = 1 / config.rank
    t_mean = _Z * sigma / math.sqrt(n)
    chi = float(np.sum(a * a)) / (sigma * sigma)
    lo = (n - 2 * math.sqrt(n * x)) * (1 - 4 * u)
    hi = (n + 2 * math.sqrt(n * x) + 2 * x) * (1 + 4 * u)
    top = float(np.max(np.abs(a)))
    if abs(mean) > t_mean:
        raise fail(f"mean(A) = {mean:.4g}; expected 0 within {t_mean:.3g} for N(0, (1/R)^2)")
    if not lo <= chi <= hi:
        raise fail(f"sum(A^2) / sigma^2 = {chi:.1f}; expected a chi-square of {n} degrees in [{lo:.1f}, {hi:.1f}] "
                   f"for std 1/R = {sigma:.4g} (PEFT's gaussian; the sample std is {math.sqrt(m2):.4g})")
    if top < 2 * sigma:
        raise fail(f"max |A| = {top:.4g} < 2 sigma = {2 * sigma:.4g} over {n} draws: not normal tails")
    return {"mean": abs(mean) / t_mean, "m2": abs(chi - n) / (hi - n), "tail": 2 * sigma / top}


def check_init(init: Callable, *, max_examples: int = 20, derandomize: bool = False, seed: int | None = None,
               min_samples: int = 4096, shrink: bool = True) -> CheckResult:
    """Check ``init(config, *, seed) -> (A, B)`` on ``max_examples`` configurations (both schemes).

    ``config`` is a ``reflora.LoraConfig`` (rank, alpha, in_features, out_features, use_rslora, init
    "kaiming_uniform" or "gaussian"); see the module docstring for the tests and their false-alarm rate.
    """
    from hypothesis import strategies as st  # noqa: PLC0415

    from . import strategies  # noqa: PLC0415

    strat = st.tuples(strategies.configs(max_size=64), st.sampled_from(("kaiming_uniform", "gaussian"))).map(
        lambda t: LoraConfig(rank=t[0].rank, alpha=t[0].alpha, in_features=t[0].in_features,
                             out_features=t[0].out_features, use_rslora=t[0].use_rslora, init=t[1]))
    return run_examples("check_init", "float64", strat, lambda c: check_init_config(init, c, min_samples=min_samples),
                        max_examples=max_examples, derandomize=derandomize, seed=seed, shrink=shrink)

