"""Hostile and careless inputs (issue 11): a generated corpus of malformed files and configs.

Every case must end in reflora.FormatError (files) or a ValueError/TypeError naming
the field (API values): never another exception, a hang, a multi-GiB allocation or a
silent wrong result; through the CLI, exit 2 with one "error:" line and no traceback.
The corpus is built here (nothing binary is committed). Cases that could hang
(regexes, FIFOs) run in a subprocess with a timeout, so a regression fails instead
of stalling CI.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reflora
from reflora import FormatError
from reflora.cli import main
from reflora.io import _pattern
from reflora.io.model_merge import merge_model
from reflora.io.safetensors import load_tensors, read_header, save_tensors

HANG_TIMEOUT_S = 120  # generous for a loaded CI machine; a fixed run takes a few seconds


def _st_file(path, header: bytes | str, data: bytes = b"") -> str:
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def _entry(dtype="F32", shape=(1,), off=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off)}


# ---------------------------------------------------------------- safetensors headers

_DEEP = 100_000
SAFETENSORS_CORPUS = {
    # structure: containers where a header has none
    "objects_in_a_list": ('{"x":[' + ",".join(["{}"] * 1000) + "]}", b""),
    "lists_in_a_list": ('{"x":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}', b"\0" * 4),
    "deep_lists": ('{"x":' + "[" * _DEEP + "]" * _DEEP + "}", b""),
    "deep_objects": ('{"x":' + '{"a":' * _DEEP + "1" + "}" * _DEEP + "}", b""),
    "deep_metadata": ('{"__metadata__":{"a":' + "[" * _DEEP + "]" * _DEEP + "}}", b""),
    "long_shape_65_dims": (json.dumps({"x": _entry(shape=[1] * 65, off=(0, 4))}), b"\0" * 4),
    "long_list_of_zeros": ('{"x":{"dtype":"F32","shape":[' + ",".join(["0"] * 100_000) + '],"data_offsets":[0,0]}}',
                           b""),
    "top_level_list": ("[]", b""),
    "top_level_string": ('"abc"', b""),
    "top_level_number": ("12345678", b""),
    "scalar_entry": ('{"x":1}', b""),
    "string_entry": ('{"x":"F32"}', b""),
    # numbers
    "nan_constant": ('{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4),
    "infinity_constant": ('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}', b"\0" * 4),
    "float_dim": ('{"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', b"\0" * 4),
    "negative_dim": ('{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4),
    "400_digit_dim": ('{"x":{"dtype":"F32","shape":[' + "9" * 400 + '],"data_offsets":[0,4]}}', b"\0" * 4),
    "5000_digit_offset": ('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,' + "9" * 5000 + "]}}", b"\0" * 4),
    "zero_times_2_62": (json.dumps({"x": _entry(shape=[0, 2**62], off=(0, 0))}), b""),
    "2_62_times_zero": (json.dumps({"x": _entry(shape=[2**62, 0], off=(0, 0))}), b""),
    "overflowing_shape": (json.dumps({"x": _entry(shape=[2**32, 2**32], off=(0, 0))}), b""),
    "leading_zero_number": ('{"x":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', b"\0" * 4),
    # entries
    "unknown_dtype": (json.dumps({"x": _entry(dtype="F128")}), b"\0" * 4),
    "sub_byte_dtype": (json.dumps({"x": _entry(dtype="F4", off=(0, 1))}), b"\0"),
    "dtype_not_a_string": ('{"x":{"dtype":5,"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "extra_field": (json.dumps({"x": {**_entry(), "strides": [1]}}), b"\0" * 4),
    "missing_field": ('{"x":{"dtype":"F32","shape":[1]}}', b"\0" * 4),
    "duplicate_name": ('{"x":' + json.dumps(_entry()) + ',"x":' + json.dumps(_entry()) + "}", b"\0" * 4),
    "three_offsets": (json.dumps({"x": _entry(off=(0, 4, 8))}), b"\0" * 4),
    "reversed_offsets": (json.dumps({"x": _entry(shape=[0], off=(4, 0))}), b"\0" * 4),
    "gap": (json.dumps({"x": _entry(off=(4, 8))}), b"\0" * 8),
    "overlap": (json.dumps({"x": _entry(), "y": _entry()}), b"\0" * 4),
    "data_too_short": (json.dumps({"x": _entry(shape=[2], off=(0, 8))}), b"\0" * 4),
    "metadata_not_strings": ('{"__metadata__":{"a":1}}', b""),
    "metadata_a_list": ('{"__metadata__":["a"]}', b""),
    # text
    "lone_surrogate": ('{"\\ud800":' + json.dumps(_entry()) + "}", b"\0" * 4),
    "control_char_in_name": ('{"a\x01b":' + json.dumps(_entry()) + "}", b"\0" * 4),
    "not_utf8": (b'{"\xff":' + json.dumps(_entry()).encode() + b"}", b"\0" * 4),
    "trailing_garbage": (json.dumps({"x": _entry()}) + "x", b"\0" * 4),
}


def _raw_cases(tmp_path) -> dict[str, str]:
    """Files that are not (header, data) pairs: wrong sizes, text, a header length beyond the cap."""
    out = {}
    for name, blob in {
        "empty_file": b"",
        "seven_bytes": b"\x01" * 7,
        "json_renamed": b'{"lora_a": [1, 2, 3], "lora_b": [4]}\n',
        "readme_renamed": b"# My adapter\n\nTrained for 3 epochs.\n",
        "length_beyond_file": struct.pack("<Q", 64) + b"{}",
        "length_beyond_cap": struct.pack("<Q", 100_000_001) + b" " * 16,
        "length_2_64_minus_1": struct.pack("<Q", 2**64 - 1) + b"{}",
    }.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        out[name] = str(p)
    # a header over DETAIL_LIMIT that is not a header: refused without being parsed
    out["big_wrong_shape"] = _st_file(tmp_path / "big_wrong_shape.safetensors",
                                      '{"x":[' + ",".join(["1"] * 700_000) + "]}")
    return out


def safetensors_corpus(tmp_path) -> dict[str, str]:
    files = {name: _st_file(tmp_path / f"{name}.safetensors", h, d) for name, (h, d) in SAFETENSORS_CORPUS.items()}
    files.update(_raw_cases(tmp_path))
    return files


def test_safetensors_corpus_is_all_format_errors(tmp_path):
    files = safetensors_corpus(tmp_path)
    assert len(files) >= 45
    for name, path in files.items():
        for read in (load_tensors, read_header):
            with pytest.raises(FormatError) as info:
                read(path)
            assert path in str(info.value), (name, str(info.value))


def test_a_json_file_renamed_safetensors_is_named_as_such(tmp_path):
    path = safetensors_corpus(tmp_path)["json_renamed"]
    with pytest.raises(FormatError, match=r"not a safetensors file \(it starts with '\{\"lora_a', which looks like "
                                          r"JSON"):
        read_header(path)


def test_empty_shape_overflowing_numpy_is_a_format_error(tmp_path):
    # NumPy refuses shape (0, 2**62) of F32 with a plain ValueError ("array is too big")
    path = safetensors_corpus(tmp_path)["zero_times_2_62"]
    with pytest.raises(FormatError, match=r"too large for an array"):
        load_tensors(path, xp="numpy")


def test_cli_shows_one_line_and_no_traceback_for_every_corpus_file(tmp_path, capsys):
    for name, path in safetensors_corpus(tmp_path).items():
        assert main(["inspect", path]) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("reflora inspect: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("header", [
    lambda n: '{"x":[' + ",".join(["{}"] * (n // 3)) + "]}",                                    # issue: 5.2 GiB/100 MB
    lambda n: '{"x":{"shape":[' + ",".join(["0"] * (n // 2)) + "]}}",                            # issue: 851 MiB/20 MB
    lambda n: '{"x":{"dtype":"F32","shape":[' + ",".join(["1000000"] * (n // 8)) + "]}}",
], ids=["objects_in_list", "zeros_in_shape", "big_ints_in_shape"])
def test_hostile_header_costs_a_small_multiple_of_its_size(tmp_path, header):
    n = 4_000_000
    path = _st_file(tmp_path / "h.safetensors", header(n))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the header's bytes, one decoded copy, and nothing per JSON value (before: about 50 x the header)
    assert peak <= 3.5 * n, f"peak {peak / 2**20:.1f} MiB for a {n / 2**20:.1f} MiB header"


def test_a_valid_header_of_every_shape_still_parses(tmp_path):
    # the shape check must accept all that the validator accepts: odd whitespace, key order, -0, escapes
    text = ' \n{ "__metadata__" : { "a\\"\\u00e9" : "x\\n" } ,\t"w" : { "data_offsets" : [ 0 , 0 ] , ' \
           '"shape" : [ -0 , 2 ] , "dtype" : "F32" } , "e\\u00e9" : {"shape":[' + ",".join(["1"] * 64) + \
           '],"dtype":"F16","data_offsets":[0,2]} } \r'
    tensors, meta = load_tensors(_st_file(tmp_path / "v.safetensors", text, bytes(2)), xp="numpy")
    assert meta == {'a"é': "x\n"} and tensors["w"].shape == (0, 2) and tensors["eé"].shape == (1,) * 64


# ---------------------------------------------------------------- PEFT folders, both paths (load_peft and merge)


def _peft_folder(tmp_path, name="ad", *, edit=None, module="layers.0.q", R=2, I=4, O=3, dtypes=("F32", "F32")):
    ad = reflora.LoraAdapter.from_arrays(np.full((R, I), 0.5, np.float32), np.full((O, R), 0.25, np.float32),
                                         alpha=4.0)
    d = tmp_path / name
    reflora.save_peft(d, {module: ad})
    if edit is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        text = edit(cfg)
        (d / "adapter_config.json").write_text(text if isinstance(text, str) else json.dumps(cfg))
    return d


def _base(tmp_path, module="layers.0.q", O=3, I=4):
    p = tmp_path / "base.safetensors"
    save_tensors(p, {f"{module}.weight": np.ones((O, I), np.float32)})
    return p


def _set(key, value):
    def edit(cfg):
        cfg[key] = value
    return edit


def _raw(key, literal):
    """Put a literal (NaN, a 400-digit number, ...) into the JSON text as the value of ``key``."""
    def edit(cfg):
        cfg[key] = "@@"
        return json.dumps(cfg).replace('"@@"', literal)
    return edit


CONFIG_CORPUS = {
    "alpha_nan": _raw("lora_alpha", "NaN"),
    "alpha_infinity": _raw("lora_alpha", "Infinity"),
    "alpha_minus_infinity": _raw("lora_alpha", "-Infinity"),
    "alpha_400_digits": _raw("lora_alpha", "9" * 400),
    "alpha_string": _set("lora_alpha", "8"),
    "alpha_pattern_nan": _raw("alpha_pattern", '{"q": NaN}'),
    "alpha_pattern_infinity": _raw("alpha_pattern", '{"q": Infinity}'),
    "alpha_pattern_400_digits": _raw("alpha_pattern", '{"q": ' + "9" * 400 + "}"),
    "rank_pattern_zero": _set("rank_pattern", {"q": 0}),
    "rank_pattern_float": _set("rank_pattern", {"q": 2.5}),
    "rank_pattern_400_digits": _raw("rank_pattern", '{"q": ' + "9" * 400 + "}"),
    "r_zero": _set("r", 0),
    "r_negative": _set("r", -2),
    "r_bool": _set("r", True),
    "r_float": _set("r", 2.5),
    "r_400_digits": _raw("r", "9" * 400),
    "r_missing": lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "r"}),
    "use_rslora_string": _set("use_rslora", "false"),
    "pattern_not_a_regex": _set("rank_pattern", {"(": 2}),
    "pattern_backreference": _set("alpha_pattern", {r"(q)\1": 2}),
    "pattern_lookahead": _set("alpha_pattern", {r"(?=q)q": 2}),
    "pattern_too_big": _set("alpha_pattern", {"(q{1000}){1000}": 2}),
    "pattern_nested_too_deep": _set("rank_pattern", {"(" * 3000 + "q" + ")" * 3000: 2}),  # RecursionError in re
    "deep_nesting": lambda cfg: '{"peft_type": "LORA", "x": ' + "[" * _DEEP + "]" * _DEEP + "}",
    "not_an_object": lambda cfg: "[1, 2]",
    "not_utf8": lambda cfg: "\udcff",
    "empty": lambda cfg: "",
}


def _check_config_case(tmp_path, name, edit, capsys):
    d = _peft_folder(tmp_path, name, edit=edit)
    with pytest.raises(FormatError) as info:
        reflora.load_peft(d)
    assert "adapter_config.json" in str(info.value), str(info.value)
    with pytest.raises(FormatError):
        merge_model(_base(tmp_path), d, tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()
    for argv in (["inspect", str(d)], ["merge", "--quiet", str(_base(tmp_path)), str(d), str(tmp_path / "o")]):
        assert main(argv) == 2, (name, argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error: " in err, err


@pytest.mark.parametrize("name", sorted(set(CONFIG_CORPUS) - {"not_utf8"}))
def test_config_corpus_is_refused_by_load_peft_and_merge_alike(tmp_path, name, capsys):
    _check_config_case(tmp_path, name, CONFIG_CORPUS[name], capsys)


def test_config_not_utf8(tmp_path):
    d = _peft_folder(tmp_path)
    (d / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
    with pytest.raises(FormatError, match="not UTF-8"):
        reflora.load_peft(d)


def test_r_zero_with_empty_tensors_is_a_format_error_not_zero_division(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    save_tensors(d / "adapter_model.safetensors", {"base_model.model.m.lora_A.weight": np.zeros((0, 4), np.float32),
                                                   "base_model.model.m.lora_B.weight": np.zeros((3, 0), np.float32)})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8}))
    base = _base(tmp_path, module="m")
    for call in (lambda: reflora.load_peft(d), lambda: merge_model(base, d, tmp_path / "o", progress=False)):
        with pytest.raises(FormatError, match=r"r is 0; expected a number >= 1"):
            call()


def _run_isolated(code: str, timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (this checkout's reflora) with a timeout: a hang fails, never stalls."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(reflora.__file__)))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {timeout} s: {(exc.stdout or '')[-500:]} {(exc.stderr or '')[-500:]}")
    out.seconds = time.monotonic() - t0
    return out


def test_catastrophic_pattern_does_not_hang_load_peft_or_merge(tmp_path):
    module = "a" * 32 + "!"  # with re and the key (a+)+ this takes longer than the age of the universe
    d = _peft_folder(tmp_path, module=module, edit=_set("alpha_pattern", {"(a+)+": 2}))
    base = _base(tmp_path, module=module)
    res = _run_isolated(f"""
        import reflora, sys
        from reflora.io.model_merge import merge_model
        print(reflora.load_peft({str(d)!r})[{module!r}].scale)
        merge_model({str(base)!r}, {str(d)!r}, {str(tmp_path / "m")!r}, progress=False)
        print("merged")
    """)
    # the key does not match 'aaa...a!' (it would need to end the path): PEFT's answer is lora_alpha / r
    assert res.returncode == 0 and res.stdout.split() == ["2.0", "merged"], res.stderr


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"(?:[ab.|()*+?{}012^$]|\\\.|\\b|\[ab\]|\[\^a\]){0,10}", fullmatch=True),
       st.from_regex(r"[ab.]{0,8}", fullmatch=True))
def test_bounded_matcher_gives_re_s_answer(pattern, path):
    try:
        want = re.match(rf"(.*\.)?({pattern})$", path) is not None
    except re.error:
        return
    try:
        got = _pattern._matches(pattern, path)
    except _pattern.PatternError:
        return  # refused constructs are covered by test_config_corpus
    assert got == want, (pattern, path)


def test_bounded_matcher_agrees_with_peft_on_real_patterns():
    peft_other = pytest.importorskip("peft.utils.other")
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "lm_head", "q_proj",
             "model.layers.1.mlp.down_proj"]
    patterns = [r"q_proj", r"layers\.0\.self_attn\.q_proj", r"layers\.1\d*\..*", r".*\.(q|v)_proj", r"^model\..*",
                r"down_proj|up_proj", r"lm_head", r"self_attn.q_proj$", r"layers.0"]
    for path in paths:
        for order in (patterns, patterns[::-1]):
            want = peft_other.get_pattern_key(order, path)
            got = _pattern.pattern_key(order, path)
            assert (got if got is not None else path) == want, (path, order)


# ---------------------------------------------------------------- non-regular files (FIFOs)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX; CI runs on Linux")
def test_fifos_are_refused_everywhere_without_blocking(tmp_path):
    d = _peft_folder(tmp_path)
    base = _base(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fdir = tmp_path / "fifo_adapter"
    fdir.mkdir()
    (fdir / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    os.mkfifo(fdir / "adapter_model.safetensors")
    cdir = tmp_path / "fifo_config"
    cdir.mkdir()
    (cdir / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes())
    os.mkfifo(cdir / "adapter_config.json")
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layers.0.q.weight": "s1"}}))
    os.mkfifo(shards / "s1")
    idx = tmp_path / "fifo_index"
    idx.mkdir()
    os.mkfifo(idx / "model.safetensors.index.json")
    golden, results = tmp_path / "golden", tmp_path / "results"
    results.mkdir()
    res = _run_isolated(f"""
        import reflora, sys
        from reflora import FormatError
        from reflora.io.model_merge import merge_model
        from reflora.testing import golden as g
        calls = {{
            "load_tensors(FIFO)": lambda: reflora.load_tensors({str(fifo)!r}),
            "load_adapter(FIFO)": lambda: reflora.load_adapter({str(fifo)!r}, alpha=1.0),
            "load_peft(weights FIFO)": lambda: reflora.load_peft({str(fdir)!r}),
            "load_peft(config FIFO)": lambda: reflora.load_peft({str(cdir)!r}),
            "merge(BASE FIFO)": lambda: merge_model({str(fifo)!r}, {str(d)!r}, {str(tmp_path / 'o1')!r},
                                                    progress=False),
            "merge(shard FIFO)": lambda: merge_model({str(shards)!r}, {str(d)!r}, {str(tmp_path / 'o2')!r},
                                                     progress=False),
            "merge(index FIFO)": lambda: merge_model({str(idx)!r}, {str(d)!r}, {str(tmp_path / 'o3')!r},
                                                     progress=False),
            "merge(adapter weights FIFO)": lambda: merge_model({str(base)!r}, {str(fdir)!r}, {str(tmp_path / 'o4')!r},
                                                               progress=False),
        }}
        for name, call in calls.items():
            print(name, flush=True)
            try:
                call()
            except FormatError as exc:
                assert "FIFO" in str(exc), exc
            else:
                sys.exit(name + " did not raise")
        names = g.write_golden({str(golden)!r})
        import os
        os.mkfifo(os.path.join({str(results)!r}, names[0] + ".safetensors"))
        rows, ok = g.check_golden({str(golden)!r}, {str(results)!r})
        assert not ok and "FIFO" in rows[0]["failures"][0], rows[0]
        print("done")
    """)
    assert res.returncode == 0 and res.stdout.strip().endswith("done"), res.stdout + res.stderr


# ---------------------------------------------------------------- other JSON side files


def test_shard_index_corpus(tmp_path):
    d = _peft_folder(tmp_path)
    for name, text in {"deep": '{"weight_map": ' + "[" * _DEEP + "]" * _DEEP + "}",
                       "nan": '{"weight_map": {"a": NaN}}', "list": "[]", "no_map": "{}",
                       "shard_in_another_folder": '{"weight_map": {"layers.0.q.weight": "../x.safetensors"}}'}.items():
        base = tmp_path / f"base_{name}"
        base.mkdir()
        (base / "model.safetensors.index.json").write_text(text)
        with pytest.raises(FormatError):
            merge_model(base, d, tmp_path / f"out_{name}", progress=False)


def test_golden_manifest_corpus(tmp_path, capsys):
    from reflora.testing.golden import check_golden

    results = tmp_path / "results"
    results.mkdir()
    for name, text in {"deep": "[" * _DEEP + "]" * _DEEP, "nan": '{"format": NaN}',
                       "tolerance_400_digits": None, "tolerance_nan": None}.items():
        g = tmp_path / name
        g.mkdir()
        if text is None:
            case = {"name": "c", "file": "c.safetensors", "outputs": {"y": {"shape": [1], "tolerance": "@@"}}}
            lit = "9" * 400 if "400" in name else "NaN"
            text = json.dumps({"format": "reflora-golden", "version": 1, "cases": [case]}).replace('"@@"', lit)
        (g / "manifest.json").write_text(text)
        with pytest.raises(FormatError):
            check_golden(str(g), str(results))
        assert main(["golden", "check", str(g), "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err


def test_reflora_metadata_record_corpus(tmp_path):
    ad = reflora.LoraAdapter.from_arrays(np.ones((2, 4)), np.ones((3, 2)), alpha=2.0)
    for name, record in {"deep": "[" * _DEEP + "]" * _DEEP, "nan": '{"version": NaN}', "not_json": "{",
                         "alpha_inf": None}.items():
        p = tmp_path / f"{name}.safetensors"
        reflora.save_adapter(p, ad, layout="seed")
        tensors, meta = load_tensors(p, xp="numpy")
        if record is None:
            rec = json.loads(meta["reflora"])
            rec["modules"][""]["alpha"] = "@@"
            record = json.dumps(rec).replace('"@@"', "Infinity")
        save_tensors(p, tensors, metadata={**meta, "reflora": record})
        with pytest.raises(FormatError):
            reflora.load_adapter(p)


# ---------------------------------------------------------------- API values: a ValueError/TypeError naming the field


def _seed_file() -> str:
    import tempfile

    p = os.path.join(tempfile.mkdtemp(), "bare.safetensors")
    save_tensors(p, {"lora_a": np.ones((4, 2)), "lora_b": np.ones((2, 3))})
    return p


@pytest.mark.parametrize("call, exc, field", [
    (lambda: reflora.LoraConfig(alpha=10**400), ValueError, "LoraConfig.alpha"),
    (lambda: reflora.LoraConfig(alpha=float("inf")), ValueError, "LoraConfig.alpha"),
    (lambda: reflora.LoraAdapter.from_arrays(np.ones((1, 2)), np.ones((2, 1)), alpha=10**400), ValueError, "alpha"),
    (lambda: reflora.lora_forward(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=10**400), ValueError,
     "scale"),
    (lambda: reflora.lora_forward(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=float("nan")), ValueError,
     "scale"),
    (lambda: reflora.merge(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=10**400), ValueError, "scale"),
    (lambda: reflora.SGD(lr=10**400), ValueError, "lr"),
    (lambda: __import__("reflora.testing", fromlist=["x"]).TolerancePolicy(k=10**400), ValueError, "k is"),
    (lambda: __import__("reflora.testing", fromlist=["x"]).TolerancePolicy(overrides={"y": {"floor_abs": 10**400}}),
     ValueError, "floor_abs"),
    (lambda: reflora.load_adapter(_seed_file(), alpha=10**400), ValueError, "alpha"),
    (lambda: reflora.SGD(lr=1e-3, momentum=float("nan")), ValueError, "momentum"),
    (lambda: reflora.merge(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=1.0, fan_in_fan_out="False"),
     TypeError, "fan_in_fan_out"),
    (lambda: reflora.LoraAdapter(reflora.LoraConfig(), xp="os"), ValueError, "xp"),
    (lambda: reflora.LoraAdapter(reflora.LoraConfig(), xp="this"), ValueError, "xp"),
    (lambda: reflora.lora_forward(None, np.ones((1, 2)), np.ones((2, 1)), scale=1.0), TypeError, "x is NoneType"),
    (lambda: reflora.lora_forward(np.ma.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=1.0), TypeError,
     "MaskedArray"),
    (lambda: reflora.merge(np.ma.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), scale=1.0), TypeError, "MaskedArray"),
    (lambda: reflora.merge(None, np.ones((1, 2)), np.ones((2, 1)), scale=1.0), TypeError, "W is NoneType"),
])
def test_api_values_get_a_value_or_type_error_naming_the_field(call, exc, field):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) in (ValueError, TypeError) and field in str(info.value), str(info.value)


def test_xp_by_name_never_imports_an_arbitrary_module():
    assert "antigravity" not in sys.modules
    with pytest.raises(ValueError):
        reflora.LoraAdapter(reflora.LoraConfig(), xp="antigravity")
    assert "antigravity" not in sys.modules


def test_save_tensors_takes_torch_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16).T  # a non-contiguous view
    save_tensors(tmp_path / "t.safetensors", {"t": t})
    got = load_tensors(tmp_path / "t.safetensors", xp="numpy")[0]["t"]
    assert got.dtype.name == "bfloat16" and got.astype(np.float32).tolist() == [[0, 3], [1, 4], [2, 5]]


# ---------------------------------------------------------------- writers and readers share one module-path rule


@pytest.mark.parametrize("module", ["a\nb", "x.modules_to_save", "trainable_tokens_delta", "a..b", ".a", "a b",
                                    "x\n", "a\x00b"])
def test_writers_refuse_module_paths_their_readers_refuse(tmp_path, module):
    ad = reflora.LoraAdapter.from_arrays(np.ones((1, 2)), np.ones((2, 1)), alpha=1.0)
    with pytest.raises(ValueError, match="module"):
        reflora.save_peft(tmp_path / "p", {module: ad})
    with pytest.raises(ValueError, match="module"):
        reflora.save_adapter(tmp_path / "a.safetensors", {module: ad})
    with pytest.raises(ValueError, match="module"):
        reflora.save_adapter(tmp_path / "b.safetensors", ad, module=module)
    assert not os.listdir(tmp_path)


def _peft_with_keys(tmp_path, name, tensors):
    d = tmp_path / name
    d.mkdir()
    save_tensors(d / "adapter_model.safetensors", tensors)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    return d


def test_a_key_ending_in_newline_is_refused_by_load_peft_and_merge(tmp_path):
    d = _peft_with_keys(tmp_path, "nl", {"base_model.model.m.lora_A.weight\n": np.ones((1, 2), np.float32),
                                         "base_model.model.m.lora_B.weight": np.ones((2, 1), np.float32)})
    base = _base(tmp_path, module="m", O=2, I=2)
    with pytest.raises(FormatError):
        reflora.load_peft(d)
    with pytest.raises(FormatError):
        merge_model(base, d, tmp_path / "o", progress=False)


def test_mixed_a_b_dtypes_are_refused_by_load_peft_and_merge_alike(tmp_path):
    d = _peft_with_keys(tmp_path, "mixed", {"base_model.model.m.lora_A.weight": np.ones((1, 2), np.float32),
                                            "base_model.model.m.lora_B.weight": np.ones((2, 1), np.float16)})
    base = _base(tmp_path, module="m", O=2, I=2)
    for call in (lambda: reflora.load_peft(d), lambda: merge_model(base, d, tmp_path / "o", progress=False)):
        with pytest.raises(FormatError, match="lora_A is float32 and lora_B float16; expected one dtype"):
            call()
