"""A finished or partial run as read back from its folder: what the report is built from.

``RUN/run.json`` (written by every invocation) names the stages in order with their kinds and
titles, the resolved space and data, the configuration and the machine; each completed stage's
``stage.json`` holds its typed results. So ``oqat run --report-only --out RUN`` rebuilds the
report from the folder alone, on any machine, without the config file or the data.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig
from ..space import SearchSpace
from ..utils.config import to_dict
from .markers import read_marker
from .results import outcome_from_dict

RUN_FILE = "run.json"
RUN_FORMAT = "oqat-run"


@dataclass
class StageInfo:
    name: str
    kind: str
    title: str
    inputs: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    out: Path
    name: str
    description: str
    config: dict                       # the resolved RunConfig as a dict
    space: SearchSpace
    data: DataConfig
    device: str
    torch_version: str
    machine: str
    stages: list[StageInfo]
    markers: dict[str, dict]           # completed stages only
    outcomes: dict[str, Any]           # their typed results

    @property
    def train_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.kind in ("fp", "train")]

    def of_kind(self, kind: str) -> dict[str, Any]:
        return {s.name: self.outcomes[s.name] for s in self.stages if s.kind == kind and s.name in self.outcomes}

    @classmethod
    def load(cls, out: str | Path) -> "RunSummary":
        out = Path(out)
        path = out / RUN_FILE
        try:
            run = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: not found; is {out} an oqat run folder (written by oqat run)?") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc})") from None
        if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: not an oqat run description")
        stages = [StageInfo(**s) for s in run["stages"]]
        markers, outcomes = {}, {}
        for s in stages:
            m = read_marker(out / s.name)
            if m is not None and m.get("status") == "complete":
                markers[s.name] = m
                outcomes[s.name] = outcome_from_dict(s.kind, m["results"], str(out / s.name / "stage.json"))
        return cls(out=out, name=run["name"], description=run.get("description", ""), config=run["config"],
                   space=SearchSpace.from_dict(run["space"]), data=DataConfig.from_dict(run["data"]),
                   device=run.get("device", "cpu"), torch_version=run.get("torch", ""), machine=run.get("machine", ""),
                   stages=stages, markers=markers, outcomes=outcomes)


def describe_run(pipe, device: torch.device) -> dict:
    """The content of ``RUN/run.json`` for a planned Pipeline."""
    return {"format": RUN_FORMAT, "name": pipe.cfg.name, "description": pipe.cfg.description,
            "config": to_dict(pipe.cfg), "space": pipe.space.to_dict(), "data": pipe.data.to_dict(),
            "device": str(device), "torch": str(torch.__version__), "machine": platform.machine(),
            "stages": [s.to_dict() for s in pipe.stages]}


__all__ = ["RUN_FILE", "RunSummary", "StageInfo", "describe_run"]
