"""The ``oqat`` command line: :func:`main` and one module per verb in :mod:`oqat.cli.commands`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
