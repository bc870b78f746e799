"""An output model folder that readers see whole: written aside, then switched in by one rename.

OUT is a symbolic link to a hidden sibling folder holding one complete
version::

    parent/OUT -> .OUT.rf-v<token>       (relative link)
    parent/.OUT.rf-v<token>/              model.safetensors or shards + index, config.json, ...

A merge writes a fresh ``.OUT.rf-v<token>`` folder, fsyncs every file and the
folder, makes a new link ``.OUT.rf-l<token>`` and renames it over OUT:
``rename`` is atomic, so OUT names the old version or the new one, never a
mix, never nothing. Then the old version folder is removed.

A reader that resolves OUT once (``os.path.realpath``, or one open folder)
reads one version. A reader that opens OUT/a then, later, OUT/b by path could
straddle a switch; same names and shapes, so resolve OUT once when merges may
run concurrently with reads.

Leftovers of a crash (a version folder not linked from OUT, a stray
``rf-l`` link, an ``rf-o`` folder) are removed by the next run on the same
OUT, under an exclusive lock (``flock`` on the empty file ``.OUT.rf-_lock``,
removed at the end of the run), so a run never deletes the folder another
live run is writing. If OUT was a plain folder (a
merge output of reflora before links, or a folder of the same files) it is
renamed to ``.OUT.rf-o<token>`` and the link renamed in its place: a crash
between those two renames leaves no OUT, and the next run puts the plain
folder back before anything else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from typing import Iterable

__all__: list[str] = []

_KINDS = ("v", "l", "o")  # version folder, link being made, old plain folder


def _fsync_dir(path: str, *, after_switch: bool = False) -> None:
    """Make renames in a folder durable.

    Before the switch a failure raises (the new version is not known to be on disk, so OUT
    keeps the old one). After it, OUT already names the new version: a failure is reported
    as a RuntimeWarning and never undoes the write.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if not after_switch:
            raise
        warnings.warn(f"{path}: syncing the folder after the switch failed ({exc}); the new output is in place "
                      "but may not survive a power loss", RuntimeWarning, stacklevel=3)


class FolderOutput:
    """The life of one output folder: check, lock, recover, write aside, publish (or abort)."""

    def __init__(self, out: str, *, overwrite: bool, expected: Iterable[str], protect: Iterable[str]):
        if not os.fspath(out):
            raise ValueError("OUT is empty; expected a folder path")
        self.out = os.path.normpath(os.path.abspath(os.fspath(out)))  # "newout/" is the folder newout
        self.parent, self.name = os.path.split(self.out)
        if self.name.endswith(".safetensors"):
            raise ValueError(f"OUT {out} ends in .safetensors; expected a folder: reflora merge writes a model "
                             f"folder (OUT/model.safetensors or shards, with the base's config and tokenizer files)")
        self.overwrite = overwrite
        self.expected = set(expected)
        self.prefix = f".{self.name[:200]}.rf-"
        real_out = os.path.realpath(self.out)
        for d in protect:
            d = os.path.realpath(d)
            if d == real_out or d.startswith(real_out + os.sep):
                raise ValueError(f"OUT {out} is or contains the base model's folder; expected a new folder "
                                 "(replacing it would delete the base and its other files)")
        self.lock_fd = None
        self.version = None

    # ---- before writing

    def begin(self) -> None:
        """Lock the parent folder, clean a previous crash's leftovers, check OUT, make the version folder."""
        os.makedirs(self.parent, exist_ok=True)
        self._lock()
        try:
            self.recover()
            self._check()
            self.version = os.path.join(self.parent, f"{self.prefix}v{secrets.token_hex(4)}")
            os.mkdir(self.version)
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        try:
            import fcntl  # noqa: PLC0415 - POSIX only
        except ImportError:
            return
        path = os.path.join(self.parent, f"{self.prefix}_lock")
        busy = FileExistsError(f"{self.out}: another reflora merge is writing this output; expected one at a time")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            now = os.stat(path)  # still the file at that name? (the holder before us removes it when done)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                raise busy
        except OSError:
            os.close(fd)
            raise busy from None
        self.lock_fd, self.lock_path = fd, path

    def _unlock(self) -> None:
        if self.lock_fd is not None:
            try:
                os.unlink(self.lock_path)  # while still held: a later run makes a fresh one
            except OSError:
                pass
            os.close(self.lock_fd)  # closing releases the flock
            self.lock_fd = None

    def _ours(self) -> str | None:
        """The version folder name OUT links to, if OUT is one of our links."""
        if not os.path.islink(self.out):
            return None
        target = os.readlink(self.out)
        if target.startswith(self.prefix + "v") and os.sep not in target:
            return target
        return None

    def leftovers(self) -> list[str]:
        """Names in the parent folder that belong to this OUT's versions, links or old folders."""
        try:
            names = os.listdir(self.parent)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(self.prefix) and n[len(self.prefix):][:1] in _KINDS)

    def recover(self) -> None:
        """Undo or clean what a crashed run left: restore a plain OUT renamed aside, remove the rest."""
        names = self.leftovers()
        olds = [n for n in names if n[len(self.prefix)] == "o"]
        if olds and not os.path.lexists(self.out):
            os.rename(os.path.join(self.parent, olds[0]), self.out)  # the crash hit between the two renames
            _fsync_dir(self.parent, after_switch=True)
        current = self._ours()
        for n in self.leftovers():
            if n == current:
                continue
            path = os.path.join(self.parent, n)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    def _check(self) -> None:
        out = self.out
        if not os.path.lexists(out):
            return
        if self._ours() is not None:
            if not self.overwrite:
                raise FileExistsError(f"{out} exists (a previous merge output); pass --overwrite to replace it")
            return
        if os.path.islink(out):
            raise FileExistsError(f"{out} is a link to {os.readlink(out)}, not a reflora merge output; "
                                  "expected a new folder")
        if not os.path.isdir(out):
            raise FileExistsError(f"{out} exists and is a file; expected a folder (reflora merge writes a model "
                                  "folder)")
        present = os.listdir(out)
        if present and not self.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose a new folder")
        foreign = sorted(set(present) - self.expected)
        if foreign:
            raise FileExistsError(f"{out} holds files this merge would not write ({foreign[:5]}); "
                                  "expected a new folder or a previous merge output")

    # ---- writing

    def path(self, name: str) -> str:
        return os.path.join(self.version, name)

    def publish(self) -> None:
        """Switch OUT to the new version (files already fsynced); then remove the old one."""
        _fsync_dir(self.version)
        target = os.path.basename(self.version)
        previous = self._ours()
        if previous is None and not os.path.lexists(self.out):
            os.symlink(target, self.out)  # create-if-absent: a FileExistsError if something appeared meanwhile
        else:
            link = os.path.join(self.parent, f"{self.prefix}l{secrets.token_hex(4)}")
            os.symlink(target, link)
            aside = None
            try:
                if previous is None:  # a plain folder cannot be replaced by one rename: set it aside first
                    aside = os.path.join(self.parent, f"{self.prefix}o{secrets.token_hex(4)}")
                    os.rename(self.out, aside)
                    previous = os.path.basename(aside)
                os.rename(link, self.out)  # the switch: atomic
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(link)
                if aside is not None and not os.path.lexists(self.out):
                    with contextlib.suppress(OSError):
                        os.rename(aside, self.out)  # put it back (else the next run does)
                raise
        self.version = None  # published: from here on nothing may remove it
        _fsync_dir(self.parent, after_switch=True)
        if previous is not None:
            with contextlib.suppress(OSError):  # the new output is in place; a leftover is cleaned next run
                shutil.rmtree(os.path.join(self.parent, previous))
        self._unlock()

    def abort(self) -> None:
        """Remove the unpublished version folder (OUT is untouched) and release the lock."""
        try:
            if self.version is not None:
                shutil.rmtree(self.version, ignore_errors=True)
                self.version = None
        finally:
            self._unlock()
