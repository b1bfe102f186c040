"""The ``oqat`` command. Each verb lives in ``oqat.cli.commands.<verb>`` and registers itself
(``register(subparsers)``), so adding a verb never touches this file."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..utils.devices import threads
from ..utils.version import __version__
from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oqat", description="Once Quantization-Aware Training of low-bit supernets.")
    parser.add_argument("--version", action="version", version=f"oqat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with threads(getattr(args, "threads", None), "--threads"):  # the verbs that take --threads
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"oqat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"oqat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
