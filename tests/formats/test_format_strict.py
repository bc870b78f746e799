"""Strict reading (malformed -> reflora.FormatError naming the file and the key) and clear refusals
of what a format cannot hold, for kohya, mlx-lm and GGUF."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reflora
from reflora import FormatError

gguf = pytest.importorskip("gguf")
from safetensors.numpy import save_file  # noqa: E402

rng = np.random.default_rng(0)


def _ad(R=2, I=8, O=8, alpha=4.0, dtype="float32", **kw):
    return reflora.LoraAdapter.from_arrays(rng.standard_normal((R, I)).astype(dtype),
                                           rng.standard_normal((O, R)).astype(dtype), alpha=alpha, **kw)


# ---------------------------------------------------------------- kohya

K = "lora_unet_down_blocks_0_proj_in"
GOOD = {f"{K}.lora_down.weight": np.ones((2, 8), np.float32), f"{K}.lora_up.weight": np.ones((4, 2), np.float32),
        f"{K}.alpha": np.array(2.0, np.float32)}


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update({f"{K}.dora_scale": np.ones((4, 1), np.float32)}), "dora_scale.*DoRA"),
    (lambda d: d.update({f"{K}.lora_mid.weight": np.ones((2, 2, 3, 3), np.float32)}), "LoCon"),
    (lambda d: d.update({"lora_unet_x.hada_w1_a": np.ones((2, 2), np.float32)}), "LoHa"),
    (lambda d: d.update({f"{K}.diff_b": np.ones((4,), np.float32)}), "diff"),
    (lambda d: d.update({"something.else": np.ones((4,), np.float32)}), "not a kohya LoRA tensor"),
    (lambda d: d.pop(f"{K}.lora_up.weight"), "no lora_up.weight"),
    (lambda d: d.update({f"{K}.alpha": np.ones((2,), np.float32)}), "alpha has shape"),
    (lambda d: d.update({f"{K}.alpha": np.array(0.0, np.float32)}), "alpha is 0"),
    (lambda d: d.update({f"{K}.alpha": np.array(np.inf, np.float32)}), "alpha is inf"),
    (lambda d: d.update({f"{K}.lora_down.weight": np.ones((2, 8, 1, 1), np.float32)}), "convolution"),
    (lambda d: d.update({f"{K}.lora_down.weight": np.ones((3, 8), np.float32)}), "one R"),
    (lambda d: d.update({f"{K}.lora_down.weight": np.ones((2, 8), np.float16)}), "dtypes"),
])
def test_malformed_kohya_files_are_format_errors(tmp_path, edit, match):
    d = dict(GOOD)
    edit(d)
    p = tmp_path / "k.safetensors"
    save_file(d, str(p))
    with pytest.raises(FormatError, match=match) as e:
        reflora.load_kohya(p)
    assert str(p) in str(e.value)


def test_kohya_without_alpha_is_alpha_rank(tmp_path):
    d = dict(GOOD)
    del d[f"{K}.alpha"]
    save_file(d, str(tmp_path / "k.safetensors"))
    (ad,) = reflora.load_kohya(tmp_path / "k.safetensors").values()
    assert ad.scale == 1.0  # sd-scripts and diffusers: no alpha means alpha = rank


def test_kohya_record_edits_are_refused(tmp_path):
    """A reflora-written file whose alpha was edited later disagrees with its record: refused."""
    p = tmp_path / "k.safetensors"
    reflora.save_kohya(p, {"unet.a.b": _ad()})
    tensors, meta = reflora.load_tensors(p, xp="numpy")
    tensors["lora_unet_a_b.alpha"] = np.array(3.0, np.float32)
    reflora.save_tensors(p, tensors, metadata=meta)
    with pytest.raises(FormatError, match="changed after reflora wrote it"):
        reflora.load_kohya(p)
    meta["reflora"] = "{not json"
    reflora.save_tensors(p, tensors, metadata=meta)
    with pytest.raises(FormatError, match="record is not valid JSON"):
        reflora.load_kohya(p)


def test_kohya_name_collisions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="both become kohya name"):
        reflora.save_kohya(tmp_path / "k.safetensors", {"unet.a.b_c": _ad(), "unet.a_b.c": _ad()})


# ---------------------------------------------------------------- refusals on write


@pytest.mark.parametrize("fmt", ["kohya", "mlx", "gguf", "seed"])
@pytest.mark.parametrize("extra", ["magnitude", "lora_bias"])
def test_dora_and_lora_bias_are_refused_outside_peft(tmp_path, fmt, extra):
    ad = _ad()
    setattr(ad, extra, np.ones(8, np.float32))
    what = "DoRA" if extra == "magnitude" else "lora_bias"
    with pytest.raises(ValueError, match=f"{what}.*cannot hold it"):
        reflora.save_any(tmp_path / f"x.{fmt}", {"model.layers.0.self_attn.v_proj": ad}, fmt)
    assert not (tmp_path / f"x.{fmt}").exists()  # nothing half-written


def test_convert_cli_refuses_dora_in_kohya(tmp_path, capsys):
    from reflora.cli import main

    ad = _ad()
    ad.magnitude = np.ones(8, np.float32)
    reflora.save_peft(tmp_path / "p", {"model.layers.0.self_attn.v_proj": ad})
    rc = main(["convert", str(tmp_path / "p"), str(tmp_path / "k.safetensors"), "--to", "kohya"])
    err = capsys.readouterr().err
    assert rc == 2 and "DoRA" in err and "kohya" in err, err
    assert not (tmp_path / "k.safetensors").exists()


def test_gguf_refuses_float64_unmapped_names_and_missing_heads(tmp_path):
    with pytest.raises(ValueError, match="float64"):
        reflora.save_gguf(tmp_path / "a.gguf", {"model.layers.0.mlp.up_proj": _ad(dtype="float64")})
    with pytest.raises(ValueError, match="no GGUF name"):
        reflora.save_gguf(tmp_path / "a.gguf", {"encoder.fc": _ad()})
    with pytest.raises(ValueError, match="needs n_head"):
        reflora.save_gguf(tmp_path / "a.gguf", {"model.layers.0.self_attn.q_proj": _ad()})
    with pytest.raises(ValueError, match="different alphas"):
        reflora.save_gguf(tmp_path / "a.gguf", {"model.layers.0.mlp.up_proj": _ad(alpha=4.0),
                                                "model.layers.0.mlp.down_proj": _ad(alpha=8.0)})


def test_mlx_refuses_several_ranks_or_scales(tmp_path):
    with pytest.raises(ValueError, match="different ranks"):
        reflora.save_mlx(tmp_path / "m", {"a.q": _ad(R=2), "a.k": _ad(R=3)})
    with pytest.raises(ValueError, match="different scales"):
        reflora.save_mlx(tmp_path / "m", {"a.q": _ad(alpha=2.0), "a.k": _ad(alpha=3.0)})


# ---------------------------------------------------------------- mlx


def _mlx_folder(tmp_path, cfg=None, tensors=None):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    if tensors is None:
        tensors = {"model.layers.0.self_attn.q_proj.lora_a": np.ones((8, 2), np.float32),
                   "model.layers.0.self_attn.q_proj.lora_b": np.ones((2, 4), np.float32)}
    save_file(tensors, str(d / "adapters.safetensors"))
    cfg = cfg if cfg is not None else {"fine_tune_type": "lora", "num_layers": 2,
                                       "lora_parameters": {"rank": 2, "scale": 20.0, "dropout": 0.0}}
    (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return d


@pytest.mark.parametrize("cfg, tensors, match", [
    ({"lora_parameters": {"rank": 2, "alpha": 16, "dropout": 0.0}}, None, "no 'scale'.*not alpha"),
    ({"fine_tune_type": "dora", "lora_parameters": {"rank": 2, "scale": 1.0}}, None, "fine_tune_type"),
    ({"lora_parameters": {"rank": "2", "scale": 1.0}}, None, "rank"),
    ({"lora_parameters": {"rank": 2, "scale": float("nan")}}, None, "scale"),
    ('{"lora_parameters": {"rank": 2, "scale": 1' + "0" * 400 + '}}', None, "scale"),
    ('{"lora_parameters": {"rank": 1' + "0" * 400 + ', "scale": 1.0}}', None, "rank"),
    ({"lora_parameters": {"rank": 0, "scale": 1.0}}, {"model.q.lora_a": np.ones((8, 0), np.float32),
                                                       "model.q.lora_b": np.ones((0, 4), np.float32)}, "rank"),
    ("{bad json", None, "not valid JSON"),
    (None, {"model.q.lora_a": np.ones((2, 8), np.float32), "model.q.lora_b": np.ones((4, 2), np.float32)},
     "PEFT layout that was not transposed"),
    (None, {"model.q.lora_a": np.ones((8, 2), np.float32)}, "only lora_a"),
    (None, {"model.q.m": np.ones((8,), np.float32)}, "DoRA"),
])
def test_malformed_mlx_folders_are_format_errors(tmp_path, cfg, tensors, match):
    d = _mlx_folder(tmp_path, cfg, tensors)
    with pytest.raises(FormatError, match=match):
        reflora.load_mlx(d)


def test_mlx_files_with_null_metadata_read(tmp_path):
    """mlx's save_safetensors writes "__metadata__": null; the reference reader takes it as no metadata."""
    import safetensors.numpy

    raw = b'{"__metadata__":null,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / "n.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + np.array([1.0, 2.0], "<f4").tobytes())
    ref = safetensors.numpy.load_file(str(p))
    tensors, meta = reflora.load_tensors(p, xp="numpy")
    assert meta == {} and np.array_equal(tensors["a"], ref["a"])


# ---------------------------------------------------------------- gguf


def _gguf_file(p, *, gtype="adapter", atype="lora", alpha=("f32", 8.0), tensors=None, arch="llama", record=None):
    w = gguf.GGUFWriter(str(p), arch)
    if gtype is not None:
        w.add_type(gtype)
    if atype is not None:
        w.add_string("adapter.type", atype)
    if alpha is not None:
        kind, v = alpha
        (w.add_float32 if kind == "f32" else w.add_uint32)("adapter.lora.alpha", v)
    if record is not None:
        w.add_string("reflora.record", record)
    tensors = tensors if tensors is not None else {"blk.0.ffn_up.weight.lora_a": np.ones((2, 8), np.float32),
                                                   "blk.0.ffn_up.weight.lora_b": np.ones((4, 2), np.float32)}
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


@pytest.mark.parametrize("kw, match", [
    (dict(gtype="model"), "general.type"),
    (dict(atype="lokr"), "adapter.type"),
    (dict(alpha=("u32", 8)), "FLOAT32"),
    (dict(tensors={"blk.0.ffn_up.weight.lora_a": np.ones((2, 8), np.float32)}), "missing one component"),
    (dict(tensors={"blk.0.ffn_up.weight.lora_a": np.ones((8, 2), np.float32),
                   "blk.0.ffn_up.weight.lora_b": np.ones((4, 2), np.float32)}), "not transposed"),
    (dict(tensors={"blk.0.attn_norm.weight": np.ones((8,), np.float32)}), "not a LoRA tensor"),
])
def test_malformed_gguf_files_are_format_errors(tmp_path, kw, match):
    p = _gguf_file(tmp_path / "a.gguf", **kw)
    with pytest.raises(FormatError, match=match) as e:
        reflora.load_gguf(p)
    assert str(p) in str(e.value)


def test_gguf_truncated_and_foreign_files_are_format_errors(tmp_path):
    p = _gguf_file(tmp_path / "a.gguf")
    data = p.read_bytes()
    for n in (3, 10, 40, len(data) // 2, len(data) - 4):
        q = tmp_path / f"t{n}.gguf"
        q.write_bytes(data[:n])
        with pytest.raises(FormatError):
            reflora.load_gguf(q)
    q = tmp_path / "x.gguf"
    q.write_bytes(b"not a gguf at all")
    with pytest.raises(FormatError, match="magic"):
        reflora.load_gguf(q)


def test_gguf_alpha_zero_or_absent_is_scale_one(tmp_path):
    """llama.cpp: get_kv_f32 gives 0 for a missing alpha, and alpha 0 means scale = adapter_scale (1)."""
    for alpha in (None, ("f32", 0.0)):
        p = _gguf_file(tmp_path / "a.gguf", alpha=alpha)
        (ad,) = reflora.load_gguf(p).values()
        assert ad.scale == 1.0


def test_gguf_llama_q_without_heads_asks_for_them(tmp_path):
    p = _gguf_file(tmp_path / "a.gguf", tensors={"blk.0.attn_q.weight.lora_a": np.ones((2, 8), np.float32),
                                                 "blk.0.attn_q.weight.lora_b": np.ones((8, 2), np.float32)})
    with pytest.raises(ValueError, match="pass n_head"):
        reflora.load_gguf(p)
    (ad,) = reflora.load_gguf(p, n_head=2).values()
    assert ad.B.shape == (8, 2)


@pytest.mark.parametrize("n_head", ["4", [2], True, 0, 2.5])
def test_gguf_record_with_malformed_head_counts_is_a_format_error(tmp_path, n_head):
    """A record whose n_head is not an int >= 1 is refused as FormatError (it used to raise TypeError)."""
    p = tmp_path / "a.gguf"
    reflora.save_gguf(p, {"model.layers.0.self_attn.q_proj": _ad(O=8)}, n_head=2)
    r = gguf.GGUFReader(str(p))
    rec = json.loads(r.fields["reflora.record"].contents())
    tensors = {t.name: np.array(t.data).reshape(tuple(int(d) for d in reversed([int(x) for x in t.shape])))
               for t in r.tensors}
    rec["n_head"] = n_head
    q = _gguf_file(tmp_path / "b.gguf", alpha=("f32", float(r.fields["adapter.lora.alpha"].contents())),
                   tensors=tensors, record=json.dumps(rec))
    with pytest.raises(FormatError, match="n_head"):
        reflora.load_gguf(q)
    rec["n_head"] = 2
    q = _gguf_file(tmp_path / "c.gguf", alpha=("f32", float(r.fields["adapter.lora.alpha"].contents())),
                   tensors=tensors, record=json.dumps(rec))
    assert list(reflora.load_gguf(q)) == ["model.layers.0.self_attn.q_proj"]


def test_gguf_record_naming_one_module_twice_is_a_format_error(tmp_path):
    """Two pairs whose record entries name one module: refused (the second used to replace the first silently)."""
    p = tmp_path / "a.gguf"
    reflora.save_gguf(p, {"model.layers.0.mlp.up_proj": _ad(), "model.layers.0.mlp.down_proj": _ad()})
    r = gguf.GGUFReader(str(p))
    rec = json.loads(r.fields["reflora.record"].contents())
    rec["modules"]["blk.0.ffn_down"]["module"] = "model.layers.0.mlp.up_proj"
    tensors = {t.name: np.array(t.data).reshape(tuple(int(d) for d in reversed([int(x) for x in t.shape])))
               for t in r.tensors}
    q = _gguf_file(tmp_path / "b.gguf", alpha=("f32", float(r.fields["adapter.lora.alpha"].contents())),
                   tensors=tensors, record=json.dumps(rec))
    with pytest.raises(FormatError, match="two tensor pairs map to module"):
        reflora.load_gguf(q)


def test_gguf_other_architectures_keep_gguf_names(tmp_path):
    p = _gguf_file(tmp_path / "a.gguf", arch="gemma2")
    assert list(reflora.load_gguf(p)) == ["blk.0.ffn_up"]


# ---------------------------------------------------------------- detection


def test_detect_format(tmp_path):
    mods = {"model.layers.0.mlp.up_proj": _ad()}
    for fmt, name in (("kohya", "k.safetensors"), ("mlx", "m"), ("gguf", "a.gguf"), ("peft", "p")):
        reflora.save_any(tmp_path / name, mods, fmt)
        assert reflora.detect_format(tmp_path / name) == fmt
    reflora.save_any(tmp_path / "s.safetensors", mods, "seed")
    assert reflora.detect_format(tmp_path / "s.safetensors") == "file"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="PEFT or mlx-lm"):
        reflora.detect_format(tmp_path / "empty")


def test_gguf_bfloat16_round_trip_and_as_the_converter_writes_it(tmp_path):
    """bf16 tensors: gguf.quants' BF16 bytes (what convert_lora_to_gguf --outtype bf16 writes) read as
    ml_dtypes.bfloat16 with the same bits; reflora's own bf16 file reloads bit for bit."""
    import ml_dtypes

    x = rng.standard_normal((2, 8)).astype(np.float32)
    y = rng.standard_normal((4, 2)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    for n, a in (("blk.0.ffn_up.weight.lora_a", x), ("blk.0.ffn_up.weight.lora_b", y)):
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16)
        w.add_tensor(n, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (ad,) = reflora.load_gguf(tmp_path / "c.gguf").values()
    assert ad.A.dtype == ml_dtypes.bfloat16
    assert np.array_equal(np.asarray(ad.A).view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(np.asarray(ad.B).view(np.uint16), y.astype(ml_dtypes.bfloat16).view(np.uint16))
    reflora.save_gguf(tmp_path / "r.gguf", {"model.layers.0.mlp.up_proj": ad})
    (back,) = reflora.load_gguf(tmp_path / "r.gguf").values()
    assert np.array_equal(np.asarray(back.A).view(np.uint16), np.asarray(ad.A).view(np.uint16))
    assert np.array_equal(reflora.delta_weight(back), reflora.delta_weight(ad))


@settings(max_examples=60)
@given(data=st.data())
def test_corrupted_gguf_gives_format_error_or_reads(tmp_path_factory, data):
    """Any byte of a reflora GGUF changed: the reader either returns adapters or raises FormatError
    (or ValueError asking for head counts), never another exception from the gguf package."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "a.gguf"
    reflora.save_gguf(p, {"model.layers.0.mlp.up_proj": _ad()})
    raw = bytearray(p.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p.write_bytes(bytes(raw))
    try:
        reflora.load_gguf(p)
    except FormatError as e:
        assert str(p) in str(e)
    except ValueError as e:  # a corrupted name can become Llama's attn_q / attn_k: reflora asks for head counts
        assert "pass n_head" in str(e), e


def test_kohya_dtype_applies_to_factors_not_alpha(tmp_path):
    """dtype= converts A and B; the scalar alpha keeps its stored value (a float16 alpha 0.1 would round)."""
    p = tmp_path / "k.safetensors"
    reflora.save_kohya(p, {"unet.a": _ad(alpha=0.1)})
    (ad,) = reflora.load_kohya(p, dtype="float64").values()
    assert ad.A.dtype == np.float64 and ad.config.alpha == 0.1
    (ad16,) = reflora.load_kohya(p, dtype="float16").values()
    assert ad16.A.dtype == np.float16 and ad16.config.alpha == 0.1
