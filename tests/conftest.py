"""Shared fixtures: the ``xp`` backend fixture and the hypothesis profiles.

Every backend-agnostic test takes ``xp`` and builds its inputs with
``xp.asarray(numpy_array)``; it then runs on:

  numpy           array_api_compat.numpy
  numpy_readonly  NumPy arrays with writeable=False: any write into an input raises
  array_api_strict  the minimal standard namespace (catches non-standard calls)
  cupy            when CuPy imports and a GPU is usable; skipped otherwise

Hypothesis profiles: "ci" (derandomized, bounded, no deadline) is loaded when
$CI is set or HYPOTHESIS_PROFILE=ci; "dev" otherwise; "thorough" on request.
"""

from __future__ import annotations

import os
import types

import array_api_compat
import array_api_compat.numpy
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def _readonly_numpy() -> types.SimpleNamespace:
    """array_api_compat.numpy, except that asarray returns read-only arrays."""
    base = array_api_compat.numpy

    class ReadOnlyNumpy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(base, name)

        @staticmethod
        def asarray(obj, /, *, dtype=None, device=None, copy=None):
            a = np.array(obj, dtype=dtype, copy=True)
            a.flags.writeable = False
            return a

    ns = ReadOnlyNumpy("numpy_readonly")
    return ns


def _cupy_or_reason():
    try:
        import cupy
    except Exception as exc:
        return None, f"CuPy not importable ({type(exc).__name__}); run the GPU suite with benchmarks/gpu.sh on a CUDA machine"
    try:
        if not cupy.is_available():
            return None, "CuPy imports but no GPU is usable; run the GPU suite with benchmarks/gpu.sh on a CUDA machine"
    except Exception as exc:
        return None, f"CuPy GPU check failed ({exc}); run benchmarks/gpu.sh on a CUDA machine"
    return array_api_compat.array_namespace(cupy.empty(0)), ""


BACKENDS = ["numpy", "numpy_readonly", "array_api_strict", "cupy"]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array namespace a backend-agnostic test runs on."""
    name = request.param
    only = os.environ.get("REFLORA_TEST_BACKENDS")
    if only and name not in only.split(","):
        pytest.skip(f"backend {name} not in $REFLORA_TEST_BACKENDS={only}")
    if name == "numpy":
        return array_api_compat.numpy
    if name == "numpy_readonly":
        return _readonly_numpy()
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    ns, why = _cupy_or_reason()
    if ns is None:
        pytest.skip(why)
    return ns


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Skips grouped by reason, one line each (setup.cfg's -r leaves out the per-test lines).

    On a machine without a GPU every CuPy-backend test skips with the same reason; listing
    each one would bury the result. The GPU suite (benchmarks/gpu.sh) runs them.
    """
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups: dict[str, list[str]] = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        groups.setdefault(reason.removeprefix("Skipped: "), []).append(rep.nodeid.split("::")[0])
    terminalreporter.section("skipped, grouped by reason")
    for reason, files in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"{len(files):4d} in {len(set(files))} file(s): {reason}")
