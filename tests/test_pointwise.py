"""1x1 convolutions without gradients run as matrix products on the CPU (oqat.nn.pointwise): the
same values as F.conv2d, and the convolution wherever the matrix product is not the faster one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oqat.nn import pointwise
from oqat.nn.layers import QConvBN
from oqat.nn.pointwise import pointwise_conv2d


@pytest.mark.parametrize("n,cin,cout,h,w", [(3, 16, 48, 6, 5), (2, 40, 160, 7, 7), (1, 5, 3, 4, 4), (4, 8, 8, 2, 9)])
def test_values_equal_the_convolution(n, cin, cout, h, w):
    g = torch.Generator().manual_seed(n * 100 + cin)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    full = torch.randn(cout + 3, cin + 2, 1, 1, dtype=torch.float64, generator=g)
    weight = full[:cout, :cin]                                # a supernet's leading slice: not contiguous
    with torch.no_grad():
        out = pointwise_conv2d(x, weight)
    assert out.shape == (n, cout, h, w) and out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=1e-12, atol=1e-12)


def test_the_route_follows_grad_mode_and_map_size(monkeypatch):
    def no_conv(*args, **kwargs):
        raise AssertionError("F.conv2d called")

    monkeypatch.setattr(pointwise.F, "conv2d", no_conv)
    weight = torch.randn(6, 4, 1, 1)
    with torch.no_grad():
        pointwise_conv2d(torch.randn(2, 4, 4, 4), weight)                  # 16 positions: matrix product
        with pytest.raises(AssertionError, match="F.conv2d called"):
            pointwise_conv2d(torch.randn(2, 4, 3, 3), weight)              # 9 positions: the convolution
        with pytest.raises(AssertionError, match="F.conv2d called"):
            pointwise_conv2d(torch.randn(2, 4, 8, 8).transpose(2, 3), weight)   # not contiguous
    with pytest.raises(AssertionError, match="F.conv2d called"):
        pointwise_conv2d(torch.randn(2, 4, 8, 8, requires_grad=True), weight)   # training: the convolution


def test_a_quantized_layer_measures_the_same_on_either_route(monkeypatch):
    torch.manual_seed(0)
    layer = QConvBN(12, 20, 1, bits=4, act="relu").double().train()
    x = torch.randn(8, 12, 6, 6, dtype=torch.float64)
    layer(x, 16)                                              # initialises the steps, BN statistics
    layer.eval()
    with torch.no_grad():
        fast = layer(x[:, :10], 16)
        monkeypatch.setattr(pointwise, "MIN_POSITIONS", 10**9)
        reference = layer(x[:, :10], 16)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
