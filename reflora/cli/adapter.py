"""``reflora inspect`` and ``reflora convert``: look into and translate adapter files.

    reflora inspect FILE|DIR [--layout peft|seed] [--alpha A] [--use-rslora]
    reflora convert SRC DST --to peft|seed [--layout ...] [--alpha A] [--module M] [--force]

``inspect`` lists the tensors (name, dtype, shape), the layout and how it was
decided, and per module: R, I, O, alpha, scale, parameters, and the Frobenius
norms of A, B and s B A. The last one is computed from R x R matrices only:

    ||s B A||_F^2 = s^2 trace(A^T B^T B A) = s^2 sum((B^T B) * (A A^T))

so the O x I product is never formed. A DIR is a PEFT adapter directory.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np

from ..adapter import LoraAdapter
from ..io._keys import read_record
from ..io.layouts import detect_layout, group_keys, load_adapter, save_adapter
from ..io.peft import PEFT_WEIGHTS_NAME, load_peft, save_peft
from ..io.safetensors import read_header

__all__ = ["lowrank_frobenius", "register"]


def lowrank_frobenius(A: Any, B: Any, scale: float = 1.0) -> float:
    """||scale * B A||_F without forming the (O, I) product.

    ||s B A||_F^2 = s^2 sum((B^T B) * (A A^T)); only R x R matrices are formed.

    Args:
      A: (R, I).  B: (O, R).  scale: s.

    Returns:
      The norm as a Python float (computed in float64 on the host).

    Example:
      >>> import numpy as np
      >>> A, B = np.array([[3.0, 0.0]]), np.array([[1.0], [0.0], [0.0]])
      >>> lowrank_frobenius(A, B, 2.0)
      6.0
    """
    from ..backend import to_numpy  # noqa: PLC0415

    a = np.asarray(to_numpy(A), dtype=np.float64)
    b = np.asarray(to_numpy(B), dtype=np.float64)
    sq = float(np.sum((b.T @ b) * (a @ a.T)))  # trace of a product of two symmetric PSD R x R matrices
    return abs(scale) * math.sqrt(max(sq, 0.0))


def _fro(x: Any) -> float:
    from ..backend import to_numpy  # noqa: PLC0415

    return float(np.linalg.norm(np.asarray(to_numpy(x), dtype=np.float64)))


def _table(rows: list[list[str]], out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))),
              file=out)


def inspect_path(path: str, *, layout: str | None = None, alpha: float | None = None,
                 use_rslora: bool | None = None, out=None) -> dict[str, Any]:
    """Print what ``reflora inspect`` prints; return {module: {rank, alpha, scale, ...}} for tests."""
    import sys  # noqa: PLC0415

    out = out or sys.stdout
    is_dir = os.path.isdir(path)
    weights = os.path.join(path, PEFT_WEIGHTS_NAME) if is_dir else path
    header, metadata = read_header(weights)
    print(f"{'directory' if is_dir else 'file'}: {path}", file=out)
    print(f"tensors ({len(header)}):", file=out)
    _table([["name", "dtype", "shape"]] + [[n, dt, str(tuple(s))] for n, (dt, s) in header.items()], out)
    alpha_known = True
    if is_dir:
        adapters = load_peft(path, xp="numpy")
        how = "PEFT directory (adapter_config.json)"
        found = "peft"
    else:
        if "reflora" in metadata and layout is None:
            how, found = "from reflora metadata", read_record(metadata, path)["layout"]
        elif layout is not None:
            how, found = "given (--layout)", layout
        else:
            found = detect_layout({n: s for n, (_, s) in header.items()}, where=path)
            how = "detected from names and shapes"
        if "reflora" not in metadata and alpha is None:
            alpha_known = False
        loaded = load_adapter(path, layout=layout, alpha=alpha if alpha_known else 1.0, use_rslora=use_rslora,
                              xp="numpy")
        if isinstance(loaded, LoraAdapter):  # name the single module from its keys ("" for bare lora_a/lora_b)
            (name,) = group_keys({n: s for n, (_, s) in header.items()}, path)[0]
            loaded = {name: loaded}
        adapters = loaded
    print(f"layout: {found} ({how})", file=out)
    print(f"modules: {len(adapters)}", file=out)
    rows = [["module", "R", "I", "O", "alpha", "scale", "params", "|A|_F", "|B|_F", "|s B A|_F"]]
    summary = {}
    total = 0
    for m, ad in adapters.items():
        c = ad.config
        total += ad.num_params()
        s_ba = lowrank_frobenius(ad.A, ad.B, ad.scale) if alpha_known else None
        rows.append([m or "(single)", str(c.rank), str(c.in_features), str(c.out_features),
                     f"{c.alpha:g}" if alpha_known else "?", f"{ad.scale:g}" if alpha_known else "?",
                     str(ad.num_params()), f"{_fro(ad.A):.6g}", f"{_fro(ad.B):.6g}",
                     f"{s_ba:.6g}" if s_ba is not None else f"? (|B A|_F = {lowrank_frobenius(ad.A, ad.B):.6g})"])
        summary[m] = {"rank": c.rank, "alpha": c.alpha if alpha_known else None,
                      "scale": ad.scale if alpha_known else None, "params": ad.num_params(),
                      "norm_A": _fro(ad.A), "norm_B": _fro(ad.B), "norm_sBA": s_ba}
    _table(rows, out)
    for m, ad in adapters.items():
        extras = [n for n in ("magnitude", "lora_bias") if getattr(ad, n, None) is not None]
        if extras:  # counted in num_params(); |s B A|_F above is the plain LoRA update only
            print(f"  {m}: also has {' and '.join(extras)} (O,)" + (" - DoRA: the update is not s B A alone"
                                                                       if "magnitude" in extras else ""), file=out)
    print(f"parameters: {total}", file=out)
    if not alpha_known:
        print("alpha: unknown (the file has no reflora config); pass --alpha for the scale and |s B A|_F", file=out)
    return summary


def _inspect(args: argparse.Namespace) -> int:
    inspect_path(args.path, layout=args.layout, alpha=args.alpha, use_rslora=args.use_rslora or None)
    return 0


def convert(src: str, dst: str, *, to: str, layout: str | None = None, alpha: float | None = None,
            use_rslora: bool | None = None, module: str = "linear", force: bool = False) -> str:
    """Read SRC (file or PEFT directory) and write DST in layout ``to``; return a one-line summary."""
    if os.path.isdir(src):
        adapters: Any = load_peft(src, xp="numpy")
    else:
        adapters = load_adapter(src, layout=layout, alpha=alpha, use_rslora=use_rslora, xp="numpy")
        if isinstance(adapters, LoraAdapter):
            # keep the module path the file names; --module only names bare lora_a/lora_b files
            header = read_header(src)[0]
            (name,) = group_keys({n: s for n, (_, s) in header.items()}, src)[0]
            if name:
                module = name
    n = 1 if isinstance(adapters, LoraAdapter) else len(adapters)
    if to == "peft" and (os.path.isdir(dst) or not dst.endswith(".safetensors")):
        if isinstance(adapters, LoraAdapter):
            adapters = {module: adapters}
        save_peft(dst, adapters, overwrite=force)
        return f"wrote PEFT directory {dst} ({n} module{'s' * (n != 1)})"
    save_adapter(dst, adapters, layout=to, module=module, overwrite=force)
    return f"wrote {dst} (layout {to}, {n} module{'s' * (n != 1)})"


def _convert(args: argparse.Namespace) -> int:
    try:
        print(convert(args.src, args.dst, to=args.to, layout=args.layout, alpha=args.alpha,
                      use_rslora=args.use_rslora or None, module=args.module, force=args.force))
    except FileExistsError as exc:
        where = exc.filename if exc.filename is not None else str(exc).split(";")[0]
        raise FileExistsError(f"{where} exists; pass --force to replace it") from None
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="tensors, layout, ranks, scales and norms of an adapter file or PEFT dir")
    p.add_argument("path", metavar="FILE|DIR")
    p.add_argument("--layout", choices=("peft", "seed"), default=None, help="force the layout (default: detect)")
    p.add_argument("--alpha", type=float, default=None, help="alpha for files without a reflora config")
    p.add_argument("--use-rslora", action="store_true", help="scale alpha/sqrt(R) for files without a config")
    p.set_defaults(func=_inspect)

    c = sub.add_parser("convert", help="convert an adapter between the peft and seed layouts")
    c.add_argument("src", metavar="SRC", help="adapter file or PEFT directory")
    c.add_argument("dst", metavar="DST", help="file (.safetensors) or, with --to peft, a PEFT directory")
    c.add_argument("--to", choices=("peft", "seed"), required=True)
    c.add_argument("--layout", choices=("peft", "seed"), default=None, help="SRC's layout (default: detect)")
    c.add_argument("--alpha", type=float, default=None, help="alpha for sources without a reflora config")
    c.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling for sources without a config")
    c.add_argument("--module", default="linear", help="module path of a single adapter written as peft")
    c.add_argument("--force", action="store_true", help="replace existing DST files")
    c.set_defaults(func=_convert)
