"""The ``reflora`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds an argparse parser whose default ``func(args) -> int`` runs it.
Add a module to ``SUBCOMMAND_MODULES`` to add a command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys

SUBCOMMAND_MODULES = (
    "reflora.cli.demo",
    "reflora.cli.adapter",
    "reflora.cli.merge",
    "reflora.cli.golden",
)


def _info(args: argparse.Namespace) -> int:
    """Print the backend, device and library versions."""
    import numpy  # noqa: PLC0415
    import safetensors  # noqa: PLC0415

    import reflora  # noqa: PLC0415
    from reflora.backend import device_name, get_namespace  # noqa: PLC0415

    xp = get_namespace(args.backend)
    rows = [
        ("reflora", reflora.__version__),
        ("python", platform.python_version()),
        ("backend", xp.__name__.rsplit(".", 1)[-1]),
        ("device", device_name(xp)),
        ("numpy", numpy.__version__),
        ("safetensors", safetensors.__version__),
    ]
    try:
        import cupy  # noqa: PLC0415

        rows.append(("cupy", cupy.__version__))
    except Exception as exc:  # not installed, or CUDA libraries missing
        rows.append(("cupy", f"not usable ({type(exc).__name__})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflora", description="LoRA golden reference (NumPy/CuPy).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (e.g. the backend choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("info", help="backend, device and library versions")
    p.add_argument("--backend", default=None, help="auto|numpy|cupy (default: $REFLORA_BACKEND or auto)")
    p.set_defaults(func=_info)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"reflora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
