"""``reflora merge --device gpu`` against PEFT's merge_and_unload on the same GPU, side by side.

    python benchmarks/bench_merge_gpu.py                      # a ~4 GiB bf16 Llama-shaped base, built here
    python benchmarks/bench_merge_gpu.py --gib 8 --markdown out.md
    python benchmarks/bench_merge_gpu.py --gib 0.1 --cpu      # smoke run without a GPU (both sides on CPU)

No downloads: the base is ``LlamaForCausalLM`` built from a ``LlamaConfig``
(hidden 4096, MLP 11008, 32 heads / 8 KV heads, vocab 32000, as many layers as
fit in --gib) with seeded random bf16 weights, saved by ``save_pretrained``
(2 GB shards + index + config.json); the adapter is PEFT's own
(``init_lora_weights=False``: B != 0), rank 16, alpha 32, on every linear.
Then, each in its own process under /usr/bin/time -v:

  reflora gpu   python -m reflora.cli merge BASE ADAPTER OUT --device gpu --quiet
  reflora cpu   the same with --device cpu (the bytes must match the GPU's)
  peft          from_pretrained(BASE, device cuda, bf16), PeftModel.from_pretrained,
                merge_and_unload(), save_pretrained(OUT): each phase timed
                (torch.cuda.synchronize), end to end and merge only

and prints wall time, peak host RSS, the ratios, whether reflora's GPU and CPU
outputs are byte-identical, and how many elements of one merged weight PEFT
rounds differently from reflora's correctly rounded merge. Temporary files live
in one folder (--tmp, default $TMPDIR), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PEFT_SCRIPT = r"""
import json, sys, time, torch, transformers
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
t = {}
t0 = time.perf_counter()
try:
    import accelerate  # noqa: F401 - device_map needs it
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
except ImportError:
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
model = PeftModel.from_pretrained(model, adapter)
sync(); t["load"] = time.perf_counter() - t0
t1 = time.perf_counter()
merged = model.merge_and_unload()
sync(); t["merge_and_unload"] = time.perf_counter() - t1
t2 = time.perf_counter()
merged.save_pretrained(out, max_shard_size="2GB")
t["save"] = time.perf_counter() - t2
if device == "cuda":
    t["peak GPU MiB"] = torch.cuda.max_memory_allocated() / 2**20
print("PEFT_TIMES " + json.dumps(t))
"""


def build(base: str, adapter: str, gib: float, device: str, seed: int) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    D, F, V, heads, kv = 4096, 11008, 32000, 32, 8
    per_layer = (2 * D * D + 2 * D * (D * kv // heads) + 3 * D * F) * 2
    layers = max(1, int((gib * 2**30 - 2 * V * D * 2) // per_layer))
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="2GB")
    lcfg = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, lcfg).save_pretrained(adapter)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    return {"layers": layers, "bytes": size}


def timed(cmd: list[str], env: dict | None = None) -> tuple[dict, str]:
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", r.stderr))
    return {"wall s": wall, "cpu s": cpu, "peak RSS MiB": rss / 1024}, r.stdout


def digest(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            h = hashlib.sha256()
            with open(os.path.join(folder, f), "rb") as fh:
                for piece in iter(lambda: fh.read(1 << 24), b""):
                    h.update(piece)
            out[f] = h.hexdigest()
    return out


def differing(out_r: str, out_p: str, name: str) -> tuple[int, int]:
    """Elements of tensor ``name`` whose bits differ between two model folders."""
    import torch
    from safetensors import safe_open

    def get(folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        shard = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            return f.get_tensor(name).view(torch.int16)

    a, b = get(out_r), get(out_p)
    return int((a != b).sum()), a.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=4.0, help="size of the base (default 4)")
    ap.add_argument("--cpu", action="store_true", help="no GPU: torch on CPU, reflora --device cpu (smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (about 4x --gib)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--markdown", default=None, help="append a results table to this file")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    root = tempfile.mkdtemp(prefix="bench_merge_gpu_", dir=args.tmp)
    try:
        base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
        t0 = time.perf_counter()
        info = build(base, adapter, args.gib, device, args.seed)
        print(f"base: {info['layers']} layers, {info['bytes'] / 2**30:.2f} GiB bf16; built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("CUPY_TF32", None)
        rows, outs = {}, {}
        sides = [("cpu", "reflora --device cpu")] if args.cpu else [("gpu", "reflora --device gpu"),
                                                                   ("cpu", "reflora --device cpu")]
        for dev, label in sides:
            outs[dev] = os.path.join(root, f"out_{dev}")
            rows[label], _ = timed([sys.executable, "-m", "reflora.cli", "merge", base, adapter, outs[dev],
                                    "--device", dev, "--quiet"], env)
            print(f"{label}: {rows[label]['wall s']:.1f} s", flush=True)
        out_p = os.path.join(root, "out_peft")
        rows["peft load+merge+save"], stdout = timed([sys.executable, "-c", PEFT_SCRIPT, base, adapter, out_p, device],
                                                     env)
        phases = json.loads(stdout.split("PEFT_TIMES ", 1)[1].splitlines()[0])
        same = None if args.cpu else digest(outs["gpu"]) == digest(outs["cpu"])
        name = "model.layers.0.self_attn.q_proj.weight"
        diff, n = differing(outs["cpu"], out_p, name)
        import torch

        lines = [f"base {info['bytes'] / 2**30:.2f} GiB bf16 ({info['layers']} layers), rank 16 on every linear; "
                 f"{'CPU only' if args.cpu else torch.cuda.get_device_name(0)}; torch {torch.__version__}",
                 "", "| run | wall s | host CPU s | peak RSS MiB |", "| --- | ---: | ---: | ---: |"]
        for label, r in rows.items():
            lines.append(f"| {label} | {r['wall s']:.1f} | {r['cpu s']:.1f} | {r['peak RSS MiB']:.0f} |")
        ref = rows["peft load+merge+save"]
        lead = rows[sides[0][1]]
        lines += ["", "PEFT phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
                  f"ratio {sides[0][1]} / PEFT end to end: wall {lead['wall s'] / ref['wall s']:.2f}, "
                  f"peak RSS {lead['peak RSS MiB'] / ref['peak RSS MiB']:.2f}",
                  f"reflora GPU output byte-identical to CPU output: {same}",
                  f"{name}: {diff} of {n} elements of PEFT's merge differ from reflora's correctly rounded one"]
        print("\n".join(lines))
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n".join(lines) + "\n")
        if same is False:
            sys.exit("reflora's GPU and CPU outputs differ")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
