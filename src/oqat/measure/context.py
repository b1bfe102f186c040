"""A supernet checkpoint loaded with the data its subnets are measured on (:class:`EvalContext`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataConfig, build_data, calibration_subset
from ..models import load_supernet
from ..space import Arch
from ..utils.devices import resolve_device
from .calibrate import DEFAULT_CALIB_BATCH, DEFAULT_CALIB_IMAGES, calibration_batches
from .evaluate import DEFAULT_EVAL_BATCH, DirectAccuracy, deployable_subnet, load_batches


# ----------------------------------------------------------------------------- checkpoint context
@dataclass
class EvalContext:
    """A loaded supernet checkpoint with the data its subnets are measured on."""

    net: nn.Module
    ckpt: Any                      # oqat.checkpoint.Checkpoint
    calib: list                    # calibration image batches (fixed subset of the held-out split)
    eval_data: Any                 # list of (images, labels) batches, or a loader
    split: str
    device: torch.device
    settings: dict = field(default_factory=dict)
    data: Any = None               # the oqat.data.Data the batches came from

    @property
    def space(self):
        return self.ckpt.space

    @property
    def bits(self) -> int:
        return self.ckpt.bits

    def accuracy_fn(self) -> DirectAccuracy:
        return DirectAccuracy(self.net, self.calib, self.eval_data, calib_batch=self.settings["calib_batch"])

    def deployable(self, arch: Arch) -> nn.Module:
        """:func:`deployable_subnet` of `arch` with this context's calibration batches."""
        return deployable_subnet(self.net, arch, self.calib, calib_batch=self.settings["calib_batch"])[0]

    def calibration(self) -> dict:
        """How this context re-calibrates BN: the record stored in every exported file's metadata."""
        return {"recalibrated": True, "split": "holdout", "images": self.settings["calib_images"],
                "batch": self.settings["calib_batch"], "seed": self.settings["calib_seed"],
                "data": self.settings["data"]["name"]}

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.data.classes) if self.data is not None else ()

    def with_split(self, split: str, eval_images: int | None = None, seed: int | None = None,
                   batch_size: int = DEFAULT_EVAL_BATCH) -> "EvalContext":
        """The same supernet and calibration batches, measured on another split (or subset)."""
        seed = self.settings["calib_seed"] if seed is None else seed
        eval_set, eval_data = _eval_data(self.data, split, eval_images, seed, batch_size, self.device)
        return dataclasses.replace(self, split=split, eval_data=eval_data,
                                   settings={**self.settings, "eval_images": len(eval_set)})

    def eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation images (at the data's native size) and labels as two tensors."""
        batches = list(self.eval_data)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def fingerprint(self) -> dict:
        """What a cached measurement depends on (checkpoint, data, calibration settings)."""
        path = Path(self.ckpt.path).resolve() if self.ckpt.path else None
        return {"ckpt": str(path), "ckpt_step": self.ckpt.step, "bits": self.ckpt.bits, "split": self.split,
                **{k: self.settings[k] for k in ("calib_images", "calib_batch", "calib_seed", "eval_images")}}


def data_config_from_checkpoint(ckpt: Any, *, data: str | None = None, data_root: str | None = None):
    """The checkpoint's DataConfig (config["data"]), with optional name/root overrides."""

    cfg = ckpt.config.get("data") if isinstance(ckpt.config, dict) else None
    if cfg is None and data is None:
        raise ValueError(f"{ckpt.path}: the checkpoint's config has no 'data' section; name the dataset with --data")
    if cfg is None:
        cfg = DataConfig(name=data, image_size=max(ckpt.space.resolutions)).to_dict()
    cfg = dict(cfg)
    if data is not None:
        cfg["name"] = data
    if data_root is not None:
        cfg["root"] = data_root
    return DataConfig.from_dict(cfg)


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset

    return calibration_subset(dataset, n, seed + 7919)  # a different subset from calibration's


def load_context(ckpt_path: str | Path, *, split: str = "holdout", calib_images: int = DEFAULT_CALIB_IMAGES,
                 calib_batch: int = DEFAULT_CALIB_BATCH, calib_seed: int = 0, eval_images: int | None = None,
                 batch_size: int = DEFAULT_EVAL_BATCH, device: str | None = "cpu", data: str | None = None,
                 data_root: str | None = None, workers: int = 0, eval_seed: int | None = None) -> EvalContext:
    """Load a supernet checkpoint and its evaluation data.

    Calibration images always come from the held-out split (a fixed seeded subset of
    `calib_images`); `split` ("holdout" or "test") is what accuracy is measured on, optionally
    limited to a fixed seeded subset of `eval_images` (seeded by `eval_seed`, default
    `calib_seed`). Both are read once into memory when they fit, so that measuring many subnets
    does not re-read the data.
    """
    if split not in ("holdout", "test"):
        raise ValueError(f"--split: {split!r} is not one of 'holdout', 'test'")
    if isinstance(calib_images, bool) or not isinstance(calib_images, int) or calib_images < 1:
        raise ValueError(f"--calib-images: expected a positive integer, got {calib_images!r}")
    if eval_images is not None and (isinstance(eval_images, bool) or not isinstance(eval_images, int)
                                    or eval_images < 1):
        raise ValueError(f"--eval-images: expected a positive integer (or none for the whole split), got {eval_images!r}")
    dev = resolve_device(device)
    net, ckpt = load_supernet(ckpt_path, map_location=dev)
    net.to(dev).eval()
    cfg = data_config_from_checkpoint(ckpt, data=data, data_root=data_root)
    if workers:
        cfg = cfg.replace(workers=workers)
    d = build_data(cfg)
    if len(d.holdout) == 0:
        raise ValueError(f"{ckpt_path}: data.holdout is 0, so there are no held-out images to calibrate on")
    if d.in_channels != ckpt.space.in_channels or d.num_classes != ckpt.space.num_classes:
        raise ValueError(f"{ckpt_path}: data {cfg.name} has {d.in_channels} channels / {d.num_classes} classes, "
                         f"the checkpoint's space {ckpt.space.in_channels} / {ckpt.space.num_classes}")
    calib = [x.to(dev) for x in calibration_batches(d.holdout, calib_images, calib_batch, calib_seed)]
    eval_set, eval_data = _eval_data(d, split, eval_images, calib_seed if eval_seed is None else eval_seed,
                                     batch_size, dev, cfg.workers)
    settings = {"calib_images": sum(x.size(0) for x in calib), "calib_batch": calib_batch,
                "calib_seed": calib_seed, "eval_images": len(eval_set), "data": cfg.to_dict()}
    return EvalContext(net=net, ckpt=ckpt, calib=calib, eval_data=eval_data, split=split, device=dev,
                       settings=settings, data=d)


def _eval_data(d: Any, split: str, images: int | None, seed: int, batch_size: int, device: torch.device,
               workers: int = 0) -> tuple[Dataset, Any]:
    """(the seeded evaluation subset of `split`, its batches in memory or a loader)."""
    if split not in ("holdout", "test"):
        raise ValueError(f"--split: {split!r} is not one of 'holdout', 'test'")
    eval_set = _subset(d.holdout if split == "holdout" else d.test, images, seed)
    loader = DataLoader(eval_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    return eval_set, load_batches(loader, device)


__all__ = ["data_config_from_checkpoint", "EvalContext", "load_context"]
