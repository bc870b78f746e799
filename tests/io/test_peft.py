"""PEFT adapter directories against real PEFT, both ways (float64, relative error <= 1e-12).

PEFT -> reflora: a tiny torch model adapted with peft.get_peft_model (several
Linear targets, rank_pattern, alpha_pattern, rsLoRA, GPT-2 Conv1D with
fan_in_fan_out) and saved with save_pretrained; reflora.load_peft + a NumPy
forward of the same model must reproduce PEFT's output.
reflora -> PEFT: reflora.save_peft; PeftModel.from_pretrained on a fresh base
must reproduce reflora's output. Nothing touches a hub: models are built here.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import reflora
from helpers import F64_PEER, assert_close
from reflora import FormatError, load_peft, save_peft
from reflora.backend import to_numpy

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore:fan_in_fan_out is set"),
              pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")]


class Tiny(nn.Module):
    """Linear(6->5) -> tanh -> [Linear(5->7) -> ReLU -> Linear(7->4)], plus a GPT-2 Conv1D(4->3) head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.blk = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4, bias=False))
        self.head = Conv1D(3, 4)  # nf=out=3, nx=in=4; weight (I, O)

    def forward(self, x):
        return self.head(self.blk(torch.tanh(self.proj(x))))


def _base_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny().double()
    with torch.no_grad():
        m.head.weight.normal_()
        m.head.bias.normal_()
    return m


def _layer_params(base: Tiny) -> dict[str, tuple]:
    """module path -> (W (O, I), bias or None) as NumPy float64, from the *base* model."""
    return {
        "proj": (base.proj.weight.detach().numpy(), base.proj.bias.detach().numpy()),
        "blk.0": (base.blk[0].weight.detach().numpy(), base.blk[0].bias.detach().numpy()),
        "blk.2": (base.blk[2].weight.detach().numpy(), None),
        "head": (base.head.weight.detach().numpy().T, base.head.bias.detach().numpy()),  # Conv1D holds W^T
    }


def reflora_model_forward(x, base: Tiny, adapters: dict) -> np.ndarray:
    """Tiny's forward in NumPy with reflora.lora_forward on adapted layers (plain x W^T + b elsewhere)."""
    params = _layer_params(base)

    def layer(name, h):
        W, b = params[name]
        if name in adapters:
            ad = adapters[name]
            y, _ = reflora.lora_forward(h, ad.A, ad.B, scale=ad.scale, W=W, bias=b)
            return y
        return h @ W.T + (0 if b is None else b)

    h = np.tanh(layer("proj", x))
    h = np.maximum(layer("blk.0", h), 0.0)
    return layer("head", layer("blk.2", h))


def _x(rows: int = 9) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, 6))


def _peft_out(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


CONFIGS = {
    "rank_and_alpha_patterns": dict(r=2, lora_alpha=3, target_modules=["proj", "blk.0", "blk.2"],
                                    rank_pattern={"blk.0": 4}, alpha_pattern={"blk.2": 5}),
    "rslora": dict(r=3, lora_alpha=6, target_modules=["proj", "blk.2"], use_rslora=True,
                   rank_pattern={"proj": 1}),
    "conv1d_fan_in_fan_out": dict(r=2, lora_alpha=4, target_modules=["head", "blk.0"], fan_in_fan_out=True,
                                  rank_pattern={"head": 3}),
    "regex_targets": dict(r=2, lora_alpha=2, target_modules=r".*blk\.[02]", alpha_pattern={"blk.0": 7}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_directory_loads_with_same_outputs(tmp_path, name):
    kwargs = CONFIGS[name]
    base = _base_model()
    # init_lora_weights=False: B is non-zero, so the adapters change the output
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)).double()
    pm.eval()
    pm.save_pretrained(tmp_path)
    adapters = load_peft(tmp_path, xp="numpy", dtype="float64")
    expected_modules = {k for k, v in pm.base_model.model.named_modules() if hasattr(v, "lora_A")}
    assert set(adapters) == expected_modules
    for mod, ad in adapters.items():
        layer = pm.base_model.model.get_submodule(mod)
        assert ad.config.rank == layer.r["default"]
        assert ad.scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        np.testing.assert_array_equal(to_numpy(ad.A), layer.lora_A["default"].weight.detach().numpy())
    x = _x()
    ref = _peft_out(pm, x)
    got = reflora_model_forward(x, base, adapters)
    # the adapters matter: without them the output differs
    assert np.max(np.abs(reflora_model_forward(x, base, {}) - ref)) > 1e-3 * np.max(np.abs(ref))
    assert_close(got, ref, name=f"model output ({name})", rel=F64_PEER)


def _random_adapters(specs: dict, seed: int = 3, use_rslora: bool = False) -> dict:
    """{module: LoraAdapter} with random non-zero A and B (float64), specs: module -> (R, I, O, alpha)."""
    rng = np.random.default_rng(seed)
    out = {}
    for mod, (R, I, O, alpha) in specs.items():
        out[mod] = reflora.LoraAdapter.from_arrays(rng.standard_normal((R, I)), rng.standard_normal((O, R)) * 0.3,
                                                   alpha=alpha, use_rslora=use_rslora)
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_reflora_directory_loads_in_peft_with_same_outputs(tmp_path, use_rslora):
    specs = {"proj": (3, 6, 5, 5.0), "blk.0": (2, 5, 7, 2.5), "blk.2": (4, 7, 4, 16.0)}
    adapters = _random_adapters(specs, use_rslora=use_rslora)
    save_peft(tmp_path, adapters)
    base = _base_model()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).double()
    pm.eval()
    for mod, ad in adapters.items():
        layer = pm.base_model.model.get_submodule(mod)
        assert layer.r["default"] == ad.config.rank
        assert layer.scaling["default"] == pytest.approx(ad.scale, rel=1e-15)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), ad.B)
    # only the given modules were adapted
    adapted = {k for k, v in pm.base_model.model.named_modules() if hasattr(v, "lora_A")}
    assert adapted == set(specs)
    x = _x()
    assert_close(reflora_model_forward(x, base, adapters), _peft_out(pm, x), name="model output", rel=F64_PEER)
    # and reflora reads its own directory back identically
    again = load_peft(tmp_path, xp="numpy")
    for mod, ad in adapters.items():
        assert again[mod].config == ad.config
        np.testing.assert_array_equal(again[mod].A, ad.A)


def test_reflora_directory_with_conv1d_fan_in_fan_out(tmp_path):
    adapters = _random_adapters({"head": (2, 4, 3, 3.0), "blk.0": (3, 5, 7, 6.0)})
    save_peft(tmp_path, adapters, fan_in_fan_out=True)
    base = _base_model()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).double()
    pm.eval()
    x = _x()
    assert_close(reflora_model_forward(x, base, adapters), _peft_out(pm, x), name="model output", rel=F64_PEER)


def test_suffix_paths_get_their_own_rank(tmp_path):
    # "blk.0" is a suffix of "outer.blk.0" for PEFT's pattern matching: each must keep its own rank/alpha
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(4, 4))
            self.outer = nn.Module()
            self.outer.blk = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.outer.blk(self.blk(x))

    rng = np.random.default_rng(5)
    ads = {"blk.0": reflora.LoraAdapter.from_arrays(rng.standard_normal((1, 4)), rng.standard_normal((4, 1)),
                                                    alpha=2.0),
           "outer.blk.0": reflora.LoraAdapter.from_arrays(rng.standard_normal((3, 4)), rng.standard_normal((4, 3)),
                                                          alpha=9.0)}
    save_peft(tmp_path, ads)
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(Nested().double(), str(tmp_path))
    for mod, ad in ads.items():
        layer = pm.base_model.model.get_submodule(mod)
        assert (layer.r["default"], layer.scaling["default"]) == (ad.config.rank, ad.scale)
    back = load_peft(tmp_path, xp="numpy")
    assert {m: (a.config.rank, a.config.alpha) for m, a in back.items()} == {"blk.0": (1, 2.0),
                                                                             "outer.blk.0": (3, 9.0)}


def _peft_save(tmp_path, model, **cfg):
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    pm.save_pretrained(tmp_path)
    return tmp_path


REFUSED = {
    # (DoRA and lora_bias are read since the DoRA/lora_bias issue: tests/io/test_peft_extras.py)
    "modules_to_save": (lambda: _base_model(), dict(r=2, target_modules=["proj"], modules_to_save=["blk.2"]),
                        "modules_to_save"),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), dict(r=2, target_modules=["0"]),
                  "embedding"),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3)), dict(r=2, target_modules=["0"]), "convolutions"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unrepresentable_peft_configs_are_refused(tmp_path, case):
    make, cfg, pattern = REFUSED[case]
    _peft_save(tmp_path, make(), **cfg)
    with pytest.raises(FormatError, match=pattern):
        load_peft(tmp_path, xp="numpy")


@pytest.mark.parametrize("field, value, pattern", [
    ("init_lora_weights", "pissa", "residual"),
    ("init_lora_weights", "olora", "residual"),
    ("peft_type", "IA3", "expected 'LORA'"),
    ("r", 3, "R = 3 from r"),
    ("rank_pattern", {"proj": 5}, r"rank_pattern\['proj'\]"),
    ("lora_alpha", "8", "expected a number"),
    ("use_rslora", "yes", "true or false"),
    ("alpha_pattern", {"pro(j": 2}, "not a valid regular expression"),
    ("use_dora", True, "lacks lora_magnitude_vector"),
    ("lora_bias", True, "lacks lora_B.bias"),
])
def test_edited_configs_are_refused(tmp_path, field, value, pattern):
    _peft_save(tmp_path, _base_model(), r=2, target_modules=["proj", "blk.0"])
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=pattern):
        load_peft(tmp_path, xp="numpy")


def test_missing_files_are_format_errors(tmp_path):
    with pytest.raises(FormatError, match="adapter_config.json"):
        load_peft(tmp_path)
    _peft_save(tmp_path, _base_model(), r=2, target_modules=["proj"])
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        load_peft(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FormatError, match="pickle"):
        load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_peft(tmp_path)


def test_save_peft_arguments(tmp_path):
    ads = _random_adapters({"proj": (2, 6, 5, 4.0)})
    with pytest.raises(TypeError, match="single LoraAdapter"):
        save_peft(tmp_path, ads["proj"])
    mixed = {**ads, **_random_adapters({"blk.0": (2, 5, 7, 4.0)}, use_rslora=True)}
    with pytest.raises(ValueError, match="use_rslora"):
        save_peft(tmp_path, mixed)
    with pytest.raises(ValueError, match="module path"):
        save_peft(tmp_path, {"base_model.model.proj": ads["proj"]})
    save_peft(tmp_path, ads)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        save_peft(tmp_path, _random_adapters({"proj": (2, 6, 5, 1.0)}, seed=9), overwrite=False)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    _, meta = reflora.load_tensors(tmp_path / "adapter_model.safetensors", xp="numpy")
    assert meta["format"] == "pt"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranks=st.tuples(*[st.integers(1, 4)] * 3), alphas=st.tuples(*[st.integers(1, 32)] * 3),
       use_rslora=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_hypothesis_random_patterns_both_ways(tmp_path_factory, ranks, alphas, use_rslora, seed, data):
    """Random per-module ranks and alphas (through rank_pattern/alpha_pattern), PEFT -> reflora -> PEFT."""
    mods = ["proj", "blk.0", "blk.2"]
    targets = data.draw(st.lists(st.sampled_from(mods), min_size=1, max_size=3, unique=True))
    base = _base_model(seed % 7)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=ranks[0], lora_alpha=alphas[0], target_modules=targets, use_rslora=use_rslora,
                          init_lora_weights=False, rank_pattern={m: r for m, r in zip(mods, ranks) if m in targets},
                          alpha_pattern={m: a for m, a in zip(mods, alphas) if m in targets})
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).double().eval()
    d1, d2 = tmp_path_factory.mktemp("peft"), tmp_path_factory.mktemp("reflora")
    pm.save_pretrained(d1)
    adapters = load_peft(d1, xp="numpy")
    x = _x(5)
    ref = _peft_out(pm, x)
    assert_close(reflora_model_forward(x, base, adapters), ref, name="PEFT -> reflora", rel=F64_PEER)
    save_peft(d2, adapters)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d2)).double().eval()
    assert_close(_peft_out(pm2, x), ref, name="reflora -> PEFT", rel=F64_PEER)


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    """save_peft writes two files; if only one of them is replaced, load_peft says so."""
    import shutil

    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    reflora.save_peft(tmp_path / "a", {"fc": reflora.LoraAdapter.from_arrays(A, B, alpha=4.0)})
    reflora.save_peft(tmp_path / "b", {"fc": reflora.LoraAdapter.from_arrays(A, B, alpha=8.0)})
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(reflora.FormatError, match="expected the two files of one save"):
        reflora.load_peft(tmp_path / "a")
