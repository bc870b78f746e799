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
a base bias. Then each output file is streamed: the header is the input's
(the same names, dtypes, shapes and offsets), untargeted tensors are copied
through in 16 MiB pieces, targeted ones are read, merged and written one at a
time. Peak memory is about two copies of the largest targeted tensor (its
input and its output) plus the merge's float64 row blocks (a few MiB); a DoRA
module needs more, several float64 O x I arrays for its row norms (about 20
times a bf16 tensor), since ``dora_merge`` is not blocked. The
output is written atomically: a single file through a temporary file and a
rename; a sharded model into a temporary folder renamed to OUT at the end,
with its index. No torch is imported. Only weights are written: copy
config.json, tokenizer and generation files next to them yourself.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
import time
from typing import Any, NamedTuple

import numpy as np

from .._errors import FormatError
from ..numerics.merge import merge
from ..numerics.rounding import BF16
from ..ops.dora import dora_merge
from .atomic import atomic_write
from .peft import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, pattern_key, read_peft_config
from .safetensors import load_tensors
from .safetensors_header import MAX_HEADER_BYTES, SAFETENSORS_DTYPES, validate_header

__all__ = ["INDEX_NAME", "merge_model"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_COPY_CHUNK = 16 << 20
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
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: file has {size} bytes; expected at least 8 (the header length)")
        raw_n = f.read(8)
        (n,) = struct.unpack("<Q", raw_n)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{path}: header length is {n} bytes; expected at most "
                              f"{min(MAX_HEADER_BYTES, size - 8)}")
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
        try:
            with open(base, encoding="utf-8") as f:
                index = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{base}: not valid JSON ({exc})") from None
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
    cfg = read_peft_config(folder, allow=("use_dora", "lora_bias"))
    tensors, _ = load_tensors(weights, xp="numpy")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        part = next((p for p in _SUFFIXES if name.startswith(PEFT_PREFIX) and name.endswith("." + p)), None)
        if part is None:
            raise FormatError(f"{weights}: tensor {name!r} is not one reflora merge handles; expected "
                              f"'{PEFT_PREFIX}<module>.' + one of {sorted(_SUFFIXES)} (Linear layers only)")
        module = name[len(PEFT_PREFIX):-len(part) - 1]
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
        return dora_merge(arr, job.A, job.B, job.magnitude, scale=job.scale).weight
    return merge(arr, job.A, job.B, scale=job.scale, fan_in_fan_out=job.fan_in_fan_out).weight


def _write_shard(h: _Header, targets: dict[str, tuple], out_path: str, bar: Any, done: list) -> None:
    data_start = len(h.prefix)
    with open(h.path, "rb") as src, open(out_path, "wb") as dst:
        dst.write(h.prefix)  # the same header: same names, dtypes, shapes and offsets
        for name, dt, shape, begin, end in h.entries:
            src.seek(data_start + begin)
            if name in targets:
                raw = np.empty(end - begin, dtype=np.uint8)
                if src.readinto(memoryview(raw)) != raw.size:
                    raise FormatError(f"{h.path}: file ended inside tensor {name!r} (did it change while read?)")
                job, what = targets[name]
                new = _merged_tensor(raw.view(SAFETENSORS_DTYPES[dt]).reshape(shape), job, what)
                del raw
                dst.write(np.ascontiguousarray(new).reshape(-1).view(np.uint8).data)
                del new
            else:
                left = end - begin
                while left:
                    piece = src.read(min(left, _COPY_CHUNK))
                    if not piece:
                        raise FormatError(f"{h.path}: file ended inside tensor {name!r}")
                    dst.write(piece)
                    left -= len(piece)
            done[0] += 1
            if bar is not None:
                bar.update(done[0] - 1, ("merged " if name in targets else "copied ") + name)
        dst.flush()
        os.fsync(dst.fileno())


def merge_model(base: Any, adapter: Any, out: Any, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Merge a PEFT LoRA adapter into base model weights on disk (see the module docstring).

    Args:
      base: a safetensors file, a folder with model.safetensors, or a sharded
        model (folder or its model.safetensors.index.json).
      adapter: a PEFT adapter folder or its adapter_model.safetensors.
      out: the merged file (single-file base; a folder OUT means
        OUT/model.safetensors) or the merged model folder (sharded base).
      overwrite: replace an existing output.
      progress: a progress bar on stderr.

    Returns:
      A summary dict: modules merged, tensors written, bytes, seconds, output paths.

    Raises:
      ValueError: adapter modules without a base tensor, shape or dtype mismatches
        (all listed at once); nothing is written.
      reflora.FormatError: malformed files or configs.
      FileExistsError: the output exists and overwrite is False.

    Example:
      (see tests/io/test_model_merge.py; on the command line:)
      reflora merge ./llama ./my-adapter ./llama-merged
    """
    t0 = time.perf_counter()
    base, adapter, out = os.fspath(base), os.fspath(adapter), os.fspath(out)
    headers, index = _resolve_base(base)
    weights, modules, cfg = _read_adapter(adapter)
    plan = _plan(headers, _jobs(weights, modules, cfg))
    total = sum(len(h.entries) for h in headers.values())
    bar = None
    if progress:
        from ..cli.progress import ProgressBar  # noqa: PLC0415 - a leaf module, stdlib only

        bar = ProgressBar(total)
    done = [0]
    if index is None:
        (shard, h), = headers.items()
        target = os.path.join(out, SINGLE_NAME) if os.path.isdir(out) else out
        if os.path.realpath(target) == os.path.realpath(h.path):
            raise ValueError(f"OUT {target} is the base file itself; expected a new path")
        atomic_write(target, lambda tmp: _write_shard(h, plan[shard], tmp, bar, done), overwrite=overwrite)
        outputs = [target]
    else:
        if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not overwrite)):
            raise FileExistsError(f"{out} exists; expected a new folder for the sharded model (or overwrite)")
        real_out = os.path.realpath(out)
        base_dirs = {os.path.dirname(os.path.realpath(h.path)) for h in headers.values()}
        if any(d == real_out or d.startswith(real_out + os.sep) for d in base_dirs):
            raise ValueError(f"OUT {out} is or contains the base model's folder; expected a new folder "
                             "(replacing it would delete the base and its other files)")
        if os.path.isdir(out):
            ours = set(headers) | {INDEX_NAME}
            foreign = sorted(set(os.listdir(out)) - ours)
            if foreign:
                raise FileExistsError(f"{out} holds files this merge would not write ({foreign[:5]}); "
                                      "expected a new folder or a previous merge output")
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.{secrets.token_hex(6)}.tmp")
        os.mkdir(tmp)
        try:
            for shard, h in headers.items():
                _write_shard(h, plan[shard], os.path.join(tmp, shard), bar, done)
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            old = None
            if os.path.exists(out):
                old = f"{tmp}.old"
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                if old is not None:
                    os.rename(old, out)  # put the previous output back
                raise
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        outputs = [os.path.join(out, s) for s in headers] + [os.path.join(out, INDEX_NAME)]
    targeted = sum(len(t) for t in plan.values())
    return {"modules": len(modules), "tensors merged": targeted, "tensors copied": total - targeted,
            "bytes": sum(os.path.getsize(p) for p in outputs), "seconds": time.perf_counter() - t0,
            "outputs": outputs}
