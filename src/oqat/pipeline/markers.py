"""Stage markers: ``RUN/<stage>/stage.json`` says whether a stage ran, with which settings
(hash), and what it produced (its typed results, :mod:`oqat.pipeline.results`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..utils.files import write_text_atomic

MARKER = "stage.json"
MARKER_FORMAT = "oqat-stage"


class StageMismatch(ValueError):
    """Completed or started stages whose configuration has changed since."""


def read_marker(stage_dir: Path) -> dict | None:
    """The marker of the stage in `stage_dir`, or None (absent, or cut short by a crash)."""
    path = Path(stage_dir) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def write_marker(stage_dir: Path, data: dict) -> None:
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(stage_dir) / MARKER, json.dumps({"format": MARKER_FORMAT, **data}, indent=2, default=str)
                      + "\n", fsync=False)


def discard_outputs(stage_dir: Path, keep: set[str] = frozenset()) -> None:
    """Remove what a stage wrote into its folder, except the names in `keep`."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return
    for p in stage_dir.iterdir():
        if p.name in keep:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


__all__ = ["MARKER", "StageMismatch", "discard_outputs", "read_marker", "write_marker"]
