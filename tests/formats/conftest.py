"""The format tests compare files and factors on the host: their arrays are NumPy on every machine.

(Under ``REFLORA_BACKEND=cupy``, as benchmarks/gpu.sh runs the suite, a loader called without
``xp=`` would return CuPy arrays; what crosses backends is tested in tests/io and tests/ops.)
"""

import pytest


@pytest.fixture(autouse=True)
def _host_arrays(monkeypatch):
    monkeypatch.setenv("REFLORA_BACKEND", "numpy")
