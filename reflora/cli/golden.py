"""``reflora golden write|check``: golden vectors for implementations that cannot import reflora.

    reflora golden write DIR [--seed S]
    reflora golden check DIR --results RESULTS_DIR

The file format is documented in ``reflora.testing.golden``. ``check`` prints a
per-case table and exits 1 when any case fails (2 for a malformed golden folder).
"""

from __future__ import annotations

import argparse


def _write(args: argparse.Namespace) -> int:
    from reflora.testing.golden import MANIFEST, write_golden  # noqa: PLC0415

    names = write_golden(args.directory, seed=args.seed)
    print(f"wrote {len(names)} cases and {MANIFEST} to {args.directory}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from reflora.testing.golden import check_golden, format_table  # noqa: PLC0415

    rows, ok = check_golden(args.directory, args.results)
    print(format_table(rows))
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("golden", help="write golden vectors, or grade another implementation's results")
    gsub = p.add_subparsers(dest="golden_command", metavar="ACTION")
    gsub.required = True
    w = gsub.add_parser("write", help="write the golden cases (safetensors) and manifest.json into DIR")
    w.add_argument("directory", metavar="DIR")
    w.add_argument("--seed", type=int, default=0, help="base seed of the cases' arrays (default 0)")
    w.set_defaults(func=_write)
    c = gsub.add_parser("check", help="grade RESULTS_DIR/<case>.safetensors against DIR; exit 1 on any failure")
    c.add_argument("directory", metavar="DIR")
    c.add_argument("--results", required=True, metavar="RESULTS_DIR", help="folder of <case name>.safetensors results")
    c.set_defaults(func=_check)
