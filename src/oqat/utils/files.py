"""Files written whole or not at all, and the user's cache folder.

Every output of oqat (checkpoints, markers, exported models, tables) goes through
:func:`atomic_writer`: a temporary file beside the target, flushed and fsynced, then renamed over
it, so an interruption leaves the old file or the new one, never half of one; concurrent writers
(data-parallel ranks) agree because the rename is atomic.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def plain_permissions(path: str | Path) -> None:
    """Give `path` the permissions of a plain new file (temporary files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def temp_beside(path: str | Path) -> Path:
    """A new empty temporary file in `path`'s folder (created), named after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: str | Path, path: str | Path, *, fsync: bool = True) -> Path:
    """Rename the finished temporary file `tmp` over `path` (fsync first), with plain permissions."""
    tmp, path = Path(tmp), Path(path)
    if fsync:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    plain_permissions(tmp)
    os.replace(tmp, path)
    if fsync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", *, fsync: bool = True) -> Iterator[IO]:
    """``with atomic_writer(path) as fh: ...`` writes `path` atomically (see the module docstring)."""
    tmp = temp_beside(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
        commit(tmp, path, fsync=fsync)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    with atomic_writer(path, "w", fsync=fsync) as fh:
        fh.write(text)
    return Path(path)


MAX_TEXT_BYTES = 64 << 20  # configs, arch files, tables: far below this; a larger file is a mistake


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of `path`, or a ValueError naming it and `what` it should have been (missing, a
    folder, unreadable, not text, larger than `max_bytes`)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not a {what}")
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes is more than a {what} can be (limit {max_bytes})")
        return path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied reading the {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a {what})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_file(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, never code. Failures are a
    ValueError naming the file; a file holding other objects is refused without torch's advice to
    load it unsafely (never the right advice for a file of unknown origin)."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise ValueError(f"{path}: permission denied reading the {what}") from None
    except Exception as exc:  # pickled code, truncated zip, random bytes, ...
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = _GLOBAL.search(text)
            refs = f" (it references {found.group(1)})" if found else ""
            raise ValueError(f"{path}: the file holds pickled Python objects or code beyond tensors{refs}; "
                             f"refused, nothing in it was loaded or run") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable {what} (truncated or another format?): {first}") from None


def cache_dir() -> Path:
    """The user's oqat cache: ``$OQAT_CACHE``, else ``$XDG_CACHE_HOME/oqat``, else ``~/.cache/oqat``."""
    if os.environ.get("OQAT_CACHE"):
        return Path(os.environ["OQAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "oqat"


__all__ = ["atomic_writer", "cache_dir", "commit", "load_torch_file", "plain_permissions", "read_text", "temp_beside",
           "write_text_atomic"]
