"""One module per ``oqat`` verb; each defines ``register(subparsers)`` and is found by ``oqat.cli.main``."""
