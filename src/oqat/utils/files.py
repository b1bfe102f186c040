"""Files written whole or not at all, and the user's cache folder.

Every output of oqat (checkpoints, markers, exported models, tables) goes through
:func:`atomic_writer`: a temporary file beside the target, flushed and fsynced, then renamed over
it, so an interruption leaves the old file or the new one, never half of one; concurrent writers
(data-parallel ranks) agree because the rename is atomic.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
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


def append_line(path: str | Path, line: str) -> None:
    """Append `line` to a log file, refusing to follow a symbolic link there."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line + "\n")


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    with atomic_writer(path, "w", fsync=fsync) as fh:
        fh.write(text)
    return Path(path)


MAX_TEXT_BYTES = 64 << 20  # configs, arch files, tables: far below this; a larger file is a mistake


def _a(what: str) -> str:
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of `path`, or a ValueError naming it and `what` it should have been (missing, a
    folder, unreadable, not text, larger than `max_bytes`)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not {_a(what)}")
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes is more than {_a(what)} can be (limit {max_bytes})")
        return path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied reading the {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected {_a(what)})") from None
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
        raise ValueError(f"{path}: is a folder, not {_a(what)}")
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():  # a plain pickle of another protocol: the error below says it all
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise ValueError(f"{path}: permission denied reading the {what}") from None
    except Exception as exc:  # pickled code, truncated zip, random bytes, ...
        text = str(exc)
        found = _GLOBAL.search(text)
        if found:  # torch's safe unpickler met an object (a class, a function) it will not build
            raise ValueError(f"{path}: the file holds pickled Python objects or code beyond tensors (it references "
                             f"{found.group(1)}); refused, nothing in it was loaded or run") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable {what} (truncated or another format?): {first}") from None


def ensure_output_dir(path: str | Path, what: str = "--out") -> Path:
    """`path` as a folder this process can write into (created), or a one-line ValueError naming
    it: checked before any work, so no long computation ends on an unwritable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is a file, not a folder ({what})")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".oqat-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ValueError(f"{path}: a parent of it is a file, not a folder ({what})") from None
    except NotADirectoryError:
        raise ValueError(f"{path}: a parent of it is a file, not a folder ({what})") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied: cannot write into it ({what})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot write into it ({what}): {exc.strerror or exc}") from None
    return path


def ensure_output_file(path: str | Path, what: str = "-o") -> Path:
    """`path` as a file this process can create or replace: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name ({what})")
    ensure_output_dir(path.parent if str(path.parent) else Path("."), what)
    return path


def escaping_links(root: str | Path) -> list[Path]:
    """Symbolic links inside `root` that point outside it (oqat never writes through them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    top = root.resolve()
    out = []
    for folder, dirs, files in os.walk(root):  # does not descend into linked folders
        for name in dirs + files:
            p = Path(folder) / name
            if p.is_symlink() and not p.resolve().is_relative_to(top):
                out.append(p)
    return out


class FolderInUse(ValueError):
    """Another oqat process holds the folder's lock."""


@contextmanager
def folder_lock(folder: str | Path, what: str = "run folder") -> Iterator[None]:
    """Hold ``<folder>/.oqat.lock`` for the block: a second oqat process on the same folder is
    refused (naming the holder's pid) instead of both deleting each other's work."""
    folder = Path(folder)
    path = folder / ".oqat.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, as before
            pass
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise FolderInUse(f"{folder}: the {what} is in use by another oqat process (pid {holder}); wait for it "
                              f"to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """The user's oqat cache: ``$OQAT_CACHE``, else ``$XDG_CACHE_HOME/oqat``, else ``~/.cache/oqat``."""
    if os.environ.get("OQAT_CACHE"):
        return Path(os.environ["OQAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "oqat"


__all__ = ["FolderInUse", "append_line", "atomic_writer", "cache_dir", "commit", "ensure_output_dir", "ensure_output_file", "escaping_links", "folder_lock",
           "load_torch_file", "plain_permissions", "read_text", "temp_beside",
           "write_text_atomic"]
