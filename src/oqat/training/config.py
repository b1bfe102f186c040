"""What ``oqat train CONFIG`` reads: model, schedule and the whole run, as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataConfig
from ..space import normalize_bits
from ..utils.config import apply_overrides, from_dict, load_yaml


# ----------------------------------------------------------------------------- configuration
@dataclass
class ModelConfig:
    unsigned_activations: bool = False  # OQA compatibility: every activation quantized unsigned
    dropout: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None       # stop earlier (quick runs, tests)
    batch_size: int = 128              # per process
    lr: float = 0.05
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5         # not applied to step sizes, BN parameters and biases
    label_smoothing: float = 0.1
    num_random: int = 2                # random subnets per step besides largest and smallest
    distill: bool = True               # in-place distillation from the largest subnet
    arch: dict | None = None           # train this one subnet only (a single quantized network)
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 0                # steps between checkpoints (0: at epoch ends only)
    eval_images: int = 1000            # held-out images scored at each epoch end (0: off)
    calib_images: int = 500            # images for BN re-calibration before that scoring
    sync_bn: bool = False
    amp: bool = True                   # bf16 autocast, CUDA only
    channels_last: bool = True         # CUDA only
    device: str = "auto"

    def check(self, where: str) -> None:
        """Every range a run needs, named by key (numbers are already finite: utils.config)."""
        rules = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 (or null)"),
                 ("lr", self.lr > 0, "> 0"), ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, lr]"),
                 ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"), ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"), ("num_random", self.num_random >= 0, ">= 0"),
                 ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                 ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 (or null)"),
                 ("log_every", self.log_every >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 0, ">= 0"),
                 ("eval_images", self.eval_images >= 0, ">= 0 (0: off)"),
                 ("calib_images", self.calib_images >= 1 or self.eval_images == 0, ">= 1 when eval_images > 0")]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{where}.{name}: must be {rule}, got {getattr(self, name)}")


@dataclass
class TrainRunConfig:
    """What ``oqat train CONFIG`` reads: the space, the bit-width, data, model and schedule."""

    space: Any = "mbv3-tiny"           # preset name, YAML path, or an inline mapping
    bits: int | None = 4               # 2..8, or 32/null for the full-precision supernet
    data: dict = field(default_factory=lambda: {"name": "synthetic"})
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None            # checkpoint to start from (e.g. FP or an inherited one)

    def check(self, where: str) -> None:
        try:
            self.bits = normalize_bits(self.bits)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
        try:
            DataConfig.from_dict(self.data)
        except ValueError as exc:
            raise ValueError(f"{where}.data: {exc}") from None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainRunConfig:
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    where = str(path) if path else "config"
    return from_dict(TrainRunConfig, data, where)


__all__ = ["load_train_config", "ModelConfig", "TrainConfig", "TrainRunConfig"]
