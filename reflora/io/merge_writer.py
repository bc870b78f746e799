"""Writing one merged safetensors shard: bytes copied, targeted tensors merged in row chunks by threads.

The output has the input's header and offsets, so every tensor lands where it
was. A shard's work is a list of tasks run by a small thread pool:

  copy    a tensor the adapter does not touch: ``os.copy_file_range`` (the
          kernel copies, the bytes never reach Python; a pread/pwrite loop
          where the file system cannot)
  chunk   about ``CHUNK_BYTES`` of rows of a bfloat16/float16 weight:
          pread, the float32 certified merge of
          ``reflora.numerics.merge_f32`` (cache-sized sub-blocks), pwrite
  tensor  anything else (float32/float64 W, DoRA, lora_bias): read whole,
          merged by ``merge``/``dora_merge``, written

Memory: at most ``workers + 2`` tasks are queued or running at once; a chunk
task holds 2 x CHUNK_BYTES plus its thread's scratch (about 1.5 MiB), so the
fast path needs a few MiB whatever the model's size. A tensor task holds the
tensor, its result and the float64 merge's row blocks (DoRA: several float64
copies), as the one-tensor-at-a-time merge did. NumPy releases the GIL in
its loops and the file calls release it too, so the workers use the cores;
OpenBLAS is held to one thread inside (``blas_threads``) so that its own
pool does not fight them.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

import numpy as np

from .._errors import FormatError
from ..numerics import merge_f32
from .safetensors_header import SAFETENSORS_DTYPES

__all__: list[str] = []

#: bytes of W (the input) per chunk task
CHUNK_BYTES = 1 << 20
#: the same on a GPU (fewer, larger launches and copies)
GPU_CHUNK_BYTES = 64 << 20
#: bytes per pread/pwrite call of a copy without copy_file_range; per write call (1 MiB writes measured fastest)
IO_PIECE = 1 << 20
_COPY_PIECE = 64 << 20
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def default_workers() -> int:
    """Worker threads: the usable cores, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def gpu_module(device: str | None) -> Any:
    """The cupy module for device "gpu" (or $REFLORA_BACKEND=cupy when device is None), else None."""
    if device is None:
        device = "gpu" if os.environ.get("REFLORA_BACKEND", "").strip().lower() == "cupy" else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device is {device!r}; expected 'cpu' or 'gpu'")
    if device == "cpu":
        return None
    from ..backend import get_namespace  # noqa: PLC0415

    get_namespace("cupy")  # a RuntimeError saying why, where CuPy cannot run
    import cupy  # noqa: PLC0415 - optional dependency

    merge_f32.check_gpu_float32(cupy)
    return cupy


def pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise FormatError(f"{where}: file ended early (did it change while read?)")
        done += n


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:done + IO_PIECE], offset + done)


def copy_range(src: int, dst: int, offset: int, length: int, where: str) -> None:
    """length bytes from src at offset to dst at the same offset, without decoding them."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, min(length - done, _COPY_PIECE), offset + done, offset + done)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
                raise
            break
        if n == 0:
            raise FormatError(f"{where}: file ended early (did it change while read?)")
        done += n
    buf = bytearray(min(IO_PIECE, length - done))
    view = memoryview(buf)
    while done < length:
        k = min(len(buf), length - done)
        pread_into(src, view[:k], offset + done, where)
        pwrite_all(dst, view[:k], offset + done)
        done += k


class _Local(threading.local):
    def __init__(self):
        self.work = None
        self.elements = 0


class ShardWriter:
    """Runs the tasks of one merge (all shards) on a thread pool, with bounded queueing."""

    def __init__(self, merged_tensor: Callable, progress: Callable[[int, str], None] | None, workers: int,
                 gpu: Any = None):
        self.merged_tensor = merged_tensor
        self.gpu = gpu  # the cupy module: chunks are merged on the GPU, candidates fixed on the host
        self.chunk_bytes = GPU_CHUNK_BYTES if gpu is not None else CHUNK_BYTES
        self.progress = progress
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reflora-merge")
        self.slots = threading.BoundedSemaphore(workers + 2)
        self.local = _Local()
        self.lock = threading.Lock()
        self.float64_redo: list = []

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, futures: list, fn: Callable, *args: Any) -> None:
        self.slots.acquire()
        try:
            fut = self.pool.submit(fn, *args)
        except BaseException:
            self.slots.release()
            raise
        fut.add_done_callback(lambda _f: self.slots.release())
        futures.append(fut)
        if any(f.done() and f.exception() is not None for f in futures[-4:]):
            _raise_first(futures)

    def _advance(self, nbytes: int, text: str) -> None:
        if self.progress is not None:
            self.progress(nbytes, text)

    # ---- tasks (run on the pool)

    def _copy(self, src: int, dst: int, offset: int, length: int, where: str, name: str) -> None:
        copy_range(src, dst, offset, length, where)
        self._advance(length, "copied " + name)

    def _chunk(self, plan: merge_f32.Plan, src: int, dst: int, offset: int, p0: int, p1: int, dtype: np.dtype,
               where: str, name: str, state: dict) -> None:
        if state["float64"]:
            return
        Q = plan.Q
        n = p1 - p0
        nbytes = n * Q * dtype.itemsize
        w = np.empty((n, Q), dtype)
        pread_into(src, memoryview(w.reshape(-1).view(np.uint8)), offset + p0 * Q * dtype.itemsize, where)
        out = np.empty_like(w)
        try:
            with np.errstate(all="ignore"):  # Inf/NaN/overflow are candidates (merge_f32), not warnings
                if self.gpu is not None:
                    self._chunk_gpu(plan, w, p0, out)
                else:
                    need = min(n * Q, max(merge_f32.SUB_ELEMENTS, Q))
                    if self.local.work is None or self.local.elements < need:
                        self.local.work = merge_f32.work_arrays(np, need)
                        self.local.elements = need
                    merge_f32.merge_rows(plan, w, p0, out, self.local.work)
        except merge_f32.NeedsFloat64:
            state["float64"] = True  # the whole tensor is redone by the float64 path after this shard
            return
        pwrite_all(dst, memoryview(out.reshape(-1).view(np.uint8)), offset + p0 * Q * dtype.itemsize)
        self._advance(nbytes, "merged " + name)

    def _chunk_gpu(self, plan: merge_f32.Plan, w: np.ndarray, p0: int, out: np.ndarray) -> None:
        """The same arithmetic on the GPU (uint16 bits up, uint16 bits and candidate indices down)."""
        cp = self.gpu
        n, Q = w.shape
        lr = plan.__dict__.get("gpu_lr")
        if lr is None:
            lr = plan.__dict__.setdefault("gpu_lr", plan.device_copy(cp))
        if self.local.work is None or self.local.elements < n * Q:
            self.local.work = merge_f32.work_arrays(cp, n * Q)
            self.local.elements = n * Q
        w16 = cp.asarray(w.view(np.uint16))
        o16 = cp.empty_like(w16)
        idx = plan.block(cp, p0, w16, o16, self.local.work, lr=lr)
        cp.asnumpy(o16, out=out.view(np.uint16))
        plan.fix(p0, w, out.view(np.uint16), cp.asnumpy(idx))

    def _tensor(self, src: int, dst: int, offset: int, dt: str, shape: tuple, job: Any, what: str,
                where: str, name: str, count: bool = True) -> None:
        npdt = SAFETENSORS_DTYPES[dt]
        raw = np.empty(int(np.prod(shape, dtype=np.int64)) * npdt.itemsize, np.uint8)
        pread_into(src, memoryview(raw), offset, where)
        new = np.ascontiguousarray(self.merged_tensor(raw.view(npdt).reshape(shape), job, what))
        del raw
        pwrite_all(dst, memoryview(new.reshape(-1).view(np.uint8)), offset)
        if count:
            self._advance(new.nbytes, "merged " + name)

    # ---- one shard

    def write(self, h: Any, targets: dict, dst: int) -> None:
        """Write shard h (header already checked) into the open file dst: header, then every tensor."""
        src = os.open(h.path, os.O_RDONLY)
        try:
            pwrite_all(dst, memoryview(h.prefix), 0)
            data_start = len(h.prefix)
            futures: list[Future] = []
            redo = []
            for name, dt, shape, begin, end in h.entries:
                offset = data_start + begin
                where = f"{h.path}: tensor {name!r}"
                if name not in targets:
                    self._submit(futures, self._copy, src, dst, offset, end - begin, where, name)
                    continue
                job, what = targets[name]
                plan = _fast_plan(job, what, dt, shape)
                if plan is None:
                    self._submit(futures, self._tensor, src, dst, offset, dt, shape, job, what, where, name)
                    continue
                state = {"float64": False}
                redo.append((state, offset, dt, shape, job, what, where, name))
                npdt = SAFETENSORS_DTYPES[dt]
                # whole row blocks of the float64 path per chunk, so a replay (merge_f32.Plan.fix) stays inside
                rows = max(1, self.chunk_bytes // max(1, plan.Q * npdt.itemsize)) // plan.old_rows * plan.old_rows
                rows = max(rows, plan.old_rows)
                for p0 in range(0, plan.P, rows):
                    self._submit(futures, self._chunk, plan, src, dst, offset, p0, min(plan.P, p0 + rows), npdt,
                                 where, name, state)
            _raise_first(futures, wait_all=True)
            for state, offset, dt, shape, job, what, where, name in redo:
                if state["float64"]:  # rare: zeros of uncertain sign, NaN, overflow (see merge_f32)
                    self.float64_redo.append(name)
                    self._tensor(src, dst, offset, dt, shape, job, what, where, name, count=False)
        finally:
            os.close(src)


def _raise_first(futures: list, wait_all: bool = False) -> None:
    """Raise the first task error (after cancelling and draining the rest); with wait_all, wait for all first."""
    if wait_all:
        wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None)
    if failed is not None:
        for g in futures:
            g.cancel()
        wait(futures)
        raise failed.exception()
    if wait_all:
        wait(futures)


def _fast_plan(job: Any, what: str, dt: str, shape: tuple) -> merge_f32.Plan | None:
    """The float32 path's plan for a plain LoRA weight in bfloat16/float16, else None."""
    if what != "weight" or job.magnitude is not None or dt not in ("BF16", "F16") or len(shape) != 2:
        return None
    A, B = np.asarray(job.A, np.float64), np.asarray(job.B, np.float64)
    # W_PQ + s L R: L = B, R = A (W is (O, I)); fan_in_fan_out stores W^T (I, O): L = A^T, R = B^T
    left, right = (A.T, B.T) if job.fan_in_fan_out else (B, A)
    plan = merge_f32.Plan(SAFETENSORS_DTYPES[dt], left, right, job.scale, o_axis=1 if job.fan_in_fan_out else 0)
    if not plan.ok or (plan.P, plan.Q) != tuple(shape):
        return None
    return plan
