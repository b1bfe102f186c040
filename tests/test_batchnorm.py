"""Batch norm on the native kernels equals PyTorch's (values, gradients, running statistics) on
full and sliced channels, and every case the kernels do not handle takes F.batch_norm."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from oqat.nn import SlicedBatchNorm2d
from oqat.nn import batchnorm as bn_module
from oqat.quant import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels on this machine")


def _pair(channels: int, momentum: float | None = 0.1):
    torch.manual_seed(0)
    ours, ref = SlicedBatchNorm2d(channels, momentum=momentum), torch.nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(-1.5, 2.0)  # negative scales too
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _reference(ref: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's batch norm on the leading x.size(1) channels, as SlicedBatchNorm2d defines it."""
    c = x.size(1)
    if c == ref.num_features:
        return ref(x)
    ref.num_batches_tracked.add_(1)
    factor = 1.0 / float(ref.num_batches_tracked) if ref.momentum is None else ref.momentum
    return F.batch_norm(x, ref.running_mean[:c], ref.running_var[:c], ref.weight[:c], ref.bias[:c], True, factor,
                        ref.eps)


@pytest.mark.parametrize("active", [48, 29])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_forward_backward_and_running_stats_match_pytorch(active, momentum):
    ours, ref = _pair(48, momentum)
    for step in range(3):  # running statistics accumulate over calls
        x = (3 * torch.randn(16, active, 14, 13) + 2).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = ours(x), _reference(ref, xr)
        assert type(y.grad_fn).__name__ == "_NativeBatchNormBackward"  # the native path was taken
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_no_grad_calibration_updates_statistics_like_pytorch():
    ours, ref = _pair(32, momentum=None)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(20, 32, 16, 16) * 0.7 - 1
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


def test_only_the_requested_gradients_are_computed():
    ours, _ = _pair(24)
    ours.weight.requires_grad_(False)
    x = torch.randn(8, 24, 16, 16)  # no grad for x either: only the bias gets one
    ours(x).sum().backward()
    assert ours.weight.grad is None and ours.bias.grad is not None
    torch.testing.assert_close(ours.bias.grad, torch.full((24,), 8 * 16 * 16.0))


@pytest.mark.parametrize("case", ["eval", "small", "double", "channels_last", "no_affine", "autocast"])
def test_cases_the_kernels_do_not_handle_take_pytorch(case, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the native kernels were called")

    monkeypatch.setattr(bn_module._NativeBatchNorm, "apply", refuse)
    ours, ref = _pair(16)
    x = torch.randn(16, 16, 12, 12)
    if case == "eval":
        ours.eval(), ref.eval()
    elif case == "small":
        x = torch.randn(2, 16, 4, 4)  # under MIN_ELEMENTS
    elif case == "double":
        ours.double(), ref.double()
        x = x.double()
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "no_affine":
        ours, ref = SlicedBatchNorm2d(16, affine=False), torch.nn.BatchNorm2d(16, affine=False)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(x), ref(x))
    else:
        torch.testing.assert_close(ours(x), ref(x))


def test_one_value_per_channel_is_pytorchs_error():
    ours, _ = _pair(16)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 16, 1, 1))


def test_kernels_load_when_first_asked_inside_inference_mode(monkeypatch, tmp_path):
    """An export asks for the kernels first inside no_grad/inference mode; their self-test must
    not need autograd there (it once made every export fall back to torch.compile)."""
    native.library.cache_clear()
    monkeypatch.setenv("OQAT_KERNEL_CACHE", str(tmp_path / "kernels"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.inference_mode():
                assert native.library() is not None
    finally:
        native.library.cache_clear()
