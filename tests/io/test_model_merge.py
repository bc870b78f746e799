"""``reflora merge BASE ADAPTER OUT`` on tiny models, against PEFT's merge_and_unload.

Models are a few torch Linear layers named like a transformer's; adapters are
written by PEFT's own save_pretrained. Oracles: PEFT's merge (float32/float64:
to the dtype's rounding), an exact float64 merge for bfloat16 (each element
within half an ulp), the safetensors package as the reader of the output, and
tracemalloc for the peak memory.
"""

from __future__ import annotations

import importlib
import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402

import reflora  # noqa: E402
import reflora.io.model_merge as cm  # noqa: E402
from reflora.cli import main  # noqa: E402
from reflora.io.safetensors import save_tensors  # noqa: E402

from helpers import assert_close  # noqa: E402

rm = importlib.import_module("reflora.numerics.merge")

BF16 = np.dtype(ml_dtypes.bfloat16)


class Block(nn.Module):
    def __init__(self, d, h, bias):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)


class Inner(nn.Module):
    def __init__(self, d, h, n, bias):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layers = nn.ModuleList([Block(d, h, bias) for _ in range(n)])


class Tiny(nn.Module):
    def __init__(self, d=12, h=20, n=2, bias=True):
        super().__init__()
        self.model = Inner(d, h, n, bias)
        self.lm_head = nn.Linear(d, 10, bias=False)


def _np(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def make_case(tmp_path, *, dtype=torch.float32, bias=True, shards=1, seed=0, **lora_kwargs):
    """A base checkpoint (single file or sharded), a PEFT adapter folder, and PEFT's merged state dict."""
    torch.manual_seed(seed)
    model = Tiny(bias=bias).to(dtype)
    base_sd = {k: _np(v).copy() for k, v in model.state_dict().items()}
    base = tmp_path / "base"
    base.mkdir()
    names = sorted(base_sd)
    if shards == 1:
        save_tensors(base / "model.safetensors", base_sd, metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_tensors(base / fname, {n: base_sd[n] for n in part}, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(a.nbytes for a in base_sd.values())
        (base / cm.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], **lora_kwargs)
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.05)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    lora = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            lora[name.replace("base_model.model.", "")] = (
                _np(mod.lora_A["default"].weight).astype(np.float64), _np(mod.lora_B["default"].weight).astype(np.float64),
                mod.scaling["default"])
    merged = {k: _np(v).copy() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, adapter, base_sd, merged, lora


def read_all(path):
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_single_file_float32_matches_peft(tmp_path):
    base, adapter, base_sd, merged, _ = make_case(tmp_path, r=4, lora_alpha=8, use_rslora=True,
                                                  rank_pattern={"up_proj": 2}, alpha_pattern={"down_proj": 3})
    out = tmp_path / "merged.safetensors"
    s = cm.merge_model(base, adapter, out, progress=False)
    assert s["modules"] == 8 and s["tensors merged"] == 8
    got = read_all(out)  # the safetensors package reads it
    assert set(got) == set(merged)
    for k, v in merged.items():
        if k.endswith("_proj.weight"):
            assert_close(got[k], v, name=k, rel=2e-7)
        else:  # untouched tensors are copied bit for bit
            np.testing.assert_array_equal(got[k], base_sd[k])
    assert not np.array_equal(got["model.layers.0.q_proj.weight"], base_sd["model.layers.0.q_proj.weight"])


def test_sharded_bfloat16_is_within_half_an_ulp(tmp_path):
    base, adapter, base_sd, merged, lora = make_case(tmp_path, dtype=torch.bfloat16, shards=3, r=8, lora_alpha=16)
    out = tmp_path / "out"
    cm.merge_model(base / cm.INDEX_NAME, adapter, out, progress=False)
    index = json.loads((out / cm.INDEX_NAME).read_text())
    assert index == json.loads((base / cm.INDEX_NAME).read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = read_all(out / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(part)
        got.update(part)
    worse_than_peft = 0
    for module, (A, B, s) in lora.items():
        k = module + ".weight"
        exact = base_sd[k].astype(np.float64) + s * (B @ A)
        g = got[k].astype(np.float64)
        half_ulp = 2.0 ** (np.floor(np.log2(np.abs(g), where=g != 0, out=np.zeros_like(g))) - 8)
        assert np.all(np.abs(g - exact) <= half_ulp * (1 + 1e-9)), k
        worse_than_peft += int(np.sum(np.abs(g - exact) > np.abs(merged[k].astype(np.float64) - exact)))
    assert worse_than_peft == 0
    for k in base_sd:
        if not k.endswith("_proj.weight"):
            np.testing.assert_array_equal(got[k].view(np.uint16), base_sd[k].view(np.uint16))


@pytest.mark.filterwarnings("ignore:.*invalid shape.*")
@pytest.mark.parametrize("kind", ["lora_bias", "dora"])
def test_lora_bias_and_dora_match_peft(tmp_path, kind):
    kw = {"lora_bias": True} if kind == "lora_bias" else {"use_dora": True}
    base, adapter, base_sd, merged, _ = make_case(tmp_path, dtype=torch.float64, r=4, lora_alpha=6, **kw)
    out = tmp_path / "m.safetensors"
    main(["merge", str(base), str(adapter), str(out), "--quiet"])
    got = read_all(out)
    for k, v in merged.items():
        assert_close(got[k], v, name=k, rel=1e-13)
    changed = [k for k in merged if not np.array_equal(got[k], base_sd[k])]
    if kind == "lora_bias":
        assert any(k.endswith("_proj.bias") for k in changed)
    else:
        assert not any(k.endswith(".bias") for k in changed)


def _no_stray_files(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_errors_come_before_anything_is_written(tmp_path, capsys):
    base, adapter, base_sd, _, _ = make_case(tmp_path, r=2, lora_alpha=2)
    # a base without one targeted tensor, and with another of the wrong shape
    sd = dict(base_sd)
    del sd["model.layers.1.v_proj.weight"]
    sd["model.layers.0.up_proj.weight"] = np.zeros((20, 13), np.float32)
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, sd)
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError) as exc:
        cm.merge_model(bad, adapter, out, progress=False)
    msg = str(exc.value)
    assert "nothing was written" in msg and "'model.layers.1.v_proj' has no base tensor" in msg
    assert "model.layers.0.up_proj.weight has shape [20, 13]; expected (O, I) = [20, 12]" in msg
    assert not out.exists() and _no_stray_files(tmp_path) == []
    # the CLI reports it and exits 2
    assert main(["merge", str(bad), str(adapter), str(out), "--quiet"]) == 2
    assert "no base tensor" in capsys.readouterr().err
    # lora_bias needs a base bias
    (tmp_path / "nb").mkdir()
    base2, adapter2, _, _, _ = make_case(tmp_path / "nb", bias=False, r=2, lora_alpha=2)
    with open(adapter2 / "adapter_config.json") as f:
        cfg = json.load(f)
    cfg["lora_bias"] = True
    with open(adapter2 / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    # (the config now says lora_bias but the file has no lora_B.bias: a FormatError, also before writing)
    with pytest.raises(reflora.FormatError, match="lacks lora_B.bias"):
        cm.merge_model(base2, adapter2, out, progress=False)
    assert not out.exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    base, adapter, _, _, _ = make_case(tmp_path, shards=2, r=2, lora_alpha=2)
    calls = []

    def boom(arr, job, what):
        calls.append(job.module)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return arr

    monkeypatch.setattr(cm, "_merged_tensor", boom)
    with pytest.raises(OSError, match="simulated"):
        cm.merge_model(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _no_stray_files(tmp_path) == []
    # a single-file output: an existing file is left as it was
    (tmp_path / "s").mkdir()
    one, adapter1, _, _, _ = make_case(tmp_path / "s", r=2, lora_alpha=2)
    target = tmp_path / "one.safetensors"
    target.write_bytes(b"old")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        cm.merge_model(one, adapter1, target, overwrite=True, progress=False)
    assert target.read_bytes() == b"old" and _no_stray_files(tmp_path) == []


def test_peak_memory_is_about_two_of_the_largest_tensors(tmp_path):
    """Four 4 MiB bf16 weights (2M elements), all targeted: the peak stays near 2 x 4 MiB.

    The merge's float64 row blocks (64 KiB) add a fixed overhead of a handful of blocks.
    """
    block = max(rm._BLOCK_BYTES, 8 * 1448)
    O = I = 1448
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.q_proj" for i in range(4)]
    save_tensors(tmp_path / "model.safetensors",
                 {n + ".weight": (rng.standard_normal((O, I)) * 0.02).astype(BF16) for n in names})
    ad = tmp_path / "ad"
    ad.mkdir()
    tensors = {}
    for n in names:
        tensors[f"base_model.model.{n}.lora_A.weight"] = rng.standard_normal((4, I)).astype(np.float32)
        tensors[f"base_model.model.{n}.lora_B.weight"] = rng.standard_normal((O, 4)).astype(np.float32) * 0.01
    save_tensors(ad / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    largest = O * I * 2
    adapter_bytes = sum(a.nbytes for a in tensors.values())
    # warm up first: lazily imported modules would count as allocations of the traced call
    cm.merge_model(tmp_path, ad, tmp_path / "warm.safetensors", progress=False)
    tracemalloc.start()
    try:
        cm.merge_model(tmp_path, ad, tmp_path / "out.safetensors", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    over = peak - adapter_bytes
    # measured: about 2.6 x 4 MiB beyond the adapter's own arrays
    assert over <= 2 * largest + 16 * block, f"peak {peak / 2**20:.1f} MiB beyond the adapter's"
    assert over >= 2 * largest  # input and output of one tensor really are held together


def test_command_line_runs_without_torch_and_shows_progress(tmp_path):
    import subprocess
    import sys

    base, adapter, _, merged, _ = make_case(tmp_path, r=2, lora_alpha=4)
    out = tmp_path / "cli.safetensors"
    code = ("import sys; from reflora.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "merge", str(base), str(adapter), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "merged 8 adapter modules (8 tensors;" in r.stdout
    assert "/" in r.stderr and "merged model.layers" in r.stderr  # the progress bar, on stderr
    got = read_all(out)
    for k, v in merged.items():
        assert_close(got[k], v, name=k, rel=2e-7)
    # an existing output is refused without --overwrite, before anything is written
    r = subprocess.run([sys.executable, "-m", "reflora.cli", "merge", str(base), str(adapter), str(out), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists" in r.stderr


def test_sharded_output_never_replaces_the_base_or_foreign_files(tmp_path):
    base, adapter, *_ = make_case(tmp_path, dtype=torch.bfloat16, shards=2, r=4, lora_alpha=8)
    (base / "config.json").write_text("{}")
    before = sorted(os.listdir(base))
    for out in (base, tmp_path):  # the base folder itself, and a folder that contains it
        with pytest.raises(ValueError, match="is or contains the base model's folder"):
            cm.merge_model(base / cm.INDEX_NAME, adapter, out, overwrite=True, progress=False)
    assert sorted(os.listdir(base)) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        cm.merge_model(base / cm.INDEX_NAME, adapter, other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "merged"
    cm.merge_model(base / cm.INDEX_NAME, adapter, out, progress=False)
    cm.merge_model(base / cm.INDEX_NAME, adapter, out, overwrite=True, progress=False)  # a previous output: fine
    assert (out / cm.INDEX_NAME).exists()
