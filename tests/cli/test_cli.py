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
    r = subprocess.run([sys.executable, "-m", "reflora.cli", "demo", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "params trained" in r.stdout and "12288" in r.stdout
    assert "verdict: PASS" in r.stdout and "[FAIL]" not in r.stdout
    for criterion in ("grad error", "loss fell", "layouts agree"):
        assert f"[pass] {criterion}" in r.stdout.replace("max rel. grad", "grad"), criterion


def test_demo_names_the_criterion_that_failed(capsys):
    # 3 steps cannot recover the hidden update: the loss criterion fails, the others pass.
    code = main(["demo", "--quiet", "--in-features", "32", "--out-features", "24", "--rank", "4",
                 "--rows", "64", "--steps", "3", "--lr", "0.5", "--backend", "numpy"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "verdict: FAIL" in out and "[FAIL] loss fell" in out and "[pass] max rel. grad error" in out
    assert "reflora demo: FAILED: loss fell" in err and "grad error" not in err


def test_demo_progress_bar_ends_on_the_loss_the_table_prints(capsys):
    s = run_demo(in_features=32, out_features=24, rank=4, rows=64, steps=20, lr=0.5, backend="numpy")
    err = capsys.readouterr().err
    last_bar = [line for line in err.splitlines() if line.startswith("[")][-1]
    assert last_bar.endswith(f"20/20 loss {s['loss last']:.4e}"), (last_bar, s["loss last"])
    assert s["loss last"] < s["loss first"]


def test_errors_are_reported_not_raised(capsys):
    assert main(["info", "--backend", "tpu"]) == 2
    assert "expected one of" in capsys.readouterr().err
