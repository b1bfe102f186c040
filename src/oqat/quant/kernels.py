"""The element-wise LSQ kernels: the eager definition, and fused versions from torch.compile.

Every implementation (these, and the native C loops of :mod:`oqat.quant.native`) computes the
same float32 operations in the same order; the eager functions are the definition the others
are tested against.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from .activations import ACT_CODES


def _act_and_slope(z: torch.Tensor, code: torch.Tensor):
    """(act(z), d act/dz) for the activation `code` (0 identity, 1 ReLU, 2 h_swish), written with
    element-wise ops only so that the compiled kernel computes it in registers. The slopes are
    those of torch's own backward: ReLU 0 at z <= 0; h_swish 0 at z <= -3, z/3 + 1/2 inside, 1 at z >= 3."""
    relu = torch.clamp_min(z, 0.0)
    hswish = z * torch.clamp(z + 3.0, 0.0, 6.0) / 6.0
    act = torch.where(code == 1, relu, torch.where(code == 2, hswish, z))
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    d_relu = torch.where(z > 0, one, zero)
    d_hswish = torch.where(z <= -3.0, zero, torch.where(z < 3.0, z / 3.0 + 0.5, one))
    slope = torch.where(code == 1, d_relu, torch.where(code == 2, d_hswish, one))
    return act, slope


def _forward_kernel(x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor,
                    code: torch.Tensor) -> torch.Tensor:
    a = _act_and_slope(x, code)[0]
    return torch.clamp(a / s, qn, qp).round() * s


def _backward_kernel(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor,
                     code: torch.Tensor):
    """Returns (grad_x, unscaled grad_s), with v = act(x)/s.

    Strictly inside the range (Qn < v < Qp) the STE passes g on (times the activation's slope)
    and d(out)/ds = round(v) - v; at and beyond the bounds x gets nothing and d(out)/ds = clip(v),
    i.e. Qn or Qp (LSQ eq. 5; OQA's hardtanh passes no gradient at its bounds either).
    """
    a, slope = _act_and_slope(x, code)
    v = a / s
    inside = (v > qn) & (v < qp)
    grad_x = torch.where(inside, g * slope, torch.zeros_like(g))
    q = torch.clamp(v, qn, qp).round()
    dsv = torch.where(inside, q - v, q)
    grad_s = (g * dsv).sum()
    return grad_x, grad_s


# Eager versions: Python picks the activation, so the identity case does no extra work.
def _eager_act(x: torch.Tensor, code: torch.Tensor):
    c = int(code)
    if c == 0:
        return x, None
    if c == 1:
        return torch.relu(x), (x > 0).to(x.dtype)
    slope = torch.where(x <= -3.0, 0.0, torch.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0, slope


def eager_forward(x, s, qn, qp, code):
    return torch.clamp(_eager_act(x, code)[0] / s, qn, qp).round() * s


def eager_backward(g, x, s, qn, qp, code):
    a, slope = _eager_act(x, code)
    v = a / s
    inside = (v > qn) & (v < qp)
    grad_x = torch.where(inside, g if slope is None else g * slope, torch.zeros_like(g))
    q = torch.clamp(v, qn, qp).round()
    grad_s = (g * torch.where(inside, q - v, q)).sum()
    return grad_x, grad_s


@functools.cache
def compiled_kernels(device_type: str = "cpu"):
    """Fused kernels from torch.compile for tensors on `device_type` ("cpu", "cuda"), or None
    where compilation does not work there (a warning says why, and that eager runs instead).

    The self-test compiles and checks them on tensors of that device: inductor emits C++ for
    the CPU and Triton for CUDA, and either can be missing or wrong on a given machine."""
    # Inductor's CPU path warns that no CUDA runtime exists on CPU-only machines: not our news.
    # Quieted only while compiling here; the caller's logging configuration is restored after.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # No fullgraph: should an odd shape ever exhaust dynamo's recompile limit, that call
        # falls back to eager instead of failing.
        fwd = torch.compile(_forward_kernel, dynamic=True)
        bwd = torch.compile(_backward_kernel, dynamic=True)
        dev = torch.device(device_type)
        s, qn, qp = (torch.tensor(v, device=dev) for v in (0.5, -4.0, 3.0))
        # Compile here, in the state the autograd Function calls them (grad mode off, which is
        # part of dynamo's guards), for a small and a large tensor: inductor specialises the
        # reduction of the backward on the size (a guard near 4096 elements), so both variants
        # are built now instead of in the middle of a run.
        with torch.no_grad():
            for n in (1000, 8192):
                x = torch.linspace(-5, 5, n, device=dev)
                for code in ACT_CODES.values():
                    c = torch.tensor(code, device=dev)
                    ok_f = torch.equal(fwd(x, s, qn, qp, c), eager_forward(x, s, qn, qp, c))
                    gx, gs = bwd(torch.ones_like(x), x, s, qn, qp, c)
                    rx, rs = eager_backward(torch.ones_like(x), x, s, qn, qp, c)
                    if not (ok_f and torch.allclose(gx, rx, rtol=1e-6, atol=0) and torch.allclose(gs, rs)):
                        raise RuntimeError("compiled LSQ kernels disagree with eager ones")
        return fwd, bwd
    except Exception as exc:  # no compiler, unsupported platform, ...
        warnings.warn(f"oqat: torch.compile unavailable for the LSQ kernels on {device_type}, "
                      f"using the eager kernels there ({type(exc).__name__}: {exc})")
        return None
    finally:
        logger.setLevel(level)


IMPLS = ("auto", "native", "compiled", "eager")


def select_kernels(impl: str, device: torch.device):
    """(forward, backward) element-wise kernels for tensors on `device`: compiled or eager."""
    if impl in ("eager", "native") or device.type not in ("cpu", "cuda"):
        return eager_forward, eager_backward
    compiled = compiled_kernels(device.type)
    if compiled is None:
        if impl == "compiled":
            raise RuntimeError(f"impl='compiled' requested but torch.compile does not work here for {device.type} tensors")
        return eager_forward, eager_backward
    return compiled


__all__ = ["IMPLS", "compiled_kernels", "eager_backward", "eager_forward", "select_kernels"]
