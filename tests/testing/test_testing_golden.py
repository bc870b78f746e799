"""Golden vectors: `reflora golden write` files, and `reflora golden check` grading torch results."""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from reflora.cli import main
from reflora.io.safetensors import load_tensors

torch = pytest.importorskip("torch")  # the results writer is a torch implementation (interop extra)
from safetensors.torch import load_file, save_file  # noqa: E402

import lora_candidates as lc  # noqa: E402


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    assert main(["golden", "write", str(d)]) == 0
    return str(d)


def _manifest(golden):
    with open(os.path.join(golden, "manifest.json")) as fh:
        return json.load(fh)


def test_manifest_covers_dtypes_layouts_and_shapes(golden):
    m = _manifest(golden)
    assert m["format"] == "reflora-golden" and m["version"] == 1
    cases = m["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "float16", "bfloat16", "float64"}
    assert {c["layout"] for c in cases} == {"peft", "seed"}
    assert any(c["R"] > c["I"] for c in cases) and any(c["lead"] == [] for c in cases)
    assert any(len(c["lead"]) > 1 for c in cases) and any(c["use_rslora"] for c in cases)
    for c in cases:
        assert all(spec["tolerance"] > 0 for spec in c["outputs"].values()), c["name"]


def test_files_hold_inputs_in_the_case_dtype_and_float64_expectations_in_the_layout(golden):
    want_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
    for c in _manifest(golden)["cases"]:
        t, meta = load_tensors(os.path.join(golden, c["file"]), xp="numpy")
        assert meta == {"reflora_golden": "1", "case": c["name"]}
        for name in c["inputs"]:
            assert t[name].dtype == np.dtype(want_dtype[c["dtype"]]), (c["name"], name)
        f = {k: v.astype(np.float64) for k, v in t.items()}
        # independent oracle of the documented semantics, straight from the formula in each layout
        if c["layout"] == "seed":
            a, b = f["lora_a"], f["lora_b"]
            assert a.shape == (c["I"], c["R"]) and b.shape == (c["R"], c["O"])
        else:
            a, b = f["lora_A"].T, f["lora_B"].T
            assert f["lora_A"].shape == (c["R"], c["I"]) and f["lora_B"].shape == (c["O"], c["R"])
        xm = f["x"] * f.get("dropout_mask", 1.0)
        y = c["scale"] * (xm @ a) @ b
        if "W" in f:
            y = y + f["x"] @ f["W"].T
        if "bias" in f:
            y = y + f["bias"]
        np.testing.assert_allclose(f["y"], y, rtol=1e-12, atol=1e-12)
        # expectations are stored in float64, whatever the case dtype (f is a float64 copy: check t)
        assert all(t[name].dtype == np.float64 for name in c["outputs"]), c["name"]
        dA_name = "d_lora_a" if c["layout"] == "seed" else "d_lora_A"
        assert f[dA_name].shape == (f["lora_a"] if c["layout"] == "seed" else f["lora_A"]).shape


def _torch_results(golden, out, forward=lc.forward):
    """A torch implementation reading the golden inputs and writing results in the documented format."""
    os.makedirs(out, exist_ok=True)
    for c in _manifest(golden)["cases"]:
        t = load_file(os.path.join(golden, c["file"]))
        seed = c["layout"] == "seed"
        nA, nB = ("lora_a", "lora_b") if seed else ("lora_A", "lora_B")
        A = t[nA].T.contiguous() if seed else t[nA]
        B = t[nB].T.contiguous() if seed else t[nB]
        kw = dict(scale=c["scale"], W=t.get("W"), bias=t.get("bias"))
        y = forward(t["x"], A, B, dropout_mask=t.get("dropout_mask"), **kw)
        x_, A_, B_ = (v.clone().requires_grad_(True) for v in (t["x"], A, B))
        forward(x_, A_, B_, dropout_mask=t.get("dropout_mask"), **kw).backward(t["dy"])
        params, state = {"A": A, "B": B, "W": kw["W"], "bias": kw["bias"]}, None
        sgd = dict(c["sgd"])
        steps = sgd.pop("steps")
        step = lc.make_train_step(fwd=forward)
        for _ in range(steps):
            params, state = step(t["x"], t["target"], params, state, scale=c["scale"], **sgd)
        tr = (lambda v: v.T.contiguous()) if seed else (lambda v: v)
        save_file({"y": y.detach(), "dx": x_.grad, "d_" + nA: tr(A_.grad), "d_" + nB: tr(B_.grad),
                   "sgd." + nA: tr(params["A"]), "sgd." + nB: tr(params["B"])},
                  os.path.join(out, c["name"] + ".safetensors"))


def test_correct_torch_results_pass(golden, tmp_path, capsys):
    _torch_results(golden, str(tmp_path / "res"))
    assert main(["golden", "check", golden, "--results", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "24 of 24 cases pass" in out
    assert "status  worst tensor" in out


def test_mutant_results_fail_with_a_per_case_table(golden, tmp_path, capsys):
    _torch_results(golden, str(tmp_path / "res"), forward=lc.fwd_scale_on_base)
    assert main(["golden", "check", golden, "--results", str(tmp_path / "res")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "- y: abs error" in out
    # only cases with a base path and scale != 1 can show the bug; the others pass
    assert re.search(r"^00_float32_peft_base_bias_momentum +FAIL", out, re.M)
    assert re.search(r"^02_float32_peft_vector_x_no_base +ok", out, re.M)


def test_missing_results_and_tensors_fail(golden, tmp_path, capsys):
    res = tmp_path / "res"
    _torch_results(golden, str(res))
    first = sorted(os.listdir(res))[0]
    t = load_file(str(res / first))
    del t["dx"]
    save_file(t, str(res / first))
    os.remove(res / sorted(os.listdir(res))[-1])
    assert main(["golden", "check", golden, "--results", str(res)]) == 1
    out = capsys.readouterr().out
    assert "- dx: missing" in out and "missing results file" in out and "22 of 24 cases pass; 2 FAIL" in out


def test_a_folder_that_is_not_golden_is_a_usage_error(tmp_path, capsys):
    assert main(["golden", "check", str(tmp_path), "--results", str(tmp_path)]) == 2
    assert "manifest.json does not exist; expected a folder written by `reflora golden write`" in capsys.readouterr().err


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("cases"), "'cases' is None; expected a list"),
    (lambda m: m["cases"][0].pop("outputs"), r"cases\[0\]: 'outputs' is None"),
    (lambda m: m["cases"][1].update(file="../x.safetensors"), r"cases\[1\]: 'file' is '../x.safetensors'"),
    (lambda m: m["cases"][0]["outputs"]["y"].pop("tolerance"), r"outputs\['y'\] tolerance is None"),
    (lambda m: m["cases"][0]["outputs"]["y"].update(shape="2x3"), r"outputs\['y'\] has shape '2x3'"),
])
def test_a_malformed_manifest_is_a_usage_error(golden, tmp_path, capsys, edit, match):
    import shutil

    d = tmp_path / "golden"
    shutil.copytree(golden, d)
    m = _manifest(str(d))
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    assert main(["golden", "check", str(d), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err


def test_the_manifest_is_written_whole_and_nothing_else_is_left(golden):
    assert not [f for f in os.listdir(golden) if f.endswith(".tmp")]
    assert _manifest(golden)["cases"]
