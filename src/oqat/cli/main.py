"""The ``oqat`` command. Each verb lives in ``oqat.cli.commands.<verb>`` and registers itself
(``register(subparsers)``), so adding a verb never touches this file."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from ..training.launch import report_error
from ..utils.devices import threads
from ..utils.version import __version__
from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oqat", description="Once Quantization-Aware Training of low-bit supernets.")
    parser.add_argument("--version", action="version", version=f"oqat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """An error as one line. An OSError names its file; a DataLoader worker's error arrives
    wrapped around the worker's traceback, whose last line is the error itself."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        kind, _, message = last.partition(": ")
        return message if kind.endswith(("Error", "Exception")) and message else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a verb re-runs in its own processes
    quiet = int(os.environ.get("RANK", "0")) > 0  # other ranks of a data-parallel run: warnings and errors only
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = f"oqat {args.command}"
    try:
        with threads(getattr(args, "threads", None), "--threads"):  # the verbs that take --threads
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        report_error(f"{where}: interrupted")
        return 130
    except (ValueError, OSError) as exc:  # bad input, paths, permissions, full disks: one line, status 2
        if args.debug:
            raise
        report_error(f"{where}: error: {one_line(exc)}")
        return 2
    except Exception as exc:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        report_error(f"{where}: unexpected error (a bug in oqat?): {type(exc).__name__}: {one_line(exc)}; "
                     f"rerun with --debug for the traceback")
        return 1


if __name__ == "__main__":
    sys.exit(main())
