"""BN re-calibration: re-estimate the batch-norm statistics of one subnet before evaluating it.

A subnet of a weight-sharing supernet inherits running statistics that were accumulated over
many different subnets, so they do not match its own activations. Before a subnet is measured
its BN statistics are recomputed on a fixed, seeded subset of the held-out split (default 2000
images in batches of 100) at the subnet's input resolution, with every weight, step size and
kernel transform left untouched (method.md section 5).

How it works (:func:`recalibrate_bn`): the running statistics of every BN layer are reset,
``momentum`` is set to ``None`` so PyTorch keeps a cumulative average of the per-batch
statistics, the BN layers (and only them) are put in train mode and the calibration batches
run forward under ``torch.no_grad``; then momentum and training flags are restored. On a
supernet the sliced BN layers update the leading channels that the active subnet uses; layers
and channels the subnet does not use get their previous statistics back, so calibrating one
subnet never disturbs the statistics stored for the rest of the supernet. The same function
works on an extracted :class:`~oqat.models.SubNet`.

Quantizers are never initialised here: an LSQ quantizer that has not seen data yet has no
meaningful step, and silently initialising it from calibration data would change the model.
Such a model raises :class:`CalibrationError`.

Determinism: the subset, its order and the batches are fixed by the seed, the forward runs
with no randomness (dropout stays in eval mode), so the same model and data give bitwise
identical statistics. Under ``torch.distributed`` the default is that every rank calibrates on
the same fixed subset (the dataset path does not use a DistributedSampler), so every rank ends
with identical statistics by construction; a loader that does shard the data across ranks
(``DistributedSampler``) has its per-rank statistics merged with an all-reduce weighted by
sample count (``sync``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import calibration_subset, is_sharded, resize_batch
from ..quant import LSQQuantizer

DEFAULT_CALIB_IMAGES = 2000
DEFAULT_CALIB_BATCH = 100


class CalibrationError(ValueError):
    """The model cannot be re-calibrated as asked (e.g. an uninitialised quantizer)."""


# ----------------------------------------------------------------------------- data helpers
def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise CalibrationError(f"calibration data: expected tensors or (images, labels) batches, got {type(batch).__name__}")


def calibration_batches(dataset: Dataset, num_images: int = DEFAULT_CALIB_IMAGES,
                        batch_size: int = DEFAULT_CALIB_BATCH, seed: int = 0) -> list[torch.Tensor]:
    """Load the fixed calibration subset once, as a list of image batches (labels dropped).

    The loader is a plain sequential one (never a DistributedSampler), so every rank of a
    distributed job gets exactly the same batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibration batch size: expected a positive integer, got {batch_size!r}")
    subset = calibration_subset(dataset, num_images, seed)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [_images(b) for b in loader]


def _is_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__")


def _iter_images(data: Any, num_images: int | None, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    if _is_dataset(data):
        yield from calibration_batches(data, num_images or DEFAULT_CALIB_IMAGES, batch_size, seed)
        return
    if not isinstance(data, Iterable):
        raise CalibrationError(f"calibration data: expected a Dataset, a DataLoader or a list of batches, "
                               f"got {type(data).__name__}")
    seen = 0
    for batch in data:
        x = _images(batch)
        if num_images is not None:
            if seen >= num_images:
                break
            x = x[: num_images - seen]
        seen += x.size(0)
        yield x


# ----------------------------------------------------------------------------- model helpers
def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def uninitialized_quantizers(model: nn.Module) -> list[str]:
    """Names of enabled LSQ quantizers that have never seen data (their step is meaningless)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, LSQQuantizer) and m.enabled and not m.is_initialized]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _default_resolution(model: nn.Module) -> int | None:
    arch = getattr(model, "arch", None)
    return getattr(arch, "r", None)


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, resolution: int | None = None, *,
                   num_images: int | None = None, batch_size: int = DEFAULT_CALIB_BATCH, seed: int = 0,
                   sync: bool | None = None, device: torch.device | str | None = None) -> int:
    """Re-estimate every BN layer's running statistics of `model` on calibration data.

    `model` is a supernet (its active arch is calibrated) or an extracted subnet. `data` is a
    Dataset (the fixed seeded subset of `num_images`, default 2000, is drawn from it in batches
    of `batch_size`), a DataLoader, or a list of batches (tensors or (images, labels)); with
    the latter two `num_images` caps the number of images used. Batches are resized to
    `resolution` (default: ``model.arch.r``) and moved to the model's device.

    `sync`: merge the statistics over torch.distributed ranks. ``None`` (default) does it only
    for a loader with a DistributedSampler, whose ranks see different data; with identical
    data on every rank (the Dataset path) the statistics are already identical everywhere.

    Weights, step sizes and every other parameter are left exactly as they were; BN layers and
    channels the subnet does not use keep their previous statistics. Returns the number of
    calibration images used. Raises CalibrationError for an uninitialised quantizer or empty data.
    """
    resolution = resolution if resolution is not None else _default_resolution(model)
    device = torch.device(device) if device is not None else model_device(model)
    bns = bn_layers(model)
    snapshot = {name: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(),
                       bn.momentum) for name, bn in bns}
    training = {m: m.training for m in model.modules()}
    used: dict[str, int] = {}  # BN name -> channels the subnet uses

    def _check_quantizer(module: LSQQuantizer, inputs) -> None:
        if module.enabled and not module.is_initialized:
            raise CalibrationError(
                f"quantizer {qnames[module]!r} has never been initialised (no training step ran through it); "
                "BN re-calibration never initialises quantizers: train or load a trained checkpoint first")

    def _record_channels(name: str):
        def hook(module, inputs) -> None:
            used[name] = int(inputs[0].size(1))
        return hook

    qnames = {m: n for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}
    handles = [m.register_forward_pre_hook(_check_quantizer) for m in qnames]
    handles += [bn.register_forward_pre_hook(_record_channels(name)) for name, bn in bns]
    n_images = 0
    ok = False
    try:
        model.eval()
        for _, bn in bns:
            bn.reset_running_stats()
            bn.momentum = None          # cumulative average over the calibration batches
            bn.train()
        for x in _iter_images(data, num_images, batch_size, seed):
            x = resize_batch(x.to(device, non_blocking=True), resolution)
            model(x)
            n_images += x.size(0)
        if n_images == 0:
            raise CalibrationError("calibration data: no images (empty dataset or loader)")
        if (sync if sync is not None else is_sharded(data)) and dist.is_available() and dist.is_initialized():
            _all_reduce_stats(bns, used, n_images, device)
        ok = True
    finally:
        for h in handles:
            h.remove()
        for name, bn in bns:
            mean, var, tracked, momentum = snapshot[name]
            bn.momentum = momentum
            c = used.get(name, 0) if ok else 0
            # Unused layers and channels (or everything, after an error) get their old stats back.
            bn.running_mean[c:].copy_(mean[c:])
            bn.running_var[c:].copy_(var[c:])
            if c == 0:
                bn.num_batches_tracked.copy_(tracked)
        for m, flag in training.items():
            m.training = flag
    return n_images


def _all_reduce_stats(bns, used: dict[str, int], n_images: int, device: torch.device) -> None:
    """Merge per-rank BN statistics into those of the union of all ranks' images.

    Per rank: mean m_r and (per-batch-averaged) variance v_r over n_r images. The merged mean is
    sum(n_r m_r)/N and the merged variance sum(n_r (v_r + m_r^2))/N - mean^2.
    """
    names = [name for name, _ in bns if used.get(name, 0) > 0]
    layers = dict(bns)
    parts = [torch.tensor([float(n_images)], dtype=torch.float64, device=device)]
    for name in names:
        c = used[name]
        m = layers[name].running_mean[:c].double()
        v = layers[name].running_var[:c].double()
        parts += [m * n_images, (v + m * m) * n_images]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    total = flat[0]
    offset = 1
    for name in names:
        c = used[name]
        bn = layers[name]
        mean = flat[offset:offset + c] / total
        sq = flat[offset + c:offset + 2 * c] / total
        offset += 2 * c
        bn.running_mean[:c].copy_(mean.to(bn.running_mean.dtype))
        bn.running_var[:c].copy_((sq - mean * mean).clamp_min(0).to(bn.running_var.dtype))


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BN layer (for comparisons and tests)."""
    out = {}
    for name, bn in bn_layers(model):
        out[f"{name}.running_mean"] = bn.running_mean.detach().clone()
        out[f"{name}.running_var"] = bn.running_var.detach().clone()
    return out


__all__ = ["CalibrationError", "DEFAULT_CALIB_BATCH", "DEFAULT_CALIB_IMAGES", "bn_layers", "bn_state",
           "calibration_batches", "model_device", "recalibrate_bn",
           "uninitialized_quantizers"]
