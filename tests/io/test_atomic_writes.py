"""Every writer leaves its destination exactly old or exactly new (issue 11, items 5 and 10).

Fault injection: ``_Faults`` counts every file-system call a writer makes (os.open, close,
fsync, stat, scandir, mkdir, link, rename, replace, unlink, rmdir, chmod, ..., builtins.open
and each write/flush/close of the files it opens, and the renameat2 swap) and fails call
number N, for every N from 1 to the count of a clean run:

  * "raise": call N raises OSError(EIO). The writer must raise and leave the destination
    exactly old, or return (the failure came after the new content was in place: a folder
    fsync or a cleanup, reported as a RuntimeWarning) and leave it exactly new; no
    temporary file may be left unless a warning named it.
  * "crash": a forked child runs the writer and dies (os._exit) at call N, as a killed
    process would: no cleanup code runs. The destination must be exactly old or exactly
    new; the next write removes the dead writer's temporary files.

Writers: save_tensors, save_adapter, save_peft (the pair and a foreign README.md),
``reflora convert`` to a file and to a PEFT folder, merge_model of a single file, and
golden write (two cases, to keep the run short). The counts of one run are printed with -s.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import stat
import warnings

import numpy as np
import pytest

import reflora
from reflora.cli.adapter import convert
from reflora.io import atomic
from reflora.io.atomic import TMP_TAG, atomic_write, clean_stale
from reflora.io.safetensors import load_tensors, save_tensors


@pytest.fixture(autouse=True)
def _host_backend(monkeypatch):
    """Merges and loads here run on the host (crash tests fork the process, which a CUDA context does not survive); the GPU merge: tests/io/test_model_merge_gpu.py."""
    monkeypatch.setenv("REFLORA_BACKEND", "numpy")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks; CI runs on Linux")

_OS_CALLS = ("open", "close", "fsync", "replace", "rename", "link", "unlink", "remove", "chmod", "mkdir", "rmdir",
             "stat", "lstat", "fstat", "scandir", "listdir", "symlink", "readlink", "utime", "makedirs")


class _Injected(OSError):
    pass


class _Faults:
    """Patch the file-system calls; count them; fail call number ``fail_at`` (1-based; 0 = never)."""

    def __init__(self, monkeypatch, *, fail_at: int = 0, crash: bool = False):
        self.n, self.fail_at, self.crash, self.log = 0, fail_at, crash, []
        for name in _OS_CALLS:
            monkeypatch.setattr(os, name, self._wrap(f"os.{name}", getattr(os, name)))
        monkeypatch.setattr(atomic, "_exchange", self._wrap("renameat2", atomic._exchange))
        real_open = builtins.open
        faults = self

        class File:
            def __init__(self, f):
                self._f = f

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def __iter__(self):
                return iter(self._f)

            def write(self, b):
                faults.tick("file.write")
                return self._f.write(b)

            def flush(self):
                faults.tick("file.flush")
                return self._f.flush()

            def close(self):
                if not self._f.closed:
                    try:
                        faults.tick("file.close")
                    finally:
                        self._f.close()  # the close itself fails after releasing the handle, as close(2) does

        def fake_open(*a, **k):
            faults.tick("open")
            return File(real_open(*a, **k))

        monkeypatch.setattr(builtins, "open", fake_open)

    def tick(self, what: str) -> None:
        self.n += 1
        self.log.append(what)
        if self.n == self.fail_at:
            if self.crash:
                os._exit(77)
            raise _Injected(errno.EIO, f"injected failure of call {self.n} ({what})")

    def _wrap(self, what, fn):
        def call(*a, **k):
            self.tick(what)
            return fn(*a, **k)
        return call


def _snapshot(path: str):
    """Bytes of a file, or {relative path: bytes} of a folder (None if absent)."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        out = {}
        for root, _, files in os.walk(path):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, path)] = fh.read()
        return out
    with open(path, "rb") as fh:
        return fh.read()


def _leftovers(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if TMP_TAG in n)


# ---------------------------------------------------------------- the writers under test


def _adapters(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {m: reflora.LoraAdapter.from_arrays(rng.standard_normal((2, 4)).astype(np.float32),
                                               rng.standard_normal((3, 2)).astype(np.float32), alpha=4.0 + seed)
            for m in ("layers.0.q", "layers.0.v")}


def _w_save_tensors(d, v):
    save_tensors(os.path.join(d, "t.safetensors"), {"w": np.full((64, 64), v, np.float32)}, metadata={"v": str(v)})
    return os.path.join(d, "t.safetensors")


def _w_save_adapter(d, v):
    reflora.save_adapter(os.path.join(d, "a.safetensors"), _adapters(v), layout="seed")
    return os.path.join(d, "a.safetensors")


def _w_save_peft(d, v):
    target = os.path.join(d, "peft")
    reflora.save_peft(target, _adapters(v))
    return target


def _w_save_mlx(d, v):
    target = os.path.join(d, "mlx")  # weights and config together: the versions differ in scale (alpha 4 + v)
    reflora.save_mlx(target, _adapters(v))
    return target


def _s_save_peft(d):
    os.makedirs(os.path.join(d, "peft"))
    with open(os.path.join(d, "peft", "README.md"), "w") as f:
        f.write("not reflora's: kept by every save\n")


def _s_sources(d):
    """Inputs of convert and merge (written before the faults start)."""
    for v in (0, 1):
        reflora.save_peft(os.path.join(d, f"src{v}"), _adapters(v))
    save_tensors(os.path.join(d, "base.safetensors"), {"layers.0.q.weight": np.ones((3, 4), np.float32),
                                                       "layers.0.v.weight": np.ones((3, 4), np.float32)})


def _w_convert_file(d, v):
    convert(os.path.join(d, f"src{v}"), os.path.join(d, "c.safetensors"), to="seed", overwrite=True)
    return os.path.join(d, "c.safetensors")


def _w_convert_peft(d, v):
    convert(os.path.join(d, f"src{v}"), os.path.join(d, "cp"), to="peft", overwrite=True)
    return os.path.join(d, "cp")


def _w_merge(d, v):
    from reflora.io.model_merge import merge_model

    out = os.path.join(d, "merged")  # a model folder (OUT/model.safetensors), switched atomically
    merge_model(os.path.join(d, "base.safetensors"), os.path.join(d, f"src{v}"), out, overwrite=True, progress=False)
    return out


def _w_golden(d, v):
    from reflora.testing import golden

    full = golden.golden_cases
    golden.golden_cases = lambda seed=0: [c for i, c in enumerate(full(seed)) if i in (0, 13)]
    try:
        golden.write_golden(os.path.join(d, "golden"), seed=v)
    finally:
        golden.golden_cases = full
    return os.path.join(d, "golden")


def _none(d):
    pass


#: name -> (set-up of the inputs, not faulted; the write of version v, faulted)
WRITERS = {"save_tensors": (_none, _w_save_tensors), "save_adapter": (_none, _w_save_adapter),
           "save_peft": (_s_save_peft, _w_save_peft), "convert_file": (_s_sources, _w_convert_file),
           "convert_peft": (_s_sources, _w_convert_peft), "merge_file": (_s_sources, _w_merge),
           "golden_write": (_none, _w_golden), "save_mlx": (_none, _w_save_mlx)}


#: merge_model sums the output sizes (os.stat) after writing, so a failure there raises with the new file in
#: place: still exactly old or new, but the caller is told it failed (reflora/io/model_merge.py: merge_model)
_RAISES_AFTER_WRITING = {"merge_file"}


def _prepare(tmp_path, name):
    """Two reference states: old (v = 0) and new (v = 1) written without faults."""
    setup, writer = WRITERS[name]
    d = str(tmp_path / "w")
    ref = str(tmp_path / "ref")
    os.makedirs(ref)
    setup(ref)
    dest = writer(ref, 0)
    old = _snapshot(dest)
    writer(ref, 1)
    new = _snapshot(dest)
    assert old != new
    return d, old, new, writer


def _reset(d, name):
    """A fresh folder holding the inputs and the old version."""
    import shutil

    setup, writer = WRITERS[name]
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    setup(d)
    return writer(d, 0)


def _calls_to_fail(monkeypatch, d, writer) -> list[int]:
    """Every call of a clean run, except inside a run of file.write: its first two and its last.

    (json.dump writes a config token by token; failing each of 700 writes of one file tells
    nothing that failing its first, second and last does not.)
    """
    with monkeypatch.context() as m:
        faults = _Faults(m)
        writer(d, 1)
    log = faults.log
    keep = []
    for i, what in enumerate(log):
        if what != "file.write":
            keep.append(i + 1)
            continue
        first = i == 0 or log[i - 1] != what
        second = i >= 1 and log[i - 1] == what and (i == 1 or log[i - 2] != what)
        last = i + 1 == len(log) or log[i + 1] != what
        if first or second or last:
            keep.append(i + 1)
    return keep


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_oserror_at_every_call_leaves_old_or_new(tmp_path, monkeypatch, name):
    d, old, new, writer = _prepare(tmp_path, name)
    _reset(d, name)
    calls = _calls_to_fail(monkeypatch, d, writer)
    assert len(calls) > 5
    outcomes = {"old": 0, "new": 0, "new (warned)": 0}
    for n in calls:
        dest = _reset(d, name)
        with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
            warnings.simplefilter("always")
            faults = _Faults(m, fail_at=n)
            try:
                writer(d, 1)
                raised = None
            except Exception as exc:  # _Injected, or what it caused (a failed stat: "no such file", EEXIST...)
                raised = exc
        what = faults.log[n - 1] if n <= len(faults.log) else "?"
        assert not (os.path.islink(dest) and not os.path.exists(dest)), \
            f"call {n} ({what}) failed: the destination is a dangling link (its version was removed)"
        state = _snapshot(dest)
        if raised is not None and name in _RAISES_AFTER_WRITING and state == new:
            outcomes["new (raised)"] = outcomes.get("new (raised)", 0) + 1
        elif raised is not None:
            assert state == old, f"call {n} ({what}) failed: the destination is not the old one"
            outcomes["old"] += 1
        else:
            # the failure was absorbed: an optional step (removing stale files, a stat in os.path.*) or one after
            # the new content was in place (folder fsync, cleanup: a RuntimeWarning, checked below and in
            # test_a_failing_folder_fsync_after_the_rename_warns_and_keeps_the_new_file)
            assert state == new, f"call {n} ({what}) failed, the writer returned, yet the destination is not new"
            outcomes["new (warned)" if caught else "new"] += 1
        left = _leftovers(d) + _leftovers(os.path.dirname(dest))
        assert not left or any(str(w.message).count(TMP_TAG) for w in caught), \
            f"call {n} ({what}) left {left}"
    print(f"\n{name}: {len(calls)} file-system calls, each failed once: {outcomes}")


def _crash_at(d, writer, n) -> int:
    """Run writer(d, 1) in a forked child that dies at call n; return its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no cleanup, just die where told
        try:
            mp = pytest.MonkeyPatch()
            _Faults(mp, fail_at=n, crash=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                writer(d, 1)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_crash_at_every_call_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path, monkeypatch, name):
    d, old, new, writer = _prepare(tmp_path, name)
    _reset(d, name)
    calls = _calls_to_fail(monkeypatch, d, writer)
    monkeypatch.setattr(atomic, "STALE_DEAD_S", -1.0)  # the dead child's leftovers are stale at once
    seen = {"old": 0, "new": 0}
    for n in calls:
        dest = _reset(d, name)
        code = _crash_at(d, writer, n)
        assert code in (77, 0), f"child exited {code} at call {n}"
        state = _snapshot(dest)
        assert state in (old, new), f"a crash at call {n} left the destination neither old nor new"
        seen["old" if state == old else "new"] += 1
        writer(d, 1)  # the next write succeeds and removes what the dead writer left
        assert _snapshot(dest) == new
        assert not _leftovers(d) and not _leftovers(os.path.dirname(dest)), f"crash at call {n}: leftovers remain"
    print(f"\n{name}: crashed at each of {len(calls)} calls: {seen}")


# ---------------------------------------------------------------- the two-rename fallback (no renameat2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["save_peft", "golden_write"])
def test_folder_swap_without_renameat2_recovers_after_a_crash(tmp_path, monkeypatch, name):
    d, old, new, writer = _prepare(tmp_path, name)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic, "STALE_DEAD_S", -1.0)
    _reset(d, name)
    calls = _calls_to_fail(monkeypatch, d, writer)
    for n in calls:
        dest = _reset(d, name)
        assert _crash_at(d, writer, n) in (77, 0)
        state = _snapshot(dest)
        if state is None:  # between the two renames: the old folder waits under a temporary name
            atomic.recover_folder(os.path.realpath(dest))
            state = _snapshot(dest)
        assert state in (old, new), f"crash at call {n}"
        writer(d, 1)
        assert _snapshot(dest) == new and not _leftovers(d)


# ---------------------------------------------------------------- file hygiene (item 10)


def test_a_name_of_255_bytes_can_be_written(tmp_path):
    name = "é" * 100 + "x" * 50 + ".safetensors"  # 262 characters... cut below to 255 bytes
    name = name.encode()[:255].decode("utf-8", "ignore")
    save_tensors(tmp_path / name, {"w": np.ones(2)})
    save_tensors(tmp_path / name, {"w": np.zeros(2)})  # and replaced
    assert load_tensors(tmp_path / name, xp="numpy")[0]["w"].tolist() == [0.0, 0.0]
    assert os.listdir(tmp_path) == [name]


def test_replacing_a_file_keeps_its_mode(tmp_path):
    p = tmp_path / "secret.safetensors"
    save_tensors(p, {"w": np.ones(2)})
    os.chmod(p, 0o600)
    save_tensors(p, {"w": np.zeros(2)})
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    d = tmp_path / "peft"
    reflora.save_peft(d, _adapters(0))
    os.chmod(d, 0o750)
    os.chmod(d / "adapter_model.safetensors", 0o600)
    reflora.save_peft(d, _adapters(1))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750


def test_stale_temporaries_of_a_dead_writer_are_removed(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = tmp_path / f".t.safetensors{TMP_TAG}{dead}-abcd1234"
    fresh = tmp_path / f".t.safetensors{TMP_TAG}{dead}-0000ffff"
    alive = tmp_path / f".t.safetensors{TMP_TAG}{os.getppid()}-12345678"
    other = tmp_path / ".hidden-but-not-ours.tmp"
    for p in (stale, fresh, alive, other):
        p.write_bytes(b"x")
    old = os.stat(stale).st_mtime - 3600
    os.utime(stale, (old, old))
    os.utime(alive, (old, old))
    save_tensors(tmp_path / "t.safetensors", {"w": np.ones(1)})
    left = sorted(os.listdir(tmp_path))
    assert stale.name not in left  # dead and an hour old
    assert fresh.name in left  # dead but a minute has not passed: perhaps another host's writer
    assert alive.name in left and other.name in left  # a live writer's, and not reflora's
    week = os.stat(alive).st_mtime - 8 * 24 * 3600
    os.utime(alive, (week, week))
    assert str(alive) in clean_stale(str(tmp_path))  # any leftover older than a week


def test_a_failing_folder_fsync_after_the_rename_warns_and_keeps_the_new_file(tmp_path, monkeypatch):
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"w": np.ones(1)})
    real = atomic._fsync_path

    def fsync_path(path, *, directory):
        if directory:
            raise OSError(errno.EIO, "injected folder fsync failure")
        return real(path, directory=directory)

    monkeypatch.setattr(atomic, "_fsync_path", fsync_path)
    with pytest.warns(RuntimeWarning, match="syncing its folder"):
        save_tensors(p, {"w": np.zeros(1)})
    assert load_tensors(p, xp="numpy")[0]["w"].tolist() == [0.0]


def test_a_failing_close_of_the_fresh_temporary_leaves_nothing(tmp_path, monkeypatch):
    real_close = os.close
    calls = []

    def close(fd):
        calls.append(fd)
        real_close(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected close failure")

    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="injected close"):
        atomic_write(tmp_path / "x", lambda tmp: None, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_overwrite_false_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    p = tmp_path / "x"

    def write(tmp):
        p.write_text("someone else's")
        with open(tmp, "w") as f:
            f.write("ours")

    with pytest.raises(FileExistsError):
        atomic_write(p, write, overwrite=False)
    assert p.read_text() == "someone else's" and os.listdir(tmp_path) == ["x"]


def test_save_peft_output_loads_in_peft_and_keeps_foreign_files(tmp_path):
    peft = pytest.importorskip("peft")
    d = tmp_path / "ad"
    reflora.save_peft(d, _adapters(0))
    (d / "README.md").write_text("hello")
    reflora.save_peft(d, _adapters(1))
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (d / "README.md").read_text() == "hello"
    cfg = peft.LoraConfig.from_pretrained(str(d))
    assert cfg.rank_pattern and json.loads((d / "adapter_config.json").read_text())["lora_alpha"] == 5


def test_load_peft_reads_one_version_while_save_peft_swaps_the_folder(tmp_path, monkeypatch):
    from reflora.io import peft as peft_io

    d = tmp_path / "ad"
    reflora.save_peft(d, _adapters(0))
    real = peft_io.load_tensors
    calls = []

    def swap_then_load(path, **kw):  # the writer swaps the folder between load_peft's two reads, once
        calls.append(path)
        if len(calls) == 1:
            reflora.save_peft(d, _adapters(1))
        return real(path, **kw)

    monkeypatch.setattr(peft_io, "load_tensors", swap_then_load)
    got = reflora.load_peft(d)
    assert len(calls) == 2  # the torn first read was noticed and done again
    for m, ad in _adapters(1).items():  # the new pair, whole: its config and its weights
        assert got[m].config == ad.config and np.array_equal(got[m].A, ad.A)


def test_golden_check_grades_one_version_while_golden_write_swaps_the_folder(tmp_path, monkeypatch):
    from reflora.testing import golden

    full = golden.golden_cases
    monkeypatch.setattr(golden, "golden_cases", lambda seed=0: [c for i, c in enumerate(full(seed)) if i in (0, 13)])
    g, results = tmp_path / "g", tmp_path / "results"
    names = golden.write_golden(str(g), seed=1)
    results.mkdir()
    for name in names:  # perfect results for the seed-1 cases
        t, _ = load_tensors(g / f"{name}.safetensors", xp="numpy")
        save_tensors(results / f"{name}.safetensors", {k: v for k, v in t.items() if k in
                                                       ("y", "dx") or k.startswith(("d_", "sgd."))})
    golden.write_golden(str(g), seed=0)
    real = golden.load_tensors
    calls = []

    def swap_then_load(path, **kw):  # golden write replaces the folder after check read the old manifest
        calls.append(path)
        if len(calls) == 1:
            golden.write_golden(str(g), seed=1)
        return real(path, **kw)

    monkeypatch.setattr(golden, "load_tensors", swap_then_load)
    rows, ok = golden.check_golden(str(g), str(results))
    assert ok, rows  # graded against the seed-1 version as a whole
    assert len(calls) > 2 * len(names)  # the first, torn read was done again


def test_a_folder_swap_cut_short_is_kept_for_recovery_not_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "STALE_DEAD_S", -1.0)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "f").write_text("old")
    old = tmp_path / f".g{TMP_TAG}{dead}-abcd1234.old"
    os.rename(tmp_path / "g", old)  # a writer died between its two renames: the only copy is here
    save_tensors(tmp_path / "sibling.safetensors", {"w": np.ones(1)})  # another write into the same folder
    assert old.exists()
    reflora.save_peft(tmp_path / "golden", _adapters(0))  # a folder with another name is not restored from it
    assert old.exists() and not (tmp_path / "g").exists()
    atomic.recover_folder(str(tmp_path / "g"))
    assert (tmp_path / "g" / "f").read_text() == "old" and not old.exists()


def test_load_mlx_reads_one_version_while_save_mlx_swaps_the_folder(tmp_path, monkeypatch):
    from reflora.io import mlx as mlx_io

    d = tmp_path / "mlx"
    reflora.save_mlx(d, _adapters(0))
    real = mlx_io.load_tensors
    calls = []

    def swap_then_load(path, **kw):  # the writer swaps the folder between load_mlx's config and weights reads
        calls.append(path)
        if len(calls) == 1:
            reflora.save_mlx(d, _adapters(1))
        return real(path, **kw)

    monkeypatch.setattr(mlx_io, "load_tensors", swap_then_load)
    got = reflora.load_mlx(d)
    assert len(calls) == 2  # the torn first read (old scale, new weights) was noticed and done again
    for m, ad in _adapters(1).items():
        assert got[m].scale == ad.scale and np.array_equal(got[m].A, ad.A)
