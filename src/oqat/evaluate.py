"""Measuring subnets: top-1/top-5/loss of a model, and the full "re-calibrate then evaluate"
measurement of an architecture taken from a supernet checkpoint.

* :func:`evaluate` -- accuracy (in percent) and mean cross-entropy of a model on a loader.
* :func:`measure` -- extract a subnet from a supernet, re-calibrate its BN statistics
  (:mod:`oqat.calibrate`) and evaluate it. The supernet itself is not modified.
* :class:`DirectAccuracy` -- the search's accuracy source "direct evaluation": a callable
  ``list[Arch] -> list[float]`` (top-1 on the held-out split), recording the seconds spent.
* :func:`load_context` -- a checkpoint, its data (held-out or test split) and the calibration
  batches, ready for the commands ``oqat eval``, ``search``, ``predictor`` and ``analyze``.

Accuracies are percentages (0..100) everywhere in this module and in search outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import cost
from .calibrate import (DEFAULT_CALIB_BATCH, DEFAULT_CALIB_IMAGES, calibration_batches, model_device,
                        recalibrate_bn, resize_batch)
from .space import Arch

log = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH = 200
MAX_CACHED_BYTES = 2 << 30  # evaluation data kept in memory up to this size


# ----------------------------------------------------------------------------- evaluation
def _sharded(loader: Any) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, resolution: int | None = None, *,
             device: torch.device | str | None = None, sync: bool | None = None,
             max_images: int | None = None) -> dict:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and image count of `model`.

    `loader` yields (images, labels); images are resized to `resolution` (default
    ``model.arch.r``). The model runs in eval mode (its previous mode is restored). `sync`
    sums the counts over torch.distributed ranks; by default only for a loader with a
    DistributedSampler (each rank saw a shard), never for plain loaders (each rank saw all).
    """
    if resolution is None:
        resolution = getattr(getattr(model, "arch", None), "r", None)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            if max_images is not None:
                if n >= max_images:
                    break
                x, y = x[: max_images - n], y[: max_images - n]
            x = resize_batch(x.to(device, non_blocking=True), resolution)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            k = min(5, logits.size(1))
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().double()
            correct5 += hit.any(dim=1).sum().double()
            n += y.size(0)
    finally:
        model.train(was_training)
    totals = torch.stack([correct1, correct5, loss_sum, torch.tensor(float(n), dtype=torch.float64, device=device)])
    if (sync if sync is not None else _sharded(loader)) and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    c1, c5, loss, count = (float(v) for v in totals.tolist())
    if count == 0:
        raise ValueError("evaluation data: no images (empty dataset or loader)")
    return {"top1": 100.0 * c1 / count, "top5": 100.0 * c5 / count, "loss": loss / count, "n": int(count)}


# ----------------------------------------------------------------------------- cached data
def load_batches(loader: Iterable, device: torch.device | str = "cpu",
                 max_bytes: int = MAX_CACHED_BYTES) -> list | Iterable:
    """The loader's batches as a list on `device` when they fit in `max_bytes`, else the loader.

    Search evaluates hundreds of subnets on the same images: reading them once saves the data
    pipeline's time on every evaluation.
    """
    out, size = [], 0
    for batch in loader:
        x, y = batch[0], batch[1]
        size += x.element_size() * x.numel()
        if size > max_bytes:
            log.info("evaluation data exceeds %.1f GiB: streaming it from the loader", max_bytes / 2**30)
            return loader
        out.append((x.to(device), y.to(device)))
    return out


# ----------------------------------------------------------------------------- measuring subnets
def prepare_subnet(net: nn.Module, arch: Arch | None) -> nn.Module:
    """An extracted subnet of `net` for `arch` (or `net` itself when it is already a subnet)."""
    if hasattr(net, "set_arch"):
        return net.extract(arch)
    if arch is not None and getattr(net, "arch", None) not in (None, arch):
        raise ValueError(f"arch: this model is the fixed subnet {net.arch.to_json()}, not {arch.to_json()}")
    return net


def deployable_subnet(net: nn.Module, arch: Arch | None, calib: Any, *, calib_images: int | None = None,
                      calib_batch: int = DEFAULT_CALIB_BATCH, seed: int = 0) -> tuple[nn.Module, int]:
    """The subnet `arch` of the supernet `net` as it is measured and deployed: extracted, with its
    BN statistics re-estimated on `calib` (the supernet's running statistics belong to no subnet).

    Every measurement (search, eval, report) and every export goes through this function, so an
    exported file is the model whose accuracy was reported. Returns (subnet in eval mode,
    calibration images used); the supernet itself is not modified.
    """
    sub = prepare_subnet(net, arch)
    resolution = arch.r if arch is not None else None
    used = recalibrate_bn(sub, calib, resolution, num_images=calib_images, batch_size=calib_batch, seed=seed)
    return sub.eval(), used


def measure(net: nn.Module, arch: Arch | None, calib: Any, eval_data: Iterable, *,
            calib_images: int | None = None, calib_batch: int = DEFAULT_CALIB_BATCH, seed: int = 0,
            max_eval_images: int | None = None) -> dict:
    """:func:`deployable_subnet` of `arch`, then its accuracy on `eval_data`.

    Returns evaluate()'s dict plus ``seconds`` (calibration + evaluation) and ``calib_images``.
    The supernet's own weights and statistics are not touched.
    """
    start = time.perf_counter()
    sub, used = deployable_subnet(net, arch, calib, calib_images=calib_images, calib_batch=calib_batch, seed=seed)
    out = evaluate(sub, eval_data, arch.r if arch is not None else None, max_images=max_eval_images)
    out["calib_images"] = used
    out["seconds"] = time.perf_counter() - start
    return out


class DirectAccuracy:
    """Accuracy source "direct evaluation": top-1 (percent) of each arch after re-calibration.

    Callable as ``list[Arch] -> list[float]`` (the search's AccuracyFn protocol). `results`
    keeps the full measurement of every call, `seconds` the time spent measuring.
    """

    def __init__(self, net: nn.Module, calib: Any, eval_data: Iterable, *, calib_images: int | None = None,
                 calib_batch: int = DEFAULT_CALIB_BATCH, seed: int = 0, metric: str = "top1"):
        self.net, self.calib, self.eval_data = net, calib, eval_data
        self.calib_images, self.calib_batch, self.seed, self.metric = calib_images, calib_batch, seed, metric
        self.results: list[tuple[Arch, dict]] = []
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, archs: list[Arch]) -> list[float]:
        out = []
        for arch in archs:
            r = measure(self.net, arch, self.calib, self.eval_data, calib_images=self.calib_images,
                        calib_batch=self.calib_batch, seed=self.seed)
            self.results.append((arch, r))
            self.seconds += r["seconds"]
            self.calls += 1
            out.append(float(r[self.metric]))
        return out

    @property
    def seconds_per_eval(self) -> float:
        return self.seconds / self.calls if self.calls else float("nan")


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


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but CUDA is not available")
    return device


def data_config_from_checkpoint(ckpt: Any, *, data: str | None = None, data_root: str | None = None):
    """The checkpoint's DataConfig (config["data"]), with optional name/root overrides."""
    from .data import DataConfig

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
    from .data import calibration_subset

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
    from .checkpoint import load_supernet
    from .data import build_data

    if split not in ("holdout", "test"):
        raise ValueError(f"--split: {split!r} is not one of 'holdout', 'test'")
    if isinstance(calib_images, bool) or not isinstance(calib_images, int) or calib_images < 1:
        raise ValueError(f"--calib-images: expected a positive integer, got {calib_images!r}")
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


def cost_summary(space, arch: Arch) -> dict:
    return cost.summary(space, arch)


__all__ = ["DirectAccuracy", "EvalContext", "cost_summary", "data_config_from_checkpoint", "deployable_subnet", "evaluate",
           "load_batches", "load_context", "measure", "prepare_subnet", "resolve_device"]
