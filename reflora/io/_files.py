"""Opening files that may be hostile: regular files only, and strict small JSON files.

``open_regular`` refuses a FIFO, socket, device or folder *before* reading it
(``open()`` of a FIFO blocks until a writer appears: forever): the path is
``stat``-ed first and then opened with ``O_NONBLOCK`` and checked again with
``fstat``, so a file swapped in between is refused too.

``read_json`` reads a config-sized JSON file (adapter_config.json, a shard
index, a golden manifest) with the rules every reflora reader shares: a regular
file of at most ``MAX_JSON_BYTES``, UTF-8, no NaN/Infinity constants (Python's
json accepts them, the JSON standard does not), and nesting too deep for the
parser is a FormatError, not a RecursionError.
"""

from __future__ import annotations

import io
import json
import os
import stat
from typing import Any

from .._errors import FormatError

__all__ = ["MAX_JSON_BYTES", "loads_json", "open_regular", "read_json"]

#: The largest JSON side file reflora reads (a 1M-tensor shard index is about 60 MB).
MAX_JSON_BYTES = 256 << 20

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str, mode: int, what: str) -> FormatError:
    return FormatError(f"{path}: {what} is {_kind(mode)}; expected a regular file")


def open_regular(path: Any, what: str = "the file") -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file (following symlinks), else FormatError.

    Raises:
      reflora.FormatError: a FIFO, socket, device or folder.
      OSError: the file cannot be opened (missing, no permission).
    """
    where = os.fspath(path)
    st = os.stat(where)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(where, st.st_mode, what)
    fd = os.open(where, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(where, st.st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the constant {name} is not JSON (expected a finite number)")


def loads_json(text: str | bytes, where: str) -> Any:
    """json.loads with reflora's rules: FormatError for invalid JSON, NaN/Infinity or nesting too deep."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply to read") from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # json.JSONDecodeError, too many digits, the constants above
        raise FormatError(f"{where}: not valid JSON ({exc})") from None


def read_json(path: Any, what: str = "the file") -> Any:
    """Read a small JSON file strictly (see the module docstring).

    Raises:
      reflora.FormatError: not a regular file, larger than MAX_JSON_BYTES, or not valid JSON.
      FileNotFoundError / OSError: it cannot be opened.
    """
    where = os.fspath(path)
    with open_regular(where, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(f"{where}: {what} has {size} bytes; expected at most {MAX_JSON_BYTES}")
        data = f.read(size + 1)  # (a size, not the cap: read(n) allocates n bytes up front)
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{where}: {what} grew past {MAX_JSON_BYTES} bytes while read")
    return loads_json(data, where)
