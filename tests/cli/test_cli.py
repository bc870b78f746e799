"""The command line: `reflora info` and `reflora demo`."""

from __future__ import annotations

import subprocess
import sys

from reflora.cli import main
from reflora.cli.demo import run_demo


def test_info_prints_backend_and_versions(capsys):
    assert main(["info", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    for key in ("backend", "numpy", "device", "safetensors", "cupy"):
        assert key in out


def test_demo_small_trains_and_checks_gradients(capsys):
    s = run_demo(in_features=32, out_features=24, rank=4, rows=64, steps=60, lr=0.5, backend="numpy", progress=False)
    assert s["loss last"] < 0.05 * s["loss first"]
    assert s["max rel. grad error"] < 1e-8
    assert s["params trained"] == 4 * (32 + 24)
    out = capsys.readouterr().out
    assert "max rel. grad error" in out and "backend" in out


def test_demo_console_script_runs_with_defaults():
    """The README's main job, end to end, as a subprocess (the real console entry point)."""
    r = subprocess.run([sys.executable, "-m", "reflora.cli", "demo", "--quiet", "--steps", "30"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "params trained" in r.stdout and "12288" in r.stdout


def test_errors_are_reported_not_raised(capsys):
    assert main(["info", "--backend", "tpu"]) == 2
    assert "expected one of" in capsys.readouterr().err
