"""Atomic file writes: nothing is ever lost or half-written on disk."""

from __future__ import annotations

import os
import secrets
from typing import Any

__all__ = ["atomic_write"]


def atomic_write(path: Any, write_to: Any, *, overwrite: bool) -> None:
    """Call write_to(tmp_path), fsync it, then move it over ``path`` atomically.

    On any failure the temporary file is removed and ``path`` is untouched.
    """
    final = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(final)
    if not overwrite and os.path.lexists(final):
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    tmp = os.path.join(folder, f".{os.path.basename(final)}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber; mode 0o666 & ~umask, like a plain open(..., "w").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write_to(tmp)
        os.chmod(tmp, mode)  # in case the writer recreated the file (safetensors' own writer uses 0o600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # atomic "create if absent"
            except FileExistsError:
                raise FileExistsError(f"{final} exists; pass overwrite=True to replace it") from None
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
