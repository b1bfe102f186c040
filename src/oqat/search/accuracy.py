"""Accuracy sources of the search: the protocol, a persistent measurement cache, rank-parallel measuring."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from ..space import Arch, SearchSpace

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- accuracy sources
class AccuracyFn(Protocol):
    """Anything that maps architectures to accuracies (higher is better), in order."""

    def __call__(self, archs: list[Arch]) -> list[float]: ...


class CachedAccuracy:
    """Memoises an AccuracyFn by canonical arch; optionally persists results as JSONL.

    Each line of the file is ``{"key", "arch", "accuracy", "context"}``; lines whose context
    differs from this run's (another checkpoint, split or calibration setting) are ignored, so
    one file can collect the measurements of several checkpoints. `calls` counts requested
    archs, `misses` the ones passed to the wrapped function. Only rank 0 writes the file.
    """

    def __init__(self, fn: AccuracyFn, space: SearchSpace, path: str | Path | None = None,
                 context: dict | None = None):
        self.fn, self.space = fn, space
        self.path = Path(path) if path else None
        self.context = context or {}
        self.values: dict[str, float] = {}
        self.archs: dict[str, Arch] = {}
        self.calls = 0
        self.misses = 0
        self.loaded = 0
        if self.path and self.path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        ignored = 0
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                arch = Arch.from_dict(row["arch"])
                acc = float(row["accuracy"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                if i == len(lines):  # a run interrupted while writing its last line
                    log.warning("%s:%d: ignoring a truncated last line", self.path, i)
                    continue
                raise ValueError(f"{self.path}:{i}: not a valid cache line ({exc})") from None
            if row.get("context", {}) != self.context:
                ignored += 1
                continue
            key = self.space.key(arch)
            self.values[key], self.archs[key] = acc, arch
        self.loaded = len(self.values)
        log.info("cache %s: %d measurements reused, %d from other runs ignored", self.path, self.loaded, ignored)

    def __contains__(self, arch: Arch) -> bool:
        return self.space.key(arch) in self.values

    def __call__(self, archs: list[Arch]) -> list[float]:
        keys = [self.space.key(a) for a in archs]
        self.calls += len(archs)
        todo: dict[str, Arch] = {}
        for k, a in zip(keys, archs):
            if k not in self.values and k not in todo:
                todo[k] = a
        if todo:
            new = list(self.fn(list(todo.values())))
            if len(new) != len(todo):
                raise RuntimeError(f"accuracy function returned {len(new)} values for {len(todo)} archs")
            self.misses += len(todo)
            rows = []
            for (k, a), acc in zip(todo.items(), new):
                self.values[k], self.archs[k] = float(acc), a
                rows.append(json.dumps({"key": k, "arch": a.to_dict(), "accuracy": float(acc), "context": self.context}))
            if self.path and is_main_process():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as fh:
                    fh.write("\n".join(rows) + "\n")
        return [self.values[k] for k in keys]

    def items(self) -> list[tuple[Arch, float]]:
        return [(self.archs[k], self.values[k]) for k in self.values]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    d = _dist()
    return d is None or d.get_rank() == 0


class DistributedAccuracy:
    """Spread a batch of archs over torch.distributed ranks (rank i measures archs i, i+W, ...);
    the results are all-gathered so every rank returns the full, identical list."""

    def __init__(self, fn: AccuracyFn):
        self.fn = fn

    def __call__(self, archs: list[Arch]) -> list[float]:
        d = _dist()
        if d is None or d.get_world_size() == 1:
            return list(self.fn(archs))
        rank, world = d.get_rank(), d.get_world_size()
        mine = list(self.fn(archs[rank::world])) if archs[rank::world] else []
        gathered: list[Any] = [None] * world
        d.all_gather_object(gathered, mine)
        out = [0.0] * len(archs)
        for r, values in enumerate(gathered):
            for j, v in enumerate(values):
                out[r + j * world] = float(v)
        return out


__all__ = ["AccuracyFn", "CachedAccuracy", "DistributedAccuracy", "is_main_process"]
