"""Golden vectors: LoRA cases on disk for implementations that cannot import Python.

    reflora golden write DIR                      write the cases and DIR/manifest.json
    reflora golden check DIR --results RESULTS    grade RESULTS/<case>.safetensors; exit 1 on any failure

File format (version 1)
-----------------------
``DIR/manifest.json``::

    {"format": "reflora-golden", "version": 1, "reflora": "0.1.0",
     "policy": {...the TolerancePolicy the tolerances were derived with...},
     "cases": [{"name": "10_float16_seed_rank_gt_in_dropout",
                "file": "10_float16_seed_rank_gt_in_dropout.safetensors",
                "dtype": "float16", "layout": "seed", "lead": [2, 3], "I": 5, "O": 7, "R": 8,
                "alpha": 8.0, "use_rslora": true, "scale": 2.828...,
                "sgd": {"lr": ..., "momentum": ..., "dampening": ..., "weight_decay": ...,
                        "nesterov": ..., "maximize": ..., "steps": 3},
                "inputs": ["x", "lora_a", "lora_b", "W", "dropout_mask", "dy", "target"],
                "outputs": {"y": {"shape": [2, 3, 7], "tolerance": 0.0123,
                                  "tolerances": "tolerance.y"}, ...}}, ...]}

``DIR/<case>.safetensors`` (metadata {"reflora_golden": "1", "case": name}) holds
the inputs in the case's dtype (F32, F16, BF16 or F64) and the expected outputs
in F64 (the float64 reference from exactly those inputs). Row-major, as
safetensors always is. Legend: N rows = prod(lead), I in, O out, R rank.

    tensor           dtype  shape            meaning
    x                case   (*lead, I)       input (lead may be empty: x is (I,))
    lora_A / lora_a  case   (R, I) / (I, R)  layout "peft": A as PEFT stores it;
                                             layout "seed": a = A^T (the seed's candle layout)
    lora_B / lora_b  case   (O, R) / (R, O)  "peft": B; "seed": b = B^T
    W                case   (O, I)           frozen base weight (absent: no base path)
    bias             case   (O,)             frozen base bias (absent: none)
    dropout_mask     case   (*lead, I)       inverted-dropout mask, 0 or 1/(1-p), LoRA branch only
                                             (absent: no dropout)
    dy               case   (*lead, O)       upstream gradient dL/dy for the backward
    target           case   (*lead, O)       regression target of the training steps
    y                F64    (*lead, O)       y = x W^T + bias + s ((x * m) A^T) B^T
                                             ("seed": s (x * m) a b + ...)
    dx               F64    (*lead, I)       gradient of sum(y * dy) with respect to x
    d_lora_A / _a    F64    like lora_A/_a   its gradient, summed over all rows, in the file's layout
    d_lora_B / _b    F64    like lora_B/_b
    sgd.lora_A / _a  F64    like lora_A/_a   A (or a) after sgd.steps steps of: y = forward WITHOUT the
    sgd.lora_B / _b  F64    like lora_B/_b   dropout mask, L = mean((y - target)^2), backward,
                                             torch.optim.SGD with the case's options on A and B only
    tolerance.<out>  F64    like <out>       the tolerance of every element of output <out>

An implementation under test reads the inputs, computes in the case's dtype
and writes ``RESULTS/<case name>.safetensors`` holding tensors with the output
names above (y, dx, d_lora_*, sgd.lora_*; any floating dtype, compared in
float64). ``check`` passes a tensor when |result - expected| <= its
``tolerance.<out>`` element by element (absolute), derived as in
``reflora.testing.policy``: the error envelope over every legitimate evaluation
in the case's dtype (any summation order, float32 accumulation, the scale on
any factor, bias fused or not, intermediates rounded to the dtype or not) plus
2^-39 of the summed magnitudes. The manifest's scalar ``tolerance`` is the
largest element's (a manifest without ``tolerances`` is graded with it for
every element). A missing results file or tensor is a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np

from .._errors import FormatError
from .._validate import check_real
from ..io._files import read_json
from ..ops.lora import lora_backward, lora_forward
from ..io.safetensors import load_tensors, save_tensors
from ._report import as_f64
from .problems import Problem, SGDOptions
from .envelope import backward_envelope, forward_envelope
from .envelope_train import train_envelope
from .policy import TolerancePolicy

__all__ = ["FORMAT", "VERSION", "check_golden", "golden_cases", "write_golden"]

FORMAT = "reflora-golden"
VERSION = 1
MANIFEST = "manifest.json"

#: (tag, lead, I, O, R, alpha, use_rslora, W, bias, dropout, SGDOptions)
_SHAPES = (
    ("base_bias_momentum", (3,), 8, 6, 2, 16.0, False, True, True, 0.0,
     SGDOptions(lr=0.01, momentum=0.9, dampening=0.1, steps=3)),
    ("rank_gt_in_dropout", (2, 3), 5, 7, 8, 8.0, True, True, False, 0.5,
     SGDOptions(lr=0.01, momentum=0.5, nesterov=True, weight_decay=0.01, steps=3)),
    ("vector_x_no_base", (), 4, 3, 1, 1.0, False, False, True, 0.0,
     SGDOptions(lr=0.003, maximize=True, steps=2)),
)
_DTYPES = ("float32", "float16", "bfloat16", "float64")
_LAYOUTS = ("peft", "seed")
_NAMES = {"peft": ("lora_A", "lora_B"), "seed": ("lora_a", "lora_b")}


def golden_cases(seed: int = 0) -> list[dict[str, Any]]:
    """The case descriptions ``write_golden`` writes (every dtype x layout x shape)."""
    cases = []
    for d in _DTYPES:
        for layout in _LAYOUTS:
            for tag, lead, I, O, R, alpha, rs, W, bias, p, sgd in _SHAPES:
                scale = alpha / (math.sqrt(R) if rs else R)
                cases.append({
                    "name": f"{len(cases):02d}_{d}_{layout}_{tag}", "dtype": d, "layout": layout,
                    "problem": Problem(lead=lead, I=I, O=O, R=R, dtype=d, seed=seed + len(cases), scale=scale,
                                       W=W, bias=bias, dropout=p),
                    "alpha": alpha, "use_rslora": rs, "sgd": sgd})
    return cases


def _t(a: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(a.T) if layout == "seed" else a


def write_golden(directory: str, *, seed: int = 0, policy: TolerancePolicy | None = None) -> list[str]:
    """Write every golden case and ``manifest.json`` into ``directory`` (created if needed), all or nothing.

    The cases and manifest are written into a fresh folder beside ``directory``
    that then takes its place in one step (``reflora.io.atomic.atomic_folder``):
    a reader sees the previous golden folder or the new one, never a manifest
    with another write's case files. Files of ``directory`` that are not golden
    files (not the old manifest or a case it lists) are carried over.

    Args / Returns / Example: as ``_write_golden_into``.
    """
    from ..io.atomic import atomic_folder, owned_names  # noqa: PLC0415

    names: list[str] = []
    try:
        old = [c["file"] for c in _read_manifest(directory)["cases"]]
    except (ValueError, OSError):
        old = []
    atomic_folder(directory, lambda tmp: names.extend(_write_golden_into(tmp, seed=seed, policy=policy)),
                  overwrite=True, keep=owned_names([MANIFEST, *old]))
    return names


def _write_golden_into(directory: str, *, seed: int = 0, policy: TolerancePolicy | None = None) -> list[str]:
    """Write every golden case and ``manifest.json`` into ``directory`` (created if needed).

    Args:
      directory: destination folder.
      seed: base seed of the cases' arrays.
      policy: the TolerancePolicy the tolerances are derived with (default: the envelope itself).

    Returns:
      The case names written.

    Example:
      >>> import tempfile
      >>> names = write_golden(tempfile.mkdtemp())
      >>> names[0]
      '00_float32_peft_base_bias_momentum'
    """
    policy = TolerancePolicy() if policy is None else policy
    os.makedirs(directory, exist_ok=True)
    entries = []
    for case in golden_cases(seed):
        p, layout, d = case["problem"], case["layout"], case["dtype"]
        nA, nB = _NAMES[layout]
        a = p.arrays()
        f = {k: as_f64(v) for k, v in a.items()}
        s = p.scale
        tensors = {"x": a["x"], nA: _t(a["A"], layout), nB: _t(a["B"], layout), "dy": a["dy"], "target": a["target"]}
        for k in ("W", "bias", "dropout_mask"):
            if a[k] is not None:
                tensors[k] = a[k]
        with np.errstate(all="ignore"):
            y, cache = lora_forward(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                                    dropout_mask=f["dropout_mask"])
            g = lora_backward(f["dy"], cache)
            acc = policy.accumulate
            ey = forward_envelope(f["x"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                                  dropout_mask=f["dropout_mask"], dtype=d, accumulate=acc)
            eg = backward_envelope(f["x"], f["A"], f["B"], f["dy"], scale=s, W=f["W"], dropout_mask=f["dropout_mask"],
                                   dtype=d, accumulate=acc)
            sgd = case["sgd"]
            ref_A, ref_B = _reference_train(f, s, sgd)
            et = train_envelope(f["x"], f["target"], f["A"], f["B"], scale=s, W=f["W"], bias=f["bias"],
                                steps=sgd.steps, sgd=sgd.as_kwargs(), dtype=d, accumulate=acc)[-1]
        outputs: dict[str, Any] = {}

        def add(name, tensor_kind, ref, env, layout_t=False):
            bound = np.broadcast_to(policy.bound(tensor_kind, d, env), np.shape(ref))
            arr = _t(np.asarray(ref, dtype=np.float64), layout) if layout_t else np.asarray(ref, dtype=np.float64)
            tol = _t(np.asarray(bound, dtype=np.float64), layout) if layout_t else np.asarray(bound, np.float64)
            tensors[name] = arr
            tensors["tolerance." + name] = np.ascontiguousarray(tol)
            outputs[name] = {"shape": list(arr.shape), "tolerance": float(np.max(tol)) if tol.size else 0.0,
                             "tolerances": "tolerance." + name, "from": tensor_kind}

        add("y", "y", y, ey)
        add("dx", "dx", g.dx, eg[0])
        add("d_" + nA, "dA", g.dA, eg[1], layout_t=True)
        add("d_" + nB, "dB", g.dB, eg[2], layout_t=True)
        add("sgd." + nA, "A", ref_A, et[0], layout_t=True)
        add("sgd." + nB, "B", ref_B, et[1], layout_t=True)
        fname = case["name"] + ".safetensors"
        save_tensors(os.path.join(directory, fname), tensors,
                     metadata={"reflora_golden": str(VERSION), "case": case["name"]})
        entries.append({
            "name": case["name"], "file": fname, "dtype": d, "layout": layout, "lead": list(p.lead),
            "I": p.I, "O": p.O, "R": p.R, "alpha": case["alpha"], "use_rslora": case["use_rslora"], "scale": s,
            "sgd": {**sgd.as_kwargs(), "steps": sgd.steps},
            "inputs": [k for k in ("x", nA, nB, "W", "bias", "dropout_mask", "dy", "target") if k in tensors],
            "outputs": outputs})
    from .. import __version__  # noqa: PLC0415

    manifest = {"format": FORMAT, "version": VERSION, "reflora": __version__, "policy": policy.to_dict(),
                "cases": entries}
    # written next to its final name and renamed, so a reader never sees half a manifest
    path = os.path.join(directory, MANIFEST)
    tmp = os.path.join(directory, f".{MANIFEST}.{os.getpid()}.tmp")  # open(), not mkstemp: the usual permissions
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return [e["name"] for e in entries]


def _reference_train(f: dict, s: float, sgd: SGDOptions) -> tuple[np.ndarray, np.ndarray]:
    from ..ops.lora import mse_loss  # noqa: PLC0415
    from ..optim.sgd import SGD  # noqa: PLC0415

    opt = SGD(**sgd.as_kwargs())
    params = {"A": f["A"], "B": f["B"]}
    state = opt.init(params)
    for _ in range(sgd.steps):
        y, cache = lora_forward(f["x"], params["A"], params["B"], scale=s, W=f["W"], bias=f["bias"])
        _, dy = mse_loss(y, f["target"])
        g = lora_backward(dy, cache)
        params, state = opt.step(params, {"A": g.dA, "B": g.dB}, state)
    return params["A"], params["B"]


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        manifest = read_json(path, MANIFEST)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; expected a folder written by `reflora golden write`") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path} holds a JSON {type(manifest).__name__}; expected an object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise FormatError(f"{path} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                          f"expected {FORMAT!r} version {VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise FormatError(f"{path}: 'cases' is {cases!r:.60}; expected a list")
    for i, case in enumerate(cases):
        where = f"{path}: cases[{i}]"
        if not isinstance(case, dict):
            raise FormatError(f"{where} is {case!r:.60}; expected an object")
        for key in ("name", "file"):
            v = case.get(key)
            if not (isinstance(v, str) and v and v not in (".", "..") and "/" not in v and "\\" not in v):
                raise FormatError(f"{where}: {key!r} is {v!r:.60}; expected a file name without a folder")
        outputs = case.get("outputs")
        if not isinstance(outputs, dict):
            raise FormatError(f"{where}: 'outputs' is {outputs!r:.60}; expected an object")
        for name, spec in outputs.items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            tol = spec.get("tolerance") if isinstance(spec, dict) else None
            if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                    for n in shape)):
                raise FormatError(f"{where}: outputs[{name!r}] has shape {shape!r:.60}; expected a list of sizes")
            spec["tolerance"] = check_real(tol, f"{where}: outputs[{name!r}] tolerance", error=FormatError, minimum=0)
    return manifest


def check_golden(directory: str, results: str) -> tuple[list[dict], bool]:
    """Grade the results of an implementation against the golden cases.

    Args:
      directory: a folder written by ``write_golden``.
      results: a folder holding ``<case name>.safetensors`` result files.

    Returns:
      (rows, ok): one row per case {"case", "status", "worst", "err", "tolerance", "failures"}, and
      whether every case passed.

    Raises:
      ValueError: the golden folder is missing; FormatError (a ValueError): its manifest or a golden
        file is not this format.
    """
    from ..io.atomic import read_consistently  # noqa: PLC0415

    # write_golden replaces the folder as a whole: never grade with one version's manifest and another's cases
    return read_consistently(directory, lambda: _check_golden(directory, results))


def _check_golden(directory: str, results: str) -> tuple[list[dict], bool]:
    manifest = _read_manifest(directory)
    rows, ok = [], True
    for case in manifest["cases"]:
        golden, _ = load_tensors(os.path.join(directory, case["file"]), xp="numpy")
        path = os.path.join(results, case["name"] + ".safetensors")
        row = {"case": case["name"], "status": "ok", "worst": "-", "err": 0.0, "tolerance": 0.0, "ratio": 0.0,
               "failures": []}
        if not os.path.exists(path):
            row.update(status="FAIL", failures=[f"missing results file {path}"])
            rows.append(row)
            ok = False
            continue
        try:
            got, _ = load_tensors(path, xp="numpy")
        except ValueError as exc:
            row.update(status="FAIL", failures=[f"unreadable: {exc}"])
            rows.append(row)
            ok = False
            continue
        for name, spec in case["outputs"].items():
            if name not in golden:
                raise FormatError(f"{os.path.join(directory, case['file'])} has no tensor {name!r}, which "
                                  f"{MANIFEST} lists as an output of case {case['name']!r}")
            want = np.asarray(golden[name], dtype=np.float64)
            if name not in got:
                row["failures"].append(f"{name}: missing")
                continue
            have = np.asarray(got[name]).astype(np.float64)
            if list(have.shape) != spec["shape"]:
                row["failures"].append(f"{name}: shape {list(have.shape)}; expected {spec['shape']}")
                continue
            tol = np.full(want.shape, float(spec["tolerance"]))
            key = spec.get("tolerances")
            if key is not None:
                if key not in golden or tuple(np.shape(golden[key])) != want.shape:
                    raise FormatError(f"{os.path.join(directory, case['file'])} has no tensor {key!r} of shape "
                                      f"{want.shape}, which {MANIFEST} names as the tolerances of {name!r}")
                tol = np.asarray(golden[key], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                diff = np.abs(have - want)
            if want.size and np.isnan(diff).any():
                row["failures"].append(f"{name}: NaN/Inf where the expected value is finite")
                continue
            if not want.size:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.where(tol > 0, diff / np.where(tol > 0, tol, 1.0), np.where(diff > 0, math.inf, 0.0))
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(r)), r.shape))
            err, t, ratio = float(diff[idx]), float(tol[idx]), float(r[idx])
            if ratio >= row["ratio"]:
                row.update(worst=name, err=err, tolerance=t, ratio=ratio)
            if ratio > 1:
                row["failures"].append(f"{name}: abs error {err:.3g} at {idx} > its tolerance {t:.3g}")
        if row["failures"]:
            row["status"] = "FAIL"
            ok = False
        rows.append(row)
    return rows, ok


def format_table(rows: list[dict]) -> str:
    """The per-case table ``reflora golden check`` prints."""
    width = max([len(r["case"]) for r in rows] + [4])
    lines = [f"{'case':<{width}}  status  {'worst tensor':<14} {'abs err':>11}  {'tolerance':>10}  err/tol"]
    for r in rows:
        if r["worst"] == "-":  # nothing was compared (a missing or unreadable results file): no figures
            lines.append(f"{r['case']:<{width}}  {r['status']:<6}  {'-':<14} {'-':>11}  {'-':>10}  -")
        else:
            lines.append(f"{r['case']:<{width}}  {r['status']:<6}  {r['worst']:<14} {r['err']:>11.3g}  "
                         f"{r['tolerance']:>10.3g}  {r['ratio']:.3f}")
        for f in r["failures"]:
            lines.append(f"{'':<{width}}    - {f}")
    n_bad = sum(r["status"] != "ok" for r in rows)
    lines.append(f"{len(rows) - n_bad} of {len(rows)} cases pass" + (f"; {n_bad} FAIL" if n_bad else ""))
    return "\n".join(lines)
