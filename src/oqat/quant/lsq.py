"""LSQ fake quantization (Esser et al., 2020) with one learned step size per tensor.

``lsq_quantize`` is a single autograd Function whose backward is written out: the straight-
through estimator for x (zero outside the clipping range) and the LSQ step gradient, scaled by
``1/sqrt(N*Qp)``. The element-wise work runs in one fused kernel per direction, optionally with
the preceding activation (ReLU/h_swish) folded in. ``impl="auto"`` picks, in order: native C
kernels for CPU float32 tensors (:mod:`oqat.quant.native`, built once with the system compiler),
``torch.compile``'d kernels, eager PyTorch (:mod:`oqat.quant.kernels`); all give the same numbers
(the step gradient up to summation order). The STE passes gradient to x strictly inside the grid
(``Qn < x/s < Qp``, LSQ eq. 5), none at the bounds. A step may be 0-dim or of shape ``(1,)`` (as
OQA and lsq-net store it); its gradient has the step's shape. :class:`LSQQuantizer` owns the
shared step ``step`` (0-dim) and its data-driven initialisation (averaged over data-parallel ranks).

Mixed precision: under autocast a half-precision input is cast to float32 and the quantizer
runs with autocast off, so the division by the step, the rounding, the clipping and the
step-gradient sum are float32 (the grid of the float32 export), whatever dtype the convs use;
the output is float32 (the next conv casts it as autocast says). On device tensors the
forward and backward read nothing back to the host (no ``.item()``, no ``bool(tensor)``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from ..space import FULL_PRECISION, normalize_bits
from ..utils.devices import capturing_graph
from . import native as native_kernels
from .activations import act_code, activation_fn
from .kernels import IMPLS, eager_forward, select_kernels

STEP_EPS = 1e-8  # smallest step used in the forward; keeps |s| strictly positive


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid (Qn, Qp): signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale(numel: int, bits: int, signed: bool) -> float:
    """LSQ step-gradient scale g = 1/sqrt(N * Qp)."""
    return 1.0 / math.sqrt(numel * qrange(bits, signed)[1])


def _native(impl: str, x: torch.Tensor):
    """The native C kernels where `impl` allows them and they handle `x` (CPU float32), else None."""
    if impl in ("auto", "native") and native_kernels.supports(x):
        kernels = native_kernels.library()
        if kernels is not None:
            return kernels
    if impl == "native":
        raise RuntimeError("impl='native' requested but the native LSQ kernels are unavailable "
                           f"here (they need a C compiler and CPU float32 tensors; got {x.device} {x.dtype})")
    return None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of `t`'s data that is not a view of it and needs no grad.

    The compiled kernels then see the same kind of input from every layer (no rank, 0/1-size,
    stride or view guards), so one compilation serves all shapes of all subnets.
    """
    t = t.detach().contiguous()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


@functools.cache
def _constants(qn: int, qp: int, code: int, dtype: torch.dtype, device: torch.device,
               host_code: bool = False) -> tuple:
    """(Qn, Qp, act code) as 0-dim tensors on `device`, built once per combination (not on every
    call). ``host_code``: the code as a Python int, for the eager kernels, which branch on it in
    Python (``int()`` of a device tensor would be a host sync on every call)."""
    qn_t, qp_t, code_t = (torch.tensor(v, dtype=dtype, device=device) for v in (qn, qp, code))
    return qn_t, qp_t, (code if host_code else code_t)


_HALF = (torch.float16, torch.bfloat16)


def _grid_input(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 when autocast is on for its device and `x` is half precision (an autocast
    conv's output), else `x`: the LSQ grid is computed in float32, as at export."""
    if x.dtype in _HALF and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


def _apply(x: torch.Tensor, step: torch.Tensor, *args) -> torch.Tensor:
    """``_LSQFunction.apply`` on the float32 grid: under autocast, a half input cast to float32
    first and the Function run with autocast off (the compiled kernels would otherwise recompile
    under autocast's global state, and nothing inside should be cast); autograd casts the
    gradient back to `x`'s dtype. Without autocast: one cheap check (this runs hundreds of
    times per step)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return _LSQFunction.apply(x, step, *args)
    x = _grid_input(x)
    with torch.autocast(device_type, enabled=False):
        return _LSQFunction.apply(x, step, *args)


class _LSQFunction(torch.autograd.Function):
    """``positive=True`` quantizes with ``max(|step|, STEP_EPS)`` and applies the derivative of
    that map in the backward (what LSQQuantizer does, with two autograd nodes fewer)."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, scale, impl, code, positive=False):
        native = _native(impl, x)
        if native is not None:  # plain Python floats, no reshapes: little around the kernel
            raw = float(step)
            sv = max(abs(raw), STEP_EPS) if positive else raw
            xc = x.detach().contiguous()
            out = native.forward(xc, sv, qn, qp, code)
            ctx.save_for_backward(xc)
        else:
            flat = _flat(x)
            raw = step.detach()
            s = (raw.abs().clamp_min(STEP_EPS) if positive else raw).to(x.dtype)
            fwd, _ = select_kernels(impl, x.device)
            out = fwd(flat, s, *_constants(qn, qp, code, x.dtype, x.device, fwd is eager_forward))
            ctx.save_for_backward(flat, s, raw)
            sv, raw = None, None
        ctx.consts = (scale, impl, native, x.shape, step.dtype, step.shape, qn, qp, code, positive, sv, raw)
        return out if native is not None else out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        scale, impl, native, shape, step_dtype, step_shape, qn, qp, code, positive, sv, raw = ctx.consts
        if native is not None:  # autograd hands us a gradient of the output's dtype and device
            (xc,) = ctx.saved_tensors
            grad_x, total = native.backward(grad_out.contiguous(), xc, sv, qn, qp, code)
            if positive:  # d max(|w|, eps)/dw = sign(w) where |w| >= eps, else 0
                total = total * (math.copysign(1.0, raw) if abs(raw) >= STEP_EPS else 0.0)
            grad_s = (torch.tensor(total * scale, dtype=step_dtype).reshape(step_shape)
                      if ctx.needs_input_grad[1] else None)
            return grad_x if ctx.needs_input_grad[0] else None, grad_s, None, None, None, None, None, None
        flat, s, raw_t = ctx.saved_tensors
        fwd, bwd = select_kernels(impl, flat.device)
        g = _flat(grad_out)
        consts = _constants(qn, qp, code, flat.dtype, flat.device, fwd is eager_forward)
        if torch.is_autocast_enabled(flat.device.type):  # a CPU backward runs in the caller's autocast state
            with torch.autocast(flat.device.type, enabled=False):
                grad_x, grad_s = bwd(g, flat, s, *consts)
        else:
            grad_x, grad_s = bwd(g, flat, s, *consts)
        grad_s = (grad_s * scale).to(step_dtype).reshape(step_shape)
        if positive:
            grad_s = grad_s * torch.where(raw_t.abs() >= STEP_EPS, raw_t.sign(), 0.0)
        grad_step = grad_s if ctx.needs_input_grad[1] else None
        return (grad_x.view(shape) if ctx.needs_input_grad[0] else None, grad_step,
                None, None, None, None, None, None)


def _check_step(step: torch.Tensor) -> None:
    if not isinstance(step, torch.Tensor) or step.numel() != 1:
        shape = tuple(step.shape) if isinstance(step, torch.Tensor) else type(step).__name__
        raise ValueError(f"step: expected a tensor of one element (shape () or (1,)), got {shape}")


def kernel_impl(device: torch.device | str, impl: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """The element-wise kernels a quantizer runs for `dtype` tensors on `device`: "native",
    "compiled" or "eager" (`impl` as LSQQuantizer takes it).

    Builds and self-tests them on that device (once per process), so that a training run
    knows, and any fallback warning is given, before the first step."""
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not one of {list(IMPLS)}")
    device = torch.device(device)
    if _native(impl, torch.empty(0, dtype=dtype, device=device)) is not None:
        return "native"
    fwd, _ = select_kernels(impl, device)
    return "eager" if fwd is eager_forward else "compiled"


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                 grad_scale_factor: float | None = None, impl: str = "auto", act: str | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` with step size ``step`` (a positive tensor of one element,
    shape ``()`` or ``(1,)``; the step gradient has the same shape).

    Forward ``round(clip(x/s, Qn, Qp)) * s``; backward is LSQ's (x gets the gradient strictly
    inside ``Qn < x/s < Qp``; d out/ds is ``round(v) - v`` there and ``Qn``/``Qp`` at and beyond
    the bounds), with the step gradient scaled by ``grad_scale_factor`` (default
    ``1/sqrt(x.numel() * Qp)``). ``act`` ("relu" or "h_swish")
    quantizes ``act(x)`` instead, with the activation computed inside the same kernels (its
    gradient included): one pass over memory instead of two in each direction.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits: {bits} is outside 2..16")
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not one of {list(IMPLS)}")
    _check_step(step)
    code = act_code(act)
    act_fn = activation_fn(act)
    qn, qp = qrange(bits, signed)
    scale = grad_scale(x.numel(), bits, signed) if grad_scale_factor is None else grad_scale_factor
    if capturing_graph():
        # Traced/compiled graphs (ONNX export, user compile) get the plain formula.
        x = _grid_input(x)
        return torch.clamp(act_fn(x) / step.to(x.dtype), qn, qp).round() * step.to(x.dtype)
    return _apply(x, step, qn, qp, scale, impl, code)


def _lsq_positive(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, impl: str,
                  act: str | None, numel: int | None = None) -> torch.Tensor:
    """``lsq_quantize(x, max(|step|, STEP_EPS), ...)`` with that max inside the autograd Function
    (two autograd nodes fewer per call; the same values and gradients)."""
    if capturing_graph():
        return lsq_quantize(x, step.abs().clamp_min(STEP_EPS), bits, signed, impl=impl, act=act)
    code = act_code(act)
    qn, qp = qrange(bits, signed)
    scale = grad_scale(x.numel() if numel is None else numel, bits, signed)
    return _apply(x, step, qn, qp, scale, impl, code, True)


def lsq_reference(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ from plain autograd ops (straight-through round, gradient-scaled step).

    Slow; kept as the executable definition that ``lsq_quantize`` is tested against.
    """
    qn, qp = qrange(bits, signed)
    g = grad_scale(x.numel(), bits, signed)
    # value of step, gradient scaled by g; written so that the value is exactly `step`
    # ((step - step*g) + step*g may differ from step in the last bit and move boundary values).
    s = step.detach() + (step * g - (step * g).detach())
    v = x / s
    # clip whose gradient to v is 1 strictly inside (Qn, Qp) and 0 at the bounds, as LSQ eq. 5 and
    # OQA's hardtanh; spelled out because torch.clamp's gradient at the bounds differs between versions
    v = torch.where(v <= qn, qn, torch.where(v >= qp, qp, v))
    v = v.round().detach() + (v - v.detach())  # straight-through round, exactly round(v)
    return v * s


class LSQQuantizer(nn.Module):
    """Fake quantizer with one learned step size ``step`` for a whole tensor.

    The step is shared by every subnet that uses the layer. It is initialised from the first
    tensor it sees, ``2*mean(|v|)/sqrt(Qp)``, averaged over data-parallel ranks; the forward
    uses ``|step|`` so the step stays positive. ``bits=None``/32 makes it an identity (the step
    is kept so state dicts match across bit-widths).

    Whether the step was initialised lives in the ``initialized`` buffer (saved in state dicts);
    :attr:`is_initialized` reads it only when the buffer changed, so a forward on a GPU does not
    wait for the device to answer (a host sync in each of a supernet's hundreds of quantizers).
    """

    def __init__(self, bits: int | None, signed: bool, impl: str = "auto", batched: bool = False):
        super().__init__()
        self.bits = normalize_bits(bits)
        self.signed = signed
        # An activation quantizer sees one rank's share of the batch; LSQ's gradient scale
        # 1/sqrt(N Qp) then counts N over all ranks, so W ranks of batch B train like one of W*B.
        self.batched = batched
        if impl not in IMPLS:
            raise ValueError(f"impl: {impl!r} is not one of {list(IMPLS)}")
        self.impl = impl
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen: tuple[torch.Tensor, int, bool] | None = None  # (buffer, its version, its value)

    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"

    @property
    def is_initialized(self) -> bool:
        """``bool(self.initialized)``, read from the buffer only when it changed since the last read.

        A change is another tensor in the buffer's place (``.to()``, ``load_state_dict(assign=True)``,
        a copied module) or an in-place write, which moves the tensor's version counter
        (``load_state_dict``, ``copy_``, ``fill_``). Writes through ``.data`` (or by a collective
        on ``.data``) are invisible to it: call :meth:`refresh_initialized` after those.
        """
        buf = self.initialized
        try:
            version = buf._version
        except RuntimeError:  # inference-mode tensors have no version counter
            return bool(buf)
        seen = self._seen
        if seen is None or seen[0] is not buf or seen[1] != version:
            seen = self._seen = (buf, version, bool(buf))
        return seen[2]

    def refresh_initialized(self) -> bool:
        """Read the ``initialized`` buffer again (after writes :attr:`is_initialized` cannot see)."""
        self._seen = None
        return self.is_initialized

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        qp = qrange(self.bits, self.signed)[1]
        # float64 accumulation: the mean over W ranks' shares equals the whole batch's mean to the
        # last bit of the step, so data-parallel and single-process runs start from the same steps
        value = 2.0 * x.detach().abs().mean(dtype=torch.float64) / math.sqrt(qp)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        self.step.copy_(value.clamp_min(STEP_EPS).to(self.step.dtype))
        self.initialized.fill_(True)
        try:  # known without reading it back
            self._seen = (self.initialized, self.initialized._version, True)
        except RuntimeError:  # inference-mode tensor: no version counter
            self._seen = None

    def effective_step(self) -> torch.Tensor:
        return self.step.abs().clamp_min(STEP_EPS)

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """Quantize ``x``, or ``act(x)`` when ``act`` ("relu"/"h_swish") is given (fused)."""
        if not self.enabled:
            return activation_fn(act)(x)
        if not self.is_initialized:
            self.initialize(activation_fn(act)(x))
        numel = x.numel()
        if self.batched and dist.is_available() and dist.is_initialized():
            numel *= dist.get_world_size()
        return _lsq_positive(x, self.step, self.bits, self.signed, self.impl, act, numel)


__all__ = ["LSQQuantizer", "STEP_EPS", "grad_scale", "kernel_impl", "lsq_quantize", "lsq_reference", "qrange"]
