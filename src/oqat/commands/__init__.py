"""One module per ``oqat`` verb; each defines ``register(subparsers)``."""
