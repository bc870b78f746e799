"""The golden cases for converters in other languages: the files are right (checked against the
raw arrays and the peers), a correct converter passes, and converters with the known bugs fail
with the cause named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.numpy as stn

import reflora
from reflora.testing.format_golden import FORMAT_CASES, FORMAT_MANIFEST, check_converted, write_format_cases

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    write_format_cases(d)
    return d


def test_manifest_and_expected_delta_from_the_raw_peft_files(cases):
    """expected_delta.safetensors is s (B A) of the PEFT input, recomputed from its raw tensors and config."""
    manifest = json.loads((cases / FORMAT_MANIFEST).read_text())
    assert sorted(manifest["cases"]) == sorted(FORMAT_CASES)
    for case, entry in manifest["cases"].items():
        if entry["use_dora"]:
            assert all("refuse" in v for f, v in entry["formats"].items() if f != "peft")
            continue
        raw = stn.load_file(str(cases / case / "peft" / "adapter_model.safetensors"))
        cfg = json.loads((cases / case / "peft" / "adapter_config.json").read_text())
        want = stn.load_file(str(cases / case / "expected_delta.safetensors"))
        for m, info in entry["modules"].items():
            A = raw[f"base_model.model.{m}.lora_A.weight"].astype(np.float64)
            B = raw[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
            R, alpha = A.shape[0], info["alpha"]
            assert R == info["R"] and want[m].dtype == np.float64
            s = alpha / (math.sqrt(R) if cfg["use_rslora"] else R)
            assert np.array_equal(want[m], s * (B @ A)), (case, m)


def test_every_reference_file_holds_the_expected_delta(cases):
    manifest = json.loads((cases / FORMAT_MANIFEST).read_text())
    checked = 0
    for case, entry in manifest["cases"].items():
        if "expected_delta" not in entry:
            continue
        for fmt, v in entry["formats"].items():
            if "path" in v:
                d = check_converted(cases / case, cases / case / v["path"], fmt)
                assert d.ok and all(m.status == "identical" for m in d.modules), (case, fmt, d.format())
                checked += 1
    assert checked == 3 * 5 + 4 + 3 + 3  # plain, rslora, float16 in 5 formats; then 4, 3 and 3 formats
    # refusals: mlx for several ranks or scales, GGUF for several alphas, everything but PEFT for DoRA
    f = {c: {k for k, v in e["formats"].items() if "refuse" in v} for c, e in manifest["cases"].items()}
    assert f["rank_pattern"] == {"mlx"} and f["alpha_pattern"] == {"mlx", "gguf"}
    assert f["rslora_rank_pattern"] == {"mlx", "gguf"} and f["dora"] == {"seed", "kohya", "mlx", "gguf"}


def test_golden_gguf_raw_tensors_follow_llama_cpp(cases):
    """Raw gguf reader: lora_a = A, lora_b = permuted B for q (4 heads) and k (2 kv heads), alpha float32."""
    raw = stn.load_file(str(cases / "plain" / "peft" / "adapter_model.safetensors"))
    r = gguf.GGUFReader(str(cases / "plain" / "llama.gguf"))
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert float(r.fields["adapter.lora.alpha"].contents()) == 8.0
    for m, base, heads in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q", 4),
                           ("model.layers.0.self_attn.k_proj", "blk.0.attn_k", 2),
                           ("model.layers.1.mlp.down_proj", "blk.1.ffn_down", None)):
        A, B = raw[f"base_model.model.{m}.lora_A.weight"], raw[f"base_model.model.{m}.lora_B.weight"]
        if heads:  # convert_hf_to_gguf's permute, written out here independently
            B = B.reshape(heads, 2, B.shape[0] // heads // 2, B.shape[1]).swapaxes(1, 2).reshape(B.shape)
        assert np.array_equal(t[base + ".weight.lora_a"], A) and np.array_equal(t[base + ".weight.lora_b"], B)


def test_golden_mlx_folder_loads_in_mlx_lm(cases):
    pytest.importorskip("mlx.core")
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import load_adapters

    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=2,
                                        intermediate_size=24, num_attention_heads=4, rms_norm_eps=1e-5,
                                        vocab_size=32, num_key_value_heads=2))
    model.freeze()
    load_adapters(model, str(cases / "rslora" / "mlx"))
    want = stn.load_file(str(cases / "rslora" / "expected_delta.safetensors"))
    q = model.model.layers[0].self_attn.q_proj
    a, b = np.array(q.lora_a).astype(np.float64), np.array(q.lora_b).astype(np.float64)
    assert np.array_equal(q.scale * (b.T @ a.T), want["model.layers.0.self_attn.q_proj"])


# ---------------------------------------------------------------- converters with the known bugs


def _write_gguf(path, alpha, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for k, v in tensors.items():
        w.add_tensor(k, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _peft(cases, case):
    raw = stn.load_file(str(cases / case / "peft" / "adapter_model.safetensors"))
    cfg = json.loads((cases / case / "peft" / "adapter_config.json").read_text())
    mods = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (v, raw[k.replace("lora_A", "lora_B")])
            for k, v in raw.items() if k.endswith("lora_A.weight")}
    return mods, cfg


def _naive_gguf(cases, case, out, *, permute=True, alpha=None):
    mods, cfg = _peft(cases, case)
    names = {"self_attn.q_proj": ("attn_q", 4), "self_attn.k_proj": ("attn_k", 2), "mlp.down_proj": ("ffn_down", None)}
    t = {}
    for m, (A, B) in mods.items():
        n = m.split(".")[2]
        base, heads = names[m.split(".", 3)[3]]
        if heads and permute:
            B = B.reshape(heads, 2, B.shape[0] // heads // 2, B.shape[1]).swapaxes(1, 2).reshape(B.shape)
        t[f"blk.{n}.{base}.weight.lora_a"], t[f"blk.{n}.{base}.weight.lora_b"] = A, B
    _write_gguf(out, cfg["lora_alpha"] if alpha is None else alpha, t)


def test_gguf_converter_ignoring_rslora_fails_naming_it(cases, tmp_path):
    _naive_gguf(cases, "rslora", tmp_path / "x.gguf")  # llama.cpp's converter: lora_alpha as is
    d = check_converted(cases / "rslora", tmp_path / "x.gguf", "gguf")
    assert not d.ok and all("rsLoRA mix-up" in m.verdict for m in d.modules), d.format()


def test_gguf_converter_forgetting_the_permutation_fails_naming_it(cases, tmp_path):
    _naive_gguf(cases, "plain", tmp_path / "x.gguf", permute=False)
    d = check_converted(cases / "plain", tmp_path / "x.gguf", "gguf")
    by = {m.module: m for m in d.modules}
    assert "rows permuted" in by["model.layers.0.self_attn.q_proj"].verdict, d.format()
    assert "rows permuted" in by["model.layers.0.self_attn.k_proj"].verdict, d.format()
    assert by["model.layers.1.mlp.down_proj"].status == "identical"


def test_correct_independent_gguf_converter_passes(cases, tmp_path):
    _naive_gguf(cases, "plain", tmp_path / "x.gguf")
    assert check_converted(cases / "plain", tmp_path / "x.gguf", "gguf").ok


def test_mlx_converter_writing_alpha_as_scale_fails_naming_it(cases, tmp_path):
    mods, cfg = _peft(cases, "plain")
    out = tmp_path / "m"
    out.mkdir()
    stn.save_file({f"{m}.lora_{h}": x.T.copy() for m, (A, B) in mods.items() for h, x in (("a", A), ("b", B))},
                  str(out / "adapters.safetensors"))
    lp = {"rank": cfg["r"], "scale": cfg["lora_alpha"], "dropout": 0.0}  # mlx-lm #1119: alpha is not the scale
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": -1,
                                                         "lora_parameters": lp}))
    d = check_converted(cases / "plain", out, "mlx")
    assert not d.ok and all("alpha vs scale" in m.verdict for m in d.modules), d.format()


def test_mlx_converter_not_transposing_is_refused(cases, tmp_path):
    mods, cfg = _peft(cases, "plain")
    out = tmp_path / "m"
    out.mkdir()
    stn.save_file({f"{m}.lora_{h}": x for m, (A, B) in mods.items() for h, x in (("a", A), ("b", B))},
                  str(out / "adapters.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 2.0,
                                                                             "dropout": 0.0}}))
    with pytest.raises(reflora.FormatError, match="not transposed"):
        check_converted(cases / "plain", out, "mlx")


def test_kohya_converter_dropping_alpha_and_a_module_fails_naming_both(cases, tmp_path):
    mods, _ = _peft(cases, "plain")
    sd = {}
    for m, (A, B) in list(mods.items())[:2]:  # drops the last module, and every .alpha
        k = "lora_unet_" + m.replace(".", "_")
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = A, B
    stn.save_file(sd, str(tmp_path / "k.safetensors"))
    d = check_converted(cases / "plain", tmp_path / "k.safetensors", "kohya")
    st = {m.other or m.module: m for m in d.modules}
    assert st["model.layers.1.mlp.down_proj"].status == "missing"
    assert sum("applies no scale" in m.verdict for m in d.modules) == 2, d.format()


# ---------------------------------------------------------------- a converter in another language


JS = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "examples" / "convert_lora.mjs"


def _node(script, case_dir, out, to):
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js (CI has it: docs/kit.md and docs/formats/diff.md run it too)")
    return subprocess.run([node, str(script), str(case_dir / "peft"), str(out), "--to", to],
                          capture_output=True, text=True)


@pytest.mark.parametrize("to", ["mlx", "kohya"])
def test_javascript_converter_passes_every_case(cases, tmp_path, to):
    manifest = json.loads((cases / FORMAT_MANIFEST).read_text())
    for case, entry in manifest["cases"].items():
        out = tmp_path / f"{case}.{to}"
        run = _node(JS, cases / case, out, to)
        assert (run.returncode != 0) == ("refuse" in entry["formats"][to]), (case, run.stderr)
        if run.returncode == 0:
            d = check_converted(cases / case, out, to)
            assert d.ok and {m.status for m in d.modules} == {"identical"}, (case, d.format())


#: planted bugs: (what the line becomes, ...), the target format, what the verdict must say
BUGS = {
    "mlx scale = alpha": ([("scale: modules[0].scale,", "scale: modules[0].alpha,")], "mlx", "alpha vs scale"),
    "mlx not transposed": ([("transpose(m.A)", "m.A"), ("transpose(m.B)", "m.B")], "mlx", "not transposed"),
    "kohya alpha = lora_alpha": ([("const alpha = m.scale * m.R;", "const alpha = m.alpha;"),
                                  ("if (alpha / m.R !== m.scale)", "if (false)")], "kohya", "rsLoRA mix-up"),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_javascript_converter_with_a_planted_bug_fails_naming_it(cases, tmp_path, bug):
    edits, to, expect = BUGS[bug]
    text = JS.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    mutant = tmp_path / "mutant.mjs"
    mutant.write_text(text)
    case = "rslora" if to == "kohya" else "plain"
    out = tmp_path / f"out.{to}"
    run = _node(mutant, cases / case, out, to)
    assert run.returncode == 0, run.stderr
    try:
        d = check_converted(cases / case, out, to)
    except reflora.FormatError as e:
        assert expect in str(e), e
        return
    assert not d.ok and all(expect in m.verdict for m in d.modules), d.format()
