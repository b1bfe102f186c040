"""What every stage of a run sees: the run folder, the config, the space and data, the device
and the ranks, and the typed outcomes of the stages completed so far."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import DataConfig, build_data
from ..space import SearchSpace
from ..training.distributed import DistInfo
from .config import RunConfig


@dataclass
class StageContext:
    out: Path
    cfg: RunConfig
    space: SearchSpace
    data: DataConfig
    device: torch.device
    info: DistInfo
    echo: Callable[[str], None] = print
    progress: bool = True
    outcomes: dict[str, Any] = field(default_factory=dict)   # stage name -> typed results
    markers: dict[str, dict] = field(default_factory=dict)   # stage name -> its completed marker

    def checkpoint(self, stage_name: str) -> Path:
        """The final checkpoint of a completed training stage."""
        outcome = self.outcomes.get(stage_name)
        if outcome is None:
            raise ValueError(f"stage {stage_name} has not completed; cannot continue")
        return self.out / outcome.checkpoint

    def barrier(self) -> None:
        if self.info.enabled:
            dist.barrier()

    def say(self, text: str) -> None:
        """A line for the user, from rank 0 only."""
        if self.info.is_main:
            self.echo(text)

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder when it lies inside it (markers stay valid if the folder moves)."""
        path = Path(path)
        return str(path.relative_to(self.out)) if path.is_relative_to(self.out) else str(path)

    @cached_property
    def train_images(self) -> int:
        return len(build_data(self.data).train)


__all__ = ["StageContext"]
