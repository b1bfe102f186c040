"""Stage markers: ``RUN/<stage>/stage.json`` says whether a stage ran, with which settings
(hash), and what it produced (its typed results, :mod:`oqat.pipeline.results`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.files import write_text_atomic

MARKER = "stage.json"
MARKER_FORMAT = "oqat-stage"


class StageMismatch(ValueError):
    """Completed or started stages whose configuration has changed since."""


class DamagedMarker(ValueError):
    """A stage.json that exists but cannot be read (cut short, edited, another file)."""


def load_marker(stage_dir: Path) -> dict | None:
    """The marker of the stage in `stage_dir`, None when there is none, DamagedMarker when there
    is one that cannot be read: a damaged marker must not pass for an absent one (that would
    discard the stage's outputs)."""
    path = Path(stage_dir) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedMarker(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        raise DamagedMarker(f"{path}: not an oqat stage marker")
    return data


def read_marker(stage_dir: Path) -> dict | None:
    """The marker of the stage in `stage_dir`, or None when it is absent or damaged."""
    try:
        return load_marker(stage_dir)
    except DamagedMarker:
        return None


def write_marker(stage_dir: Path, data: dict) -> None:
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(stage_dir) / MARKER, json.dumps({"format": MARKER_FORMAT, **data}, indent=2, default=str)
                      + "\n", fsync=False)


def files_in(stage_dir: Path) -> list[str]:
    """Every file below `stage_dir` (relative, sorted), the marker itself excluded."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def discard_outputs(stage_dir: Path, marker: dict | None, keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove what the stage wrote, as its marker records it, and nothing else.

    A completed stage lists its files (``files``); a started one, the files that were there
    before it began (``preexisting``), so everything else below the folder is its own. Without a
    marker nothing is known, so nothing is removed. Returns the files left in place that oqat
    did not write (for the caller to report); `keep` names files to keep even so (a search's
    measurement cache).
    """
    stage_dir = Path(stage_dir)
    present = files_in(stage_dir)
    if marker is None:
        return present
    if marker.get("status") == "complete" and "files" in marker:
        ours = set(marker["files"])
    else:
        ours = set(present) - set(marker.get("preexisting", []))
    for rel in present:
        if rel in ours and Path(rel).name not in keep:
            (stage_dir / rel).unlink()
    (stage_dir / MARKER).unlink(missing_ok=True)
    for folder in sorted((p for p in stage_dir.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return [rel for rel in present if rel not in ours]


__all__ = ["DamagedMarker", "MARKER", "StageMismatch", "discard_outputs", "files_in", "load_marker", "read_marker",
           "write_marker"]
