"""``reflora merge`` output loads in transformers and gives the logits of PEFT's merged model.

A tiny Llama is built from a config (no download), saved by transformers
itself (single file, or sharded with an index), with a tokenizer file beside
it; PEFT writes the adapter (init_lora_weights=False, so B != 0): plain LoRA,
rsLoRA and DoRA, in float32 and bfloat16. Checks, for each of the 12 cases:

1. the output folder holds the weights and every non-weight file of the base
   folder, unchanged; ``LlamaForCausalLM.from_pretrained(OUT)`` loads it with
   no missing, unexpected or re-initialised weights, and its weights are the
   bytes reflora wrote;
2. PEFT's merged model with its merged weights replaced by reflora's gives
   exactly the logits of the loaded model (same architecture and config);
3. the logits of the loaded model against PEFT's ``merge_and_unload()``
   model: exactly equal where every merged weight agrees bit for bit;
   otherwise within ``LOGIT_BOUND`` x max|logits| -- the merged weights
   differ by at most a unit in the last place where PEFT's two roundings
   (delta = s B A rounded, then W + delta rounded) miss the correctly rounded
   value, and the bound allows that perturbation through two layers. The
   figures (elements that differ, max logit difference) are printed (-s).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import reflora.io.model_merge as mm  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: max |logits(reflora) - logits(PEFT)| / max |logits| when merged weights differ (see the module docstring)
LOGIT_BOUND = {torch.float32: 2.0 ** -16, torch.bfloat16: 2.0 ** -5}


def tiny_llama(dtype):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("kind", ["plain", "rslora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_merged_folder_loads_in_transformers_with_peft_logits(tmp_path, kind, dtype, sharded):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    model = tiny_llama(dtype)
    model.save_pretrained(base, max_shard_size="40KB" if sharded else "1GB")
    (base / "tokenizer.json").write_text(json.dumps({"model": {"type": "tiny"}}))  # stands for the tokenizer files
    assert (base / mm.INDEX_NAME).exists() == sharded
    kw = {"use_rslora": kind == "rslora", "use_dora": kind == "dora"}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)
    # PEFT's side loads the base as a user would (from_pretrained keeps e.g. rotary buffers in float32)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype), cfg)
    pm.save_pretrained(adapter)
    peft_merged = pm.merge_and_unload().eval()

    s = mm.merge_model(base, adapter, str(out) + "/", progress=False)  # a trailing slash names the folder

    # 1. the folder: weights + the base's other files, unchanged
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in base.iterdir()), names
    for p in base.iterdir():
        if not p.name.endswith(".safetensors"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert s["outputs"] == sorted(s["outputs"]) and s["note"] == ""
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    loaded.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(f))
    sd = loaded.state_dict()
    assert set(written) == set(sd)
    for k, v in written.items():
        assert torch.equal(sd[k], v), k

    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    peft_sd = {k: v.detach().clone() for k, v in peft_merged.state_dict().items()}
    with torch.no_grad():
        got = loaded(ids).logits
        want = peft_merged(ids).logits
        # 2. same architecture: PEFT's merged model with reflora's weights gives exactly these logits
        swapped = peft_merged.state_dict()
        for k in swapped:
            swapped[k] = written[k]
        peft_merged.load_state_dict(swapped)
        assert torch.equal(peft_merged(ids).logits, got)
    # 3. against PEFT's own merge
    differ = sum(int((written[k] != v).sum()) for k, v in peft_sd.items() if k in written)
    total = sum(v.numel() for k, v in written.items() if any(t in k for t in TARGETS))
    base_sd = {}
    for f in base.glob("*.safetensors"):
        base_sd.update(load_file(f))
    moved = sum(int((written[k] != base_sd[k]).sum()) for k in written)
    assert moved > total // 2, f"the adapter moved only {moved} of {total} elements: too weak a test"
    gap = float((got.float() - want.float()).abs().max())
    scale = float(want.float().abs().max())
    print(f"\n{kind} {dtype} {'sharded' if sharded else 'single'}: {differ} of {total} merged weight elements "
          f"differ from PEFT's ({moved} moved by the merge); max |logits diff| {gap:.3g} (max |logits| {scale:.3g})")
    if differ == 0:
        assert gap == 0.0
    else:
        assert gap <= LOGIT_BOUND[dtype] * scale, (gap, scale)


def test_single_file_base_says_only_weights_were_written(tmp_path, capsys):
    from reflora.cli import main

    model = tiny_llama(torch.float32)
    model.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "base" / "model.safetensors"), str(tmp_path / "adapter"), str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "only the weights were written" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    # the folder form of the same base copies config.json and generation_config.json too, listed sorted
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(out), "--quiet",
                 "--overwrite"]) == 0
    printed = capsys.readouterr().out
    listed = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert listed == sorted(listed) and [p.rsplit("/", 1)[-1] for p in listed] == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert "only the weights" not in printed
