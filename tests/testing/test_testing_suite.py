"""The pytest suite end to end: `REFLORA_CANDIDATE=... pytest --pyargs reflora.testing.suite` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # the candidates are torch implementations (interop extra)
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where lora_candidates.py lives


def run_suite(tmp_path, candidate, *extra):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("REFLORA_CANDIDATE", None)
    if candidate:
        env["REFLORA_CANDIDATE"] = candidate
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "reflora.testing.suite", "-p", "no:cacheprovider",
           "-rA", "--max-examples", "8", "--derandomize", *extra]
    # run from an empty folder: the user's project, not reflora's checkout
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_correct_candidate_passes_and_the_header_lists_what_was_found(tmp_path):
    r = run_suite(tmp_path, "lora_candidates:candidate_f32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "reflora candidate: lora_candidates:candidate_f32" in r.stdout
    assert "callables found: forward, backward, train_step, merge, scaling, save, load, unmerge, init" in r.stdout
    assert "PASSED" in r.stdout and "FAILED" not in r.stdout
    for test in ("test_forward[float32]", "test_backward[float32]", "test_metamorphic[float32]",
                 "test_train_step[float32]", "test_merge[float32]", "test_roundtrip[float32]", "test_scaling",
                 "test_unmerge[float32]", "test_init"):
        assert f"PASSED test_candidate.py::{test}" in r.stdout, test


def test_missing_callables_are_skipped_and_listed(tmp_path):
    r = run_suite(tmp_path, "lora_candidates:forward_only")
    assert r.returncode == 0, r.stdout[-3000:]
    assert ("skipped (not provided): backward, train_step, merge, scaling, save, load, unmerge, init, "
            "lora_bias_forward, lora_bias_backward, dora_forward, dora_backward") in r.stdout
    assert "the candidate has no backward" in r.stdout
    assert "the candidate does not compute in float16" in r.stdout


def test_mutant_candidate_fails_with_the_readable_report(tmp_path):
    r = run_suite(tmp_path, "lora_candidates:mutant_candidate", "--max-examples", "40")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "FAILED test_candidate.py::test_forward[float32]" in r.stdout
    assert "reflora.testing.check_forward: y is wrong: abs error" in r.stdout
    assert "Reproduce (reruns just this case):" in r.stdout
    assert "from lora_candidates import fwd_scale_on_base as forward" in r.stdout


def test_xfails_file_marks_listed_tests_and_warns_about_unmatched_ids(tmp_path):
    xf = tmp_path / "xfails.txt"
    xf.write_text("# known bug: scale applied to the base output\n"
                  "test_forward[float32]   # the candle-lora bug\n"
                  "test_metamorphic\n"
                  "test_no_such_thing\n")
    r = run_suite(tmp_path, "lora_candidates:mutant_candidate", "--xfails-file", str(xf), "--max-examples", "40")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 xfailed" in r.stdout
    assert "1 id(s) match no test: test_no_such_thing" in r.stdout


def test_without_a_candidate_the_suite_says_what_to_set(tmp_path):
    r = run_suite(tmp_path, None)
    assert r.returncode != 0  # pytest reports it as an error while collecting the suite
    assert "$REFLORA_CANDIDATE is not set; expected e.g. REFLORA_CANDIDATE=mypkg.lora:candidate" in r.stdout


def test_a_bad_candidate_spec_is_a_usage_error(tmp_path):
    r = run_suite(tmp_path, "lora_candidates:no_such_attribute")
    assert r.returncode != 0
    assert "cannot be loaded: AttributeError" in r.stdout
