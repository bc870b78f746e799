"""Merge outputs are all-or-nothing: fault injection at every file-system call of a rewrite.

OUT holds a previous merge (adapter 1); a rewrite with adapter 2 is run once
normally to count its file-system calls (os.open, preadv, pwrite, fsync,
copy_file_range, sendfile, mkdir, symlink, rename, unlink, rmdir), then once per
call index k with a fault injected there:

  error   call k raises OSError (EIO), later calls work (clean-up runs)
  crash   call k and every later one raise (the process "dies" at k: no
          clean-up reaches the disk)

After each: OUT reads exactly as the old output or exactly as the new one
(for a link OUT; a plain-folder OUT may also be briefly absent, and the next
run restores it); then an ordinary rerun succeeds, gives the new output, and
leaves no ``.OUT.rf-*`` leftovers.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
import threading

import ml_dtypes
import numpy as np
import pytest

import reflora.io.model_merge as mm
from reflora.cli import main
from reflora.io.model_folder import FolderOutput
from reflora.io.safetensors import save_tensors


@pytest.fixture(autouse=True)
def _host_backend(monkeypatch):
    """Merges and loads here run on the host (crash tests fork the process, which a CUDA context does not survive); the GPU merge: tests/io/test_model_merge_gpu.py."""
    monkeypatch.setenv("REFLORA_BACKEND", "numpy")

BF16 = np.dtype(ml_dtypes.bfloat16)
PATCHED = ("open", "preadv", "pwrite", "fsync", "copy_file_range", "sendfile", "mkdir", "symlink", "rename",
           "replace", "unlink", "rmdir")


def make_base(folder, rng):
    folder.mkdir()
    sd = {f"model.layers.{i}.{m}.weight": (rng.standard_normal((8, 12)) * 0.02).astype(BF16)
          for i in range(2) for m in ("q_proj", "v_proj")}
    sd["model.embed.weight"] = rng.standard_normal((10, 12)).astype(np.float32)
    names = sorted(sd)
    weight_map = {}
    for k in range(2):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_tensors(folder / fname, {n: sd[n] for n in names[k::2]})
        weight_map.update({n: fname for n in names[k::2]})
    (folder / mm.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "tiny"}')


def make_adapter(folder, rng):
    folder.mkdir()
    t = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.{m}"
            t[key + ".lora_A.weight"] = rng.standard_normal((2, 12)).astype(np.float32)
            t[key + ".lora_B.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    save_tensors(folder / "adapter_model.safetensors", t)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))


def snapshot(out):
    if not os.path.lexists(out):
        return None
    return {p: (out / p).read_bytes() for p in sorted(os.listdir(out))}


def leftovers(out):
    """Hidden siblings of OUT other than the version folder OUT links to."""
    live = os.readlink(out) if os.path.islink(out) else None
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.rf-") and n != live)


class Faults:
    """Counts the patched os calls (all threads); raises at call k (once, or from k on)."""

    def __init__(self, monkeypatch):
        self.n, self.k, self.crash = 0, None, False
        self.lock = threading.Lock()
        for name in PATCHED:
            real = getattr(os, name, None)
            if real is not None:
                monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            with self.lock:
                i = self.n
                self.n += 1
                fail = self.k is not None and (i == self.k or (self.crash and i > self.k))
            if fail:
                raise OSError(errno.EIO, f"injected fault at call {i} ({real.__name__})")
            return real(*args, **kwargs)
        return call

    def arm(self, k, crash):
        self.n, self.k, self.crash = 0, k, crash

    def off(self):
        self.k = None


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    make_base(tmp_path / "base", rng)
    make_adapter(tmp_path / "a1", rng)
    make_adapter(tmp_path / "a2", rng)
    mm.merge_model(tmp_path / "base", tmp_path / "a2", tmp_path / "ref", progress=False)
    return tmp_path, snapshot(tmp_path / "ref")


@pytest.mark.parametrize("plain", [False, True], ids=["link", "plain-folder"])
@pytest.mark.parametrize("crash", [False, True], ids=["error", "crash"])
def test_every_fault_leaves_old_or_new(setup, monkeypatch, crash, plain):
    tmp, new = setup
    out = tmp / "out"
    faults = Faults(monkeypatch)
    calls = None
    checked = 0
    k = 0
    while calls is None or k < calls:
        faults.off()
        if os.path.islink(out):
            os.unlink(out)
        elif os.path.lexists(out):
            __import__("shutil").rmtree(out)
        for n in leftovers(out):
            __import__("shutil").rmtree(tmp / n) if os.path.isdir(tmp / n) and not os.path.islink(tmp / n) \
                else os.unlink(tmp / n)
        mm.merge_model(tmp / "base", tmp / "a1", out, progress=False, workers=2)
        if plain:  # a plain folder holding a previous output (as reflora wrote before links)
            real = os.path.realpath(out)
            os.unlink(out)
            os.rename(real, out)
        old = snapshot(out)
        assert old != new
        if calls is None:
            faults.arm(None, False)
            mm.merge_model(tmp / "base", tmp / "a2", out, overwrite=True, progress=False, workers=2)
            calls = faults.n
            assert snapshot(out) == new and leftovers(out) == []
            assert calls > 20, calls
            continue
        faults.arm(k, crash)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mm.merge_model(tmp / "base", tmp / "a2", out, overwrite=True, progress=False, workers=2)
            except OSError:
                pass
        faults.off()
        # the only warning a fault may cause: the folder sync after the switch (the output is then new)
        for w in caught:
            assert issubclass(w.category, RuntimeWarning) and "after the switch failed" in str(w.message), w
            assert snapshot(out) == new, f"fault at call {k}: warned after the switch, yet OUT is not new"
        seen = snapshot(out)
        if seen is None:
            # only a plain folder, between "set aside" and "link in": the next run puts it back first
            assert plain, f"fault at call {k}: OUT vanished"
            FolderOutput(out, overwrite=True, expected=[], protect=[]).recover()
            seen = snapshot(out)
        assert seen in (old, new), f"fault at call {k} ({'crash' if crash else 'error'}): OUT is a mix"
        if not crash:
            assert seen == new or leftovers(out) == [], f"fault at call {k}: leftovers {leftovers(out)}"
        mm.merge_model(tmp / "base", tmp / "a2", out, overwrite=True, progress=False, workers=2)
        assert snapshot(out) == new and leftovers(out) == [], f"rerun after fault at call {k}"
        checked += 1
        k += 1
    assert checked == calls
    print(f"\n{'crash' if crash else 'error'} {'plain' if plain else 'link'}: {calls} file-system calls, "
          f"a fault at each one checked")


def test_trailing_slash_output_reruns_with_overwrite(setup, capsys):
    tmp, new = setup
    out = str(tmp / "newout") + "/"
    assert main(["merge", str(tmp / "base"), str(tmp / "a2"), out, "--quiet"]) == 0
    assert main(["merge", str(tmp / "base"), str(tmp / "a2"), out, "--quiet"]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(tmp / "base"), str(tmp / "a2"), out, "--quiet", "--overwrite"]) == 0
    assert snapshot(tmp / "newout") == new and leftovers(tmp / "newout") == []
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert printed == sorted(printed) and len(printed) == 4  # 2 shards, index, config.json


def test_one_writer_at_a_time(setup):
    import fcntl

    tmp, _ = setup
    out = tmp / "busy"
    fd = os.open(tmp / ".busy.rf-_lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a live merge into the same OUT holds it
    try:
        with pytest.raises(FileExistsError, match="another reflora merge is writing"):
            mm.merge_model(tmp / "base", tmp / "a2", out, progress=False)
        mm.merge_model(tmp / "base", tmp / "a2", tmp / "other", progress=False)  # another OUT, same folder: fine
    finally:
        os.close(fd)
    assert not os.path.lexists(out)
    os.unlink(tmp / ".busy.rf-_lock")
    mm.merge_model(tmp / "base", tmp / "a2", out, progress=False)  # free again
    assert leftovers(out) == [] and not os.path.lexists(tmp / ".other.rf-_lock")


def test_refusals_stand(setup):
    tmp, _ = setup
    with pytest.raises(ValueError, match="is or contains the base model's folder"):
        mm.merge_model(tmp / "base", tmp / "a2", tmp / "base", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="ends in .safetensors; expected a folder"):
        mm.merge_model(tmp / "base", tmp / "a2", tmp / "x.safetensors", progress=False)
    (tmp / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        mm.merge_model(tmp / "base", tmp / "a2", tmp / "afile", overwrite=True, progress=False)
    os.symlink(tmp / "base", tmp / "alink")
    with pytest.raises(ValueError, match="base model's folder"):
        mm.merge_model(tmp / "base", tmp / "a2", tmp / "alink", overwrite=True, progress=False)
    assert (tmp / "afile").read_text() == "x" and os.path.islink(tmp / "alink")


def test_a_reader_polling_during_rewrites_sees_one_version(setup):
    """A reader that resolves OUT once per read (realpath) and reads every file sees exactly one output."""
    tmp, new = setup
    out = tmp / "polled"
    mm.merge_model(tmp / "base", tmp / "a1", out, progress=False)
    old = snapshot(out)
    versions = (old, new)
    seen, bad, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                real = os.path.realpath(out)
                got = {p: open(os.path.join(real, p), "rb").read() for p in sorted(os.listdir(real))}
            except FileNotFoundError:  # the version it resolved was removed after a switch: read again
                continue
            seen.append(versions.index(got) if got in versions else -1)
            if got not in versions:
                bad.append(sorted(got))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(6):
            mm.merge_model(tmp / "base", tmp / ("a2" if k % 2 == 0 else "a1"), out, overwrite=True, progress=False)
    finally:
        stop.set()
        t.join()
    assert not bad, f"a reader saw a mix: {bad[:1]}"
    assert {0, 1} <= set(seen) and leftovers(out) == []  # it did read both versions, never a mix
