"""Oracle 2: reflora's forward and backward against PEFT's LoRA Linear under torch autograd (float64).

Relative error here is normwise: max|reflora - peft| / max|peft| <= 1e-12 per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("peft")

import reflora  # noqa: E402
from helpers import F64_PEER, assert_close  # noqa: E402
from peers import peft_forward_backward, peft_lora_linear  # noqa: E402


@st.composite
def peer_problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    I, O = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    R = draw(st.integers(1, 10))
    alpha = draw(st.sampled_from([1, 8, 16, 0.5, 3]))
    use_rslora = draw(st.booleans())
    with_bias, with_mask = draw(st.booleans()), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return {
        "x": rng.standard_normal(lead + (I,)), "A": rng.standard_normal((R, I)), "B": rng.standard_normal((O, R)),
        "W": rng.standard_normal((O, I)), "bias": rng.standard_normal(O) if with_bias else None,
        "mask": (rng.random(lead + (I,)) > 0.25) / 0.75 if with_mask else None,
        "G": rng.standard_normal(lead + (O,)), "R": R, "alpha": alpha, "rs": use_rslora,
    }


@given(peer_problems())
def test_forward_and_backward_match_peft(p):
    config = reflora.LoraConfig(rank=p["R"], alpha=p["alpha"], in_features=p["W"].shape[1],
                                out_features=p["W"].shape[0], use_rslora=p["rs"])
    _, layer = peft_lora_linear(p["A"], p["B"], p["W"], p["bias"], r=p["R"], lora_alpha=p["alpha"],
                                use_rslora=p["rs"], mask=p["mask"])
    # the scale itself must be PEFT's, to the bit
    assert config.scale == layer.scaling["default"]
    y_ref, dx_ref, dA_ref, dB_ref = peft_forward_backward(layer, p["x"], p["G"])
    y, cache = reflora.lora_forward(p["x"], p["A"], p["B"], scale=config.scale, W=p["W"], bias=p["bias"],
                                    dropout_mask=p["mask"])
    g = reflora.lora_backward(p["G"], cache)
    assert_close(y, y_ref, name="y", rel=F64_PEER)
    assert_close(g.dx, dx_ref, name="dx", rel=F64_PEER)
    assert_close(g.dA, dA_ref, name="dA", rel=F64_PEER)
    assert_close(g.dB, dB_ref, name="dB", rel=F64_PEER)


def test_adapter_merge_matches_peft_merge_and_unload():
    rng = np.random.default_rng(11)
    I, O, R, alpha = 12, 7, 3, 6
    W, bias = rng.standard_normal((O, I)), rng.standard_normal(O)
    ad = reflora.LoraAdapter(reflora.LoraConfig(rank=R, alpha=alpha, in_features=I, out_features=O),
                             seed=4, xp="numpy", dtype="float64", W=W, bias=bias)
    ad.B = rng.standard_normal((O, R))
    pm, layer = peft_lora_linear(ad.A, ad.B, W, bias, r=R, lora_alpha=alpha)
    merged = pm.merge_and_unload().lin.weight.detach().numpy()
    ad.merge()
    assert_close(ad.W, merged, name="merged W", rel=F64_PEER)


def test_kaiming_bound_is_torch_formula():
    import torch

    for fan_in in (1, 7, 768, 4096):
        gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        assert math.isclose(reflora.ops.init.kaiming_uniform_bound(fan_in), gain * math.sqrt(3.0 / fan_in), rel_tol=1e-15)
        assert math.isclose(reflora.ops.init.kaiming_uniform_bound(fan_in), 1 / math.sqrt(fan_in), rel_tol=1e-15)


def test_init_distribution_matches_peft_default():
    """PEFT's default A and reflora's are the same distribution: compare moments and range."""
    import torch

    I, O, R = 256, 8, 64
    torch.manual_seed(0)
    _, layer = peft_lora_linear(np.zeros((R, I)), np.zeros((O, R)), np.zeros((O, I)), r=R, lora_alpha=R)
    layer.reset_lora_parameters("default", True)  # PEFT's own default init
    a_peft = layer.lora_A["default"].weight.detach().numpy()
    assert np.all(layer.lora_B["default"].weight.detach().numpy() == 0)
    A, B = reflora.init_lora(reflora.LoraConfig(rank=R, in_features=I, out_features=O), seed=0, xp="numpy",
                             dtype="float64")
    bound = 1 / math.sqrt(I)
    for a in (a_peft, A):
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
        # U(-b, b): variance b^2/3; 16384 draws give a standard error of about 0.9%
        assert abs(a.var() / (bound**2 / 3) - 1) < 0.05
    assert np.all(np.asarray(B) == 0)


def test_large_row_counts_match_peft():
    """N large enough that reflora's NumPy path adds the LoRA terms in row blocks."""
    rng = np.random.default_rng(21)
    N, I, O, R = 700, 40, 1500, 3
    x, A, B, W = rng.standard_normal((N, I)), rng.standard_normal((R, I)), rng.standard_normal((O, R)), \
        rng.standard_normal((O, I))
    mask, G = (rng.random((N, I)) > 0.5) * 2.0, rng.standard_normal((N, O))
    _, layer = peft_lora_linear(A, B, W, None, r=R, lora_alpha=6, mask=mask)
    y_ref, dx_ref, dA_ref, dB_ref = peft_forward_backward(layer, x, G)
    y, cache = reflora.lora_forward(x, A, B, scale=2.0, W=W, dropout_mask=mask)
    g = reflora.lora_backward(G, cache)
    for name, a, b in (("y", y, y_ref), ("dx", g.dx, dx_ref), ("dA", g.dA, dA_ref), ("dB", g.dB, dB_ref)):
        assert_close(a, b, name=name, rel=F64_PEER)
