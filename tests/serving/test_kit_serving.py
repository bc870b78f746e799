"""reflora.testing.serving: correct torch kernels pass in every dtype; real engines' bugs are caught.

Correct: the vLLM-style torch candidates of serving_candidates.py (gather per
row, mask -1, autograd for gradients) in float32, float16, bfloat16 and
float64. Mutants, each caught: punica's long-segment bug (on problems with a
145-200-row segment), -1 read as adapter L-1, per-adapter scales ignored,
MoE-style transposed lora_b (vLLM #31534), an expand without the -1 mask,
fused-slice offsets advanced by the rank instead of the width, and the
all-gather of the shrink output where A is replicated (vLLM #45691).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import reflora.testing.serving as rts
from reflora import FormatError, load_tensors, save_tensors
from reflora.testing.serving_golden import check_serving_golden, main, write_serving_golden
from reflora.testing.serving_problems import ServingProblem

torch = pytest.importorskip("torch")
import serving_candidates as sc  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "float64"]
KW = dict(to="torch", max_examples=20, derandomize=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_torch_kernels_pass(dtype):
    results = [
        rts.check_shrink(sc.shrink, dtype=dtype, **KW),
        rts.check_expand(sc.expand, dtype=dtype, **KW),
        rts.check_multi_forward(sc.multi_forward, dtype=dtype, **KW),
        rts.check_multi_backward(sc.multi_backward, dtype=dtype, **KW),
        rts.check_sliced_forward(sc.sliced_forward, dtype=dtype, **KW),
        rts.check_embedding(sc.embedding, dtype=dtype, extra_vocab=True, **KW),
        rts.check_embedding_backward(sc.embedding_backward, dtype=dtype, extra_vocab=True, **KW),
    ]
    for r in results:
        assert r.examples == KW["max_examples"] and r.dtype == dtype
        assert all(v <= 1 for v in r.worst.values()), r


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["column", "column_sharded", "row", "row_sharded"])
def test_correct_tensor_parallel_kernel_passes(tp, mode):
    for dtype in ("float32", "bfloat16"):
        r = rts.check_tp(sc.tp_forward, tp=tp, mode=mode, dtype=dtype, to="torch", max_examples=5, derandomize=True)
        assert len(r.worst) == tp


MUTANTS = [
    ("long segment > 144 rows (punica sgmv_cutlass)", rts.check_multi_forward, sc.multi_forward_long_segment_bug,
     dict(layouts=("long",))),
    ("-1 read as adapter L-1", rts.check_multi_forward, sc.multi_forward_minus_one_as_last, {}),
    ("per-adapter scales ignored", rts.check_multi_forward, sc.multi_forward_one_scale, {}),
    ("MoE-style transposed lora_b (vLLM #31534)", rts.check_multi_forward, sc.multi_forward_moe_transposed_b, {}),
    ("expand without the -1 mask", rts.check_expand, sc.expand_minus_one_as_last, {}),
    ("slice offsets advanced by the rank", rts.check_sliced_forward, sc.sliced_forward_offset_by_rank, {}),
    ("all-gather where A is replicated (vLLM #45691)", rts.check_tp, sc.tp_forward_gather_replicated,
     dict(tp=2, mode="column")),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("label, check, mutant, kw", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutants_are_caught(dtype, label, check, mutant, kw):
    with pytest.raises(AssertionError, match=r"is wrong: \d+ of \d+ elements outside the tolerance"):
        check(mutant, dtype=dtype, **KW, **kw)


def test_long_segment_mutant_passes_short_segments_so_the_long_layout_is_what_catches_it():
    # guards the test above: the bug only shows past 144 rows of one adapter
    rts.check_multi_forward(sc.multi_forward_long_segment_bug, dtype="float32", layouts=("unsorted",), **KW)


def test_failure_report_names_the_tensor_and_reproduces():
    p = ServingProblem(I=6, O=5, ranks=(2, 3), indices=(0, 1, -1, 1), scales=(0.5, 2.0), dtype="float32", seed=3)
    with pytest.raises(AssertionError) as e:
        rts.check_multi_forward_problem(sc.multi_forward_one_scale, p, to="torch")
    msg = str(e.value)
    assert "check_multi_forward: y is wrong" in msg and "worst at index" in msg and "tolerance" in msg
    assert "problem = ServingProblem(I=6, O=5, ranks=(2, 3)" in msg and "check_multi_forward_problem" in msg


def test_exact_problems_have_zero_tolerance_and_torch_meets_it():
    # |partial sums| <= 27 (x A^T), 354 (y); times max(1, s) / min(1, s) = 4: 1416 <= 2^11
    p = ServingProblem(I=3, O=4, ranks=(2, 1, 0), indices=(0, 1, 2, -1, 0), scales=(0.5, 2.0, 1.0),
                       dtype="float16", values="int", bias=True)
    ref, tol = rts.serving_reference("multi_forward", p)["y"]
    assert not tol.any()
    assert rts.check_multi_forward_problem(sc.multi_forward, p, to="torch")["y"] == 0.0
    # and a non-dyadic scale makes it inexact again
    q = ServingProblem(**{**p.__dict__, "scales": (0.5, 2.0, 1 / 3)})
    assert rts.serving_reference("multi_forward", q)["y"][1].any()
    # and so does bfloat16, whose 8 bits cannot hold these sums
    b = ServingProblem(**{**p.__dict__, "dtype": "bfloat16"})
    assert rts.serving_reference("multi_forward", b)["y"][1].any()


def test_golden_round_trip_with_a_torch_kernel(tmp_path):
    cases, results = tmp_path / "cases", tmp_path / "results"
    names = write_serving_golden(str(cases))
    assert len(names) == len(set(names)) and (cases / "manifest.json").exists()
    os.makedirs(results)
    import json

    manifest = json.loads((cases / "manifest.json").read_text())
    graded = 0
    for c in manifest["cases"]:
        if c["dtype"] != "bfloat16" or c["op"] not in ("multi_forward", "multi_backward", "shrink", "expand", "tp"):
            continue
        t, _ = load_tensors(str(cases / c["file"]), xp="numpy")
        conv = {k: (torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) if v.dtype.name == "bfloat16"
                    else torch.from_numpy(v.copy())) for k, v in t.items()}
        s = tuple(t["scales"].tolist()) if "scales" in t else None
        if c["op"] == "shrink":
            out = {"h": sc.shrink(conv["x"], conv["A"], conv["indices"], scale=c["scale"])}
        elif c["op"] == "expand":
            out = {"y": sc.expand(conv["h"], conv["B"], conv["indices"], base=conv["base"], offset=c["offset"])}
        elif c["op"] == "multi_forward":
            out = {"y": sc.multi_forward(conv["x"], conv["A"], conv["B"], conv["indices"], scales=s, W=conv.get("W"),
                                         bias=conv.get("bias"))}
        elif c["op"] == "multi_backward":
            dx, dA, dB = sc.multi_backward(conv["x"], conv["A"], conv["B"], conv["indices"], conv["dy"], scales=s,
                                           W=conv.get("W"))
            out = {"dx": dx, "dA": dA, "dB": dB}
        else:
            ys = sc.tp_forward(conv["x"], conv["A"], conv["B"], conv["indices"], scales=s, tp=c["tp"], mode=c["mode"],
                               W=conv.get("W"), bias=conv.get("bias"))
            out = {f"y.{k}": y for k, y in enumerate(ys)}
        save_tensors(str(results / (c["name"] + ".safetensors")), {k: v.float().numpy() for k, v in out.items()})
        graded += 1
    rows, ok = check_serving_golden(str(cases), str(results))
    mine = [r for r in rows if r["status"] != "missing"]
    assert graded >= 10 and len(mine) >= graded and all(r["status"] == "pass" for r in mine), mine[:3]
    assert not ok  # the other cases have no results: missing is a failure
    assert main(["check", str(cases), "--results", str(results)]) == 1
    # a wrong result fails
    first = next(r for r in mine if r["output"] == "y")
    t, _ = load_tensors(str(results / (first["case"] + ".safetensors")), xp="numpy")
    save_tensors(str(results / (first["case"] + ".safetensors")), {"y": t["y"] * 1.01})
    rows2, _ = check_serving_golden(str(cases), str(results))
    assert next(r for r in rows2 if r["case"] == first["case"])["status"] == "FAIL"


def test_golden_malformed_manifest_is_a_format_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "reflora-serving-golden", "version": 1, "cases": [{"name": "../x"}]}')
    with pytest.raises(FormatError, match="expected name, file"):
        check_serving_golden(str(tmp_path), str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        check_serving_golden(str(tmp_path), str(tmp_path))
    assert main(["check", str(tmp_path), "--results", str(tmp_path)]) == 2


def test_the_conformance_suite_runs_the_serving_checks(tmp_path):
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")]),
               REFLORA_CANDIDATE="serving_candidates")
    r = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "reflora.testing.suite", "-q", "-p",
                        "no:cacheprovider", "-k", "serving", "--max-examples", "3", "--derandomize"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    tail = r.stdout[-2000:]
    assert r.returncode == 0, tail
    # 7 checks x 2 of the candidate's dtypes + 16 (mode, tp) pairs pass; the other dtypes are skipped
    assert "30 passed" in tail, tail
