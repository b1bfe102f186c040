"""Batch norm with batch statistics on the CPU through the native kernels.

Why: PyTorch's CPU training-mode ``batch_norm`` forward is about three times slower than the
memory traffic it needs on the feature maps of these supernets, and batch norm was a fifth of a
quickstart training step (benchmarks/RESULTS.md, "Per-step speed"). :func:`batch_norm` takes the
native kernels of :mod:`oqat.quant.native` where they apply (CPU float32, a 4-D contiguous input
with batch statistics, an affine BN, at least ``MIN_ELEMENTS`` elements, no autocast, no
tracing) and ``F.batch_norm`` everywhere else, with the same running-statistics update: the
results agree with PyTorch's to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import native
from ..utils.devices import capturing_graph

MIN_ELEMENTS = 16384  # below this the per-call cost outweighs the faster loops (measured)


class _NativeBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):
        y, stats = kernels.batch_norm_forward(x, weight.detach(), bias.detach(), eps)
        ctx.save_for_backward(x, weight, stats)
        ctx.mark_non_differentiable(stats)
        ctx.kernels = kernels
        return y, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_stats):
        x, weight, stats = ctx.saved_tensors
        mean, invstd = stats[0], stats[1]
        gx, grads = ctx.kernels.batch_norm_backward(grad.contiguous(), x, weight.detach(), mean, invstd,
                                                    ctx.needs_input_grad[0])
        return gx, grads[0] if ctx.needs_input_grad[1] else None, grads[1] if ctx.needs_input_grad[2] else None, None, None


def _kernels(x: torch.Tensor, weight, bias, use_batch_stats: bool):
    """The native kernels when they handle this call, else None."""
    if not (use_batch_stats and weight is not None and bias is not None and x.dim() == 4
            and x.numel() >= MIN_ELEMENTS and native.supports(x) and weight.dtype == x.dtype and x.is_contiguous()):
        return None
    if torch.is_autocast_enabled("cpu") or capturing_graph():
        return None
    if x.size(0) * x[0, 0].numel() < 2:  # F.batch_norm raises its own error for one value per channel
        return None
    return native.library()


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None, bias: torch.Tensor | None, use_batch_stats: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)``,
    on the native kernels where they apply (running statistics updated in place the same way:
    ``(1 - momentum) * running + momentum * batch``, the variance unbiased)."""
    kernels = _kernels(x, weight, bias, use_batch_stats)
    if kernels is None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)
    y, stats = _NativeBatchNorm.apply(x, weight, bias, eps, kernels)
    if running_mean is not None and running_var is not None:
        count = x.numel() // x.size(1)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(stats[0], alpha=momentum)
            running_var.mul_(1 - momentum).add_(stats[2], alpha=momentum * count / (count - 1))
    return y


__all__ = ["MIN_ELEMENTS", "batch_norm"]
