"""reflora.delta_weight against PEFT, and compare_adapters / ``reflora diff`` verdicts on constructed
mistakes: each known bug is made on purpose and must be named; identical ΔW must pass; an
unrelated adapter must not be explained away as a factor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reflora
from reflora.cli import main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _ad(R, I, O, alpha, rs=False, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return reflora.LoraAdapter.from_arrays(rng.standard_normal((R, I)).astype(dtype),
                                           rng.standard_normal((O, R)).astype(dtype), alpha=alpha, use_rslora=rs)


# ---------------------------------------------------------------- ΔW against PEFT


def _peft_layer(I, O, R, alpha, *, rs=False, dora=False, lora_bias=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Sequential(torch.nn.Linear(I, O).double())
    cfg = peft.LoraConfig(r=R, lora_alpha=alpha, target_modules=["0"], use_rslora=rs, use_dora=dora,
                          lora_bias=lora_bias, init_lora_weights=False)
    pm = peft.get_peft_model(lin, cfg).double()
    layer = pm.base_model.model[0]
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn_like(p))
        if dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
        if lora_bias:
            layer.lora_B["default"].bias.copy_(torch.randn_like(layer.lora_B["default"].bias))
    return layer


@pytest.mark.parametrize("kind", ["plain", "rslora", "dora", "lora_bias"])
def test_delta_weight_matches_peft(kind):
    layer = _peft_layer(7, 5, 3, 6.0, rs=kind == "rslora", dora=kind == "dora", lora_bias=kind == "lora_bias")
    A = layer.lora_A["default"].weight.detach().numpy()
    B = layer.lora_B["default"].weight.detach().numpy()
    W = layer.base_layer.weight.detach().numpy().copy()
    bias = layer.base_layer.bias.detach().numpy().copy()
    ad = reflora.LoraAdapter.from_arrays(A, B, alpha=6.0, use_rslora=kind == "rslora", W=W)
    if kind == "dora":
        ad.magnitude = layer.lora_magnitude_vector["default"].weight.detach().numpy().copy()
    if kind == "lora_bias":
        ad.lora_bias = layer.lora_B["default"].bias.detach().numpy().copy()
    ours = reflora.delta_weight(ad)
    if kind in ("plain", "rslora"):
        assert np.array_equal(ours, layer.get_delta_weight("default").detach().numpy())  # same formula, same order
        return
    layer.merge()
    merged_w = layer.base_layer.weight.detach().numpy()
    # merged - W vs ΔW: merge rounds W + ΔW once in float64, so |error| <= ulp(W + ΔW) / 2 elementwise
    tol = np.spacing(np.abs(W) + np.abs(ours))
    assert np.all(np.abs((merged_w - W) - ours) <= tol), float(np.max(np.abs((merged_w - W) - ours)))
    if kind == "lora_bias":
        merged_b = layer.base_layer.bias.detach().numpy()
        db = reflora.delta_bias(ad)
        assert np.all(np.abs((merged_b - bias) - db) <= np.spacing(np.abs(bias) + np.abs(db)))


def test_delta_weight_dora_needs_w():
    ad = _ad(2, 4, 3, 2.0)
    ad.magnitude = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="base weight"):
        reflora.delta_weight(ad)


# ---------------------------------------------------------------- verdicts on constructed mistakes


def _one(a, b, **kw):
    d = reflora.compare_adapters({"m": a}, {"m": b}, **kw)
    (m,) = d.modules
    return d, m


@settings(max_examples=15)
@given(R=st.integers(2, 16), I=st.integers(2, 20), O=st.integers(2, 20), alpha=st.sampled_from([1.0, 8.0, 16.0, 7.5]),
       seed=st.integers(0, 1000))
def test_verdicts_name_each_constructed_mistake(R, I, O, alpha, seed):
    R = min(R, I, O)
    good = _ad(R, I, O, alpha, rs=True, seed=seed)
    A, B = good.A, good.B
    # identical ΔW from a different factorisation (columns of B, rows of A permuted) passes
    p = np.random.default_rng(seed).permutation(R)
    same = reflora.LoraAdapter.from_arrays(A[p], B[:, p], alpha=alpha, use_rslora=True)
    d, m = _one(good, same, rtol=1e-6)
    assert d.ok, d.format()
    if R == 1:
        return
    # rsLoRA read as plain LoRA: factor sqrt(R)
    d, m = _one(good, reflora.LoraAdapter.from_arrays(A, B, alpha=alpha), rtol=0.0)
    assert not d.ok and "rsLoRA mix-up" in m.verdict, m
    # alpha vs scale: a scale s stored where alpha belongs reads as s / R: factor R
    plain = reflora.LoraAdapter.from_arrays(A, B, alpha=alpha)
    as_alpha = reflora.LoraAdapter.from_arrays(A, B, alpha=plain.scale)
    d, m = _one(plain, as_alpha)
    assert "alpha vs scale" in m.verdict, m
    # transposed layout: (I, R) / (R, O) factors read as (R, I) / (O, R)
    if I != O:
        t = reflora.LoraAdapter.from_arrays(B.T.copy(), A.T.copy(), alpha=alpha, use_rslora=True)
        d, m = _one(good, t)
        assert "transposed layout" in m.verdict, m
    # alpha dropped (kohya .alpha missing -> alpha = R -> s = 1)
    if plain.scale != 1 and abs(plain.scale - R) > 1e-9 and abs(plain.scale - math.sqrt(R)) > 1e-9:
        d, m = _one(plain, reflora.LoraAdapter.from_arrays(A, B, alpha=float(R)))
        assert "applies no scale" in m.verdict, m


def test_missing_module_and_unrelated_adapter():
    a, b = _ad(2, 6, 5, 4.0, seed=1), _ad(2, 6, 5, 4.0, seed=2)
    d = reflora.compare_adapters({"q": a, "k": a}, {"q": b, "v": a})
    by = {m.module: m for m in d.modules}
    assert "not by a constant factor" in by["q"].verdict
    assert by["k"].status == "missing" and "only in the first" in by["k"].verdict
    assert by["v"].status == "missing" and "only in the second" in by["v"].verdict
    assert not d.ok


def test_a_tiny_but_nonzero_side_is_not_called_zero():
    # ΔW entries near 1e-170: their squares underflow to 0, yet the ΔW is not zero
    a = _ad(2, 6, 5, 4.0, seed=1, dtype="float64")
    b = reflora.LoraAdapter.from_arrays(np.asarray(a.A) * 1e-85, np.asarray(a.B) * 1e-85, alpha=4.0)
    (m,) = reflora.compare_adapters({"q": a}, {"q": b}).modules
    assert m.status == "differs" and "is zero" not in m.verdict and "too small" in m.verdict, m.verdict


def test_rows_permuted_names_the_gguf_permutation():
    a = _ad(2, 8, 8, 4.0)
    B = reflora.io.gguf.permute_rows(np.asarray(a.B), 2)
    d, m = _one(a, reflora.LoraAdapter.from_arrays(np.asarray(a.A), B, alpha=4.0))
    assert "rows permuted" in m.verdict


def test_identical_passes_at_rtol_zero_and_rounding_is_named():
    a = _ad(3, 6, 5, 8.0, rs=True)
    d, m = _one(a, a)
    assert d.ok and m.status == "identical"
    alpha32 = float(np.float32(a.scale * 3))  # GGUF's float32 alpha_eff, read as plain LoRA
    d, m = _one(a, reflora.LoraAdapter.from_arrays(a.A, a.B, alpha=alpha32))
    assert not d.ok and "rounded" in m.verdict and abs(m.factor - 1) < 2.0**-23
    assert _one(a, reflora.LoraAdapter.from_arrays(a.A, a.B, alpha=alpha32), rtol=2.0**-23)[0].ok


def test_kohya_names_match_dotted_paths(tmp_path):
    a = {"unet.down_blocks.0.attentions.0.proj_in": _ad(2, 8, 8, 4.0)}
    reflora.save_kohya(tmp_path / "k.safetensors", a)
    import safetensors.numpy as stn
    stn.save_file(stn.load_file(str(tmp_path / "k.safetensors")), str(tmp_path / "plain.safetensors"))
    d = reflora.compare_adapters(a, reflora.load_any(tmp_path / "plain.safetensors"))
    assert d.ok and d.modules[0].other == "lora_unet_down_blocks_0_attentions_0_proj_in", d.format()


# ---------------------------------------------------------------- the CLI, on files made the wrong way


def _peft_dir(tmp_path, rs):
    mods = {f"model.layers.0.{k}": _ad(4, 16, 16, 8.0, rs=rs, seed=i)
            for i, k in enumerate(["self_attn.q_proj", "mlp.up_proj"])}
    reflora.save_peft(tmp_path / "peft", mods)
    return mods


def test_cli_diff_passes_on_a_conversion(tmp_path, capsys):
    _peft_dir(tmp_path, rs=True)
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "a.gguf"), "--to", "gguf", "--n-head", "4"]) == 0
    assert main(["diff", str(tmp_path / "peft"), str(tmp_path / "a.gguf")]) == 0
    assert "all agree" in capsys.readouterr().out


def test_cli_diff_names_llama_cpp_rslora_defect(tmp_path, capsys):
    """llama.cpp's convert_lora_to_gguf writes lora_alpha as is and ignores use_rslora: sqrt(R) too weak."""
    gguf = pytest.importorskip("gguf")
    mods = _peft_dir(tmp_path, rs=True)
    w = gguf.GGUFWriter(str(tmp_path / "cpp.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)  # lparams["lora_alpha"], as the converter does
    for m, ad in mods.items():
        base = reflora.io.gguf.gguf_name(m)
        B = np.asarray(ad.B)
        if base.endswith("attn_q"):
            B = reflora.io.gguf.permute_rows(B, 4)
        w.add_tensor(base + ".weight.lora_a", np.asarray(ad.A))
        w.add_tensor(base + ".weight.lora_b", np.ascontiguousarray(B))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc = main(["diff", str(tmp_path / "peft"), str(tmp_path / "cpp.gguf"), "--n-head", "4"])
    out = capsys.readouterr().out
    assert rc == 1 and out.count("rsLoRA mix-up") == 2, out
    # read with the wrong head count, q's rows stay permuted: named as such
    rc = main(["diff", str(tmp_path / "peft"), str(tmp_path / "cpp.gguf"), "--n-head", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "rows permuted" in out and "rsLoRA mix-up" in out, out


def test_cli_diff_names_mlx_alpha_vs_scale(tmp_path, capsys):
    """An mlx-lm config written with lora_alpha where the scale belongs (mlx-lm #1119/#1120's mistake)."""
    import json
    mods = _peft_dir(tmp_path, rs=False)
    reflora.save_mlx(tmp_path / "mlx", mods)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] = 8.0  # lora_alpha written as the scale: s = 8 instead of 8 / 4
    del cfg["reflora"]
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(cfg))
    rc = main(["diff", str(tmp_path / "peft"), str(tmp_path / "mlx")])
    out = capsys.readouterr().out
    assert rc == 1 and out.count("alpha vs scale") == 2, out


def test_cli_inspect_lists_each_format(tmp_path, capsys):
    mods = _peft_dir(tmp_path, rs=False)
    for fmt, name in (("kohya", "k.safetensors"), ("mlx", "m"), ("gguf", "a.gguf"), ("seed", "s.safetensors")):
        reflora.save_any(tmp_path / name, mods, fmt, n_head=4)
        assert main(["inspect", str(tmp_path / name), "--n-head", "4"]) == 0
        out = capsys.readouterr().out
        assert "model.layers.0.mlp.up_proj" in out, (fmt, out)
        assert ("format: " + fmt if fmt != "seed" else "layout: seed") in out, out
        assert "parameters: 256" in out
