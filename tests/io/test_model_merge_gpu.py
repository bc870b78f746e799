"""``merge_model(device="gpu")``: the merge arithmetic on CuPy gives the CPU's bytes.

The GPU chunk code runs twice: here on a NumPy stand-in for CuPy (the logic:
bits up, candidates down, host fallbacks), and on a real GPU through the
``xp`` fixture (skipped without CuPy; ``benchmarks/gpu.sh`` and
``benchmarks/bench_merge_gpu.py`` run it on a CUDA machine).
"""

from __future__ import annotations

import json
import types

import ml_dtypes
import numpy as np
import pytest

import reflora.io.merge_writer as mw
import reflora.io.model_merge as mm
from reflora.io.safetensors import save_tensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def small_model(tmp_path, fan_in_fan_out=False):
    rng = np.random.default_rng(3)
    base, ad = tmp_path / "base", tmp_path / "ad"
    base.mkdir()
    ad.mkdir()
    sd, t = {}, {}
    for i, (O, I, dt) in enumerate([(40, 24, BF16), (24, 40, np.float16), (16, 16, np.float32)]):
        shape = (I, O) if fan_in_fan_out else (O, I)
        sd[f"layers.{i}.proj.weight"] = (rng.standard_normal(shape) * 0.02).astype(dt)
        t[f"base_model.model.layers.{i}.proj.lora_A.weight"] = rng.standard_normal((4, I)).astype(np.float32)
        t[f"base_model.model.layers.{i}.proj.lora_B.weight"] = rng.standard_normal((O, 4)).astype(np.float32) * 0.1
    sd["layers.0.proj.weight"][0, :3] = [0.0, -0.0, np.inf]  # signed zeros, Inf: the float64 redo path too
    save_tensors(base / "model.safetensors", sd)
    save_tensors(ad / "adapter_model.safetensors", t)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "fan_in_fan_out": fan_in_fan_out}))
    return base, ad


def numpy_as_cupy():
    """NumPy dressed as the few CuPy calls the GPU chunk path makes."""
    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})

    def asnumpy(a, out=None):
        if out is None:
            return np.array(a)
        np.copyto(out, a)
        return out

    shim.asnumpy = asnumpy
    return shim


@pytest.mark.parametrize("fifo", [False, True])
def test_gpu_chunk_path_on_a_numpy_stand_in(tmp_path, monkeypatch, fifo):
    base, ad = small_model(tmp_path, fifo)
    mm.merge_model(base, ad, tmp_path / "cpu", progress=False, device="cpu")
    monkeypatch.setattr(mw, "gpu_module", lambda device: numpy_as_cupy())
    monkeypatch.setattr(mm, "gpu_module", lambda device: numpy_as_cupy())
    mm.merge_model(base, ad, tmp_path / "gpu", progress=False, device="gpu")
    a = (tmp_path / "cpu" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "gpu" / "model.safetensors").read_bytes()


def test_gpu_merge_gives_the_cpu_bytes(tmp_path, xp):
    if "cupy" not in xp.__name__:
        pytest.skip("the GPU merge runs on CuPy only; NumPy runs the same kernel in tests/numerics/test_merge_f32.py")
    base, ad = small_model(tmp_path)
    mm.merge_model(base, ad, tmp_path / "cpu", progress=False, device="cpu")
    mm.merge_model(base, ad, tmp_path / "gpu", progress=False, device="gpu")
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "gpu" / "model.safetensors").read_bytes()


def test_device_is_checked(tmp_path, monkeypatch):
    base, ad = small_model(tmp_path)
    with pytest.raises(ValueError, match="expected 'cpu' or 'gpu'"):
        mm.merge_model(base, ad, tmp_path / "x", progress=False, device="tpu")
    monkeypatch.setenv("CUPY_TF32", "1")
    from reflora.numerics import merge_f32

    with pytest.raises(RuntimeError, match="CUPY_TF32"):
        merge_f32.check_gpu_float32(None)
