"""PEFT -> each format -> PEFT keeps ΔW bit for bit, for plain, rsLoRA and rank_pattern adapters.

ΔW is recomputed here from the arrays, independently of reflora.arithmetic: the expected
update of every module is s (B A) in float64 from the adapter that went in, with s computed
from its config (alpha / R or alpha / sqrt(R)), and the one that came back must give the
same float64 array, element for element. Formats that cannot hold an adapter refuse it.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reflora

FORMATS = ("kohya", "mlx", "gguf", "seed", "peft")
# Llama module paths, so that GGUF has names for them (its name map is Llama's).
PATHS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
         "model.layers.1.mlp.down_proj")


def expected_delta(alpha: float, R: int, rslora: bool, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    s = alpha / (math.sqrt(R) if rslora else R)
    return s * (B.astype(np.float64) @ A.astype(np.float64))


def make(kind: str, dims: list[tuple[int, int]], ranks: list[int], alpha: float, dtype: str, seed: int):
    """{path: LoraAdapter} for kind in plain / rslora / rank_pattern; and {path: expected ΔW}."""
    rng = np.random.default_rng(seed)
    mods, want = {}, {}
    for path, (I, O), R in zip(PATHS, dims, ranks):
        A = rng.standard_normal((R, I)).astype(dtype)
        B = rng.standard_normal((O, R)).astype(dtype)
        rs = kind == "rslora"
        mods[path] = reflora.LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=rs)
        want[path] = expected_delta(alpha, R, rs, A, B)
    return mods, want


def roundtrip(fmt: str, mods, tmp: str, n_head: int) -> dict:
    """PEFT folder -> fmt -> PEFT folder, through reflora's files; return the last PEFT folder read back."""
    src, mid, dst = os.path.join(tmp, "src"), os.path.join(tmp, f"mid.{fmt}"), os.path.join(tmp, "dst")
    reflora.save_peft(src, mods)
    reflora.save_any(mid, reflora.load_peft(src, xp="numpy"), fmt, n_head=n_head, n_head_kv=n_head)
    reflora.save_peft(dst, reflora.load_any(mid, xp="numpy"))
    return reflora.load_peft(dst, xp="numpy")


def check_bit_exact(back, want, dtype):
    assert sorted(back) == sorted(want)
    for m, ad in back.items():
        assert np.dtype(ad.A.dtype) == np.dtype(dtype), m
        got = ad.scale * (np.asarray(ad.B, np.float64) @ np.asarray(ad.A, np.float64))
        assert got.shape == want[m].shape, m
        assert np.array_equal(got, want[m]), (m, float(np.max(np.abs(got - want[m]))))


# dims: q/k/v/down, O a multiple of 2 * heads for q and k (heads = 2)
dims_st = st.lists(st.tuples(st.integers(2, 12), st.integers(1, 6).map(lambda h: 4 * h)), min_size=4, max_size=4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["plain", "rslora", "rank_pattern"])
@settings(max_examples=12)
@given(dims=dims_st, r=st.integers(1, 2), alpha=st.sampled_from([1.0, 8.0, 16.0, 3.0, 0.7]),
       dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_roundtrip_bit_exact(fmt, kind, dims, r, alpha, dtype, seed):
    ranks = [r] * 4 if kind != "rank_pattern" else [r, r + 1, r + 2, r]
    ranks = [min(R, I, O) for R, (I, O) in zip(ranks, dims)]
    mods, want = make(kind, dims, ranks, alpha, dtype, seed)
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "mlx" and len({ad.config.rank for ad in mods.values()}) > 1:
            with pytest.raises(ValueError, match="one rank and one scale"):
                roundtrip(fmt, mods, tmp, 2)
            return
        if fmt == "mlx" and len({ad.scale for ad in mods.values()}) > 1:
            with pytest.raises(ValueError, match="one rank and one scale"):
                roundtrip(fmt, mods, tmp, 2)
            return
        need = {np.float32(ad.scale * ad.config.rank) for ad in mods.values()}  # GGUF's one alpha: s R, float32
        if fmt == "gguf" and len(need) > 1:  # rsLoRA with several ranks: alpha_eff = alpha sqrt(R) differs
            with pytest.raises(ValueError, match="one\nadapter.lora.alpha|one adapter.lora.alpha"):
                roundtrip(fmt, mods, tmp, 2)
            return
        back = roundtrip(fmt, mods, tmp, 2)
    check_bit_exact(back, want, dtype)
    d = reflora.compare_adapters(back, mods)  # and reflora diff agrees: every module identical
    assert d.ok and {m.status for m in d.modules} == {"identical"}, d.format()
    for m, ad in back.items():  # the config survives too (alpha and the rsLoRA flag, not only the scale)
        assert (ad.config.alpha, ad.config.use_rslora) == (alpha, kind == "rslora"), m


def test_gguf_holds_rank_pattern_with_one_alpha(tmp_path):
    """rank_pattern with one lora_alpha: GGUF's s = alpha / R per pair holds it; checked without the record."""
    mods, want = make("rank_pattern", [(8, 8), (8, 8), (8, 8), (8, 8)], [1, 2, 3, 4], 8.0, "float32", 0)
    p = tmp_path / "a.gguf"
    reflora.save_gguf(p, mods, n_head=2)
    _strip_gguf_record(p, tmp_path / "plain.gguf")
    back = reflora.load_gguf(tmp_path / "plain.gguf", n_head=2, n_head_kv=2)
    check_bit_exact(back, want, "float32")


def test_mlx_holds_one_rank_and_scale(tmp_path):
    mods, want = make("plain", [(8, 8)] * 4, [2, 2, 2, 2], 5.0, "float32", 1)
    reflora.save_mlx(tmp_path / "m", mods)
    import json
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 2 and cfg["lora_parameters"]["scale"] == 2.5  # the scale, not alpha
    del cfg["reflora"]  # mlx-lm's own reading: the scale alone
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(cfg))
    check_bit_exact(reflora.load_mlx(tmp_path / "m"), want, "float32")


def _strip_gguf_record(src, dst):
    """Copy a GGUF adapter without reflora's record KV (what another writer would produce)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r.fields["adapter.lora.alpha"].contents()))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("fmt", ["kohya", "gguf", "mlx"])
def test_without_record_rslora_reads_as_alpha_eff(fmt, tmp_path):
    """A reader that ignores reflora's record sees the same ΔW up to the format's storage of the scale.

    kohya: float64 alpha_eff with alpha_eff / R == s exactly when one exists, else one ulp off;
    mlx: s itself; GGUF: alpha_eff rounded to float32 (relative 2^-24 at most).
    """
    mods, want = make("rslora", [(8, 8)] * 4, [3, 3, 3, 3], 16.0, "float32", 2)
    p = tmp_path / f"x.{fmt}"
    reflora.save_any(p, mods, fmt, n_head=2, n_head_kv=2)
    if fmt == "kohya":
        import safetensors.numpy as stn
        t = stn.load_file(str(p))
        plain = tmp_path / "plain.safetensors"
        stn.save_file(t, str(plain))  # no metadata: no record
        back = reflora.load_kohya(plain)
        want = {reflora.io.kohya.kohya_name(m): v for m, v in want.items()}  # no record: kohya's names
    elif fmt == "gguf":
        _strip_gguf_record(p, tmp_path / "plain.gguf")
        back = reflora.load_gguf(tmp_path / "plain.gguf", n_head=2, n_head_kv=2)
    else:
        import json
        cfg = json.loads((p / "adapter_config.json").read_text())
        del cfg["reflora"]
        (p / "adapter_config.json").write_text(json.dumps(cfg))
        back = reflora.load_mlx(p)
    s = 16.0 / math.sqrt(3)
    for m, ad in back.items():
        assert not ad.config.use_rslora
        bound = 2.0**-24 if fmt == "gguf" else 2.0**-52  # float32 alpha; else at most one float64 ulp
        assert abs(ad.scale / s - 1) <= bound, (m, ad.scale, s)
        got = ad.scale * (np.asarray(ad.B, np.float64) @ np.asarray(ad.A, np.float64))
        assert np.max(np.abs(got - want[m])) <= 2 * bound * np.max(np.abs(want[m])), m
