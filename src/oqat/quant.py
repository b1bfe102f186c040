"""LSQ fake quantization (Esser et al., 2020) with one learned step size per tensor.

``lsq_quantize`` is a single autograd Function whose backward is written out: the straight-
through estimator for x (zero outside the clipping range) and the LSQ step gradient, scaled by
``1/sqrt(N*Qp)``. The element-wise work runs in one fused kernel per direction when
``torch.compile`` works on this machine (``impl="auto"``), otherwise in eager PyTorch; both give
the same numbers. :class:`LSQQuantizer` owns the shared step ``step`` and its data-driven
initialisation (averaged over data-parallel ranks).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .space import FULL_PRECISION, normalize_bits

STEP_EPS = 1e-8  # smallest step used in the forward; keeps |s| strictly positive


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid (Qn, Qp): signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale(numel: int, bits: int, signed: bool) -> float:
    """LSQ step-gradient scale g = 1/sqrt(N * Qp)."""
    return 1.0 / math.sqrt(numel * qrange(bits, signed)[1])


# ----------------------------------------------------------------------------- kernels
# The grid bounds travel as 0-dim tensors so that one compiled kernel serves every bit-width.
def _forward_kernel(x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / s, qn, qp).round() * s


def _backward_kernel(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor):
    """Returns (grad_x, unscaled grad_s).

    Inside the range the STE passes g to x and d(out)/ds = round(v) - v; outside, x gets nothing
    and d(out)/ds = Qn or Qp. Boundaries count as inside, as torch.clamp's gradient does.
    """
    v = x / s
    inside = (v >= qn) & (v <= qp)
    grad_x = torch.where(inside, g, torch.zeros_like(g))
    q = torch.clamp(v, qn, qp).round()
    dsv = torch.where(inside, q - v, q)
    grad_s = (g * dsv).sum()
    return grad_x, grad_s


@functools.cache
def _compiled_kernels():
    """Fused kernels from torch.compile, or None where compilation does not work here."""
    # Inductor's CPU path warns that no CUDA runtime exists on CPU-only machines: not our news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        # No fullgraph: should an odd shape ever exhaust dynamo's recompile limit, that call
        # falls back to eager instead of failing.
        fwd = torch.compile(_forward_kernel, dynamic=True)
        bwd = torch.compile(_backward_kernel, dynamic=True)
        x = torch.linspace(-3, 3, 8192)
        s, qn, qp = torch.tensor(0.5), torch.tensor(-4.0), torch.tensor(3.0)
        ok_f = torch.equal(fwd(x, s, qn, qp), _forward_kernel(x, s, qn, qp))
        gx, gs = bwd(torch.ones_like(x), x, s, qn, qp)
        rx, rs = _backward_kernel(torch.ones_like(x), x, s, qn, qp)
        if not (ok_f and torch.equal(gx, rx) and torch.allclose(gs, rs)):
            raise RuntimeError("compiled LSQ kernels disagree with eager ones")
        return fwd, bwd
    except Exception as exc:  # no compiler, unsupported platform, ...
        warnings.warn(f"oqat: torch.compile unavailable for the LSQ kernels, using eager ({exc})")
        return None


def _kernels(impl: str, device: torch.device):
    if impl == "eager" or device.type not in ("cpu", "cuda"):
        return _forward_kernel, _backward_kernel
    if impl not in ("auto", "compiled"):
        raise ValueError(f"impl: {impl!r} is not one of 'auto', 'compiled', 'eager'")
    compiled = _compiled_kernels()
    if compiled is None:
        if impl == "compiled":
            raise RuntimeError("impl='compiled' requested but torch.compile does not work here")
        return _forward_kernel, _backward_kernel
    return compiled


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of `t`'s data that is not a view of it and needs no grad.

    The compiled kernels then see the same kind of input from every layer (no rank, 0/1-size,
    stride or view guards), so one compilation serves all shapes of all subnets.
    """
    t = t.detach().contiguous()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qn, qp, scale, impl):
        fwd, bwd = _kernels(impl, x.device)
        bounds = torch.tensor([qn, qp], dtype=x.dtype, device=x.device)
        flat = _flat(x)
        s = step.detach().to(x.dtype)
        ctx.save_for_backward(flat, s, bounds)
        ctx.consts = (scale, bwd, x.shape, step.dtype)
        return fwd(flat, s, bounds[0], bounds[1]).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, s, bounds = ctx.saved_tensors
        scale, bwd, shape, step_dtype = ctx.consts
        grad_x, grad_s = bwd(_flat(grad_out), flat, s, bounds[0], bounds[1])
        grad_step = (grad_s * scale).to(step_dtype) if ctx.needs_input_grad[1] else None
        return grad_x.view(shape) if ctx.needs_input_grad[0] else None, grad_step, None, None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                 grad_scale_factor: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` with step size ``step`` (a positive scalar tensor).

    Forward ``round(clip(x/s, Qn, Qp)) * s``; backward is LSQ's, with the step gradient scaled by
    ``grad_scale_factor`` (default ``1/sqrt(x.numel() * Qp)``).
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits: {bits} is outside 2..16")
    qn, qp = qrange(bits, signed)
    scale = grad_scale(x.numel(), bits, signed) if grad_scale_factor is None else grad_scale_factor
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # Traced/compiled graphs (ONNX export, user compile) get the plain formula.
        return torch.clamp(x / step.to(x.dtype), qn, qp).round() * step.to(x.dtype)
    return _LSQFunction.apply(x, step, qn, qp, scale, impl)


def lsq_reference(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ from plain autograd ops (straight-through round, gradient-scaled step).

    Slow; kept as the executable definition that ``lsq_quantize`` is tested against.
    """
    qn, qp = qrange(bits, signed)
    g = grad_scale(x.numel(), bits, signed)
    s = (step - step * g).detach() + step * g
    v = torch.clamp(x / s, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s


class LSQQuantizer(nn.Module):
    """Fake quantizer with one learned step size ``step`` for a whole tensor.

    The step is shared by every subnet that uses the layer. It is initialised from the first
    tensor it sees, ``2*mean(|v|)/sqrt(Qp)``, averaged over data-parallel ranks; the forward
    uses ``|step|`` so the step stays positive. ``bits=None``/32 makes it an identity (the step
    is kept so state dicts match across bit-widths).
    """

    def __init__(self, bits: int | None, signed: bool, impl: str = "auto"):
        super().__init__()
        self.bits = normalize_bits(bits)
        self.signed = signed
        self.impl = impl
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        qp = qrange(self.bits, self.signed)[1]
        value = 2.0 * x.detach().abs().mean().float() / math.sqrt(qp)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        self.step.copy_(value.clamp_min(STEP_EPS))
        self.initialized.fill_(True)

    def effective_step(self) -> torch.Tensor:
        return self.step.abs().clamp_min(STEP_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            self.initialize(x)
        return lsq_quantize(x, self.effective_step(), self.bits, self.signed, impl=self.impl)


__all__ = ["lsq_quantize", "lsq_reference", "LSQQuantizer", "qrange", "grad_scale"]
