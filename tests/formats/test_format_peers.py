"""Files written or read by the real tools: PEFT's save_pretrained / from_pretrained, diffusers'
kohya loaders on a tiny UNet, mlx-lm's LoRA layers and adapter loader, and the gguf package's
writer in llama.cpp's converter layout.

Where a peer holds the adapter in its own objects, the test compares what the peer holds
(A, B and its scale) with reflora's, element for element: equal factors and an equal scale
give the same ΔW bit for bit, and the peer's own ΔW formula is then not in question.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import reflora
from reflora.io.kohya import kohya_name

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


# ---------------------------------------------------------------- PEFT


class _Attn(torch.nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Linear(d, d), torch.nn.Linear(d, kv)
        self.v_proj, self.o_proj = torch.nn.Linear(d, kv), torch.nn.Linear(d, d)


class _Mlp(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, f), torch.nn.Linear(d, f)
        self.down_proj = torch.nn.Linear(f, d)


class _Layer(torch.nn.Module):
    def __init__(self, d, kv, f):
        super().__init__()
        self.self_attn, self.mlp = _Attn(d, kv), _Mlp(d, f)


class _Inner(torch.nn.Module):
    def __init__(self, d, kv, f, n):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(d, kv, f) for _ in range(n)])


class TinyLlama(torch.nn.Module):
    """Module paths as transformers' Llama: model.layers.N.self_attn.q_proj, ...; d 16, 4 heads, 2 kv heads."""

    def __init__(self, d=16, kv=8, f=24, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.model = _Inner(d, kv, f, n)


CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "rank_pattern": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6}),
    "alpha_pattern": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _peft_saved(tmp_path, case):
    cfg = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **CASES[case])  # B nonzero
    pm = peft.get_peft_model(TinyLlama(), cfg)
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


def _peft_deltas(pm):
    from peft.tuners.lora import Linear

    return {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().clone()
            for n, m in pm.named_modules() if isinstance(m, Linear)}


def _holds(case, fmt):
    """Whether a format can hold the case (mlx-lm: one rank and one scale; GGUF: one alpha)."""
    if fmt == "mlx":
        return case in ("plain", "rslora")
    if fmt == "gguf":
        return case != "alpha_pattern"
    return True


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["kohya", "mlx", "gguf", "seed"])
def test_peft_save_pretrained_through_each_format_back_into_peft(tmp_path, case, fmt):
    """save_pretrained -> reflora -> fmt -> reflora -> PEFT folder -> PeftModel.from_pretrained: same ΔW, bitwise."""
    pm, src = _peft_saved(tmp_path, case)
    mods = reflora.load_peft(src, xp="numpy")
    mid = tmp_path / f"mid.{fmt}"
    if not _holds(case, fmt):
        with pytest.raises(ValueError, match="one rank and one scale|one adapter.lora.alpha|different alphas"):
            reflora.save_any(mid, mods, fmt, n_head=4, n_head_kv=2)
        return
    reflora.save_any(mid, mods, fmt, n_head=4, n_head_kv=2)
    reflora.save_peft(tmp_path / "back", reflora.load_any(mid, xp="numpy"))
    again = peft.PeftModel.from_pretrained(TinyLlama(), tmp_path / "back")
    want, got = _peft_deltas(pm), _peft_deltas(again)
    assert sorted(got) == sorted(want)
    for m in want:
        assert torch.equal(got[m], want[m]), (m, float((got[m] - want[m]).abs().max()))


def test_peft_delta_weight_is_reflora_delta_weight(tmp_path):
    """reflora.delta_weight of the loaded folder equals PEFT's get_delta_weight in float64 (PEFT's order: (B A) s)."""
    cfg = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, r=3, lora_alpha=5, use_rslora=True)
    pm = peft.get_peft_model(TinyLlama().double(), cfg)
    pm.save_pretrained(tmp_path / "p")
    ours = reflora.delta_weight(reflora.load_peft(tmp_path / "p", xp="numpy"))
    for m, t in _peft_deltas(pm).items():
        assert np.array_equal(ours[m], t.numpy()), m


# ---------------------------------------------------------------- diffusers (kohya)

diffusers = pytest.importorskip("diffusers")


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


UNET_MODULES = {  # module path: (rank, alpha); one alpha for all (see the defect test for several)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (2, 3.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 3.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (2, 3.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": (3, 3.0),
}


def _kohya_dict(unet, modules, seed=0):
    """A kohya state dict built by hand: lora_unet_<path with _>.lora_down/.lora_up/.alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, (R, alpha) in modules.items():
        lin = unet.get_submodule(m)
        k = "lora_unet_" + m.replace(".", "_")
        sd[k + ".lora_down.weight"] = torch.randn(R, lin.in_features, generator=g)
        sd[k + ".lora_up.weight"] = torch.randn(lin.out_features, R, generator=g)
        sd[k + ".alpha"] = torch.tensor(alpha)
    return sd


def _diffusers_load(unet, sd):
    """diffusers' own path: StableDiffusionPipeline.lora_state_dict (its kohya converter) + load_lora_into_unet."""
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="k")
    return unet


def _diffusers_holds(unet, m):
    lay = unet.get_submodule(m)
    return (lay.lora_A["k"].weight.detach().numpy(), lay.lora_B["k"].weight.detach().numpy(), lay.scaling["k"])


def test_kohya_file_read_as_diffusers_reads_it(tmp_path):
    """A kohya dict built by hand: reflora's (A, B, s) per module equal diffusers' after its conversion."""
    from safetensors.torch import save_file

    unet = _tiny_unet()
    sd = _kohya_dict(unet, UNET_MODULES)
    save_file(sd, str(tmp_path / "k.safetensors"))
    ours = reflora.load_kohya(tmp_path / "k.safetensors")
    unet = _diffusers_load(unet, sd)
    for m in UNET_MODULES:
        A, B, s = _diffusers_holds(unet, m)
        ad = ours[kohya_name("unet." + m)]
        assert np.array_equal(np.asarray(ad.A), A) and np.array_equal(np.asarray(ad.B), B), m
        assert ad.scale == s, (m, ad.scale, s)


def test_reflora_kohya_file_loads_in_diffusers(tmp_path):
    """save_kohya of {unet.<path>: adapter} is what diffusers loads into the UNet, factor and scale alike."""
    from safetensors.torch import load_file

    unet = _tiny_unet()
    rng = np.random.default_rng(1)
    mods = {}
    for m, (R, alpha) in UNET_MODULES.items():
        lin = unet.get_submodule(m)
        mods["unet." + m] = reflora.LoraAdapter.from_arrays(
            rng.standard_normal((R, lin.in_features)).astype(np.float32),
            rng.standard_normal((lin.out_features, R)).astype(np.float32), alpha=alpha)
    reflora.save_kohya(tmp_path / "r.safetensors", mods)
    unet = _diffusers_load(unet, load_file(str(tmp_path / "r.safetensors")))
    for m in UNET_MODULES:
        A, B, s = _diffusers_holds(unet, m)
        ad = mods["unet." + m]
        assert np.array_equal(np.asarray(ad.A), A) and np.array_equal(np.asarray(ad.B), B), m
        assert ad.scale == s, m


def test_diffusers_defect_alpha_of_attention_processor_modules(tmp_path):
    """Known diffusers defect, documented: with several alphas in one SD kohya file, a module whose
    converted name goes through ``processor.to_k_lora`` gets the most common alpha, not its own
    (its alpha_pattern key keeps '.processor.to_k_lora.down.weight'). sd-scripts scales each module by
    its own alpha / R; reflora does the same, and ``compare_adapters`` names the factor.
    """
    from safetensors.torch import save_file

    unet = _tiny_unet()
    mods = dict(UNET_MODULES)
    mods["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] = (4, 4.0)  # its own alpha, 4 / 4 = 1
    sd = _kohya_dict(unet, mods)
    save_file(sd, str(tmp_path / "k.safetensors"))
    ours = reflora.load_kohya(tmp_path / "k.safetensors")
    unet = _diffusers_load(unet, sd)
    m = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    A, B, s = _diffusers_holds(unet, m)
    assert ours[kohya_name("unet." + m)].scale == 1.0  # sd-scripts: alpha / dim = 4 / 4
    if s == 1.0:
        pytest.fail("diffusers now reads this module's own alpha: the defect is fixed; update this test and the page")
    assert s == 3.0 / 4  # the most common alpha (3) over its rank (4)
    theirs = reflora.LoraAdapter.from_arrays(A, B, alpha=s * 4)
    d = reflora.compare_adapters({m: ours[kohya_name("unet." + m)]}, {m: theirs})
    assert not d.ok and abs(d.modules[0].factor - 4 / 3) < 1e-12


# ---------------------------------------------------------------- mlx-lm

mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]' mlx-lm) runs the mlx-lm peer tests")


def _mlx_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=2, intermediate_size=24,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=32, num_key_value_heads=2)
    model = llama.Model(args)
    model.freeze()
    return model


def test_reflora_mlx_folder_loads_in_mlx_lm(tmp_path):
    """mlx_lm.tuner.utils.load_adapters on save_mlx's folder: its LoRALinear layers hold A^T, B^T and s."""
    from mlx_lm.tuner.utils import load_adapters

    model = _mlx_model()
    rng = np.random.default_rng(2)
    dims = {"self_attn.q_proj": (16, 16), "self_attn.k_proj": (16, 8), "mlp.down_proj": (24, 16)}
    mods = {f"model.layers.{i}.{k}": reflora.LoraAdapter.from_arrays(
        rng.standard_normal((4, I)).astype(np.float32), rng.standard_normal((O, 4)).astype(np.float32),
        alpha=7.0, use_rslora=True) for i in range(2) for k, (I, O) in dims.items()}
    reflora.save_mlx(tmp_path / "a", mods)
    load_adapters(model, str(tmp_path / "a"))
    for m, ad in mods.items():
        i, key = int(m.split(".")[2]), m.split(".", 3)[3]
        layer = model.model.layers[i]
        for part in key.split("."):
            layer = getattr(layer, part)
        assert type(layer).__name__ == "LoRALinear", m
        assert np.array_equal(np.array(layer.lora_a), np.asarray(ad.A).T), m  # (I, R)
        assert np.array_equal(np.array(layer.lora_b), np.asarray(ad.B).T), m  # (R, O)
        assert layer.scale == ad.scale == 7.0 / 2, m


def test_mlx_lm_trained_folder_reads_in_reflora(tmp_path):
    """A folder as mlx-lm's trainer writes it (trainable parameters, vars(args) as the config): same (A, B, s)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _mlx_model()
    lp = {"rank": 3, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, lp)
    for layer in model.model.layers:  # trained: lora_b no longer zero
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.lora_b = mx.random.normal(lin.lora_b.shape)
    folder = tmp_path / "trained"
    folder.mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    args = {"model": "tiny", "fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lp, "batch_size": 1,
            "iters": 1, "learning_rate": 1e-5, "adapter_path": str(folder)}  # what lora.py's save_config writes
    (folder / "adapter_config.json").write_text(json.dumps(args, indent=4))
    ours = reflora.load_mlx(folder)
    assert sorted(ours) == sorted({k.rsplit(".", 1)[0] for k in weights})
    for m, ad in ours.items():
        assert np.array_equal(np.asarray(ad.A), np.array(weights[m + ".lora_a"]).T)
        assert np.array_equal(np.asarray(ad.B), np.array(weights[m + ".lora_b"]).T)
        assert ad.scale == 20.0  # the scale itself, not 20 / R


# ---------------------------------------------------------------- gguf (llama.cpp's converter layout)

gguf = pytest.importorskip("gguf")


def _llama_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf's LlamaModel.permute, on a torch tensor (rows of a weight)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_like_llama_cpp(peft_dir, out, n_head, n_head_kv):
    """convert_lora_to_gguf.py's steps for Llama, with the gguf package: names, q/k permutation of lora_b
    (LoraTorchTensor.permute touches B only), general.type adapter, adapter.lora.alpha = lora_alpha as is."""
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    sd = load_file(str(peft_dir / "adapter_model.safetensors"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for k in [k for k in sd if k.endswith("lora_A.weight")]:
        path = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        _, _, n, rest = path.split(".", 3)
        A, B = sd[k], sd[k.replace("lora_A", "lora_B")]
        if rest == "self_attn.q_proj":
            B = _llama_permute(B, n_head, n_head)
        if rest == "self_attn.k_proj":
            B = _llama_permute(B, n_head, n_head_kv)
        w.add_tensor(f"blk.{n}.{names[rest]}.weight.lora_a", A.numpy())
        w.add_tensor(f"blk.{n}.{names[rest]}.weight.lora_b", B.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["plain", "rank_pattern"])
def test_gguf_as_llama_cpp_converts_reads_back(tmp_path, case):
    """A GGUF written as convert_lora_to_gguf.py writes it reads back as the PEFT adapter, bit for bit."""
    pm, src = _peft_saved(tmp_path, case)
    _convert_like_llama_cpp(src, tmp_path / "a.gguf", 4, 2)
    got = reflora.load_gguf(tmp_path / "a.gguf", n_head=4, n_head_kv=2)
    d = reflora.compare_adapters(got, reflora.load_peft(src, xp="numpy"))
    assert d.ok, d.format()
    assert all(m.status == "identical" for m in d.modules)


def test_gguf_lora_permutation_matches_base_weight_permutation():
    """B' A = P (B A): permuting lora_b's rows is the base weight's permutation of ΔW (torch, independently)."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    ours = reflora.io.gguf.permute_rows(B.numpy(), 2)  # k_proj of 4 heads, 2 kv heads
    assert np.array_equal(ours @ A.numpy(), _llama_permute(B @ A, 4, 2).numpy())
    assert np.array_equal(reflora.io.gguf.unpermute_rows(ours, 2), B.numpy())


def test_reflora_gguf_passes_llama_cpp_loader_checks(tmp_path):
    """The checks llama-adapter.cpp makes, on save_gguf's file read with the gguf package: types, FLOAT32
    alpha, names <base>.weight.lora_a/b, ne: lora_a [I, R], lora_b [R, O] (a.ne[1] == b.ne[0])."""
    rng = np.random.default_rng(3)
    mods = {"model.layers.0.self_attn.q_proj": reflora.LoraAdapter.from_arrays(
        rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32), alpha=8.0),
        "model.layers.0.mlp.down_proj": reflora.LoraAdapter.from_arrays(
        rng.standard_normal((2, 24)).astype(np.float16), rng.standard_normal((16, 2)).astype(np.float16), alpha=8.0)}
    reflora.save_gguf(tmp_path / "a.gguf", mods, n_head=4)
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert r.fields["adapter.lora.alpha"].contents() == 8.0  # one alpha, s = 8 / 4 and 8 / 2 per pair
    t = {x.name: x for x in r.tensors}
    for base, I, O in (("blk.0.attn_q", 16, 16), ("blk.0.ffn_down", 24, 16)):
        a, b = t[base + ".weight.lora_a"], t[base + ".weight.lora_b"]
        assert int(a.shape[0]) == I and int(b.shape[1]) == O and int(a.shape[1]) == int(b.shape[0])
    assert t["blk.0.ffn_down.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_kohya_flux_file_read_as_diffusers_flux_converter_reads_it(tmp_path, alpha):
    """diffusers' _convert_kohya_flux_lora_to_diffusers folds s = alpha / R into the factors (A s_down, B s_up,
    with s_down s_up = s). Its ΔW equals reflora's s B A bit for bit when s is a power of two (R = 4, alpha = 2),
    and within the float32 rounding of the folded A otherwise: |ΔW_d - ΔW| <= 2^-24 |s| (|B| |A|) per element
    (one rounding of each A' element; the float64 evaluation of both sides adds ~R 2^-53, far below)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = {"lora_unet_double_blocks_0_img_attn_proj": ("transformer.transformer_blocks.0.attn.to_out.0", 24, 24),
             "lora_unet_single_blocks_0_linear2": ("transformer.single_transformer_blocks.0.proj_out", 40, 24)}
    sd = {}
    for k, (_, I, O) in names.items():
        sd[k + ".lora_down.weight"] = torch.randn(4, I, generator=g)
        sd[k + ".lora_up.weight"] = torch.randn(O, 4, generator=g)
        sd[k + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(tmp_path / "flux.safetensors"))
    ours = reflora.load_kohya(tmp_path / "flux.safetensors")
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    for k, (path, _, _) in names.items():
        A_d = theirs[path + ".lora_A.weight"].double().numpy()
        B_d = theirs[path + ".lora_B.weight"].double().numpy()
        ad = ours[k]
        got = reflora.delta_weight(ad)
        want = B_d @ A_d  # diffusers loads these with scale 1 (alpha folded in)
        if alpha == 2.0:
            assert np.array_equal(got, want), k
        else:
            bound = 2.0**-24 * ad.scale * (np.abs(np.asarray(ad.B, np.float64)) @ np.abs(np.asarray(ad.A, np.float64)))
            assert np.all(np.abs(got - want) <= bound), (k, float(np.max(np.abs(got - want) - bound)))
            assert not np.array_equal(got, want)  # the folding did round: the bound is what is tested
            folded = reflora.LoraAdapter.from_arrays(A_d, B_d, alpha=float(A_d.shape[0]))  # s = 1, folded factors
            (m,) = reflora.compare_adapters({k: ad}, {k: folded}).modules
            assert m.status == "differs" and "rounding only" in m.verdict and "float32" in m.verdict, m


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_name_map_is_gguf_py_map(arch):
    """reflora's HF -> GGUF names equal gguf-py's own TensorNameMap (the converter's map) for both architectures."""
    tm = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), 4)
    for hf in ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj",
               "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj",
               "model.layers.3.mlp.down_proj", "lm_head"]:
        ours = reflora.io.gguf.gguf_name(hf, arch)
        assert ours + ".weight" == tm.get_name(hf + ".weight", try_suffixes=(".weight",)), hf
        assert reflora.io.gguf.hf_name(ours, arch) == hf


def test_gguf_qwen2_is_not_permuted(tmp_path):
    """Qwen2 (NeoX RoPE): convert_hf_to_gguf keeps q/k rows; reflora writes B as is and needs no head counts."""
    rng = np.random.default_rng(4)
    ad = reflora.LoraAdapter.from_arrays(rng.standard_normal((2, 16)).astype(np.float32),
                                         rng.standard_normal((16, 2)).astype(np.float32), alpha=4.0)
    reflora.save_gguf(tmp_path / "q.gguf", {"model.layers.0.self_attn.q_proj": ad}, arch="qwen2")
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert np.array_equal(t["blk.0.attn_q.weight.lora_b"], np.asarray(ad.B))
    back = reflora.load_gguf(tmp_path / "q.gguf")
    assert reflora.compare_adapters({"model.layers.0.self_attn.q_proj": ad}, back).ok
