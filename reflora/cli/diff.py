"""``reflora diff A B``: do two adapters (any formats) make the same ΔW, and if not, why?

    reflora diff A B [--rtol X] [--n-head H] [--n-head-kv K] [--alpha A] [--use-rslora]

Prints one row per module (status, max |ΔW_A - ΔW_B|, relative error, best constant
factor, verdict; see ``reflora.compare_adapters``). Exit status 0 when every module
agrees (bit-identical ΔW by default, within --rtol when given), 1 when any differs or
is missing, 2 on an error (a malformed file, a missing option).
"""

from __future__ import annotations

import argparse

from ..arithmetic.compare import compare_adapters
from ..io.formats import load_any

__all__ = ["register"]


def _diff(args: argparse.Namespace) -> int:
    opts = {"n_head": args.n_head, "n_head_kv": args.n_head_kv, "alpha": args.alpha,
            "use_rslora": args.use_rslora or None, "xp": "numpy"}
    report = compare_adapters(load_any(args.a, **opts), load_any(args.b, **opts), rtol=args.rtol)
    print(report.format())
    return 0 if report.ok else 1


def register(sub) -> None:
    p = sub.add_parser("diff", help="compare two adapters (any format) by their ΔW and name the likely cause "
                                    "of a difference")
    p.add_argument("a", metavar="A", help="adapter file or folder (PEFT, seed, kohya, mlx-lm, GGUF)")
    p.add_argument("b", metavar="B", help="the other adapter")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="accept max|ΔW_A - ΔW_B| <= rtol max|ΔW_B| (default 0: bit-identical ΔW)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads, for Llama GGUF files without a "
                                                           "reflora record (q/k rows are permuted)")
    p.add_argument("--n-head-kv", type=int, default=None, help="key/value heads (grouped-query attention)")
    p.add_argument("--alpha", type=float, default=None, help="alpha for peft/seed files without a reflora config")
    p.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling for files without a config")
    p.set_defaults(func=_diff)
