"""CuPy on a real GPU: NumPy/CuPy agreement, identical init and files, TF32 off.

Skipped where CuPy cannot run (CI has no GPU). Run on a CUDA machine with
`bash benchmarks/gpu.sh`, which also runs the whole suite with REFLORA_BACKEND=cupy.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import reflora
from reflora import LoraConfig, init_lora, lora_backward, lora_forward
from reflora.numerics.bounds import lora_error_bounds


def _cupy():
    try:
        import cupy

        if cupy.is_available():
            return cupy
    except Exception:
        pass
    return None


cp = _cupy()
pytestmark = pytest.mark.skipif(cp is None, reason="needs CuPy and a GPU; run `bash benchmarks/gpu.sh` on a CUDA machine")


def _problem(rng, lead, I, O, R, mask):
    return dict(x=rng.standard_normal(lead + (I,)), A=rng.standard_normal((R, I)), B=rng.standard_normal((O, R)),
                W=rng.standard_normal((O, I)), bias=rng.standard_normal(O),
                dropout_mask=((rng.random(lead + (I,)) > 0.2) / 0.8) if mask else None,
                dy=rng.standard_normal(lead + (O,)))


@pytest.mark.parametrize("lead, I, O, R, mask", [((7,), 33, 17, 4, False), ((2, 3), 256, 128, 16, True),
                                                 ((512,), 1024, 768, 8, False), ((), 5, 3, 9, True)])
def test_numpy_and_cupy_agree_in_float64_within_the_derived_bound(lead, I, O, R, mask):
    p = _problem(np.random.default_rng(I), lead, I, O, R, mask)
    outs = {}
    for name, mod in (("numpy", np), ("cupy", cp)):
        q = {k: None if v is None else mod.asarray(v) for k, v in p.items()}
        y, cache = lora_forward(q["x"], q["A"], q["B"], scale=1.7, W=q["W"], bias=q["bias"],
                                dropout_mask=q["dropout_mask"])
        g = lora_backward(q["dy"], cache)
        outs[name] = {k: reflora.backend.to_numpy(v) for k, v in zip(("y", "dx", "dA", "dB"), (y, *g))}
    bounds = lora_error_bounds(p["x"], p["A"], p["B"], scale=1.7, dy=p["dy"], W=p["W"], bias=p["bias"],
                               dropout_mask=p["dropout_mask"], dtype="float64")
    for k in ("y", "dx", "dA", "dB"):
        diff = np.abs(outs["numpy"][k] - outs["cupy"][k])
        limit = 2 * getattr(bounds, k)
        assert np.all(diff <= limit), f"{k}: max excess {np.max(diff - limit):.3e}, max diff {diff.max():.3e}"


@pytest.mark.parametrize("init", ["kaiming_uniform", "gaussian"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_init_is_bit_identical_on_numpy_and_cupy(init, dtype):
    c = LoraConfig(rank=7, in_features=300, out_features=5, init=init)
    a_np, b_np = init_lora(c, seed=42, xp="numpy", dtype=dtype)
    a_cp, b_cp = init_lora(c, seed=42, xp="cupy", dtype=dtype)
    assert type(a_cp).__module__.startswith("cupy")
    np.testing.assert_array_equal(a_cp.get().view(np.uint8), np.asarray(a_np).view(np.uint8))
    np.testing.assert_array_equal(b_cp.get(), b_np)


def test_files_saved_from_cupy_equal_files_saved_from_numpy(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((5, 7)).astype(np.float32), "b": rng.standard_normal((3,))}
    reflora.save_tensors(tmp_path / "np.safetensors", tensors)
    reflora.save_tensors(tmp_path / "cp.safetensors", {k: cp.asarray(v) for k, v in tensors.items()})
    assert (tmp_path / "np.safetensors").read_bytes() == (tmp_path / "cp.safetensors").read_bytes()
    loaded, _ = reflora.load_tensors(tmp_path / "cp.safetensors", xp="cupy")
    assert all(type(v).__module__.startswith("cupy") for v in loaded.values())
    np.testing.assert_array_equal(loaded["a"].get(), tensors["a"])
    ad = reflora.LoraAdapter(LoraConfig(rank=2, in_features=6, out_features=4), seed=3, xp="numpy")
    reflora.save_adapter(tmp_path / "np_ad.safetensors", ad)
    reflora.save_adapter(tmp_path / "cp_ad.safetensors", reflora.LoraAdapter(
        LoraConfig(rank=2, in_features=6, out_features=4), seed=3, xp="cupy"))
    assert (tmp_path / "np_ad.safetensors").read_bytes() == (tmp_path / "cp_ad.safetensors").read_bytes()


def test_tf32_is_off_float32_stays_within_float32_bounds():
    """TF32 (10-bit mantissa) would break the float32 bound by orders of magnitude."""
    assert os.environ.get("CUPY_TF32", "0") == "0", "CUPY_TF32 must be unset or 0 for reference results"
    rng = np.random.default_rng(1)
    x, A, B, W = (rng.standard_normal(s).astype(np.float32) for s in [(256, 4096), (16, 4096), (512, 16), (512, 4096)])
    y32, _ = lora_forward(*(cp.asarray(a) for a in (x, A, B)), scale=2.0, W=cp.asarray(W))
    x64, A64, B64, W64 = (a.astype(np.float64) for a in (x, A, B, W))
    y64, _ = lora_forward(x64, A64, B64, scale=2.0, W=W64)
    bound = lora_error_bounds(x64, A64, B64, scale=2.0, W=W64, dtype="float32").y
    err = np.abs(y32.get().astype(np.float64) - y64)
    assert np.all(err <= bound), f"float32 on GPU exceeds its bound (TF32 on?): max ratio {np.max(err / bound):.2f}"


def test_backend_switch_picks_cupy(monkeypatch):
    for value in ("cupy", "auto"):
        monkeypatch.setenv("REFLORA_BACKEND", value)
        assert reflora.backend.default_namespace().__name__ == "array_api_compat.cupy"
    assert reflora.backend.device_name(reflora.get_namespace("cupy")).startswith("cuda:")


def test_mixing_numpy_and_cupy_is_a_type_error_naming_both():
    with pytest.raises(TypeError, match=r"x: numpy\.ndarray.*A: cupy"):
        lora_forward(np.ones((2, 3)), cp.ones((1, 3)), np.ones((4, 1)), scale=1.0)


def test_adapter_trains_on_the_gpu_and_moves_back():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((24, 32)) / 6
    A_t, B_t = rng.standard_normal((2, 32)) / 6, rng.standard_normal((24, 2)) / 6
    x = rng.standard_normal((256, 32))
    t, _ = lora_forward(x, A_t, B_t, scale=1.0, W=W)
    ad = reflora.LoraAdapter(LoraConfig(rank=2, alpha=2, in_features=32, out_features=24), xp="cupy",
                             dtype="float64", W=W)
    losses = ad.fit(cp.asarray(x), cp.asarray(t), steps=200, sgd=reflora.SGD(0.2, momentum=0.9))
    assert losses[-1] < 1e-3 * losses[0]
    ad.to("numpy")
    assert isinstance(ad.A, np.ndarray)


def test_asarray_from_torch_cuda_is_zero_copy_dlpack():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    t = torch.arange(6, dtype=torch.float64, device="cuda").reshape(2, 3)
    a = reflora.asarray(t, xp="cupy")
    assert type(a).__module__.startswith("cupy")
    t.add_(1.0)  # shared memory: the CuPy array sees it
    np.testing.assert_array_equal(a.get(), t.cpu().numpy())
