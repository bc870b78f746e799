"""Adapter files in the "peft" and "seed" layouts: round trips, agreement, detection, refusals.

Oracles: the original arrays (bit-exact), the seed's own formula y = s x a b
computed independently in float64, and the raw file contents read with the
safetensors package.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reflora
from helpers import F64_PEER, assert_close
from reflora import FormatError, LoraAdapter, LoraConfig, load_adapter, save_adapter, save_tensors
from reflora.io.layouts import detect_layout
from reflora.backend import to_numpy

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}


def _adapter(R=3, I=8, O=5, alpha=6.0, *, seed=0, dtype=np.float64, use_rslora=False, xp=None):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((R, I)).astype(dtype)
    B = rng.standard_normal((O, R)).astype(dtype)  # non-zero B: the output depends on it
    if xp is not None:
        A, B = xp.asarray(A), xp.asarray(B)
    return LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=use_rslora)


def _delta(ad, x):
    """s (x A^T) B^T in float64 through reflora's forward (W absent)."""
    A = np.asarray(to_numpy(ad.A), dtype=np.float64)
    B = np.asarray(to_numpy(ad.B), dtype=np.float64)
    y, _ = reflora.lora_forward(x, A, B, scale=ad.scale)
    return y


@pytest.mark.parametrize("layout", ["peft", "seed"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_is_exact(tmp_path, layout, dtype):
    ad = _adapter(dtype=DTYPES[dtype], use_rslora=dtype == "float32")
    p = tmp_path / f"{layout}.safetensors"
    save_adapter(p, ad, layout=layout)
    back = load_adapter(p, xp="numpy")
    assert back.config == ad.config  # complete: rank, alpha, in/out, use_rslora, init
    for name in ("A", "B"):
        got, want = getattr(back, name), getattr(ad, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


def test_layouts_hold_the_documented_keys_and_shapes(tmp_path):
    ad = _adapter(R=2, I=7, O=4)
    save_adapter(tmp_path / "p.safetensors", ad, layout="peft", module="layers.0.q_proj")
    save_adapter(tmp_path / "s.safetensors", ad, layout="seed")
    p, pm = stnp.load_file(tmp_path / "p.safetensors"), reflora.load_tensors(tmp_path / "p.safetensors")[1]
    assert {k: v.shape for k, v in p.items()} == {"base_model.model.layers.0.q_proj.lora_A.weight": (2, 7),
                                                  "base_model.model.layers.0.q_proj.lora_B.weight": (4, 2)}
    assert pm["format"] == "pt"
    s = stnp.load_file(tmp_path / "s.safetensors")
    assert {k: v.shape for k, v in s.items()} == {"lora_a": (7, 2), "lora_b": (2, 4)}
    np.testing.assert_array_equal(s["lora_a"], ad.A.T)
    np.testing.assert_array_equal(s["lora_b"], ad.B.T)
    record = json.loads(reflora.load_tensors(tmp_path / "s.safetensors")[1]["reflora"])
    assert record["layout"] == "seed" and record["modules"][""]["alpha"] == 6.0


def test_both_files_give_the_same_output_and_the_seed_formula(tmp_path):
    ad = _adapter(R=4, I=9, O=6, alpha=16.0)
    save_adapter(tmp_path / "p.safetensors", ad, layout="peft")
    save_adapter(tmp_path / "s.safetensors", ad, layout="seed")
    x = np.random.default_rng(1).standard_normal((11, 9))
    yp = _delta(load_adapter(tmp_path / "p.safetensors", xp="numpy"), x)
    ys = _delta(load_adapter(tmp_path / "s.safetensors", xp="numpy"), x)
    np.testing.assert_array_equal(yp, ys)
    # the seed's forward on its own tensors, as its document states it: y = scale * x @ a @ b, scale = alpha/rank
    raw = stnp.load_file(tmp_path / "s.safetensors")
    y_seed = (16.0 / 4) * (x @ raw["lora_a"] @ raw["lora_b"])
    assert_close(ys, y_seed, name="seed formula", rel=F64_PEER)


def test_several_modules_round_trip_as_a_mapping(tmp_path):
    ads = {"enc.q": _adapter(R=2, I=6, O=6, seed=1), "enc.v": _adapter(R=3, I=6, O=4, alpha=1.5, seed=2)}
    for layout in ("peft", "seed"):
        p = tmp_path / f"{layout}.safetensors"
        save_adapter(p, ads, layout=layout)
        back = load_adapter(p, xp="numpy")
        assert set(back) == set(ads)
        for m, ad in ads.items():
            assert back[m].config == ad.config
            np.testing.assert_array_equal(back[m].A, ad.A)
            np.testing.assert_array_equal(back[m].B, ad.B)
    keys = set(stnp.load_file(tmp_path / "seed.safetensors"))
    assert keys == {"enc.q.lora_a", "enc.q.lora_b", "enc.v.lora_a", "enc.v.lora_b"}


def test_backends(tmp_path, xp):
    ad = _adapter(R=2, I=5, O=3, xp=xp)
    x = np.random.default_rng(2).standard_normal((4, 5))
    for layout in ("peft", "seed"):
        p = tmp_path / f"{layout}.safetensors"
        save_adapter(p, ad, layout=layout)
        back = load_adapter(p, xp=xp)
        assert type(back.A) is type(ad.A)
        np.testing.assert_array_equal(to_numpy(back.A), to_numpy(ad.A))
        np.testing.assert_array_equal(_delta(back, x), _delta(ad, x))


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(R=st.integers(1, 4), I=st.integers(1, 6), O=st.integers(1, 6), alpha=st.floats(-8, 32),
       dtype=st.sampled_from(sorted(DTYPES)), rs=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_layouts_agree(tmp_path, R, I, O, alpha, dtype, rs, seed):
    ad = _adapter(R=R, I=I, O=O, alpha=alpha, seed=seed, dtype=DTYPES[dtype], use_rslora=rs)
    x = np.random.default_rng(seed + 1).standard_normal((3, I))
    outs = []
    for layout in ("peft", "seed"):
        p = tmp_path / f"h_{layout}.safetensors"
        save_adapter(p, ad, layout=layout)
        back = load_adapter(p, xp="numpy")
        assert back.config == ad.config
        assert back.A.tobytes() == np.ascontiguousarray(ad.A).tobytes()
        assert back.B.tobytes() == np.ascontiguousarray(ad.B).tobytes()
        outs.append(_delta(back, x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_float64_upcast_on_load(tmp_path):
    ad = _adapter(dtype=ml_dtypes.bfloat16)
    save_adapter(tmp_path / "b.safetensors", ad)
    back = load_adapter(tmp_path / "b.safetensors", xp="numpy", dtype="float64")
    assert back.A.dtype == np.float64
    np.testing.assert_array_equal(back.A, ad.A.astype(np.float64))


# ---------------------------------------------------------------- files without reflora metadata


def _bare(tmp_path, tensors, name="bare.safetensors"):
    p = tmp_path / name
    save_tensors(p, tensors)
    return p


def test_bare_files_need_alpha_and_detect_layout(tmp_path):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((16, 4)), rng.standard_normal((4, 8))  # seed: I=16, R=4, O=8
    p = _bare(tmp_path, {"lora_a": a, "lora_b": b})
    with pytest.raises(ValueError, match="pass alpha="):
        load_adapter(p)
    ad = load_adapter(p, alpha=8.0, xp="numpy")
    assert (ad.config.rank, ad.config.in_features, ad.config.out_features, ad.scale) == (4, 16, 8, 2.0)
    np.testing.assert_array_equal(ad.A, a.T)
    ad_rs = load_adapter(p, alpha=8.0, use_rslora=True, xp="numpy")
    assert ad_rs.scale == 4.0
    q = _bare(tmp_path, {"base_model.model.fc.lora_A.weight": a.T.copy(),
                         "base_model.model.fc.lora_B.weight": b.T.copy()}, "peft.safetensors")
    assert detect_layout({"base_model.model.fc.lora_A.weight": (4, 16), "base_model.model.fc.lora_B.weight": (8, 4)}) \
        == "peft"
    back = load_adapter(q, alpha=8.0, xp="numpy")
    np.testing.assert_array_equal(back.A, ad.A)
    two = _bare(tmp_path, {"x.lora_a": a, "x.lora_b": b, "y.lora_a": a[:, :2], "y.lora_b": b[:2]}, "two.safetensors")
    got = load_adapter(two, alpha={"x": 1.0, "y": 2.0}, xp="numpy")
    assert (got["x"].config.alpha, got["y"].config.rank) == (1.0, 2)
    with pytest.raises(ValueError, match="no entry for module 'y'"):
        load_adapter(two, alpha={"x": 1.0})


@pytest.mark.parametrize("tensors, pattern", [
    ({"lora_a": np.zeros((4, 4)), "lora_b": np.zeros((4, 4))}, "square.*layout='peft'.*layout='seed'"),
    ({"lora_a": np.zeros((8, 3)), "lora_b": np.zeros((2, 8))}, "ranks disagree"),
    ({"lora_a": np.zeros((8, 3))}, "no B half"),
    ({"base_model.model.q.lora_B.weight": np.zeros((8, 3))}, "no A half"),
    ({"base_model.model.q.lora_A.weight": np.zeros((8, 3)), "base_model.model.q.lora_B.weight": np.zeros((3, 5))},
     "fit only the seed orientation; pass layout='seed'"),
    ({"lora_a": np.zeros((2, 8)), "lora_b": np.zeros((5, 2))}, "fit only the peft orientation; pass layout='peft'"),
    ({"lora_a": np.zeros((8, 2)), "lora_b": np.zeros((2, 5)), "q.lora_A.weight": np.zeros((2, 8)),
      "q.lora_B.weight": np.zeros((5, 2))}, "mix the peft"),
    ({"lora_a": np.zeros((8, 2)), "lora_b": np.zeros((2, 5)), "weight": np.zeros(3)}, "not a LoRA A/B tensor"),
    ({"base_model.model.q.lora_A.weight": np.zeros((2, 8)), "base_model.model.q.lora_B.weight": np.zeros((5, 2)),
      "base_model.model.q.lora_magnitude_vector": np.zeros(5)}, "DoRA"),
    ({"lora_a": np.zeros((8, 2, 1)), "lora_b": np.zeros((2, 5))}, "not 2-D"),
    ({"lora_a": np.zeros((8, 2)), "lora_A": np.zeros((8, 2)), "lora_b": np.zeros((2, 5))}, "two A tensors"),
])
def test_undecidable_or_inconsistent_files_are_refused(tmp_path, tensors, pattern):
    p = _bare(tmp_path, tensors)
    with pytest.raises(FormatError, match=pattern) as info:
        load_adapter(p, alpha=1.0)
    assert str(p) in str(info.value)


def test_explicit_layout_settles_the_square_case(tmp_path):
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    p = _bare(tmp_path, {"lora_a": a, "lora_b": b})
    seed = load_adapter(p, layout="seed", alpha=4.0, xp="numpy")
    peft = load_adapter(p, layout="peft", alpha=4.0, xp="numpy")
    np.testing.assert_array_equal(seed.A, a.T)
    np.testing.assert_array_equal(peft.A, a)
    # a layout that contradicts the shapes is still refused
    q = _bare(tmp_path, {"lora_a": np.zeros((8, 2)), "lora_b": np.zeros((2, 5))}, "q.safetensors")
    with pytest.raises(FormatError, match="layout 'peft'"):
        load_adapter(q, layout="peft", alpha=1.0)
    with pytest.raises(ValueError, match="layout is 'candle'"):
        load_adapter(q, layout="candle", alpha=1.0)


def test_stored_config_is_checked(tmp_path):
    ad = _adapter(R=2, I=6, O=3, alpha=5.0)
    p = tmp_path / "a.safetensors"
    save_adapter(p, ad, layout="peft")
    with pytest.raises(ValueError, match="stores alpha 5"):
        load_adapter(p, alpha=4.0)
    assert load_adapter(p, alpha=5.0, xp="numpy").config == ad.config
    with pytest.raises(ValueError, match="records layout 'peft'"):
        load_adapter(p, layout="seed")
    with pytest.raises(ValueError, match="use_rslora"):
        load_adapter(p, use_rslora=True)
    tensors, meta = reflora.load_tensors(p, xp="numpy")
    record = json.loads(meta["reflora"])
    record["modules"]["linear"]["rank"] = 3
    save_tensors(p, tensors, metadata={**meta, "reflora": json.dumps(record)})
    with pytest.raises(FormatError, match=r"stored config says \(R, I, O\) = \(3, 6, 3\)"):
        load_adapter(p)
    save_tensors(p, tensors, metadata={"reflora": "{oops"})
    with pytest.raises(FormatError, match="not valid JSON"):
        load_adapter(p)
    save_tensors(p, tensors, metadata={"reflora": json.dumps({**record, "modules": {"other": record["modules"]["linear"]}})})
    with pytest.raises(FormatError, match="describes modules"):
        load_adapter(p)


def test_save_adapter_arguments(tmp_path):
    ad = _adapter()
    with pytest.raises(ValueError, match="layout"):
        save_adapter(tmp_path / "x.safetensors", ad, layout="candle")
    with pytest.raises(TypeError, match="LoraAdapter"):
        save_adapter(tmp_path / "x.safetensors", {"a": ad.A})
    with pytest.raises(ValueError, match="module"):
        save_adapter(tmp_path / "x.safetensors", ad, module=".q")
    save_adapter(tmp_path / "x.safetensors", ad)
    with pytest.raises(FileExistsError):
        save_adapter(tmp_path / "x.safetensors", ad, overwrite=False)


def test_peft_written_file_reads_with_alpha(tmp_path):
    import peft
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)).double()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=7, target_modules=["0", "1"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    file_ads = load_adapter(tmp_path / "adapter_model.safetensors", alpha=7.0, xp="numpy")
    dir_ads = reflora.load_peft(tmp_path, xp="numpy")
    assert set(file_ads) == set(dir_ads) == {"0", "1"}
    for m in dir_ads:
        assert file_ads[m].config == dir_ads[m].config
        np.testing.assert_array_equal(file_ads[m].B, dir_ads[m].B)


def test_demo_layout_check_is_zero_and_can_fail(monkeypatch):
    from reflora.io import layouts as adapter_io

    rng = np.random.default_rng(8)
    ad = _adapter(R=2, I=6, O=4)
    ad.W = rng.standard_normal((4, 6))
    x = rng.standard_normal((5, 6))
    assert adapter_io.layouts_roundtrip_error(ad, x) == 0.0
    real = adapter_io.load_adapter

    def lossy(path, **kw):  # a reader that drops precision in one layout must be caught
        back = real(path, **kw)
        if "seed" in str(path):
            back.B = back.B.astype(np.float32).astype(np.float64)
        return back

    monkeypatch.setattr(adapter_io, "load_adapter", lossy)
    assert adapter_io.layouts_roundtrip_error(ad, x) > 0.0


def test_save_adapter_refuses_what_the_layouts_cannot_hold(tmp_path):
    rng = np.random.default_rng(9)
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    for extra in ({"magnitude": np.ones(4)}, {"lora_bias": np.ones(4)}):
        ad = LoraAdapter.from_arrays(A, B, alpha=2.0, **extra)
        for layout in ("peft", "seed"):
            with pytest.raises(ValueError, match=f"{next(iter(extra))}.*save_peft"):
                save_adapter(tmp_path / "x.safetensors", ad, layout=layout)
    assert not (tmp_path / "x.safetensors").exists()
