"""``reflora merge BASE ADAPTER OUT``: fold a PEFT adapter into base model weights, tensor by tensor.

    W'  = RN(W + s B A)                      every targeted Linear (``reflora.merge``)
    W'  = RN((m / ||W + s B A||_row) (W + s B A))    DoRA modules (``reflora.dora_merge``)
    b'  = RN(b + s c)                        modules with PEFT's lora_bias c

BASE is a safetensors file, a folder holding ``model.safetensors``, or a
sharded model: a folder (or the index file itself) with
``model.safetensors.index.json`` mapping tensor names to shard files.
ADAPTER is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) or the safetensors file inside one.

Module paths map as PEFT's keys say: ``base_model.model.<m>.lora_A.weight``
targets the base tensor ``<m>.weight`` (and ``<m>.bias``); when the base file
lacks the first component of <m> (a checkpoint of the inner model, e.g.
``layers.0...`` for an adapter on ``model.layers.0...``), that prefix is dropped,
as transformers does when it loads such a checkpoint. Scales come from the
config: r / lora_alpha, rank_pattern / alpha_pattern, use_rslora; fan_in_fan_out
merges into the transposed weight.

Everything is checked before anything is written: every adapter module has
its base tensor, shapes fit (legend O, I, R), dtypes are floating, lora_bias has
a base bias. Then each output file is written with the input's header (the
same names, dtypes, shapes and offsets): untargeted tensors are copied as bytes
(``os.copy_file_range``), targeted ones merged by worker threads in row chunks
(``reflora.io.merge_writer``; bfloat16/float16 weights through the certified
float32 path of ``reflora.numerics.merge_f32``, the same bits as the float64
one). Peak memory: a few MiB per worker for bfloat16/float16 LoRA weights,
whatever the model's size; a float32/float64 weight or a DoRA module is merged
whole (its input, its output and float64 work; DoRA: several float64 O x I
arrays). No torch is imported.

OUT is always a model folder: ``model.safetensors`` (or the base's shard names
and its ``model.safetensors.index.json``, copied unchanged), plus every other
file of a base folder (config.json, generation_config.json, tokenizer files;
not other weight files, not sub-folders), copied unchanged, so
``from_pretrained(OUT)`` loads it. A single-file BASE gives only the weights
(the summary says so). OUT is replaced all-or-nothing (``--overwrite``): it is
a link switched by one rename to a complete, fsynced version folder
(``reflora.io.model_folder``).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Any, NamedTuple

import numpy as np

from .._errors import FormatError
from ..numerics.merge import dora_merge, merge
from ..numerics.rounding import BF16
from ..numerics.merge_f32 import blas_threads
from ._config import seed_file_message
from ._files import open_regular, read_json
from ._keys import check_module_path, check_pair_dtypes
from .merge_writer import ShardWriter, default_workers, gpu_module
from .model_folder import FolderOutput
from .peft import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, pattern_key, read_peft_config
from .safetensors import load_tensors
from .safetensors_header import MAX_HEADER_BYTES, header_length_message, validate_header

__all__ = ["INDEX_NAME", "merge_model"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FLOATS = ("F16", "BF16", "F32", "F64")
_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "lora_bias", "lora_magnitude_vector": "m"}


class _Header(NamedTuple):
    path: str
    prefix: bytes  # the 8-byte length and the header bytes, copied verbatim to the output
    entries: list  # [(name, dtype, shape, begin, end)] in offset order
    metadata: dict


class _Job(NamedTuple):
    module: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    lora_bias: Any
    magnitude: Any
    fan_in_fan_out: bool


def _read_header(path: str) -> _Header:
    """Validate a safetensors header without reading the data (bounded memory)."""
    with open_regular(path, "the base weights file") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: file has {size} bytes; expected at least 8 (the header length)")
        raw_n = f.read(8)
        (n,) = struct.unpack("<Q", raw_n)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(header_length_message(path, raw_n, n, size))
        header = f.read(n)
    entries, metadata = validate_header(header, size - 8 - n, path)
    return _Header(path, raw_n + header, entries, metadata)


def _resolve_base(base: str) -> tuple[dict[str, _Header], dict | None]:
    """({shard file name: header}, index dict or None) for a file, a folder, or an index file."""
    if os.path.isdir(base):
        index = os.path.join(base, INDEX_NAME)
        if os.path.exists(index):
            base = index
        elif os.path.exists(os.path.join(base, SINGLE_NAME)):
            base = os.path.join(base, SINGLE_NAME)
        else:
            raise FormatError(f"{base}: a folder without {INDEX_NAME} or {SINGLE_NAME}; expected a base model")
    if not os.path.exists(base):
        raise FileNotFoundError(f"{base}: no such file")
    if base.endswith(".index.json"):
        index = read_json(base, INDEX_NAME)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise FormatError(f"{base}: expected {{'weight_map': {{tensor name: shard file}}}}")
        folder = os.path.dirname(os.path.abspath(base))
        headers = {}
        for shard in dict.fromkeys(wm.values()):
            if os.path.basename(shard) != shard:
                raise FormatError(f"{base}: shard {shard!r} is not a plain file name in the index's folder")
            headers[shard] = _read_header(os.path.join(folder, shard))
        for shard, h in headers.items():
            names = {e[0] for e in h.entries}
            listed = {k for k, v in wm.items() if v == shard}
            if names != listed:
                extra, missing = sorted(names - listed)[:5], sorted(listed - names)[:5]
                raise FormatError(f"{h.path}: holds tensors the index does not list ({extra}) or lacks listed "
                                  f"ones ({missing}); expected exactly the index's weight_map")
        return headers, index
    return {os.path.basename(base): _read_header(base)}, None


def _read_adapter(adapter: str) -> tuple[str, dict[str, dict[str, np.ndarray]], dict]:
    """(weights path, {module: {"A", "B", "lora_bias", "m"}}, config) of a PEFT adapter."""
    if os.path.isdir(adapter):
        folder, weights = adapter, os.path.join(adapter, PEFT_WEIGHTS_NAME)
    else:
        folder, weights = os.path.dirname(os.path.abspath(adapter)), adapter
    if not os.path.exists(weights):
        raise FormatError(f"{adapter}: no {PEFT_WEIGHTS_NAME}; expected a PEFT adapter folder or its safetensors file")
    if not os.path.isdir(adapter) and not os.path.lexists(os.path.join(folder, PEFT_CONFIG_NAME)):
        raise FormatError(seed_file_message(adapter, folder))
    cfg = read_peft_config(folder, allow=("use_dora", "lora_bias"))
    tensors, _ = load_tensors(weights, xp="numpy")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        part = next((p for p in _SUFFIXES if name.startswith(PEFT_PREFIX) and name.endswith("." + p)), None)
        if part is None:
            raise FormatError(f"{weights}: tensor {name!r} is not one reflora merge handles; expected "
                              f"'{PEFT_PREFIX}<module>.' + one of {sorted(_SUFFIXES)} (Linear layers only)")
        module = check_module_path(name[len(PEFT_PREFIX):-len(part) - 1], weights, error=FormatError)
        if arr.dtype.kind != "f" and arr.dtype != BF16:
            raise FormatError(f"{weights}: tensor {name!r} has dtype {arr.dtype}; expected a floating dtype")
        modules.setdefault(module, {})[_SUFFIXES[part]] = arr
    if not modules:
        raise FormatError(f"{weights}: no LoRA tensors")
    return weights, modules, cfg


def _jobs(weights: str, modules: dict, cfg: dict) -> dict[str, _Job]:
    """Check each adapter module on its own and work out its scale."""
    out = {}
    fifo = bool(cfg.get("fan_in_fan_out", False))
    for module, parts in modules.items():
        label = f"{weights}: module {module!r}"
        if "A" not in parts or "B" not in parts:
            raise FormatError(f"{label} has {sorted(parts)} but not both lora_A.weight and lora_B.weight")
        A, B = parts["A"], parts["B"]
        check_pair_dtypes(A, B, label)
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise FormatError(f"{label}: lora_A {A.shape}, lora_B {B.shape}; expected (R, I) and (O, R) "
                              "(Linear layers only)")
        rk, ak = pattern_key(cfg["rank_pattern"], module), pattern_key(cfg["alpha_pattern"], module)
        R = cfg["rank_pattern"][rk] if rk is not None else cfg["r"]
        alpha = cfg["alpha_pattern"][ak] if ak is not None else cfg["lora_alpha"]
        if A.shape[0] != R:
            raise FormatError(f"{label}: lora_A has shape {A.shape}; expected (R, I) with R = {R} from "
                              f"{'rank_pattern' if rk is not None else 'r'} in {PEFT_CONFIG_NAME}")
        scale = float(alpha) / (math.sqrt(R) if cfg.get("use_rslora") else R)
        O = B.shape[0]
        for key in ("lora_bias", "m"):
            if key in parts and parts[key].shape != (O,):
                raise FormatError(f"{label}: {key} has shape {parts[key].shape}; expected (O,) = ({O},)")
        if bool(cfg.get("lora_bias")) != ("lora_bias" in parts):
            raise FormatError(f"{label}: lora_bias is {cfg.get('lora_bias')} in {PEFT_CONFIG_NAME} but the "
                              f"file {'lacks' if cfg.get('lora_bias') else 'has'} lora_B.bias")
        if bool(cfg.get("use_dora")) != ("m" in parts):
            raise FormatError(f"{label}: use_dora is {cfg.get('use_dora')} in {PEFT_CONFIG_NAME} but the file "
                              f"{'lacks' if cfg.get('use_dora') else 'has'} lora_magnitude_vector")
        if "m" in parts and ("lora_bias" in parts or fifo):
            raise ValueError(f"{label}: DoRA with {'lora_bias' if 'lora_bias' in parts else 'fan_in_fan_out'} "
                             "is not supported by reflora merge (PEFT's merge of DoRA + lora_bias does not match "
                             "its own forward)")
        out[module] = _Job(module, A, B, scale, parts.get("lora_bias"), parts.get("m"), fifo)
    return out


def _plan(headers: dict[str, _Header], jobs: dict[str, _Job]) -> dict[str, dict[str, tuple]]:
    """{shard: {tensor name: (job, "weight" | "bias")}}, after every check; raises before any write."""
    where = {}  # tensor name -> (shard, dtype, shape)
    for shard, h in headers.items():
        for name, dt, shape, _, _ in h.entries:
            where[name] = (shard, dt, shape)
    plan: dict[str, dict[str, tuple]] = {shard: {} for shard in headers}
    problems = []
    for module, job in jobs.items():
        candidates = [module] + ([module.split(".", 1)[1]] if "." in module else [])
        path = next((c for c in candidates if c + ".weight" in where), None)
        if path is None:
            near = sorted(n for n in where if n.endswith(module.rsplit(".", 1)[-1] + ".weight"))[:3]
            problems.append(f"adapter module {module!r} has no base tensor {module + '.weight'!r}"
                            + (f" (base has e.g. {near})" if near else ""))
            continue
        shard, dt, shape = where[path + ".weight"]
        R, I = job.A.shape
        O = job.B.shape[0]
        want = (I, O) if job.fan_in_fan_out else (O, I)
        if dt not in _FLOATS:
            problems.append(f"{path}.weight has dtype {dt}; expected one of {_FLOATS} (quantized bases are not merged)")
        elif shape != want:
            letters = "(I, O)" if job.fan_in_fan_out else "(O, I)"
            problems.append(f"{path}.weight has shape {list(shape)}; expected {letters} = {list(want)} from "
                            f"the adapter's lora_A {list(job.A.shape)} and lora_B {list(job.B.shape)}")
        if path + ".weight" in plan[shard]:
            problems.append(f"{path}.weight is targeted twice")
        plan[shard][path + ".weight"] = (job, "weight")
        if job.lora_bias is not None:
            if path + ".bias" not in where:
                problems.append(f"adapter module {module!r} has lora_bias but the base has no {path + '.bias'!r} "
                                "(PEFT refuses to merge it too)")
            else:
                bshard, bdt, bshape = where[path + ".bias"]
                if bshape != (O,) or bdt not in _FLOATS:
                    problems.append(f"{path}.bias has shape {list(bshape)} and dtype {bdt}; expected [{O}], floating")
                plan[bshard][path + ".bias"] = (job, "bias")
    if problems:
        raise ValueError("cannot merge; nothing was written:\n  " + "\n  ".join(problems))
    return plan


def _merged_tensor(arr: np.ndarray, job: _Job, what: str, bias_arr: Any = None) -> np.ndarray:
    if what == "bias":
        # bias' = RN(bias + s c): the lora_bias merge, with W and A, B of size zero
        O = arr.shape[0]
        return merge(np.zeros((O, 0), arr.dtype), np.zeros((0, 0)), np.zeros((O, 0)), scale=job.scale,
                     bias=arr, lora_bias=job.lora_bias).bias
    if job.magnitude is not None:
        return dora_merge(arr, job.A, job.B, magnitude=job.magnitude, scale=job.scale).weight
    return merge(arr, job.A, job.B, scale=job.scale, fan_in_fan_out=job.fan_in_fan_out).weight


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx",
                    ".index.json")


def _index_path(base: str) -> str:
    return os.path.abspath(os.path.join(base, INDEX_NAME) if os.path.isdir(base) else base)


def _base_files(base: str, headers: dict, index_path: str | None) -> tuple[str | None, list[str], list[str]]:
    """(base folder or None for a lone file, non-weight files to copy, names left out), all sorted."""
    if os.path.isdir(base) or index_path is not None:
        folder = os.path.dirname(index_path) if index_path is not None else base
    else:
        return None, [], []
    copy, skipped = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or name in headers or path == index_path:
            continue
        if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES):
            skipped.append(name)  # folders, and other weight files (unmerged weights would shadow or confuse)
        else:
            copy.append(name)
    return folder, copy, skipped


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_model(base: Any, adapter: Any, out: Any, *, overwrite: bool = False, progress: bool = True,
                workers: int | None = None, device: str | None = None) -> dict:
    """Merge a PEFT LoRA adapter into base model weights on disk (see the module docstring).

    Args:
      base: a safetensors file, a folder with model.safetensors, or a sharded
        model (folder or its model.safetensors.index.json).
      adapter: a PEFT adapter folder or its adapter_model.safetensors.
      out: the output model folder: OUT/model.safetensors (or the base's shards
        and index) and the base folder's other files (config.json, tokenizer...).
      overwrite: replace an existing output (switched atomically; see
        ``reflora.io.model_folder``).
      progress: a progress bar on stderr (bytes, rate, ETA).
      workers: threads for copying and merging (default: the usable cores, at most 8).
      device: "cpu", or "gpu" to run the bfloat16/float16 merge arithmetic on
        CuPy (the same bits; candidates are still settled on the host); None
        reads $REFLORA_BACKEND ("cupy" means "gpu"; anything else "cpu").

    Returns:
      A summary dict: modules merged, tensors merged and copied, bytes, seconds,
      outputs (sorted paths under OUT), copied (the base's other files), left out
      (weight files and folders of the base not copied), note.

    Raises:
      ValueError: adapter modules without a base tensor, shape or dtype mismatches
        (all listed at once); OUT is or contains the base's folder; nothing is written.
      reflora.FormatError: malformed files or configs.
      FileExistsError: the output exists and overwrite is False, or holds other files.

    Example:
      (see tests/io/test_model_merge.py; on the command line:)
      reflora merge ./llama ./my-adapter ./llama-merged
    """
    t0 = time.perf_counter()
    base, adapter, out = os.fspath(base), os.fspath(adapter), os.fspath(out)
    headers, index = _resolve_base(base)
    index_path = _index_path(base) if index is not None else None
    gpu = gpu_module(device)
    weights, modules, cfg = _read_adapter(adapter)
    plan = _plan(headers, _jobs(weights, modules, cfg))
    folder, extra, skipped = _base_files(base, headers, index_path)
    names = sorted(headers) if index is not None else [SINGLE_NAME]
    written = sorted(names + ([INDEX_NAME] if index is not None else []) + extra)
    base_dirs = {os.path.dirname(os.path.realpath(h.path)) for h in headers.values()}
    target = FolderOutput(out, overwrite=overwrite, expected=set(written) | {SINGLE_NAME}, protect=base_dirs)
    total = sum(e[4] - e[3] for h in headers.values() for e in h.entries)
    bar = None
    if progress:
        from ..cli.progress import ByteProgress  # noqa: PLC0415 - a leaf module, stdlib only

        bar = ByteProgress(total)
    writer = ShardWriter(_merged_tensor, bar.advance if bar is not None else None, workers or default_workers(),
                         gpu=gpu)
    syncs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reflora-fsync")
    target.begin()
    try:
        pending = []
        with blas_threads(1):
            for shard, h in headers.items():
                name = shard if index is not None else SINGLE_NAME
                fd = os.open(target.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    writer.write(h, plan[shard], fd)
                except BaseException:
                    os.close(fd)
                    raise
                pending.append(syncs.submit(_fsync_close, fd))  # the disk catches up while the next shard runs
        copies = [(index_path, INDEX_NAME)] if index_path is not None else []
        for src, name in copies + [(os.path.join(folder, n), n) for n in extra]:
            shutil.copyfile(src, target.path(name))
            fd = os.open(target.path(name), os.O_RDONLY)
            pending.append(syncs.submit(_fsync_close, fd))
        for f in pending:
            f.result()
        target.publish()
    except BaseException:
        target.abort()
        raise
    finally:
        writer.close()
        syncs.shutdown(wait=True)
    targeted = sum(len(t) for t in plan.values())
    outputs = [os.path.join(target.out, n) for n in written]
    note = ("BASE is a single file: only the weights were written (no config.json or tokenizer files to copy)"
            if folder is None else "")
    return {"modules": len(modules), "tensors merged": targeted,
            "tensors copied": sum(len(h.entries) for h in headers.values()) - targeted,
            "bytes": sum(os.path.getsize(p) for p in outputs), "seconds": time.perf_counter() - t0,
            "outputs": outputs, "copied": extra, "left out": skipped, "note": note,
            "float64 redone": list(writer.float64_redo)}
