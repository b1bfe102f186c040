"""1x1 convolution without gradients as a matrix product on the CPU.

Why: measuring subnets (the search, BN re-calibration, evaluation) runs 1x1 convolutions with
no autograd at batch 100-200, and there PyTorch's CPU convolution is 1.3-14x slower than
``torch.matmul`` of the (out, in) weight with the (N, in, H*W) input on the quickstart's and
``mbv3-imagenet``'s shapes (benchmarks/RESULTS.md, "Session 8"). With gradients the two are
even or the convolution wins (same section), and on a 1x1 map the convolution is faster, so
those keep ``F.conv2d``. The results equal the convolution's to float rounding
(tests/test_pointwise.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.devices import capturing_graph

MIN_POSITIONS = 16   # H*W below which the convolution is faster (a 4x4 map: 1.3x; 1x1: 0.2x)


def _as_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dim() != 4 or not x.is_contiguous():
        return False
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if torch.is_autocast_enabled("cpu") or capturing_graph():
        return False
    return x.size(2) * x.size(3) >= MIN_POSITIONS


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight)`` for a (out, in, 1, 1) `weight` (stride 1, no padding, no bias)."""
    if not _as_matmul(x, weight):
        return F.conv2d(x, weight)
    n, c, h, w = x.shape
    out = torch.matmul(weight.reshape(weight.size(0), c), x.view(n, c, h * w))
    return out.view(n, weight.size(0), h, w)


__all__ = ["MIN_POSITIONS", "pointwise_conv2d"]
