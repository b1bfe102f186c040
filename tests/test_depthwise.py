"""The CPU depthwise convolution's own backward must give PyTorch's gradients on every route."""

import pytest
import torch
import torch.nn.functional as F

from oqat.nn.depthwise import _SMALL_MAP, _conv_backward, depthwise_conv2d
from oqat.quant import native


@pytest.mark.parametrize("side,k,stride", [
    (28, 3, 1), (28, 3, 2),                      # 3x3: split convolution_backward calls
    (28, 5, 2), (24, 5, 1), (_SMALL_MAP + 1, 5, 2),  # 5x5 on large maps: channels-last weight gradient
    (_SMALL_MAP, 5, 2), (14, 5, 1), (7, 5, 1), (9, 7, 2), (4, 5, 1),  # small maps: batch as channels
])
def test_gradients_match_pytorch(side, k, stride):
    torch.manual_seed(side * 10 + k)
    x = torch.randn(3, 6, side, side, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, k, k, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv2d(x, w, stride, k // 2)
    ref = F.conv2d(x, w, None, stride, k // 2, 1, 6)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), grad)
    want = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


def test_weight_only_and_input_only_gradients():
    x = torch.randn(2, 4, 10, 10)
    w = torch.randn(4, 1, 5, 5, requires_grad=True)
    (gw,) = torch.autograd.grad(depthwise_conv2d(x, w, 1, 2).square().sum(), w)
    (ref,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 2, 1, 4).square().sum(), w)
    torch.testing.assert_close(gw, ref)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(depthwise_conv2d(xr, w.detach(), 1, 2).sum(), xr)
    (ref,) = torch.autograd.grad(F.conv2d(xr, w.detach(), None, 1, 2, 1, 4).sum(), xr)
    torch.testing.assert_close(gx, ref)


def test_non_contiguous_input_is_accepted():
    x = torch.randn(2, 10, 10, 4).permute(0, 3, 1, 2).requires_grad_()  # channels-last strides
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    out = depthwise_conv2d(x, w, 1, 1)
    torch.testing.assert_close(out, F.conv2d(x, w, None, 1, 1, 1, 4))
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("n,channels,h,w,k,stride", [
    (32, 8, 14, 14, 5, 1),    # one full block of lanes
    (3, 5, 9, 11, 5, 2),      # lanes left empty, a non-square map
    (40, 6, 7, 7, 7, 1),      # two blocks, the second one partial
    (33, 40, 14, 14, 5, 2),   # large enough for the parallel path
    (2, 3, 6, 5, 7, 3),       # taps that miss the map entirely at the edges
    (1, 2, 2, 2, 5, 1),       # a map smaller than the kernel
])
def test_native_weight_gradient_matches_pytorch(n, channels, h, w, k, stride):
    """The float32 route: the native kernel's weight gradient against PyTorch's in float64."""
    kernels = native.library()
    if kernels is None:
        pytest.skip("no native kernels on this machine")
    torch.manual_seed(n + h + k)
    x = torch.randn(n, channels, h, w)
    weight = torch.randn(channels, 1, k, k, requires_grad=True)
    y = depthwise_conv2d(x, weight, stride, k // 2)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, weight, grad)
    ref = _conv_backward(grad.double(), x.double(), weight.detach().double(), stride, k // 2, 1)  # PyTorch's kernel
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(kernels.depthwise_grad_weight(x, grad.contiguous(), k, stride, k // 2), got,
                               rtol=0, atol=0)  # the route taken is the native one
