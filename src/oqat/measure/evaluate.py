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

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import is_sharded, resize_batch
from ..space import Arch
from .calibrate import DEFAULT_CALIB_BATCH, model_device, recalibrate_bn

log = logging.getLogger(__name__)


DEFAULT_EVAL_BATCH = 200


MAX_CACHED_BYTES = 2 << 30  # evaluation data kept in memory up to this size


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
    if (sync if sync is not None else is_sharded(loader)) and dist.is_available() and dist.is_initialized():
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


__all__ = ["DEFAULT_EVAL_BATCH", "deployable_subnet", "DirectAccuracy", "evaluate", "load_batches",
           "MAX_CACHED_BYTES", "measure", "prepare_subnet"]
