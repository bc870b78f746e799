"""The backend switch: REFLORA_BACKEND, explicit conversion, no silent mixing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import reflora
from reflora import backend


def _has_gpu():
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:
        return False


def test_numpy_backend(monkeypatch):
    monkeypatch.setenv("REFLORA_BACKEND", "numpy")
    assert backend.default_namespace().__name__ == "array_api_compat.numpy"


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the cupy request succeeds (tested in the GPU suite)")
def test_cupy_request_without_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("REFLORA_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="backend 'cupy' was requested .*REFLORA_BACKEND.* but cupy"):
        backend.default_namespace()
    with pytest.raises(RuntimeError, match="cupy"):
        reflora.init_lora(reflora.LoraConfig(rank=1, in_features=2, out_features=2), seed=0)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: auto picks CuPy (tested in the GPU suite)")
def test_auto_falls_back_to_numpy_and_logs_it(monkeypatch, caplog):
    monkeypatch.delenv("REFLORA_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="reflora"):
        xp = backend.default_namespace()
    assert xp.__name__ == "array_api_compat.numpy"
    assert any("auto -> numpy" in r.getMessage() for r in caplog.records)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("REFLORA_BACKEND", "jax")
    with pytest.raises(ValueError, match=r"backend from \$REFLORA_BACKEND is 'jax'; expected one of"):
        backend.default_namespace()


def test_asarray_from_torch_lists_and_strict():
    torch = pytest.importorskip("torch")
    strict = pytest.importorskip("array_api_strict")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = reflora.asarray(t, xp="numpy", dtype="float64")
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_array_equal(a, t.numpy())
    s = reflora.asarray(a, xp=strict)
    assert type(s).__module__.startswith("array_api_strict") and s.dtype == strict.float64
    assert reflora.asarray([1.0, 2.0], xp="numpy").shape == (2,)
    back = reflora.asarray(s, xp="numpy", dtype="float32")
    assert back.dtype == np.float32


def test_asarray_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match=r"xp is 'cpu'; expected one of"):
        reflora.asarray([1.0], xp="cpu")


def test_asarray_same_library_does_not_copy():
    a = np.ones(3)
    assert reflora.asarray(a, xp="numpy") is a


def test_device_name_cpu():
    assert backend.device_name(backend.get_namespace("numpy")) == "cpu"
