"""torch.distributed helpers: process-group set-up from torchrun's environment, gradient
averaging, synchronized batch norm for sliced (elastic) BN layers.

Training does not wrap the supernet in DistributedDataParallel: each step runs several subnets
that use different parameter subsets, so gradients are accumulated locally and averaged once
per optimizer step with one all-reduce over a flat buffer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..nn.layers import SlicedBatchNorm2d
from ..quant import LSQQuantizer


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = device is not None and device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return current()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average .grad over ranks in one flat all-reduce.

    Every rank runs the same subnets, so the same parameters have no gradient on every rank;
    they are left without one (as in a single process: no momentum or weight-decay update).
    """
    info = current()
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) over ranks, in place."""
    info = current()
    if not info.enabled:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= info.world_size


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s parameters and buffers."""
    if not current().enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)
    for m in module.modules():  # written through .data: the quantizers' cached flags must re-read
        if isinstance(m, LSQQuantizer):
            m.refresh_initialized()


class SyncSlicedBatchNorm2d(SlicedBatchNorm2d):
    """SlicedBatchNorm2d whose training statistics are computed over all ranks' batches.

    With equal per-rank batches this gives the statistics of the global batch, so a
    data-parallel run matches a single-process run with the same global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().enabled):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce

        c = x.size(1)
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels catastrophically
        # when |mean| >> std, which changes gradients noticeably in float32.
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), x.new_tensor([float(x.numel() // c)])]))
        count = sums[-1]
        mean = sums[:c] / count
        var = all_reduce(((x - mean.view(1, c, 1, 1)) ** 2).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean[:c].mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var[:c].mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        scale = self.weight[:c] * torch.rsqrt(var + self.eps)
        return x * scale.view(1, c, 1, 1) + (self.bias[:c] - mean * scale).view(1, c, 1, 1)


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Switch every SlicedBatchNorm2d of `model` to SyncSlicedBatchNorm2d, in place."""
    for module in model.modules():
        if type(module) is SlicedBatchNorm2d:
            module.__class__ = SyncSlicedBatchNorm2d
    return model


def min_over_ranks(value: int | None, device: torch.device) -> int | None:
    """The smallest `value` over ranks (None counts as no value; None when no rank has one)."""
    info = current()
    if not info.enabled:
        return value
    none = torch.iinfo(torch.int64).max
    t = torch.tensor([none if value is None else value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    result = int(t.item())
    return None if result == none else result


def reduce_mean(value: float, device: torch.device) -> float:
    info = current()
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size

