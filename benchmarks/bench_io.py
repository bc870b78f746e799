"""Save/load throughput of a 128 MiB multi-tensor adapter file: reflora vs safetensors.numpy.

    python benchmarks/bench_io.py [--mib 128] [--repeats 7] [--dir DIR]

Side by side in one run, on the same tensors and the same folder:

  save  reflora.save_tensors   (contiguity guard, temp file, fsync, os.replace, dir fsync)
        safetensors.numpy.save_file            (no fsync: data may still be in the page cache)
        safetensors.numpy.save_file + fsync    (the same durability as reflora, for reference)
  load  reflora.load_tensors   (full header validation, one read, then views)
        safetensors.numpy.load_file            (mmap + a copy per tensor)

Figures are medians over --repeats runs (the contenders take turns, order rotated), in MiB/s; the ratio is reflora's
throughput over safetensors' (>= 0.9 is the target). Loads read a file that
was just written, so both come from the page cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import safetensors
import safetensors.numpy as stnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import reflora  # noqa: E402


def adapter_tensors(mib: int) -> dict[str, np.ndarray]:
    """PEFT-layout float32 tensors: modules with A (R, I) and B (O, R), R=64, I=O=4096, 2 MiB per module."""
    R, D = 64, 4096
    per_module = 2 * R * D * 4
    n = max(1, mib * 2**20 // per_module)
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        m = f"base_model.model.model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj"
        out[f"{m}.lora_A.weight"] = rng.standard_normal((R, D), dtype=np.float32)
        out[f"{m}.lora_B.weight"] = rng.standard_normal((D, R), dtype=np.float32)
    return out


def timed(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function; they run in turn, in a rotated order each round, so drift hits all."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    args = ap.parse_args()

    tensors = adapter_tensors(args.mib)
    nbytes = sum(a.nbytes for a in tensors.values())
    mib = nbytes / 2**20
    folder = args.dir or tempfile.mkdtemp(prefix="reflora-bench-")
    p_ref, p_st = os.path.join(folder, "reflora.safetensors"), os.path.join(folder, "st.safetensors")

    def st_save():
        stnp.save_file(tensors, p_st)

    def st_save_fsync():
        stnp.save_file(tensors, p_st)
        fd = os.open(p_st, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def rf_save():
        reflora.save_tensors(p_ref, tensors)

    # warm up once each (first-touch allocation, imports), then check both files hold the same bytes
    st_save()
    rf_save()
    with open(p_ref, "rb") as f1, open(p_st, "rb") as f2:
        assert f1.read() == f2.read(), "reflora and safetensors wrote different bytes"

    results = {}
    t_rf, t_st, save_fsync = timed([rf_save, st_save, st_save_fsync], args.repeats)
    results["save"] = (t_rf, t_st)
    loaded = {}

    def rf_load():
        loaded["rf"] = reflora.load_tensors(p_ref, xp="numpy")[0]

    def st_load():
        loaded["st"] = stnp.load_file(p_st)

    rf_load()
    st_load()
    results["load"] = tuple(timed([rf_load, st_load], args.repeats))
    for k, v in tensors.items():
        assert np.array_equal(loaded["rf"][k], v) and np.array_equal(loaded["st"][k], v), k

    print(f"file: {len(tensors)} tensors, {mib:.1f} MiB of float32 in {folder}; median of {args.repeats} runs")
    print(f"numpy {np.__version__}, safetensors {safetensors.__version__}, reflora {reflora.__version__}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'op':<6}{'reflora s':>11}{'MiB/s':>9}{'safetensors s':>15}{'MiB/s':>9}{'ratio':>8}")
    for op, (t_rf, t_st) in results.items():
        print(f"{op:<6}{t_rf:>11.4f}{mib / t_rf:>9.0f}{t_st:>15.4f}{mib / t_st:>9.0f}{t_st / t_rf:>8.2f}x")
    t_rf = results["save"][0]
    print(f"{'save':<6}{t_rf:>11.4f}{mib / t_rf:>9.0f}{save_fsync:>15.4f}{mib / save_fsync:>9.0f}"
          f"{save_fsync / t_rf:>8.2f}x   (safetensors save_file + fsync: the same durability)")
    print("ratio = reflora throughput / safetensors throughput (target >= 0.9x)")
    if args.dir is None:
        for p in (p_ref, p_st):
            os.remove(p)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
