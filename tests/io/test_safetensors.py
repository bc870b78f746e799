"""Tests for reflora.io.safetensors: exact round trips, the strict reader, atomic writes.

Oracles: the original arrays (bit-exact), the reference writer's bytes
(safetensors.numpy.save on contiguous copies) and the reference reader
(safetensors.deserialize), used as a peer on mutated files.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as stnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reflora
from reflora import FormatError, load_tensors, save_tensors
from reflora.io import safetensors as safetensors_io
from reflora.backend import to_numpy

DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64}


def _bits(a) -> tuple:
    """(dtype name, shape, raw bytes): equality means bit-identical (NaN payloads included)."""
    a = np.asarray(to_numpy(a))
    return a.dtype.name, a.shape, np.ascontiguousarray(a).tobytes()


def _raw(header: dict | bytes, data: bytes = b"", *, n: int | None = None) -> bytes:
    """A file from a header (dict or bytes) and data, optionally with a forged length prefix."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def _write(tmp_path, blob: bytes, name: str = "f.safetensors"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


# ---------------------------------------------------------------- round trips


def _views(base: np.ndarray) -> dict[str, np.ndarray]:
    """Non-contiguous views the safetensors 0.8 writer would write as raw buffers."""
    return {
        "transposed": base.T,
        "sliced": base[:, ::2],
        "reversed": base[::-1],
        "broadcast": np.broadcast_to(base[:1], base.shape),
        "contiguous": base,
    }


@pytest.mark.parametrize("hdt", sorted(DTYPES))
def test_views_round_trip_exactly(tmp_path, hdt):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 6)).astype(DTYPES[hdt])
    tensors = _views(base)
    for a in tensors.values():
        assert a.base is not None or a is base  # the views really are views
    p = tmp_path / "v.safetensors"
    save_tensors(p, tensors)
    got, meta = load_tensors(p, xp="numpy")
    assert meta == {}
    for name, a in tensors.items():
        assert _bits(got[name]) == _bits(a), name
    # the reference reader sees the same values
    ref = {k: v for k, v in safetensors.deserialize(p.read_bytes())}
    for name, a in tensors.items():
        assert bytes(ref[name]["data"]) == np.ascontiguousarray(a).tobytes(), name


def test_bytes_match_reference_writer(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.float64),
               "h": rng.standard_normal(7).astype(np.float16), "bf": np.ones((2, 2), ml_dtypes.bfloat16),
               "i": np.arange(3, dtype=np.int64), "empty": np.zeros((0, 4), np.float32), "scalar": np.array(2.5)}
    p = tmp_path / "r.safetensors"
    # one metadata key: the reference writer orders several keys by a randomised hash map
    save_tensors(p, tensors, metadata={"format": "pt"})
    assert p.read_bytes() == stnp.save(tensors, metadata={"format": "pt"})


ALL_DTYPES = sorted(safetensors_io.SAFETENSORS_DTYPES)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_bytes_match_reference_writer(tmp_path, data):
    names = data.draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"),
                               min_size=0, max_size=5, unique=True))
    tensors = {}
    for name in names:
        dt = safetensors_io.SAFETENSORS_DTYPES[data.draw(st.sampled_from(ALL_DTYPES))]
        shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        raw = data.draw(st.binary(min_size=int(np.prod(shape)) * dt.itemsize,
                                  max_size=int(np.prod(shape)) * dt.itemsize))
        tensors[name] = np.frombuffer(raw, dtype=dt).reshape(shape)
    meta = data.draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=1))
    if not tensors and meta == {}:
        meta = None  # the reference writes invalid JSON here; see test_no_tensors_and_empty_metadata
    p = tmp_path / "b.safetensors"
    save_tensors(p, tensors, metadata=meta)
    assert p.read_bytes() == stnp.save(tensors, metadata=meta)


def test_no_tensors_and_empty_metadata(tmp_path):
    # safetensors 0.8 writes b'{},"__metadata__":{}}' here (not JSON); reflora writes a valid header
    p = tmp_path / "e.safetensors"
    save_tensors(p, {}, metadata={})
    blob = p.read_bytes()
    assert blob[8:].rstrip(b" ") == b'{"__metadata__":{}}'
    assert safetensors.deserialize(blob) == []
    assert load_tensors(p, xp="numpy") == ({}, {})


def test_several_metadata_keys_are_sorted_and_deterministic(tmp_path):
    meta = {"z": "1", "format": "pt", "reflora": "{}", "a": "x"}
    p, q = tmp_path / "p.safetensors", tmp_path / "q.safetensors"
    save_tensors(p, {"w": np.ones(3)}, metadata=meta)
    save_tensors(q, {"w": np.ones(3)}, metadata=dict(reversed(list(meta.items()))))
    assert p.read_bytes() == q.read_bytes()
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert list(json.loads(p.read_bytes()[8:8 + n])["__metadata__"]) == ["a", "format", "reflora", "z"]
    # the reference reader agrees on everything
    with safetensors.safe_open(p, framework="np") as f:
        assert f.metadata() == meta and f.get_tensor("w").tolist() == [1.0, 1.0, 1.0]


def test_zero_d_keeps_its_shape(tmp_path):
    p = tmp_path / "z.safetensors"
    save_tensors(p, {"s": np.array(3.5, dtype=np.float32), "e": np.zeros((2, 0, 3), np.float64)})
    got, _ = load_tensors(p, xp="numpy")
    assert got["s"].shape == () and float(got["s"]) == 3.5
    assert got["e"].shape == (2, 0, 3)


def test_big_endian_input_is_written_little_endian(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    p = tmp_path / "be.safetensors"
    save_tensors(p, {"a": a})
    got, _ = load_tensors(p, xp="numpy")
    np.testing.assert_array_equal(got["a"], a)
    assert got["a"].dtype == np.dtype("<f4")


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), hdt=st.sampled_from(sorted(DTYPES)))
def test_hypothesis_round_trip_any_view(tmp_path, data, hdt):
    dt = np.dtype(DTYPES[hdt])
    base = data.draw(hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
                                elements=st.floats(width=min(dt.itemsize * 8, 64), allow_nan=True)
                                if hdt != "BF16" else st.floats(-1e4, 1e4, width=32)))
    # a random view: transpose, then a random step slice on every axis
    view = base.T
    steps = data.draw(st.tuples(*[st.sampled_from([1, -1, 2, -2]) for _ in range(view.ndim)]))
    view = view[tuple(slice(None, None, s) for s in steps)]
    p = tmp_path / "h.safetensors"
    save_tensors(p, {"v": view, "b": base})
    got, _ = load_tensors(p, xp="numpy")
    assert _bits(got["v"]) == _bits(view)
    assert _bits(got["b"]) == _bits(base)


def test_namespaces_in_and_out(tmp_path, xp):
    rng = np.random.default_rng(2)
    a64 = rng.standard_normal((4, 3))
    a = xp.asarray(a64)
    b = xp.asarray(a64.astype(np.float32))
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": xp.matrix_transpose(a), "b": b})
    got, _ = load_tensors(p, xp=xp)
    assert type(got["a"]) is type(a)  # the requested namespace's arrays
    np.testing.assert_array_equal(to_numpy(got["a"]), a64.T)
    np.testing.assert_array_equal(to_numpy(got["b"]), a64.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(a), a64)  # input untouched


@pytest.mark.parametrize("hdt", sorted(DTYPES))
def test_dtype_float64_upcasts_exactly(tmp_path, hdt):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5)).astype(DTYPES[hdt])
    p = tmp_path / "u.safetensors"
    save_tensors(p, {"a": a, "i": np.arange(4, dtype=np.int32)})
    got, _ = load_tensors(p, xp="numpy", dtype="float64")
    assert got["a"].dtype == np.float64 and got["i"].dtype == np.int32
    # every F16/BF16/F32 value is exactly representable in float64
    np.testing.assert_array_equal(got["a"], a.astype(np.float64))
    assert [float(v) for v in got["a"].ravel()] == [float(v) for v in a.ravel()]


def test_loaded_arrays_are_independent(tmp_path):
    p = tmp_path / "w.safetensors"
    save_tensors(p, {"a": np.zeros(4), "b": np.ones(4)})
    got, _ = load_tensors(p, xp="numpy")
    got["a"][:] = 7.0
    np.testing.assert_array_equal(got["b"], np.ones(4))


def test_bad_arguments(tmp_path):
    p = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="expected str -> str"):
        save_tensors(p, {"a": np.zeros(1)}, metadata={"n": 1})
    with pytest.raises(ValueError, match="__metadata__"):
        save_tensors(p, {"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="dtype"):
        save_tensors(p, {"a": np.array(["x"])})
    with pytest.raises(TypeError, match="expected a str"):
        save_tensors(p, {1: np.zeros(1)})
    with pytest.raises(TypeError, match="expected an array"):
        save_tensors(p, {"a": [1.0, 2.0]})
    with pytest.raises(TypeError, match="mapping"):
        save_tensors(p, [np.zeros(1)])
    assert not p.exists() and os.listdir(tmp_path) == []
    save_tensors(p, {"a": np.zeros(1, np.float32)})
    with pytest.raises(TypeError, match="floating"):
        load_tensors(p, dtype="int32")


# ---------------------------------------------------------------- strict reader: crafted files

GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
GOOD_DATA = np.array([1.5, -2.0], np.float32).tobytes()

BAD_FILES = {
    "too short": (b"\x01\x00\x00", "at least 8"),
    "length past end": (_raw(GOOD, GOOD_DATA, n=10_000), "only"),
    "length over cap": (_raw(GOOD, GOOD_DATA, n=100_000_001), "at most 100000000"),
    "not utf-8": (_raw(b'{"\xff":1}'), "UTF-8"),
    "not json": (_raw(b'{"a": '), "not valid JSON"),
    "lone surrogate": (_raw(b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', GOOD_DATA),
                       "surrogate"),
    "NaN constant": (_raw(b'{"a": NaN}'), "not valid JSON"),
    "json list": (_raw(b"[1, 2]"), "expected an object"),
    "duplicate name": (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', GOOD_DATA), "twice"),
    "unknown dtype": (_raw({"a": {**GOOD["a"], "dtype": "F33"}}, GOOD_DATA), "unknown dtype 'F33'"),
    "dtype case": (_raw({"a": {**GOOD["a"], "dtype": "f32"}}, GOOD_DATA), "unknown dtype 'f32'"),
    "sub-byte dtype": (_raw({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00"), "sub-byte"),
    "dtype not a string": (_raw({"a": {**GOOD["a"], "dtype": 4}}, GOOD_DATA), "expected a string"),
    "negative dim": (_raw({"a": {**GOOD["a"], "shape": [-2]}}, GOOD_DATA), "non-negative integers"),
    "float dim": (_raw({"a": {**GOOD["a"], "shape": [2.0]}}, GOOD_DATA), "non-negative integers"),
    "bool dim": (_raw({"a": {**GOOD["a"], "shape": [True, 2]}}, GOOD_DATA), "non-negative integers"),
    "shape not a list": (_raw({"a": {**GOOD["a"], "shape": 2}}, GOOD_DATA), "non-negative integers"),
    "65 dims": (_raw({"a": {**GOOD["a"], "shape": [2] + [1] * 64}}, GOOD_DATA), "at most 64"),
    "overflow": (_raw({"a": {"dtype": "F64", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}), "overflows"),
    "overflow hidden by a zero": (_raw({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}),
                                  "overflows"),
    "huge dim times zero": (_raw({"a": {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}}), "overflows"),
    "size mismatch": (_raw({"a": {**GOOD["a"], "shape": [3]}}, GOOD_DATA), "expected 12"),
    "offsets reversed": (_raw({"a": {**GOOD["a"], "shape": [0], "data_offsets": [8, 0]}}, GOOD_DATA), "reversed"),
    "offsets not 2": (_raw({"a": {**GOOD["a"], "data_offsets": [0, 4, 8]}}, GOOD_DATA), "begin, end"),
    "gap": (_raw({"a": {**GOOD["a"], "shape": [1], "data_offsets": [4, 8]}}, GOOD_DATA), "gap"),
    "overlap": (_raw({"a": GOOD["a"], "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, GOOD_DATA),
                "overlap"),
    "data too long": (_raw(GOOD, GOOD_DATA + b"\x00"), "covers 8 bytes|cover 8 bytes"),
    "data too short": (_raw(GOOD, GOOD_DATA[:-1]), "data_offsets|cover"),
    "extra field": (_raw({"a": {**GOOD["a"], "extra": 1}}, GOOD_DATA), "expected \\['data_offsets'"),
    "missing field": (_raw({"a": {"dtype": "F32", "shape": [2]}}, GOOD_DATA), "expected \\['data_offsets'"),
    "entry not object": (_raw({"a": [1, 2]}, GOOD_DATA), "entry is a JSON list"),
    "metadata not object": (_raw({"__metadata__": "x", **GOOD}, GOOD_DATA), "__metadata__"),
    "metadata value not str": (_raw({"__metadata__": {"k": 1}, **GOOD}, GOOD_DATA), "__metadata__\\['k'\\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_file_raises_format_error(tmp_path, case):
    blob, pattern = BAD_FILES[case]
    p = _write(tmp_path, blob)
    with pytest.raises(FormatError, match=pattern) as info:
        load_tensors(p, xp="numpy")
    assert str(p) in str(info.value)  # names the file
    assert isinstance(info.value, ValueError)
    with pytest.raises(FormatError):
        safetensors_io.read_header(p)


def test_format_error_names_the_key(tmp_path):
    header = {"good": GOOD["a"], "bad_one": {"dtype": "X", "shape": [0], "data_offsets": [8, 8]}}
    p = _write(tmp_path, _raw(header, GOOD_DATA))
    with pytest.raises(FormatError, match="'bad_one'"):
        load_tensors(p, xp="numpy")


def test_huge_claims_allocate_nothing(tmp_path):
    # a header claiming 2**40 float32 in a tiny file: refused before any allocation of that size
    header = {"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}
    p = _write(tmp_path, _raw(header, b"\x00" * 16))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            load_tensors(p, xp="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    # and a length prefix near the cap with a short file is refused without reading it
    p2 = _write(tmp_path, _raw(GOOD, GOOD_DATA, n=99_999_999), "g.safetensors")
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="only"):
            load_tensors(p2, xp="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


POSITIVE = {
    "whitespace around header": (b"  \n\t" + json.dumps(GOOD).encode() + b" \r\n  ", GOOD_DATA),
    "length not a multiple of 8": (json.dumps(GOOD, separators=(",", ":")).encode() + b"x"[:0], GOOD_DATA),
    "keys out of offset order": (json.dumps({"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                                             "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
                                 GOOD_DATA),
    "0-d and empty tensors": (json.dumps({"e": {"dtype": "F64", "shape": [0, 3], "data_offsets": [0, 0]},
                                          "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                                          "t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                                          "z": {"dtype": "BF16", "shape": [4, 0], "data_offsets": [8, 8]}}).encode(),
                              GOOD_DATA),
    "no tensors": (b"{}", b""),
    "metadata only": (b'{"__metadata__": {"format": "pt"}}', b""),
}


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_valid_unusual_files_load_like_the_reference(tmp_path, case):
    header, data = POSITIVE[case]
    blob = _raw(header, data)
    if case == "length not a multiple of 8":
        assert len(header) % 8 != 0
    p = _write(tmp_path, blob)
    got, meta = load_tensors(p, xp="numpy")
    ref = dict(safetensors.deserialize(blob))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].shape == tuple(v["shape"])
        assert safetensors_io.SAFETENSORS_DTYPES[v["dtype"]] == got[k].dtype
        assert np.ascontiguousarray(got[k]).tobytes() == bytes(v["data"])
    if case == "keys out of offset order":
        assert float(got["a"][0]) == 1.5 and float(got["b"][0]) == -2.0
    if case == "metadata only":
        assert meta == {"format": "pt"}


def test_unaligned_offsets_still_load(tmp_path):
    # a 1-byte tensor first pushes the F32 tensor to offset 1: valid, must load (copied to align)
    header = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    p = _write(tmp_path, _raw(header, b"\x07" + GOOD_DATA))
    got, _ = load_tensors(p, xp="numpy")
    assert got["f"].tolist() == [1.5, -2.0] and got["u"].tolist() == [7]


# ---------------------------------------------------------------- strict reader: mutation fuzzing


def _reference(blob: bytes):
    """The safetensors package's reading of a blob: {name: (dtype, shape, bytes)} or None if it refuses."""
    try:
        return {k: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(blob)}
    except Exception:
        return None


@st.composite
def _valid_files(draw):
    n = draw(st.integers(1, 3))
    tensors = {}
    for i in range(n):
        hdt = draw(st.sampled_from(sorted(DTYPES) + ["I32"]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * 8, max_size=int(np.prod(shape)) * 8))
        dt = safetensors_io.SAFETENSORS_DTYPES[hdt]
        tensors[f"t{i}"] = np.frombuffer(raw[: int(np.prod(shape)) * dt.itemsize], dtype=dt).reshape(shape)
    meta = draw(st.none() | st.just({"format": "pt"}))
    return stnp.save(tensors, metadata=meta)


@st.composite
def _mutations(draw, blob: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "header_edit", "prefix_edit", "append"]))
    n = struct.unpack("<Q", blob[:8])[0]
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    if kind == "append":
        return blob + draw(st.binary(min_size=1, max_size=9))
    if kind == "prefix_edit":
        new_n = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, 2**63, 2**64 - 1, 100_000_001]) | st.integers(0, n + 64))
        return struct.pack("<Q", max(0, min(new_n, 2**64 - 1))) + blob[8:]
    # header_edit: replace a token in the header text, keeping or fixing the length prefix
    text = blob[8:8 + n].decode()
    edits = [("F32", "F64"), ("F16", "BF16"), ("BF16", "F16"), ("I32", "F32"), ("[0,", "[1,"), ("0]", "1]"),
             ('"shape":[', '"shape":[1,'), ('"shape":[', '"shape":[0,'), (",", ", "), ("{", "{ "),
             ('"t0"', '"t1"'), ('"t1"', '"t0"'), ('"format"', '"format":"pt","x"'), ("data_offsets", "offsets"),
             ("]", ",0]"), ('"pt"', "7"), ('"dtype"', '"dtype":"F32","dtype"')]
    old, new = draw(st.sampled_from(edits))
    edited = text.replace(old, new, 1) if draw(st.booleans()) else text.replace(old, new)
    fix_prefix = draw(st.booleans())
    hb = edited.encode()
    return struct.pack("<Q", len(hb) if fix_prefix else n) + hb + blob[8 + n:]


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_files_load_right_or_raise_format_error(tmp_path, data):
    blob = data.draw(_valid_files())
    mutated = data.draw(_mutations(blob))
    p = _write(tmp_path, mutated, "m.safetensors")
    ref = _reference(mutated)
    try:
        got, _ = load_tensors(p, xp="numpy")
    except FormatError:
        return  # refusing is always allowed (reflora is stricter than the reference)
    # it loaded: the reference reader must agree on every name, dtype, shape and byte
    assert ref is not None, "reflora loaded a file the reference reader refuses"
    assert sorted(got) == sorted(ref)
    for k, (hdt, shape, raw) in ref.items():
        assert got[k].dtype == safetensors_io.SAFETENSORS_DTYPES[hdt], k
        assert got[k].shape == shape, k
        assert np.ascontiguousarray(got[k]).tobytes() == raw, k


def test_mutation_fuzzer_reaches_both_outcomes(tmp_path):
    # guard against a fuzzer that only ever produces refusals: a whitespace edit loads, a truncation refuses
    blob = stnp.save({"a": np.arange(3, dtype=np.float32)})
    n = struct.unpack("<Q", blob[:8])[0]
    spaced = blob[8:8 + n].decode().replace(",", ", ").encode()
    ok = _write(tmp_path, struct.pack("<Q", len(spaced)) + spaced + blob[8 + n:], "ok.safetensors")
    assert load_tensors(ok, xp="numpy")[0]["a"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(FormatError):
        load_tensors(_write(tmp_path, blob[:-1], "bad.safetensors"), xp="numpy")


# ---------------------------------------------------------------- atomic writes


def _listing(folder):
    return sorted(os.listdir(folder))


def test_failure_mid_write_leaves_existing_file_identical(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_tensors(p, {"old": np.arange(10, dtype=np.float32)})
    before = p.read_bytes()
    real = safetensors_io._write_all
    calls = []

    def half_then_fail(f, buf):
        calls.append(len(buf))
        if len(calls) == 2:  # the header went out; the first tensor is cut in half, as a full disk would
            real(f, buf[: len(buf) // 2])
            raise OSError(28, "No space left on device (injected)")
        real(f, buf)

    monkeypatch.setattr(safetensors_io, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        save_tensors(p, {"new": np.ones((64, 64), dtype=np.float64), "b": np.ones(3)})
    assert len(calls) == 2
    assert p.read_bytes() == before
    assert _listing(tmp_path) == ["a.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_failure_at_fsync_or_replace_leaves_existing_file_identical(tmp_path, monkeypatch, where):
    p = tmp_path / "a.safetensors"
    save_tensors(p, {"old": np.arange(10, dtype=np.float32)})
    before = p.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(5, f"I/O error in {where} (injected)")

    monkeypatch.setattr(safetensors_io.os, where, boom)
    with pytest.raises(OSError, match="injected"):
        save_tensors(p, {"new": np.ones(3)})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _listing(tmp_path) == ["a.safetensors"]


def test_keyboard_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(f, buf):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(tmp_path / "n.safetensors", {"a": np.ones(2)})
    assert _listing(tmp_path) == []


def test_overwrite_false_refuses(tmp_path):
    p = tmp_path / "a.safetensors"
    save_tensors(p, {"a": np.ones(2)})
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_tensors(p, {"b": np.zeros(2)}, overwrite=False)
    assert p.read_bytes() == before and _listing(tmp_path) == ["a.safetensors"]
    q = tmp_path / "b.safetensors"
    save_tensors(q, {"b": np.zeros(2)}, overwrite=False)
    assert load_tensors(q, xp="numpy")[0]["b"].tolist() == [0.0, 0.0]
    save_tensors(p, {"c": np.zeros(1)})  # overwrite=True (default) replaces
    assert list(load_tensors(p, xp="numpy")[0]) == ["c"]
    assert _listing(tmp_path) == ["a.safetensors", "b.safetensors"]


def test_written_file_has_umask_permissions(tmp_path):
    p = tmp_path / "m.safetensors"
    save_tensors(p, {"a": np.ones(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask


def test_public_exports():
    assert reflora.save_tensors is save_tensors and reflora.load_tensors is load_tensors
    assert issubclass(reflora.FormatError, ValueError)
