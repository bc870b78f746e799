"""The command line follows the usual conventions (issue 12, section 3)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reflora
from reflora.cli import build_parser, cli_message, main
from reflora.io.safetensors import save_tensors


def _run(*args, stdin=None, shell=False, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(reflora.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = args[0] if shell else [sys.executable, "-m", "reflora", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, shell=shell, timeout=300, cwd=cwd)


def _adapters(dora=False):
    rng = np.random.default_rng(0)
    ads = {}
    for m in ("layers.0.q", "layers.0.v"):
        ad = reflora.LoraAdapter.from_arrays(rng.standard_normal((2, 4)), rng.standard_normal((3, 2)), alpha=8.0)
        if dora:
            ad.magnitude = ad._extra(np.abs(rng.standard_normal(3)) + 1, "magnitude")
        ads[m] = ad
    return ads


def test_version_and_python_m_reflora(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"reflora {reflora.__version__}"
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"reflora {reflora.__version__}"
    res = _run("info")
    assert res.returncode == 0 and "reflora" in res.stdout


def _parsers():
    stack = [("reflora", build_parser())]
    while stack:
        name, p = stack.pop()
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for sub, sp in a.choices.items():
                    assert helps.get(sub), f"{name} {sub} has no help text"
                    stack.append((f"{name} {sub}", sp))


def test_every_subcommand_and_positional_has_help_and_no_rst():
    seen = 0
    for name, p in _parsers():
        seen += 1
        for a in p._actions:
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
                assert a.help, f"{name}: positional {a.dest} has no help text"
        assert "``" not in (p.description or "") and ":func:" not in (p.description or ""), name
        assert "``" not in p.format_help(), name
    assert seen >= 8


def test_one_flag_replaces_an_output_everywhere():
    for name, p in _parsers():
        flags = {s for a in p._actions for s in a.option_strings}
        if name in ("reflora convert", "reflora merge"):
            assert "--overwrite" in flags, name
        if "--force" in flags:  # the deprecated alias is hidden and means --overwrite
            (force,) = [a for a in p._actions if "--force" in a.option_strings]
            assert force.help == argparse.SUPPRESS and force.dest == "overwrite"
            assert "--force" not in p.format_help()


def test_messages_name_flags_not_keyword_arguments():
    assert cli_message("x exists; pass overwrite=True to replace it") == "x exists; pass --overwrite to replace it"
    assert cli_message("pass layout='peft' or layout='seed'") == "pass --layout peft or --layout seed"
    assert cli_message("so alpha is unknown; pass alpha= (PEFT's lora_alpha; for a PEFT directory use "
                       "reflora.load_peft)") == ("so alpha is unknown; pass --alpha (PEFT's lora_alpha; for a PEFT "
                                                 "folder pass the folder)")
    assert cli_message("got use_rslora=True") == "got --use-rslora"
    assert cli_message("expected a new folder (or overwrite)") == "expected a new folder (or pass --overwrite)"


def test_bare_file_without_alpha_names_the_flag(tmp_path, capsys):
    p = tmp_path / "bare.safetensors"
    save_tensors(p, {"lora_a": np.ones((4, 2)), "lora_b": np.ones((2, 3))})
    assert main(["convert", str(p), str(tmp_path / "o.safetensors"), "--to", "peft"]) == 2
    err = capsys.readouterr().err
    assert "--alpha" in err and "alpha=" not in err and "reflora.load_peft" not in err, err


def test_overwrite_message_has_no_doubled_word(tmp_path, capsys):
    src = tmp_path / "src"
    reflora.save_peft(src, _adapters())
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"x")
    assert main(["convert", str(src), str(dst), "--to", "seed"]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite to replace it" in err and "exists exists" not in err


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    src = tmp_path / "src"
    reflora.save_peft(src, {f"layers.{i}.q": ad for i, ad in enumerate(list(_adapters().values()) * 200)})
    res = _run(f"{sys.executable} -m reflora inspect {src} | head -2", shell=True, cwd=os.getcwd())
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2
    assert res.stderr == "", res.stderr


def test_json_renamed_safetensors(tmp_path, capsys):
    p = tmp_path / "adapter.safetensors"
    p.write_text(json.dumps({"lora_a": [[1.0]], "lora_b": [[2.0]]}))
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file (it starts with" in err and "looks like JSON" in err, err


def test_inspect_an_empty_folder_or_one_without_adapter_config(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "is empty: expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)" in err
    only = tmp_path / "only"
    only.mkdir()
    save_tensors(only / "adapter_model.safetensors", {"lora_a": np.ones((4, 2)), "lora_b": np.ones((2, 3))})
    assert main(["inspect", str(only)]) == 2
    err = capsys.readouterr().err
    assert "has no adapter_config.json" in err and f"pass it: {only / 'adapter_model.safetensors'}" in err, err
    assert err.count("\n") == 1


def test_golden_check_with_a_missing_results_folder_is_one_usage_error(tmp_path, capsys):
    g = tmp_path / "g"
    g.mkdir()
    with pytest.raises(SystemExit) as info:
        main(["golden", "check", str(g), "--results", str(tmp_path / "missing")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--results" in err and "no such folder" in err, err


def test_a_missing_results_file_shows_no_figures():
    from reflora.testing.golden import format_table

    rows = [{"case": "c0", "status": "FAIL", "worst": "-", "err": 0.0, "tolerance": 0.0, "ratio": 0.0,
             "failures": ["missing results file r/c0.safetensors"]},
            {"case": "c1", "status": "ok", "worst": "y", "err": 1e-9, "tolerance": 1e-8, "ratio": 0.1,
             "failures": []}]
    lines = format_table(rows).splitlines()
    assert "0.000" not in lines[1] and lines[1].split()[2:] == ["-", "-", "-", "-"], lines[1]
    assert "0.100" in lines[3]


def test_dora_to_seed_says_what_the_cli_can_do(tmp_path, capsys):
    src = tmp_path / "dora"
    reflora.save_peft(src, _adapters(dora=True))
    assert main(["convert", str(src), str(tmp_path / "s.safetensors"), "--to", "seed"]) == 2
    err = capsys.readouterr().err
    assert f"reflora convert {src} DIR --to peft" in err and "reflora merge BASE" in err, err
    assert "reflora.save_peft" not in err and "(directory" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_merge_with_a_seed_file_as_adapter_names_the_folder(tmp_path, capsys):
    seed = tmp_path / "adapters" / "seed.safetensors"
    seed.parent.mkdir()
    reflora.save_adapter(seed, next(iter(_adapters().values())), layout="seed")
    base = tmp_path / "base.safetensors"
    save_tensors(base, {"linear.weight": np.ones((3, 4), np.float32)})
    assert main(["merge", "--quiet", str(base), str(seed), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"{seed} is an adapter file, and its folder {seed.parent} has no adapter_config.json" in err
            and f"reflora convert {seed} NEW_DIR --to peft" in err), err


def test_convert_keeps_the_source_config_keys(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"],
                                                      rank_pattern={"1": 1}, init_lora_weights=False))
    src = tmp_path / "src"
    model.save_pretrained(src)
    original = json.loads((src / "adapter_config.json").read_text())
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "peft"]) == 0
    written = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    changed = {k for k in set(original) | set(written) if original.get(k) != written.get(k)}
    assert not changed, {k: (original.get(k), written.get(k)) for k in changed}
    assert list(written) == list(original)  # the same key order: a diff shows nothing
    for k in ("peft_version", "task_type", "target_modules", "auto_mapping"):
        assert k in written or k not in original
    # and PEFT loads the result with the same outputs
    again = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5)), str(tmp_path / "dst"))
    x = torch.randn(2, 4)
    with torch.no_grad():
        again.base_model.model[0].base_layer.load_state_dict(model.base_model.model[0].base_layer.state_dict())
        again.base_model.model[1].base_layer.load_state_dict(model.base_model.model[1].base_layer.state_dict())
        assert torch.equal(again(x), model(x))
