"""All-or-nothing writes: a destination file or folder is exactly old or exactly new.

``atomic_write(path, write_to)``: ``write_to(tmp)`` fills a temporary file in
the destination's folder; it is fsynced and renamed over ``path``. Any
exception before the rename (in ``write_to``, a full disk, a failed fsync or
close) removes the temporary file and leaves ``path`` untouched; a crash
leaves at most a temporary file, which the next write into that folder removes
(see ``clean_stale``). After the rename the write has succeeded: a failing
fsync of the folder or removal of a leftover is reported as a
``RuntimeWarning``, not raised, since the new content is in place.

``atomic_folder(path, build)``: ``build(tmp)`` fills a fresh temporary folder
next to ``path``, which then takes ``path``'s place in one step: on Linux the
two are swapped with ``renameat2(RENAME_EXCHANGE)`` (a reader sees the old or
the new folder, never neither, never a mix of their files), else by two
renames with the old folder kept under a temporary name until the new one is
in place (a crash between them leaves the old folder under that name, which
the next call puts back).

Temporary names are ``.<name>.reflora-tmp-<pid>-<random>`` (cut to the
folder's NAME_MAX), so a leftover is recognisable and its writer's process id
known. The mode of a replaced file or folder is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import time
import warnings
from typing import Any, Callable, Iterable

__all__ = ["TMP_TAG", "atomic_folder", "atomic_write", "clean_stale", "exists_message", "read_consistently",
           "recover_folder", "replace_folder"]

TMP_TAG = ".reflora-tmp-"
#: A leftover of a process that is gone is removed once it is this old (seconds); any leftover after a week.
STALE_DEAD_S = 60.0
STALE_ANY_S = 7 * 24 * 3600.0
_RENAME_EXCHANGE = 2


def exists_message(path: str) -> str:
    return f"{path} exists; pass overwrite=True to replace it"


def _name_max(folder: str) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _tmp_path(final: str, suffix: str = "") -> str:
    """A fresh temporary name next to ``final`` that fits the folder's NAME_MAX."""
    folder, name = os.path.split(final)
    tail = f"{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    room = _name_max(folder) - 1 - len(tail.encode())
    head = name.encode("utf-8", "surrogateescape")[:max(room, 0)].decode("utf-8", "ignore")
    return os.path.join(folder, f".{head}{tail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def clean_stale(folder: str, *, now: float | None = None) -> list[str]:
    """Remove reflora's temporary files/folders in ``folder`` left by writers that were killed.

    A leftover is ``.*.reflora-tmp-<pid>-<hex>``; it is removed when its process is
    gone and it is older than ``STALE_DEAD_S``, or when it is older than ``STALE_ANY_S``
    (a process id that was reused). Failures are warnings. Returns the paths removed.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(".") or TMP_TAG not in e.name:
            continue
        try:
            pid = int(e.name.rsplit(TMP_TAG, 1)[1].split("-", 1)[0])
            age = now - e.stat(follow_symlinks=False).st_mtime
        except (ValueError, IndexError, OSError):
            continue
        if e.name.endswith(".old"):  # a folder's previous version: the only copy if a swap was cut short
            owner = _tmp_owner(e.name, folder)
            if owner is None or not os.path.lexists(os.path.join(folder, owner)):
                continue  # recover_folder puts it back on the next write of that folder
        if (pid != os.getpid() and not _pid_alive(pid) and age > STALE_DEAD_S) or age > STALE_ANY_S:
            try:
                _remove(e.path)
                removed.append(e.path)
            except OSError as exc:
                _warn(f"reflora: could not remove the leftover temporary {e.path} ({exc})")
    return removed


def _fsync_path(path: str, *, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder_after(folder: str, what: str) -> None:
    try:
        _fsync_path(folder, directory=True)
    except OSError as exc:
        _warn(f"reflora: {what} is written, but syncing its folder {folder} failed ({exc}); "
              "the rename may not survive a power loss")


def atomic_write(path: Any, write_to: Callable[[str], None], *, overwrite: bool) -> None:
    """Call ``write_to(tmp)``, fsync ``tmp``, then move it to ``path`` in one rename.

    Raises:
      FileExistsError: ``overwrite`` is False and ``path`` exists (checked before and
        at the rename, which then cannot replace a file that appeared meanwhile).
      OSError, or what ``write_to`` raises: nothing was changed at ``path``.
    """
    final = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(final)
    if not overwrite and os.path.lexists(final):
        raise FileExistsError(exists_message(final))
    clean_stale(folder)
    tmp = _tmp_path(final)
    linked = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask, as a plain open() would give
        finally:
            os.close(fd)
        try:
            old = os.stat(final)
            if stat.S_ISREG(old.st_mode):
                mode = stat.S_IMODE(old.st_mode)  # keep the mode of the file being replaced
        except OSError:
            pass
        write_to(tmp)
        os.chmod(tmp, mode)  # also undoes a writer that recreated the file with its own mode
        _fsync_path(tmp, directory=False)
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # atomic "create if absent"
            except FileExistsError:
                raise FileExistsError(exists_message(final)) from None
            except OSError as exc:  # a file system without hard links
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(final):
                    raise FileExistsError(exists_message(final)) from None
                os.replace(tmp, final)
            else:
                linked = True
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if linked:
        try:
            os.unlink(tmp)
        except OSError as exc:
            _warn(f"reflora: {final} is written, but removing the temporary {tmp} failed ({exc})")
    _fsync_folder_after(folder, final)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"swapping {b} with its new version failed: {os.strerror(err)}", b)


def _old_name(final: str) -> str:
    return _tmp_path(final, ".old")


def _tmp_owner(entry: str, folder: str) -> str | None:
    """The destination a temporary name ``.<name>.reflora-tmp-...`` was made for, when it can be told."""
    head = entry[1:entry.rindex(TMP_TAG)]
    if len(head.encode("utf-8", "surrogateescape")) < _name_max(folder) - 64:
        return head  # not cut by _tmp_path: the whole destination name
    return None


def recover_folder(final: str) -> None:
    """Put back a folder that a crash left under a temporary ``.old`` name (two-rename fallback only)."""
    if os.path.lexists(final):
        return
    parent, name = os.path.split(final)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    olds = []
    for e in entries:
        if e.name.startswith(".") and TMP_TAG in e.name and e.name.endswith(".old"):
            owner = _tmp_owner(e.name, parent)
            if owner == name or (owner is None and name.startswith(e.name[1:e.name.rindex(TMP_TAG)])):
                olds.append(e)
    if olds:
        newest = max(olds, key=lambda e: e.stat(follow_symlinks=False).st_mtime)
        os.rename(newest.path, final)


def atomic_folder(path: Any, build: Callable[[str], None], *, overwrite: bool,
                  keep: Callable[[str], bool] | None = None) -> None:
    """Build a new version of folder ``path`` next to it, then switch to it in one step.

    Args:
      path: the folder (created if absent).
      build: ``build(tmp)`` writes the new content into the empty folder ``tmp``.
      overwrite: False refuses an existing non-empty ``path``.
      keep: for entries of an existing ``path`` that ``build`` does not write:
        ``keep(name)`` True carries them over (hard links, else copies); None keeps
        every entry that ``build`` did not write.
    """
    final = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    recover_folder(final)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise NotADirectoryError(f"{final} exists and is not a folder; expected a folder (or a new path)")
    if not overwrite and os.path.isdir(final) and os.listdir(final):
        raise FileExistsError(exists_message(final))
    clean_stale(parent)
    tmp = _tmp_path(final)
    os.mkdir(tmp)
    old = None
    try:
        build(tmp)
        existed = os.path.isdir(final)
        if existed:
            os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
            written = set(os.listdir(tmp))
            for e in os.scandir(final):
                if e.name in written or (keep is not None and not keep(e.name)):
                    continue
                dst = os.path.join(tmp, e.name)
                if e.is_dir(follow_symlinks=False):
                    shutil.copytree(e.path, dst, symlinks=True, copy_function=_link_or_copy)
                elif e.is_symlink():
                    os.symlink(os.readlink(e.path), dst)
                else:
                    _link_or_copy(e.path, dst)
        _fsync_path(tmp, directory=True)
        if not existed:
            os.rename(tmp, final)  # fails if a folder appeared meanwhile (not empty) or replaces an empty one
            tmp = None
        elif _exchange(tmp, final):
            old, tmp = tmp, None  # tmp now holds the old version
        else:
            old = _old_name(final)
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                old = None
                raise
            tmp = None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as exc:
            _warn(f"reflora: {final} is written, but removing its previous version {old} failed ({exc})")
    _fsync_folder_after(parent, final)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _folder_id(directory: str) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_consistently(directory: str, read: Callable[[], Any], *, attempts: int = 3) -> Any:
    """``read()`` the files of a folder that ``atomic_folder`` may replace meanwhile, as one version.

    The folder at ``directory`` is a new inode after each replacement, so when it is another
    one after ``read()`` than before, the read may have mixed two versions (or failed on one
    that vanished): it is done again, at most ``attempts`` times.
    """
    from .._errors import FormatError  # noqa: PLC0415

    for attempt in range(attempts):
        before = _folder_id(directory)
        try:
            out = read()
        except (ValueError, OSError):
            if attempt + 1 < attempts and _folder_id(directory) != before:
                continue  # replaced while read: read the new version
            raise
        if _folder_id(directory) == before:
            return out
    raise FormatError(f"{directory}: the folder was replaced during each of {attempts} reads; expected it to "
                      "hold still")


def owned_names(names: Iterable[str]) -> Callable[[str], bool]:
    """A ``keep`` for atomic_folder that drops the given names (files of an older version)."""
    drop = frozenset(names)
    return lambda name: name not in drop


def replace_folder(directory: Any, build: Callable[[str], None], *, names: Iterable[str]) -> None:
    """Write a folder's set of files (``names``) all or nothing where the folder can be swapped.

    A mount point, the working directory (or a folder above it) or a read-only parent
    cannot be swapped: there ``build`` writes the files in place, in its own order, and
    the reader must detect a torn set (``load_peft`` does, by reflora's config record).
    """
    final = os.path.realpath(os.fspath(directory))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    cwd = os.path.realpath(os.getcwd())
    if (os.path.ismount(final) or cwd == final or cwd.startswith(final + os.sep)
            or not os.access(os.path.dirname(final), os.W_OK)):
        os.makedirs(final, exist_ok=True)
        build(final)
        return
    atomic_folder(final, build, overwrite=True, keep=owned_names(names))
