"""What each stage produces, as typed records: written into its marker as ``results`` and read
back by later stages and by the report (:func:`outcome_from_dict`). Paths are relative to the
run folder, so a run folder can move."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.config import from_dict, to_dict


class _Record:
    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class TrainOutcome(_Record):
    checkpoint: str                    # final.pt, relative to the run folder
    bits: int
    steps: int
    batch_size: int
    world_size: int
    images_seen: int
    train_images: int
    epochs_done: float | None
    final_metrics: dict = field(default_factory=dict)
    resumed: bool = False
    init: str | None = None


@dataclass
class SubnetScore(_Record):
    """A subnet as measured: BN re-calibrated, top-1 on held-out and test images, its costs."""

    arch: dict
    holdout_top1: float
    test_top1: float
    costs: dict


@dataclass
class ChosenSubnet(SubnetScore):
    budget: dict = field(default_factory=dict)     # Budget.to_dict()
    evaluations: int = 0
    file: str = ""                                 # best_<budget>.json


@dataclass
class SearchOutcome(_Record):
    bits: int
    checkpoint: str
    supernet: dict[str, SubnetScore]               # "largest", "smallest"
    chosen: list[ChosenSubnet]
    evaluated: int
    measurements: int
    cache_reused: int
    seconds_per_evaluation: float | None
    calib_images: int
    holdout_images: int | None
    test_images: int
    evaluated_csv: str
    finalists: int = 0                             # the best N per budget re-measured (0: not re-ranked)
    final_images: int | None = None                # on this many held-out images


@dataclass
class BaselineOutcome(_Record):
    name: str
    arch: dict
    train: TrainOutcome
    epochs: float | None
    costs: dict
    holdout_top1: float
    test_top1: float


@dataclass
class ExportedFile(_Record):
    path: str
    size_bytes: int
    verified: bool | None
    verification: str | None
    top1_agreement: float | None
    holdout_top1_file: float | None = None         # the task-level check: the file as deployed ...
    holdout_top1_torch: float | None = None        # ... and the re-calibrated PyTorch subnet
    test_top1: float | None = None                 # the file's own top-1 on the test images
    test_images: int | None = None
    notes: list[str] = field(default_factory=list)
    engine: str | None = None                      # what ran the file for test_top1 (as `oqat predict` would)


@dataclass
class ExportRow(_Record):
    bits: int
    budget: str
    arch: dict
    search_test_top1: float | None = None
    files: dict[str, ExportedFile] = field(default_factory=dict)
    latency_ms_torch: float | None = None
    latency_ms_onnx: float | None = None
    deployment: dict | None = None                 # oqat.export.deployment.DeploymentRow.to_dict()
    first_budget: str = ""
    same_as: str | None = None                     # an earlier row holds the same network


@dataclass
class ExportOutcome(_Record):
    exports: list[ExportRow]
    calib_images: int | None = None
    calib_batch: int | None = None
    calib_seed: int | None = None


OUTCOMES = {"fp": TrainOutcome, "train": TrainOutcome, "search": SearchOutcome, "baseline": BaselineOutcome,
            "export": ExportOutcome}


def outcome_from_dict(kind: str, data: dict, where: str = "results"):
    """The typed results of a stage of `kind` from its marker's ``results``."""
    return from_dict(OUTCOMES[kind], data, where)


__all__ = ["BaselineOutcome", "ChosenSubnet", "ExportOutcome", "ExportRow", "ExportedFile", "OUTCOMES", "SearchOutcome",
           "SubnetScore", "TrainOutcome", "outcome_from_dict"]
