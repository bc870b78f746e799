"""``reflora merge`` against PEFT's merge_and_unload + save, side by side, in one run.

    python benchmarks/bench_merge.py            # the 2 GiB case (about 6.2 GiB of temporary disk)
    python benchmarks/bench_merge.py --gib 0.1  # a quick smoke run

Builds a synthetic Llama-shaped bf16 base (hidden 2048, MLP 5632, vocab 32000,
as many layers as fit in --gib), sharded in about 500 MB files with a
model.safetensors.index.json, and a rank-16 PEFT adapter (float32, alpha 32)
on every linear (q, k, v, o, gate, up, down). Then, each in its own process
under /usr/bin/time -v:

  reflora   python -m reflora.cli merge BASE ADAPTER OUT --quiet
  peft      load the base into torch (bf16), PeftModel.from_pretrained,
            merge_and_unload(), save the same shards with safetensors.torch

and prints wall time and peak resident memory for both, their ratios, and how
the two merged layer-0 q_proj weights compare with the exact W + s B A. All
temporary files live under one folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from reflora.io.safetensors import load_tensors, save_tensors  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
D, F, V = 2048, 5632, 32000
LINEARS = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D),
           "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
RANK, ALPHA = 16, 32

PEFT_SCRIPT = r"""
import json, os, sys, torch
from torch import nn
from safetensors.torch import load_file, save_file
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
index = json.load(open(os.path.join(base, "model.safetensors.index.json")))
shards = sorted(set(index["weight_map"].values()))

class Holder(nn.Module):
    pass

def build(sd):
    root = Holder()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        mod = root
        for i, part in enumerate(path):
            if not hasattr(mod, part):
                is_linear = leaf == "weight" and t.ndim == 2 and i == len(path) - 1 and part.endswith("_proj")
                child = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta") if is_linear else Holder()
                mod.add_module(part, child)
            mod = getattr(mod, part)
        if not isinstance(mod, nn.Linear):
            mod.register_parameter(leaf, nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False))
    root.load_state_dict(sd, assign=True)
    return root

sd = {}
for s in shards:
    sd.update(load_file(os.path.join(base, s)))
model = build(sd)
del sd
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged = model.state_dict()
os.makedirs(out, exist_ok=True)
for s in shards:
    save_file({k: merged[k].contiguous() for k, v in index["weight_map"].items() if v == s},
              os.path.join(out, s), metadata={"format": "pt"})
json.dump(index, open(os.path.join(out, "model.safetensors.index.json"), "w"))
"""


def make_base(folder: str, gib: float, seed: int) -> tuple[int, int]:
    """Write the sharded bf16 base; returns (layers, bytes)."""
    rng = np.random.default_rng(seed)
    per_layer = sum(o * i for o, i in LINEARS.values()) * 2 + 2 * D * 2
    fixed = (2 * V * D + D) * 2
    layers = max(1, int((gib * 2**30 - fixed) // per_layer))
    names: list[tuple[str, tuple[int, ...], float]] = [("model.embed_tokens.weight", (V, D), 0.02)]
    for layer in range(layers):
        for mod, shape in LINEARS.items():
            names.append((f"model.layers.{layer}.{mod}.weight", shape, 0.02))
        names += [(f"model.layers.{layer}.input_layernorm.weight", (D,), 0.0),
                  (f"model.layers.{layer}.post_attention_layernorm.weight", (D,), 0.0)]
    names += [("model.norm.weight", (D,), 0.0), ("lm_head.weight", (V, D), 0.02)]
    shards: list[list] = [[]]
    size = 0
    for name, shape, std in names:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > 500e6:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, std))
        size += nbytes
    weight_map, total = {}, 0
    for k, part in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, std in part:
            if std == 0.0:
                tensors[name] = np.ones(shape, BF16)
            else:
                tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(BF16)
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_tensors(os.path.join(folder, fname), tensors, metadata={"format": "pt"})
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return layers, total


def make_adapter(folder: str, layers: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    tensors = {}
    for layer in range(layers):
        for mod, (o, i) in LINEARS.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[key + ".lora_A.weight"] = rng.uniform(-1, 1, (RANK, i)).astype(np.float32) / np.sqrt(i)
            tensors[key + ".lora_B.weight"] = (rng.standard_normal((o, RANK)) * 1e-3).astype(np.float32)
    save_tensors(os.path.join(folder, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "target_modules": sorted({m.split(".")[-1] for m in LINEARS}), "bias": "none",
              "use_rslora": False, "use_dora": False, "lora_bias": False, "fan_in_fan_out": False,
              "init_lora_weights": True, "base_model_name_or_path": None, "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall s": wall, "peak RSS MiB": rss / 1024}


def compare(base: str, adapter: str, out_r: str, out_p: str, shard: str, name: str) -> dict:
    W = load_tensors(os.path.join(base, shard), xp="numpy")[0][name].astype(np.float64)
    ad = load_tensors(os.path.join(adapter, "adapter_model.safetensors"), xp="numpy")[0]
    key = "base_model.model." + name[: -len(".weight")]
    exact = W + (ALPHA / RANK) * (ad[key + ".lora_B.weight"].astype(np.float64)
                                   @ ad[key + ".lora_A.weight"].astype(np.float64))
    out = {}
    for label, folder in (("reflora", out_r), ("peft", out_p)):
        got = load_tensors(os.path.join(folder, shard), xp="numpy")[0][name].astype(np.float64)
        # distance to the float64 reference in units of the bf16 spacing at the result
        ulp = 2.0 ** (np.floor(np.log2(np.abs(got), where=got != 0, out=np.full_like(got, -133.0))) - 7)
        err = np.abs(got - exact) / ulp
        out[label] = (float(np.mean(err > 0.5 + 1e-6)), float(err.max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the synthetic base (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench_merge_")
    try:
        base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
        os.makedirs(base)
        os.makedirs(adapter)
        t0 = time.perf_counter()
        layers, total = make_base(base, args.gib, args.seed)
        make_adapter(adapter, layers, args.seed)
        print(f"base: {layers} layers, {total / 2**30:.2f} GiB bf16 in "
              f"{len(os.listdir(base)) - 1} shards; adapter: rank {RANK} on {7 * layers} linears "
              f"(float32); built in {time.perf_counter() - t0:.0f} s", flush=True)
        out_r, out_p = os.path.join(root, "out_reflora"), os.path.join(root, "out_peft")
        env_cmd = [sys.executable]
        rows = {}
        rows["reflora merge"] = timed(env_cmd + ["-m", "reflora.cli", "merge", base, adapter, out_r, "--quiet"])
        print(f"reflora done in {rows['reflora merge']['wall s']:.1f} s", flush=True)
        rows["peft merge_and_unload+save"] = timed(env_cmd + ["-c", PEFT_SCRIPT, base, adapter, out_p])
        index = json.load(open(os.path.join(base, "model.safetensors.index.json")))
        name = "model.layers.0.self_attn.q_proj.weight"
        cmp = compare(base, adapter, out_r, out_p, index["weight_map"][name], name)
        import peft
        import torch

        print(f"\npython {sys.version.split()[0]}, numpy {np.__version__}, torch {torch.__version__}, "
              f"peft {peft.__version__}, {os.cpu_count()} CPUs")
        print(f"{'':28} {'wall s':>9} {'peak RSS MiB':>13}")
        for label, r in rows.items():
            print(f"{label:28} {r['wall s']:9.1f} {r['peak RSS MiB']:13.0f}")
        a, b = rows["reflora merge"], rows["peft merge_and_unload+save"]
        print(f"{'ratio reflora / peft':28} {a['wall s'] / b['wall s']:9.2f} {a['peak RSS MiB'] / b['peak RSS MiB']:13.2f}")
        print(f"\n{name} ({D}x{D}) against the exact W + s B A (float64):")
        for label, (frac, worst) in cmp.items():
            print(f"  {label:8} {100 * frac:6.3f}% of elements beyond 0.5 ulp; worst {worst:.3f} ulp")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
