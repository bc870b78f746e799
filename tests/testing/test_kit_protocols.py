"""The new protocols of issue 10: unmerge, lora_bias, DoRA (within the envelope) and init (statistically).

init: a correct initialisation fails a configuration with probability at most 3e-6 (reflora.testing.check_stats);
the runs here are derandomized, so they are repeatable. The seed's sqrt(12/I) bound, candle-lora's Kaiming
normal, a gaussian with std 1/sqrt(R) and a nonzero B must fail.
"""

from __future__ import annotations

import warnings

import pytest

import reflora.testing as rt
from reflora.ops.init import init_lora

torch = pytest.importorskip("torch")  # the interop extra; CI installs it
pytest.importorskip("peft")
pytest.importorskip("loralib")
import kit_library_candidates as kc  # noqa: E402
import lora_candidates as lc  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("name, init, n", [("torch_peft_order", lc.init, 20), ("peft_layer", kc.peft_init, 4),
                                           ("reflora", lambda c, *, seed: init_lora(c, seed=seed, xp="numpy"), 20)])
def test_correct_initialisations_pass(name, init, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rt.check_init(init, max_examples=n, derandomize=True)
    assert res.examples == n and max(res.worst.values()) <= 1


@pytest.mark.parametrize("name, pattern", [
    ("init_seed_bound", r"exceeds the kaiming_uniform\(a=sqrt\(5\)\) bound"),
    ("init_candle_normal", r"exceeds the kaiming_uniform|chi-square"),
    ("init_gaussian_sqrt_r", r"chi-square"),
    ("init_B_nonzero", r"B has \d+ nonzero entries"),
])
def test_wrong_initialisations_fail(name, pattern):
    with pytest.raises(AssertionError, match=pattern) as info:
        rt.check_init(getattr(lc, name), max_examples=20, derandomize=True, shrink=False)
    assert str(info.value).startswith("reflora.testing.check_init")


def test_init_false_alarm_rate_is_stated_and_small():
    import reflora.testing.check_stats as ci

    assert ci.ALPHA == 1e-6 and "at most 3e-6" in ci.__doc__


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16", "float64"))
@pytest.mark.parametrize("name, unmerge", [("torch", lc.unmerge), ("peft", kc.peft_unmerge),
                                           ("loralib", kc.loralib_unmerge)])
def test_correct_unmerges_pass(name, unmerge, dtype):
    assert rt.check_unmerge(unmerge, dtype=dtype, to="torch", max_examples=25, derandomize=True).examples == 25


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_wrong_unmerges_fail(dtype):
    with pytest.raises(AssertionError, match=r"W_unmerged .*is wrong"):
        rt.check_unmerge(lc.merge, dtype=dtype, to="torch", max_examples=50, derandomize=True)
    with pytest.raises(AssertionError, match=r"W_unmerged .*is wrong"):
        rt.check_unmerge(lambda W, A, B, *, scale: W - B @ A, dtype=dtype, to="torch", max_examples=50,
                         derandomize=True)


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16", "float64"))
def test_peft_lora_bias_passes_and_its_mutants_fail(dtype):
    kw = dict(dtype=dtype, to="torch", derandomize=True)
    assert rt.check_lora_bias_forward(kc.peft_lora_bias_forward, max_examples=25, **kw).examples == 25
    assert rt.check_lora_bias_backward(kc.peft_lora_bias_backward, max_examples=25, **kw).examples == 25
    with pytest.raises(AssertionError, match=r"y \(with lora_bias\) is wrong"):
        rt.check_lora_bias_forward(kc.lora_bias_forward_c_unscaled, max_examples=50, shrink=False, **kw)
    with pytest.raises(AssertionError, match=r"dlora_bias is wrong"):
        rt.check_lora_bias_backward(kc.lora_bias_backward_dc_unscaled, max_examples=50, shrink=False, **kw)


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16", "float64"))
def test_peft_dora_forward_passes_and_a_norm_without_the_scale_fails(dtype):
    kw = dict(dtype=dtype, to="torch", derandomize=True)
    assert rt.check_dora_forward(kc.peft_dora_forward, max_examples=30, **kw).examples == 30
    with pytest.raises(AssertionError, match=r"y \(DoRA\) is wrong"):
        rt.check_dora_forward(kc.dora_forward_norm_without_scale, max_examples=60, shrink=False, **kw)


@pytest.mark.parametrize("dtype", ("float32", "float16", "float64"))
def test_reflora_dora_forward_passes_its_own_check(dtype):
    from reflora.ops.dora import dora_forward

    def fwd(x, A, B, m, W, *, scale, bias=None):
        return dora_forward(x, A, B, m, W, scale=scale, bias=bias)[0]

    assert rt.check_dora_forward(fwd, dtype=dtype, max_examples=30, derandomize=True).examples == 30


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16", "float64"))
def test_peft_dora_backward_passes_and_an_undivided_dm_fails(dtype):
    kw = dict(dtype=dtype, to="torch", derandomize=True)
    assert rt.check_dora_backward(kc.peft_dora_backward, max_examples=25, **kw).examples == 25
    with pytest.raises(AssertionError, match=r"dm \(DoRA\) is wrong"):
        rt.check_dora_backward(kc.dora_backward_dm_not_divided, max_examples=50, shrink=False, **kw)
