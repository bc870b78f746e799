"""LoraConfig validation and init_lora's schemes, bounds and determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import reflora
from reflora import LoraConfig, init_lora
from reflora.backend import to_numpy


def test_seed_defaults_and_scale():
    c = LoraConfig()
    assert (c.rank, c.alpha, c.in_features, c.out_features) == (8, 16.0, 768, 768)
    assert c.scale == 2.0 and c.num_params() == 8 * (768 + 768) == 12288
    assert LoraConfig(rank=16, alpha=8, use_rslora=True).scale == 2.0
    assert LoraConfig(rank=3, alpha=1).scale == 1 / 3


def test_numpy_scalars_are_accepted_as_plain_numbers():
    c = LoraConfig(rank=np.int64(4), alpha=np.float32(8.0), in_features=np.int32(6), out_features=3)
    assert c == LoraConfig(rank=4, alpha=8.0, in_features=6, out_features=3)
    assert type(c.rank) is int and type(c.alpha) is float
    json.dumps(c.to_dict())


def test_json_round_trip():
    c = LoraConfig(rank=4, alpha=3.5, in_features=10, out_features=6, use_rslora=True, init="gaussian")
    assert LoraConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", -1), ("rank", 2.0), ("rank", True), ("in_features", 0), ("out_features", -3),
    ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", "16"), ("init", "xavier"), ("use_rslora", 1),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field} is"):
        LoraConfig(**{field: value})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['lora_dropout'\]"):
        LoraConfig.from_dict({"rank": 4, "lora_dropout": 0.1})


def test_kaiming_uniform_bound_shape_and_zero_B(xp):
    c = LoraConfig(rank=5, in_features=40, out_features=7)
    A, B = init_lora(c, seed=1, xp=xp, dtype="float64")
    a = to_numpy(A)
    assert a.shape == (5, 40) and tuple(B.shape) == (7, 5)
    assert np.all(to_numpy(B) == 0)
    assert np.abs(a).max() <= 1 / math.sqrt(40)
    assert len(np.unique(a)) == a.size  # really random, not a constant fill


def test_gaussian_std_is_one_over_rank():
    c = LoraConfig(rank=4, in_features=20000, out_features=3, init="gaussian")
    A, _ = init_lora(c, seed=2, xp="numpy", dtype="float64")
    # 80,000 draws: the sample std is within ~0.25% of 1/R = 0.25 (1/sqrt(R) would be 0.5)
    assert abs(np.std(A) / 0.25 - 1) < 0.01 and abs(np.mean(A)) < 0.01


def test_same_seed_same_bits_across_backends_and_calls(xp):
    c = LoraConfig(rank=3, in_features=11, out_features=4)
    ref, _ = init_lora(c, seed=123, xp="numpy", dtype="float32")
    A, _ = init_lora(c, seed=123, xp=xp, dtype="float32")
    np.testing.assert_array_equal(to_numpy(A), to_numpy(ref))
    assert to_numpy(A).dtype == np.float32
    other, _ = init_lora(c, seed=124, xp=xp, dtype="float32")
    assert not np.array_equal(to_numpy(other), to_numpy(ref))


def test_float32_init_is_the_rounded_float64_draw():
    c = LoraConfig(rank=2, in_features=9, out_features=3)
    a64, _ = init_lora(c, seed=7, xp="numpy", dtype="float64")
    a32, _ = init_lora(c, seed=7, xp="numpy", dtype="float32")
    np.testing.assert_array_equal(np.asarray(a64).astype(np.float32), a32)


def test_init_errors():
    with pytest.raises(TypeError, match="expected reflora.LoraConfig"):
        init_lora({"rank": 2}, seed=0)
    with pytest.raises(TypeError, match="seed"):
        init_lora(LoraConfig(), seed=1.5, xp="numpy")
    with pytest.raises(TypeError, match="real floating"):
        init_lora(LoraConfig(), seed=0, xp="numpy", dtype="int32")


def test_seed_document_bound_differs_from_torch():
    """The seed's sqrt(2/fan_in)*sqrt(6) = sqrt(12/fan_in) is 2*sqrt(3) times PEFT's bound."""
    fan_in = 768
    seed_bound = math.sqrt(2 / fan_in) * math.sqrt(6)
    assert math.isclose(seed_bound, math.sqrt(12 / fan_in))
    assert math.isclose(seed_bound / reflora.ops.init.kaiming_uniform_bound(fan_in), 2 * math.sqrt(3))
    assert math.isclose(reflora.ops.init.kaiming_uniform_bound(fan_in, a=0.0), math.sqrt(6 / fan_in))
