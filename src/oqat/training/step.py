"""One training step as the device runs it, and the losses of the steps since the last check.

Why: a GPU stays busy only while the host queues work ahead of it; anything that reads a
result back (``loss.item()``, ``bool(torch.isfinite(loss))``, ``bool(buffer)``) makes the host
wait for the device to finish. A step here reads nothing back: :func:`train_step` returns the
sandwich's losses as a device tensor, :class:`LossWindow` keeps them until the training loop
reads them, once per log interval and before each checkpoint (one host sync), and finds the
first non-finite one there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import resize_batch
from ..models import Supernet
from ..space import Arch
from . import distributed
from .config import TrainConfig


@dataclass(frozen=True)
class StepOptions:
    """How a sandwich step computes (the parts of TrainConfig that matter inside a step)."""

    distill: bool = True                    # smaller subnets learn from the largest one's predictions
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    channels_last: bool = False             # inputs in channels-last memory format
    amp_dtype: torch.dtype | None = None    # autocast dtype of the convs; None: float32 throughout

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device) -> "StepOptions":
        """`cfg` on `device`: channels-last and bf16 autocast are CUDA-only switches."""
        cuda = device.type == "cuda"
        return cls(distill=cfg.distill, label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                   channels_last=cuda and cfg.channels_last, amp_dtype=torch.bfloat16 if cuda and cfg.amp else None)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def sandwich_backward(net: Supernet, x: torch.Tensor, y: torch.Tensor, archs: Sequence[Arch],
                      opts: StepOptions) -> torch.Tensor:
    """Forward and backward of each subnet of `archs` on (x, y), gradients accumulated.

    The first subnet (the largest) learns from the labels; with ``opts.distill`` the others
    learn from its soft predictions (in-place distillation). Convs run under autocast when
    ``opts.amp_dtype`` is set (the quantizers keep float32, see oqat.quant.lsq); logits and
    losses are float32. Returns the detached losses, shape (len(archs),), on x's device.
    """
    losses = []
    teacher = None
    amp = opts.amp_dtype is not None
    for i, arch in enumerate(archs):
        net.set_arch(arch)
        xi = resize_batch(x, arch.r)
        if opts.channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=opts.amp_dtype, enabled=amp):
            logits = net(xi).float()
        if i == 0 or not opts.distill:
            loss = F.cross_entropy(logits, y, label_smoothing=opts.label_smoothing)
            if i == 0:
                teacher = F.softmax(logits.detach(), dim=1)
        else:
            loss = soft_cross_entropy(logits, teacher)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def train_step(net: Supernet, optimizer: torch.optim.Optimizer, scheduler, params: list[torch.nn.Parameter],
               x: torch.Tensor, y: torch.Tensor, archs: Sequence[Arch], opts: StepOptions) -> torch.Tensor:
    """One optimizer step of the sandwich `archs` on (x, y): gradients of every subnet,
    averaged over ranks, optionally clipped, then the optimizer and scheduler (if any) step.
    Returns the per-subnet losses on the device; nothing is read back to the host."""
    optimizer.zero_grad(set_to_none=True)
    losses = sandwich_backward(net, x, y, archs, opts)
    distributed.average_gradients(params)
    if opts.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses


@dataclass(frozen=True)
class StepLosses:
    """The losses of one step, read back: values[i] is subnet archs[i]'s."""

    step: int
    archs: tuple[Arch, ...]
    values: tuple[float, ...]

    def first_non_finite(self) -> int | None:
        return next((i for i, v in enumerate(self.values) if not math.isfinite(v)), None)


class LossWindow:
    """The device-side losses of the steps since the last :meth:`read`."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, tuple[Arch, ...], torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: int, archs: Sequence[Arch], losses: torch.Tensor) -> None:
        self._pending.append((step, tuple(archs), losses))

    def read(self) -> list[StepLosses]:
        """The pending steps' losses as Python floats (one host sync for all), oldest first;
        the window is empty afterwards."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        flat = torch.cat([t.reshape(-1).to(torch.float64) for _, _, t in pending]).tolist()
        rows, offset = [], 0
        for step, archs, t in pending:
            n = t.numel()
            rows.append(StepLosses(step, archs, tuple(flat[offset:offset + n])))
            offset += n
        return rows


def first_non_finite(rows: Iterable[StepLosses]) -> tuple[StepLosses, int] | None:
    """(the earliest step with a NaN/inf loss, the index of its first such subnet), or None."""
    for row in rows:
        i = row.first_non_finite()
        if i is not None:
            return row, i
    return None


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor of `tensors` is finite (one host sync for all)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


__all__ = ["LossWindow", "StepLosses", "StepOptions", "all_finite", "first_non_finite", "sandwich_backward",
           "soft_cross_entropy", "train_step"]
