"""``reflora inspect`` and ``reflora convert``: look into and translate adapter files.

    reflora inspect FILE|DIR [--layout peft|seed] [--alpha A] [--use-rslora] [--n-head H --n-head-kv K]
    reflora convert SRC DST --to peft|seed|kohya|mlx|gguf [--layout ...] [--alpha A] [--module M]
                            [--n-head H --n-head-kv K] [--overwrite]

``inspect`` lists the tensors (name, dtype, shape), the layout and how it was
decided, and per module: R, I, O, alpha, scale, parameters, and the Frobenius
norms of A, B and s B A. The last one is computed from R x R matrices only:

    ||s B A||_F^2 = s^2 trace(A^T B^T B A) = s^2 sum((B^T B) * (A A^T))

so the O x I product is never formed. A DIR is a PEFT or mlx-lm adapter folder; kohya
and GGUF files are recognised by their keys and magic (reflora/cli/formats.py).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np

from ..adapter import LoraAdapter
from ..io._keys import read_record
from ..io.formats import FORMATS, detect_format, load_any, save_any
from ..io.layouts import detect_layout, group_keys, load_adapter, save_adapter
from ..io._files import read_json
from ..io.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, load_peft, save_peft
from ..io.safetensors import read_header
from .formats import OTHER_FORMATS, read_format

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
                 use_rslora: bool | None = None, n_head: int | None = None, n_head_kv: int | None = None,
                 out=None) -> dict[str, Any]:
    """Print what ``reflora inspect`` prints; return {module: {rank, alpha, scale, ...}} for tests."""
    import sys  # noqa: PLC0415

    out = out or sys.stdout
    is_dir = os.path.isdir(path)
    if is_dir and not any(os.path.lexists(os.path.join(path, n)) for n in (PEFT_CONFIG_NAME, "adapters.safetensors")):
        _check_peft_folder(path)  # says what is missing and what to pass instead
    fmt = detect_format(path)
    if fmt in OTHER_FORMATS:
        header, adapters, found, how = read_format(path, fmt, n_head=n_head, n_head_kv=n_head_kv)
    else:
        weights = os.path.join(path, PEFT_WEIGHTS_NAME) if is_dir else path
        if is_dir:
            _check_peft_folder(path)
        header, metadata = read_header(weights)
    print(f"{'directory' if is_dir else 'file'}: {path}", file=out)
    print(f"tensors ({len(header)}):", file=out)
    _table([["name", "dtype", "shape"]] + [[n, dt, str(tuple(s))] for n, (dt, s) in header.items()], out)
    alpha_known = True
    if fmt in OTHER_FORMATS:
        pass
    elif is_dir:
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
    print(f"{'format' if fmt in OTHER_FORMATS else 'layout'}: {found} ({how})", file=out)
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


def _check_peft_folder(path: str) -> None:
    """FileNotFoundError saying what a folder lacks to be a PEFT adapter folder, and what to pass instead."""
    missing = [n for n in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if not os.path.lexists(os.path.join(path, n))]
    if not missing:
        return
    try:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    except OSError:
        files = []
    hint = (f"; to read one adapter file, pass it: {os.path.join(path, files[0])}" if files else
            "; pass a folder PeftModel.save_pretrained wrote, or an adapter .safetensors file")
    what = "is empty" if not os.listdir(path) else f"has no {' and no '.join(missing)}"
    raise FileNotFoundError(f"{path} {what}: expected a PEFT adapter folder ({PEFT_CONFIG_NAME} + "
                            f"{PEFT_WEIGHTS_NAME}){hint}")


def _inspect(args: argparse.Namespace) -> int:
    inspect_path(args.path, layout=args.layout, alpha=args.alpha, use_rslora=args.use_rslora or None,
                 n_head=args.n_head, n_head_kv=args.n_head_kv)
    return 0


def convert(src: str, dst: str, *, to: str, layout: str | None = None, alpha: float | None = None,
            use_rslora: bool | None = None, module: str = "linear", overwrite: bool = False,
            force: bool | None = None, n_head: int | None = None, n_head_kv: int | None = None,
            arch: str = "llama") -> str:
    """Read SRC (any format) and write DST in format ``to``; return a one-line summary.

    ΔW is kept bit for bit (A, B and the scale are copied); a format that cannot hold the
    adapter (DoRA in kohya, several ranks in mlx-lm, ...) is refused with the reason. A PEFT
    folder written from a PEFT folder keeps the source's adapter_config.json keys that need
    not change (peft_version, task_type, auto_mapping, target_modules, ...). ``force`` is the
    old name of ``overwrite``.
    """
    overwrite = bool(overwrite or force)
    template = None
    if detect_format(src) in OTHER_FORMATS:
        adapters: Any = load_any(src, n_head=n_head, n_head_kv=n_head_kv, xp="numpy")
    elif os.path.isdir(src):
        adapters: Any = load_peft(src, xp="numpy")
        template = read_json(os.path.join(src, PEFT_CONFIG_NAME), PEFT_CONFIG_NAME)
    else:
        adapters = load_adapter(src, layout=layout, alpha=alpha, use_rslora=use_rslora, xp="numpy")
        if isinstance(adapters, LoraAdapter):
            # keep the module path the file names; --module only names bare lora_a/lora_b files
            header = read_header(src)[0]
            (name,) = group_keys({n: s for n, (_, s) in header.items()}, src)[0]
            if name:
                module = name
    n = 1 if isinstance(adapters, LoraAdapter) else len(adapters)
    if to in OTHER_FORMATS:
        save_any(dst, {module: adapters} if isinstance(adapters, LoraAdapter) else adapters, to, n_head=n_head,
                 n_head_kv=n_head_kv, arch=arch, overwrite=overwrite)
        return f"wrote {dst} (format {to}, {n} module{'s' * (n != 1)})"
    if to == "peft" and (os.path.isdir(dst) or not dst.endswith(".safetensors")):
        if isinstance(adapters, LoraAdapter):
            adapters = {module: adapters}
        save_peft(dst, adapters, overwrite=overwrite, config_template=template)
        return f"wrote PEFT directory {dst} ({n} module{'s' * (n != 1)})"
    mods = {"": adapters} if isinstance(adapters, LoraAdapter) else adapters
    extras = sorted({n for ad in mods.values() for n in ("magnitude", "lora_bias") if getattr(ad, n) is not None})
    if extras:
        what = " and ".join({"magnitude": "DoRA magnitude vectors", "lora_bias": "lora_B biases"}[e] for e in extras)
        raise ValueError(f"{src} has {what}, which a single {to} adapter file cannot hold (it holds A and B only). "
                         f"Write a PEFT folder instead: reflora convert {src} DIR --to peft; or fold the adapter "
                         f"into the base weights: reflora merge BASE {src} OUT")
    save_adapter(dst, adapters, layout=to, module=module, overwrite=overwrite)
    return f"wrote {dst} (layout {to}, {n} module{'s' * (n != 1)})"


def _convert(args: argparse.Namespace) -> int:
    print(convert(args.src, args.dst, to=args.to, layout=args.layout, alpha=args.alpha,
                  use_rslora=args.use_rslora or None, module=args.module, overwrite=args.overwrite,
                  n_head=args.n_head, n_head_kv=args.n_head_kv, arch=args.arch))
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="tensors, layout, ranks, scales and norms of an adapter file or PEFT dir")
    p.add_argument("path", metavar="FILE|DIR", help="an adapter .safetensors file (peft or seed layout) or a PEFT "
                   "adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--layout", choices=("peft", "seed"), default=None, help="force the layout (default: detect)")
    p.add_argument("--alpha", type=float, default=None, help="alpha for files without a reflora config")
    p.add_argument("--use-rslora", action="store_true", help="scale alpha/sqrt(R) for files without a config")
    _head_args(p)
    p.set_defaults(func=_inspect)

    c = sub.add_parser("convert", help="convert an adapter between formats (peft, seed, kohya, mlx, gguf), "
                                       "keeping ΔW bit for bit")
    c.add_argument("src", metavar="SRC", help="adapter file or PEFT directory")
    c.add_argument("dst", metavar="DST", help="file (.safetensors) or, with --to peft, a PEFT directory")
    c.add_argument("--to", choices=FORMATS, required=True, help="format of DST")
    c.add_argument("--layout", choices=("peft", "seed"), default=None, help="SRC's layout (default: detect)")
    c.add_argument("--alpha", type=float, default=None, help="alpha for sources without a reflora config")
    c.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling for sources without a config")
    c.add_argument("--module", default="linear", help="module path of a single adapter written as peft")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    c.add_argument("--force", action="store_true", dest="overwrite", help=argparse.SUPPRESS)  # deprecated name
    _head_args(c)
    c.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="GGUF general.architecture")
    c.set_defaults(func=_convert)


def _head_args(p) -> None:
    p.add_argument("--n-head", type=int, default=None, help="attention heads (Llama GGUF: q/k rows are permuted)")
    p.add_argument("--n-head-kv", type=int, default=None, help="key/value heads (grouped-query attention)")
