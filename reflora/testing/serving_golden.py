"""Golden serving cases on disk, for kernels that cannot import Python (CUDA, Triton, Rust).

    python -m reflora.testing.serving_golden write DIR
    python -m reflora.testing.serving_golden check DIR --results RESULTS     exit 1 on any failure

Format "reflora-serving-golden", version 1. ``DIR/manifest.json``::

    {"format": "reflora-serving-golden", "version": 1, "reflora": "0.1.0",
     "cases": [{"name": "03_multi_forward_bfloat16_long", "file": "03_multi_forward_bfloat16_long.safetensors",
                "op": "multi_forward", "dtype": "bfloat16", "problem": {...ServingProblem fields...},
                "scale": 0.5, "offset": 0, "tp": 1, "mode": null,
                "inputs": ["x", "A", "B", "indices", "scales", "W"],
                "outputs": {"y": {"shape": [151, 24], "max_tolerance": 0.0123}}}, ...]}

``DIR/<case>.safetensors`` (metadata {"reflora_serving_golden": "1", "case": name})
holds the inputs in the case dtype (F64, F32, F16 or BF16; ``indices`` and
``ids`` I64; ``scales`` F64, one per adapter), the expected outputs in F64 and,
for each output NAME, ``tolerance.NAME`` (F64, NAME's shape): the per-element
tolerance of ``reflora.serving.bounds`` (zero where the case is exact).

    op               inputs (legend: N rows, I in, O out, R rank, L adapters, V vocab, X extra, D dim)
    shrink           x (N, I), A (L, R, I), indices (N,); "scale" in the manifest     -> h (N, R)
    expand           h (N, R), B (L, O, R), indices, base (N, O_total); "offset"     -> y (N, O_total)
    multi_forward    x, A, B (L, O, R), indices, scales (L,)[, W (O, I)][, bias (O,)] -> y (N, O)
    multi_backward   the same + dy (N, O)                                             -> dx, dA, dB
    embedding        ids (N,), E (V, D), A (L, R, V + X), B (L, D, R), indices, scales[, extra (L, X, D)] -> y
    tp               as multi_forward; "tp" T and "mode" (reflora.serving.tp)          -> y.0 ... y.{T-1}

Semantics: ``reflora.serving`` (index -1 = no adapter; per-adapter scale s_l
multiplies x A_l^T; expand adds into columns [offset, offset + O) of base).
An implementation writes ``RESULTS/<case name>.safetensors`` with the output
names (any floating dtype); ``check`` passes an output when every element
satisfies |result - expected| <= tolerance. A missing file or tensor fails.
Files are written atomically (``reflora.save_tensors``; the manifest through
a temporary file and a rename, last, so a complete manifest means complete cases).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from .._errors import FormatError
from ..io._files import read_json
from ..io.safetensors import load_tensors, save_tensors
from .serving import serving_reference
from .serving_problems import ServingProblem, host_dtype

__all__ = ["FORMAT", "VERSION", "check_serving_golden", "serving_golden_cases", "write_serving_golden"]

FORMAT = "reflora-serving-golden"
VERSION = 1
MANIFEST = "manifest.json"
_OPS = ("shrink", "expand", "multi_forward", "multi_backward", "embedding", "tp")


def serving_golden_cases(seed: int = 0) -> list[dict[str, Any]]:
    """The fixed case list: every op in every dtype, mixed ranks with 0, -1 rows, a 150-row segment, TP 1-8."""
    rng = np.random.default_rng(seed)
    cases = []
    shapes = [  # (tag, ranks, indices, I, O, X)
        ("mixed", (4, 0, 2, 8), tuple(rng.integers(-1, 4, size=13).tolist()), 24, 16, 0),
        ("long", (8, 3), (1,) * 2 + (0,) * 150 + (-1, 1), 32, 24, 2),
        ("qkv_small", (16, 16, 8), tuple(rng.integers(-1, 3, size=9).tolist()), 64, 96, 1),
    ]
    dtypes = ("float32", "float16", "bfloat16", "float64")
    k = 0
    for d in dtypes:
        for tag, ranks, idx, I, O, X in shapes:
            for op in _OPS:
                if op == "tp":
                    for T, mode in ((2, "column"), (4, "column_sharded"), (8, "row"), (8, "row_sharded")):
                        if ranks and max(ranks) % T == 0 and I % T == 0 and O % T == 0:
                            cases.append(_case(k, op, d, tag, ranks, idx, I, O, X, seed, T, mode))
                            k += 1
                    continue
                cases.append(_case(k, op, d, tag, ranks, idx, I, O, X, seed, 1, None))
                k += 1
    return cases


def _case(k, op, d, tag, ranks, idx, I, O, X, seed, T, mode):
    scales = tuple([0.5, 2.0, 1.0, 0.25, 4.0][: len(ranks)])
    p = ServingProblem(I=I, O=O, ranks=ranks, indices=idx, scales=scales, dtype=d, seed=seed + k, W=True,
                       bias=op in ("multi_forward", "tp"), values="uniform", offset=3 if op == "expand" else 0,
                       tail=2 if op == "expand" else 0, X=X if op == "embedding" else 0)
    suffix = f"_tp{T}_{mode}" if op == "tp" else ""
    return {"name": f"{k:03d}_{op}_{d}_{tag}{suffix}", "op": op, "dtype": d, "problem": p, "tp": T, "mode": mode}


def _inputs(op: str, p: ServingProblem) -> dict[str, np.ndarray]:
    a = p.arrays()
    hd = host_dtype(p.dtype)
    cast = (lambda v: v.astype(hd))
    s = np.asarray(p.scales, dtype=np.float64)
    if op == "shrink":
        return {"x": cast(a["x"]), "A": cast(a["A"]), "indices": a["indices"]}
    if op == "expand":
        return {"h": cast(a["h"]), "B": cast(a["B"]), "indices": a["indices"], "base": cast(a["base"])}
    if op == "embedding":
        t = {"ids": a["ids"], "E": cast(a["E"]), "A": cast(a["embA"]), "B": cast(a["embB"]), "indices": a["indices"],
             "scales": s}
        if a["extra"] is not None:
            t["extra"] = cast(a["extra"])
        return t
    t = {"x": cast(a["x"]), "A": cast(a["A"]), "B": cast(a["B"]), "indices": a["indices"], "scales": s}
    for key in ("W", "bias"):
        if a[key] is not None:
            t[key] = cast(a[key])
    if op == "multi_backward":
        t["dy"] = cast(a["dy"])
    return t


def write_serving_golden(directory: str, *, seed: int = 0) -> list[str]:
    """Write every serving case and ``manifest.json`` into ``directory``, all or nothing.

    The files are written into a fresh folder beside ``directory`` that then takes
    its place in one step (``reflora.io.atomic.atomic_folder``, as ``reflora golden
    write`` does): a reader sees the previous folder or the new one, never a manifest
    with another write's case files. Files that are not serving-golden files are kept.

    Returns:
      The case names written.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     names = write_serving_golden(d)
      >>> names[0]
      '000_shrink_float32_mixed'
    """
    from ..io.atomic import atomic_folder, owned_names  # noqa: PLC0415

    try:
        old = [c["file"] for c in _manifest(directory)["cases"]]
    except (ValueError, OSError, KeyError, TypeError):
        old = []
    names: list[str] = []
    atomic_folder(directory, lambda tmp: names.extend(_write_into(tmp, seed)), overwrite=True,
                  keep=owned_names([MANIFEST, *old]))
    return names


def _write_into(directory: str, seed: int) -> list[str]:
    """Write the cases and, last, the manifest into the (empty, fresh) folder ``directory``."""
    entries = []
    for case in serving_golden_cases(seed):
        op, p = case["op"], case["problem"]
        tensors = _inputs(op, p)
        ref_op = "tp" if op == "tp" else op
        refs = serving_reference(ref_op, p, tp=case["tp"], mode=case["mode"] or "column")
        outputs = {}
        for name, (ref, tol) in refs.items():
            out = name.replace("[", ".").replace("]", "")           # y[3] -> y.3
            tensors[out] = np.asarray(ref, dtype=np.float64)
            tensors["tolerance." + out] = np.asarray(tol, dtype=np.float64)
            outputs[out] = {"shape": list(np.shape(ref)), "max_tolerance": float(np.max(tol)) if np.size(tol) else 0.0}
        fname = case["name"] + ".safetensors"
        save_tensors(os.path.join(directory, fname), tensors,
                     metadata={"reflora_serving_golden": str(VERSION), "case": case["name"]})
        entries.append({"name": case["name"], "file": fname, "op": op, "dtype": p.dtype,
                        "problem": {**dataclasses.asdict(p), "ranks": list(p.ranks), "indices": list(p.indices),
                                    "scales": list(p.scales)},
                        "scale": float(p.scales[0]), "offset": p.offset, "tp": case["tp"], "mode": case["mode"],
                        "inputs": [k for k in tensors if k not in refs and not k.startswith("tolerance.")
                                   and k not in outputs],
                        "outputs": outputs})
    from .. import __version__  # noqa: PLC0415

    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as fh:  # the folder is switched in whole
        json.dump({"format": FORMAT, "version": VERSION, "reflora": __version__, "cases": entries}, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return [e["name"] for e in entries]


def _manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        m = read_json(path, MANIFEST)  # strict: a regular file, bounded size and depth, valid JSON
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; expected a folder written by write_serving_golden") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else type(m).__name__
        raise FormatError(f"{path} is {got!r}; expected format {FORMAT!r} version {VERSION}")
    cases = m.get("cases")
    if not isinstance(cases, list):
        raise FormatError(f"{path}: 'cases' is {cases!r:.60}; expected a list")
    for i, c in enumerate(cases):
        ok = isinstance(c, dict) and all(isinstance(c.get(k), str) and c.get(k) and "/" not in c[k] and "\\" not in c[k]
                                         and c[k] not in (".", "..") for k in ("name", "file"))
        if not ok or not isinstance(c.get("outputs"), dict):
            raise FormatError(f"{path}: cases[{i}] is {c!r:.80}; expected name, file (no folder) and outputs")
    return m


def check_serving_golden(directory: str, results: str) -> tuple[list[dict], bool]:
    """Grade ``results/<case>.safetensors`` against the cases; (rows, all passed).

    Each row: {"case", "output", "status" ("pass", "FAIL", "missing"), "max_error", "worst_ratio"}.
    """
    m = _manifest(directory)
    rows, ok = [], True
    for c in m["cases"]:
        expected, _ = load_tensors(os.path.join(directory, c["file"]), xp="numpy")
        path = os.path.join(results, c["name"] + ".safetensors")
        got = load_tensors(path, xp="numpy", dtype="float64")[0] if os.path.exists(path) else None
        for name in c["outputs"]:
            row = {"case": c["name"], "output": name, "status": "missing", "max_error": None, "worst_ratio": None}
            if got is not None and name in got:
                ref, tol = expected[name], expected["tolerance." + name]
                r = np.asarray(got[name], dtype=np.float64)
                if r.shape != ref.shape:
                    row["status"] = f"FAIL (shape {r.shape}, expected {ref.shape})"
                else:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        err = np.where(r == ref, 0.0, np.abs(r - ref))
                        err = np.where(np.isnan(err), np.inf, err)
                        ratio = np.where(err == 0, 0.0, err / tol)
                    row.update(max_error=float(err.max()) if err.size else 0.0,
                               worst_ratio=float(ratio.max()) if ratio.size else 0.0)
                    row["status"] = "pass" if not (err > tol).any() else "FAIL"
            ok = ok and row["status"] == "pass"
            rows.append(row)
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reflora.testing.serving_golden", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the serving golden cases into DIR")
    w.add_argument("dir")
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="grade RESULTS against DIR; exit 1 on any failure")
    c.add_argument("dir")
    c.add_argument("--results", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "write":
            names = write_serving_golden(args.dir, seed=args.seed)
            print(f"wrote {len(names)} serving cases and {MANIFEST} to {args.dir}")
            return 0
        rows, ok = check_serving_golden(args.dir, args.results)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        ratio = "" if r["worst_ratio"] is None else f"  error/tolerance {r['worst_ratio']:.3g}"
        print(f"{r['status']:8s} {r['case']} {r['output']}{ratio}")
    print(f"{sum(r['status'] == 'pass' for r in rows)} of {len(rows)} outputs pass")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover - exercised through main() in the tests
    sys.exit(main())
