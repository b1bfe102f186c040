"""Depthwise convolution with a faster backward pass on the CPU.

PyTorch's CPU ``convolution_backward`` for depthwise (groups == channels) convolutions in NCHW is
5-20x slower than the forward pass when it computes both gradients in one call, and its weight
gradient alone is slow for 5x5 kernels (benchmarks/RESULTS.md, "Depthwise backward"). Depthwise
convolutions are most of a MobileNet's backward time, so on the CPU this module computes the two
gradients in separate calls and takes the weight gradient of 5x5 and larger kernels by the fastest
route measured:

* for float32, from the native kernel of :mod:`oqat.quant.native` (images as vector lanes; 2-5x
  faster than the routes below on the quickstart's shapes, RESULTS.md "Per-step speed");
* otherwise (float64, or where no C compiler works), on small feature maps as a convolution that
  treats each (channel, image) pair as a channel and the output gradient as its kernel (the MACs
  of the forward pass, run by the fast forward path), and on large ones in channels-last format.

3x3 weight gradients stay with PyTorch's kernel, which is faster there. The results equal
PyTorch's own gradients up to float rounding (tests/test_depthwise.py). On other devices the
plain ``F.conv2d`` is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import native

_SMALL_MAP = 16   # input side at or below which the "batch as channels" weight gradient is fastest


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                   which: int) -> torch.Tensor:
    """One gradient of a depthwise convolution from PyTorch's kernel: 0 = input, 1 = weight."""
    mask = [which == 0, which == 1, False]
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False,
                                               [0, 0], weight.size(0), mask)[which]


def _grad_weight(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    channels, _, k, _ = weight.shape
    if k <= 3:
        return _conv_backward(grad, x, weight, stride, padding, 1)
    square = weight.size(3) == k
    kernels = native.library() if square and native.supports(x) and grad.dtype == x.dtype else None
    if kernels is not None:
        return kernels.depthwise_grad_weight(x, grad, k, stride, padding)
    if x.size(-1) <= _SMALL_MAP and x.size(-2) <= _SMALL_MAP:
        n = x.size(0)
        xp = F.pad(x, (padding,) * 4)
        xp = xp.transpose(0, 1).reshape(1, channels * n, *xp.shape[-2:])
        kernel = grad.transpose(0, 1).reshape(channels * n, 1, *grad.shape[-2:])
        out = F.conv2d(xp, kernel, dilation=stride, groups=channels * n)
        return out.view(channels, n, *out.shape[-2:])[:, :, :k, :k].sum(1).unsqueeze(1)
    cl = torch.channels_last
    return _conv_backward(grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl), weight, stride, padding,
                          1).contiguous()


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, x.size(1))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(grad, x, weight, ctx.stride, ctx.padding, 0)
        if ctx.needs_input_grad[1]:
            grad_w = _grad_weight(x, grad, weight, ctx.stride, ctx.padding)
        return grad_x, grad_w, None, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, groups=channels)`` with the CPU backward above
    (not under autocast, whose casts F.conv2d makes and records itself)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return F.conv2d(x, weight, None, stride, padding, 1, x.size(1))
    return _DepthwiseConv.apply(x.contiguous(), weight, stride, padding)
