"""The safetensors header: dtype table, limits and the strict header validator.

``validate_header`` checks a header's JSON against the data length before any
tensor is materialised (see ``reflora.io.safetensors.load_tensors`` for the
list of checks); every malformed header raises ``reflora.FormatError``.
"""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np

from .._errors import FormatError

__all__ = ["MAX_DIMS", "MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "validate_header"]

#: The format's cap on the JSON header length N (bytes), as the reference reader enforces.
MAX_HEADER_BYTES = 100_000_000
#: reflora's limit on the number of dimensions of one tensor (the reference reader has none).
MAX_DIMS = 64
I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1

#: Header dtype name -> NumPy dtype (little-endian), for every byte-sized safetensors dtype.
#: Sub-byte types (F4, F6_*) are valid safetensors but not readable by reflora (FormatError).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")
# NumPy dtype names ("float32", "bfloat16") of the writable dtypes.
SPEC_NAMES = frozenset(dt.name for dt in SAFETENSORS_DTYPES.values())
FLOAT_NAMES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")


# --------------------------------------------------------------------------- reading


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_strings(obj: Any, where: str) -> None:
    """Refuse strings that are not valid Unicode (JSON escapes of lone surrogates), as the reference does."""
    stack = [obj]
    while stack:
        o = stack.pop()
        items = o.items() if isinstance(o, dict) else [(None, v) for v in o] if isinstance(o, list) else ()
        for k, v in items:
            for text in (k, v):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise FormatError(f"{where}: header string {text!r} holds a lone surrogate; "
                                          "expected valid Unicode") from None
            if isinstance(v, (dict, list)):
                stack.append(v)


def validate_header(header_bytes: bytes, data_len: int, where: str) -> tuple[list, dict[str, str]]:
    """Check a header against the data length; return [(name, dtype, shape, begin, end)], metadata.

    Entries come back in file (offset) order. Raises FormatError for anything
    the format forbids, plus duplicates, unknown entry fields and > MAX_DIMS dims.
    """
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise FormatError(f"{where}: header has the key {exc.args[0]!r} twice; expected unique names "
                          "(the safetensors package silently keeps the last one)") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: header is a JSON {type(header).__name__}; expected an object")
    _check_strings(header, where)

    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: __metadata__ is a JSON {type(meta).__name__}; expected an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise FormatError(f"{where}: __metadata__[{k!r}] is {type(v).__name__} {v!r}; expected a string")
        metadata = meta

    entries = []
    for name, info in header.items():
        key = f"{where}: tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{key}: entry is a JSON {type(info).__name__}; expected an object")
        fields = set(info)
        if fields != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{key}: entry has fields {sorted(fields)}; expected ['data_offsets', 'dtype', 'shape']")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise FormatError(f"{key}: dtype is {dtype!r}; expected a string such as 'F32'")
        if dtype not in SAFETENSORS_DTYPES:
            if dtype in SUB_BYTE:
                raise FormatError(f"{key}: dtype {dtype} is a sub-byte type reflora does not read")
            raise FormatError(f"{key}: unknown dtype {dtype!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise FormatError(f"{key}: shape is {shape!r}; expected a list of non-negative integers")
        if len(shape) > MAX_DIMS:
            raise FormatError(f"{key}: shape has {len(shape)} dims; expected at most {MAX_DIMS}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise FormatError(f"{key}: data_offsets is {offsets!r}; expected [begin, end], non-negative integers")
        begin, end = offsets
        if begin > end:
            raise FormatError(f"{key}: data_offsets [{begin}, {end}] are reversed; expected begin <= end")
        # running product, as the reference's checked_mul: a later 0 must not hide an
        # overflow (NumPy refuses such shapes with a plain ValueError)
        numel = 1
        for d in shape:
            numel *= d
            if d > I64_MAX or numel > I64_MAX:
                raise FormatError(f"{key}: shape {shape} of {dtype} overflows 64 bits (dimension or element count)")
        nbytes = numel * SAFETENSORS_DTYPES[dtype].itemsize
        if nbytes > U64_MAX:
            raise FormatError(f"{key}: shape {shape} of {dtype} overflows 64 bits ({numel} elements)")
        if end - begin != nbytes:
            raise FormatError(f"{key}: data_offsets [{begin}, {end}] hold {end - begin} bytes; expected "
                              f"{nbytes} for shape {shape} of {dtype}")
        entries.append((name, dtype, tuple(shape), begin, end))

    # Offsets must tile [0, data_len) exactly: no gap, no overlap (zero-size tensors sit anywhere in order).
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            what = "a gap" if begin > position else "an overlap"
            raise FormatError(f"{where}: tensor {name!r} starts at data offset {begin}; expected {position} "
                              f"({what} in the data buffer)")
        position = end
    if position != data_len:
        raise FormatError(f"{where}: tensors cover {position} bytes of data; the file holds {data_len} "
                          f"(file length is not 8 + header + data)")
    return entries, metadata
