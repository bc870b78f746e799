"""The ``reflora`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds an argparse parser whose default ``func(args) -> int`` runs it.
Add a module to ``SUBCOMMAND_MODULES`` to add a command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import re
import sys

SUBCOMMAND_MODULES = (
    "reflora.cli.demo",
    "reflora.cli.adapter",
    "reflora.cli.merge",
    "reflora.cli.golden",
    "reflora.cli.diff",
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


def _version() -> str:
    import reflora  # noqa: PLC0415

    return f"reflora {reflora.__version__}"


def _plain(text: str | None) -> str | None:
    """Docstring text as a terminal shows it: ``code`` -> code (no RST markup in --help)."""
    return None if text is None else re.sub(r"``([^`]*)``", r"\1", text)


#: Python keyword arguments named in library messages -> the CLI flags that set them.
_FLAGS = ((re.compile(r"\boverwrite=True\b"), "--overwrite"),
          (re.compile(r"\blayout='(peft|seed)'"), r"--layout \1"),
          (re.compile(r"\buse_rslora=True\b"), "--use-rslora"),
          (re.compile(r"\b(alpha|layout|module)=(?=$|[\s,.;:)])"), r"--\1"),
          (re.compile(r"\bfor a PEFT directory use reflora\.load_peft\b"), "for a PEFT folder pass the folder"),
          (re.compile(r"\(or overwrite\)"), "(or pass --overwrite)"))


def cli_message(text: str) -> str:
    """A library message as the command line says it: flags, not keyword arguments."""
    for pattern, flag in _FLAGS:
        text = pattern.sub(flag, text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflora", description="LoRA golden reference (NumPy/CuPy).")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (e.g. the backend choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("info", help="backend, device and library versions")
    p.add_argument("--backend", default=None, help="auto|numpy|cupy (default: $REFLORA_BACKEND or auto)")
    p.set_defaults(func=_info)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    stack = [sub]
    while stack:  # every (sub)command's description without RST markup
        for p in stack.pop().choices.values():
            p.description = _plain(p.description)
            stack.extend(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        try:
            return int(args.func(args) or 0)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        # the reader went away (``reflora inspect DIR | head -2``): stop quietly, as a C tool killed by SIGPIPE
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        print(f"reflora {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, RecursionError, OverflowError, MemoryError) as exc:
        print(f"reflora {args.command}: error: {cli_message(str(exc) or type(exc).__name__)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
