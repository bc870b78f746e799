"""Safetensors tensors I/O: a strict validating reader and an atomic writer.

File layout (https://github.com/huggingface/safetensors):

    u64 little-endian N | N bytes of UTF-8 JSON header | data buffer

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
end)} (offsets relative to the data buffer, row-major, little-endian, no
strides), plus an optional "__metadata__" object of string to string.

Reading (``load_tensors``) validates the whole header *before* any tensor is
materialised, then reads the data once through the same open file, so what was
validated is what is returned (no second parse by another library, no
time-of-check/time-of-use gap on the path).
Every malformed file raises ``reflora.FormatError`` naming the file and the
offending key; no other exception type escapes for a malformed file.

Writing (``save_tensors``) lays the file out exactly as the safetensors
package's writer does (tensor order, compact JSON, padding; the tests compare
bytes with ``safetensors.serialize``), with three guards the package lacks:

  * every array is made C-contiguous and little-endian first. safetensors 0.8's
    NumPy writer passes ``arr.ctypes.data`` and ``arr.nbytes`` to Rust, so a
    transposed, sliced, reversed or broadcast array is written from its raw
    buffer: wrong bytes, no error.
  * the file is written to a temporary file in the same folder, fsynced and
    ``os.replace``d over the target: a failure mid-write leaves an existing
    file untouched and no temporary file behind.
  * metadata keys are written sorted, so the same input gives the same bytes
    (the package orders two or more keys by a randomly seeded hash map).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, Mapping

import array_api_compat
import numpy as np

from .._errors import FormatError
from ..backend import asarray, dtype_name, normalize_xp, to_numpy
from .atomic import atomic_write
from .safetensors_header import (FLOAT_NAMES, MAX_DIMS, MAX_HEADER_BYTES, SAFETENSORS_DTYPES, SPEC_NAMES,
                                 validate_header)

__all__ = ["MAX_HEADER_BYTES", "MAX_DIMS", "SAFETENSORS_DTYPES", "load_tensors", "read_header", "save_tensors"]


def _fill(f, buf: memoryview, where: str, what: str) -> None:
    """Read exactly len(buf) bytes into buf, or raise FormatError (the file shrank while read)."""
    n, got = len(buf), 0
    while got < n:
        k = f.readinto(buf[got:])
        if not k:
            raise FormatError(f"{where}: file ended inside the {what} ({got} of {n} bytes; it changed while read?)")
        got += k


def _read_validated(path: Any, *, materialise: bool = True) -> tuple[list, dict[str, str], dict[str, np.ndarray]]:
    """Open and validate a file, then (if materialise) read each tensor into its own array.

    Returns (entries in offset order, metadata, {name: NumPy array}). Tensors
    are read sequentially in offset order (validation proved they tile the
    data exactly), each into a fresh aligned array of exactly its size.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{where}: file has {size} bytes; expected at least 8 (the header length)")
        prefix = bytearray(8)
        _fill(f, memoryview(prefix), where, "header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{where}: header length is {n} bytes; expected at most {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise FormatError(f"{where}: header length is {n} bytes but the file has only {size - 8} after the prefix")
        header = bytearray(n)
        _fill(f, memoryview(header), where, "header")
        entries, metadata = validate_header(bytes(header), size - 8 - n, where)
        arrays: dict[str, np.ndarray] = {}
        if materialise:
            for name, hdt, shape, begin, end in entries:
                npdt = SAFETENSORS_DTYPES[hdt]
                flat = np.empty((end - begin) // npdt.itemsize, dtype=npdt)
                if flat.size:
                    _fill(f, memoryview(flat.view(np.uint8)), where, f"data of tensor {name!r}")
                arrays[name] = flat.reshape(shape)
            if f.read(1):
                raise FormatError(f"{where}: file grew while it was read; expected {size} bytes")
    return entries, metadata, arrays


def read_header(path: Any) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Validate a file and return its table of contents without materialising tensors.

    Args:
      path: a safetensors file.

    Returns:
      ({name: (dtype, shape)} in offset order, metadata); dtypes are header
      names such as "F32", "BF16".

    Raises:
      reflora.FormatError: the file is malformed (see ``load_tensors``).

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
      >>> save_tensors(p, {"w": np.zeros((2, 3), dtype=np.float16)}, metadata={"format": "pt"})
      >>> read_header(p)
      ({'w': ('F16', (2, 3))}, {'format': 'pt'})
    """
    entries, metadata, _ = _read_validated(path, materialise=False)
    return {name: (dtype, shape) for name, dtype, shape, _, _ in entries}, metadata


def load_tensors(path: Any, *, xp: Any = None, dtype: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a safetensors file strictly: validate everything, then materialise.

    Checks, before any tensor exists: the 8-byte header length against the file
    size and the 100,000,000-byte cap; UTF-8 JSON object; no duplicate names;
    known dtypes; shapes lists of non-negative ints with at most 64 dims and no
    64-bit overflow; offsets tiling the data buffer from 0 without gaps or
    overlaps; the file length exact; ``__metadata__`` string to string. Leading
    and trailing whitespace in the header, a header length not a multiple of 8,
    entries out of offset order, 0-d and empty tensors are all valid. Memory
    allocated is bounded by the file size.

    F16, BF16 (``ml_dtypes.bfloat16``), F32 and F64 load losslessly; so do the
    integer, BOOL, C64 and F8 dtypes.

    Args:
      path: a safetensors file.
      xp: namespace of the returned arrays (module or "numpy"/"cupy"/"auto");
        None = the default backend (``$REFLORA_BACKEND``). CuPy arrays are
        copied to the device from the host read.
      dtype: if given (e.g. "float64" for oracle use), every floating-point
        tensor is converted to it; integer and bool tensors keep their dtype.

    Returns:
      (tensors, metadata): {name: array} in the file's offset order, and the
      ``__metadata__`` dict ({} when absent). Each NumPy result is its own
      writeable array, read straight from the file (no intermediate copy).

    Raises:
      reflora.FormatError: the file is malformed; the message names the file and key.
      OSError: the file cannot be opened or read.
      TypeError: the target namespace has no such dtype (e.g. BF16 on CuPy
        without ``dtype=``).

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
      >>> save_tensors(p, {"a": np.arange(6.0).reshape(2, 3).T})
      >>> load_tensors(p, xp="numpy")[0]["a"].tolist()
      [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    target = None if xp is None else normalize_xp(xp)
    upcast = None
    if dtype is not None:
        floats = {SAFETENSORS_DTYPES[h].name: SAFETENSORS_DTYPES[h] for h in FLOAT_NAMES}
        upcast = floats.get(dtype_name(dtype))
        if upcast is None:
            raise TypeError(f"dtype is {dtype!r}; expected a floating dtype such as 'float64' (one of {sorted(floats)})")
    entries, metadata, arrays = _read_validated(path)
    out = {}
    for name, hdt, _, _, _ in entries:
        arr = arrays[name]
        if upcast is not None and hdt in FLOAT_NAMES and arr.dtype != upcast:
            arr = arr.astype(upcast)
        out[name] = arr
    if target is None:
        target = normalize_xp(None)
    if not array_api_compat.is_numpy_namespace(target):
        try:
            out = {k: asarray(v, xp=target) for k, v in out.items()}
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{os.fspath(path)}: cannot move tensors to {target.__name__} ({exc}); "
                            "pass dtype='float32' or 'float64' for BF16/F8 files") from None
    return out, metadata


# --------------------------------------------------------------------------- writing


def _host_contiguous(name: str, x: Any) -> np.ndarray:
    """A C-contiguous little-endian host copy (or the array itself when already so)."""
    if x is None or (isinstance(x, (bool, int, float, complex, list, tuple)) and not isinstance(x, np.generic)):
        raise TypeError(f"tensor {name!r} is a {type(x).__name__}; expected an array")
    host = np.asarray(x) if isinstance(x, np.generic) else to_numpy(x)  # CuPy -> .get(); others via DLPack
    if not isinstance(host, np.ndarray):
        host = np.asarray(host)
    dt = host.dtype
    if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
        host = host.astype(dt.newbyteorder("<"))
    if dt.name not in SPEC_NAMES:
        raise TypeError(f"tensor {name!r} has dtype {dt}; expected one of "
                        f"{sorted(SPEC_NAMES)} (safetensors has no {dt})")
    # The guard safetensors 0.8 lacks: its writer reads ctypes.data for nbytes bytes.
    # (Not np.ascontiguousarray: it turns a 0-d array into shape (1,).)
    return host if host.flags.c_contiguous else host.copy(order="C")


#: The reference writer's dtype order (safetensors' Dtype enum); files list larger ranks first.
_WRITE_RANK = {h: i for i, h in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "C64", "F64", "I64", "U64"])}
_HEADER_NAME = {dt.name: h for h, dt in SAFETENSORS_DTYPES.items()}


def _write_order(host: Mapping[str, np.ndarray]) -> list[str]:
    """Tensor names in the reference writer's order: dtype rank descending, then name (code points)."""
    return sorted(host, key=lambda n: (-_WRITE_RANK[_HEADER_NAME[host[n].dtype.name]], n))


def _header_bytes(host: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """u64 length + the JSON header exactly as safetensors' writer lays it out.

    Compact JSON, ``__metadata__`` first, entries in ``_write_order`` with keys
    dtype, shape, data_offsets, padded with spaces to a multiple of 8. Unlike
    the package (a hash map), metadata keys are sorted: the same input always
    gives the same bytes.
    """
    parts = {}
    if metadata is not None:
        parts["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in _write_order(host):
        a = host[name]
        parts[name] = {"dtype": _HEADER_NAME[a.dtype.name], "shape": list(a.shape),
                       "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_all(f, buf: memoryview) -> None:
    """Write every byte of buf (a raw file may accept fewer bytes per call)."""
    n, done = len(buf), 0
    while done < n:
        done += f.write(buf[done:])


def save_tensors(path: Any, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = True) -> None:
    """Write arrays to a safetensors file, exactly and atomically.

    Every array is first made host-resident (CuPy via ``.get()``), C-contiguous
    and little-endian, so views (transposes, slices, reversed or broadcast
    arrays) are written as their values, never as their raw buffers. Bytes are
    those of the reference writer (``safetensors.serialize``): tensors ordered
    by dtype (wider first) then name, header padded to a multiple of 8, with
    metadata keys sorted so that equal inputs give equal files.

    Args:
      path: destination file.
      tensors: {name: array}; NumPy, CuPy or any DLPack array; dtypes F16, BF16
        (``ml_dtypes.bfloat16``), F32, F64, integers, bool, C64, F8.
      metadata: optional {str: str}, stored as ``__metadata__``.
      overwrite: False refuses to replace an existing file (FileExistsError).

    Raises:
      TypeError: a name or metadata entry is not a string, or a dtype safetensors lacks.
      ValueError: a tensor named "__metadata__".
      FileExistsError: ``overwrite=False`` and ``path`` exists.
      OSError: the write failed; an existing ``path`` is then left byte-identical.

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
      >>> save_tensors(p, {"w": np.ones((2, 2), dtype=np.float32)}, metadata={"format": "pt"})
      >>> load_tensors(p, xp="numpy")[1]
      {'format': 'pt'}
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors is a {type(tensors).__name__}; expected a mapping of name -> array")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata is a {type(metadata).__name__}; expected a mapping of str -> str")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata entry {k!r}: {v!r} ({type(v).__name__}); expected str -> str")
        metadata = dict(metadata)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite is {overwrite!r}; expected True or False")
    host: dict[str, np.ndarray] = {}
    for name, x in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor name {name!r} is a {type(name).__name__}; expected a str")
        if name == "__metadata__":
            raise ValueError("a tensor may not be named '__metadata__' (reserved by the format)")
        host[name] = _host_contiguous(name, x)
    header = _header_bytes(host, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, memoryview(header))
            for name in _write_order(host):
                a = host[name]
                if a.size:
                    _write_all(f, memoryview(a.reshape(-1).view(np.uint8)))

    atomic_write(path, write, overwrite=overwrite)
