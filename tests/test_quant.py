"""LSQ fake quantization: lsq_quantize against the plain-autograd reference, the gradient scale,
and the LSQQuantizer module (data-driven init, positive steps, identity at full precision)."""

from __future__ import annotations

import math

import pytest
import torch

from oqat.quant import STEP_EPS, LSQQuantizer, grad_scale, lsq_quantize, lsq_reference, qrange
from oqat.quant import native as _lsq_cpu
from oqat.quant.kernels import compiled_kernels as _compiled_kernels

# every implementation lsq_quantize can use; those this machine lacks are skipped
IMPLS = [
    "eager",
    pytest.param("native", marks=pytest.mark.skipif(_lsq_cpu.library() is None, reason="no C compiler")),
    pytest.param("compiled", marks=pytest.mark.skipif(_compiled_kernels() is None, reason="no torch.compile")),
    "auto",
]


def _run(fn, x, step, bits, signed, upstream, **kwargs):
    x = x.clone().requires_grad_(True)
    step = step.clone().requires_grad_(True)
    out = fn(x, step, bits, signed, **kwargs)
    out.backward(upstream)
    return out.detach(), x.grad, step.grad


def _step_tol(up: torch.Tensor, bits: int, signed: bool) -> float:
    """Absolute tolerance for a step gradient: float32 sums in different orders differ by about
    eps * sum|terms|, and every term is at most |upstream| * max(|Qn|, Qp) before scaling."""
    qn, qp = qrange(bits, signed)
    return 1e-6 * up.abs().sum().item() * max(-qn, qp) * grad_scale(up.numel(), bits, signed)


def _edge_inputs(bits: int, signed: bool, s: float, g: torch.Generator) -> torch.Tensor:
    """Grid points, ties (k+0.5)s, values beyond both bounds, the exact bounds and noise."""
    qn, qp = qrange(bits, signed)
    ks = torch.arange(qn, qp + 1, dtype=torch.float32)
    parts = [
        ks * s,                                        # exact grid points (bounds included)
        (ks[:-1] + 0.5) * s,                           # ties: round half to even
        torch.tensor([qn - 0.5, qn - 1.0, qn - 7.25, qp + 0.5, qp + 1.0, qp + 9.0]) * s,
        torch.tensor([qn, qp], dtype=torch.float32) * s,
        (qn - 2 + (qp - qn + 4) * torch.rand(200, generator=g)) * s,
    ]
    if not signed:
        parts.append(-torch.rand(20, generator=g) * s * 3)  # negative values, below Qn = 0
    return torch.cat(parts).reshape(1, -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference_on_edge_cases(bits, signed, impl):
    g = torch.Generator().manual_seed(bits * 2 + signed)
    s = 0.25  # a power of two: x/s is exact, so ties are exact ties
    x = _edge_inputs(bits, signed, s, g)
    upstream = torch.randn(x.shape, generator=g)
    out, gx, gs = _run(lsq_quantize, x, torch.tensor(s), bits, signed, upstream, impl=impl)
    ref_out, ref_gx, ref_gs = _run(lsq_reference, x, torch.tensor(s), bits, signed, upstream)
    assert torch.equal(out, ref_out)
    assert torch.equal(gx, ref_gx)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=_step_tol(upstream, bits, signed))
    # the output lies on the grid, inside [Qn s, Qp s]
    qn, qp = qrange(bits, signed)
    levels = out / s
    assert torch.equal(levels, levels.round())
    assert levels.min().item() == qn and levels.max().item() == qp
    # ties round half to even; grid points strictly inside pass gradient (LSQ eq. 5), the bounds
    # themselves and everything beyond them pass nothing
    n = qp - qn + 1
    ties = levels[0, n:2 * n - 1]
    assert torch.all(ties.remainder(2) == 0)
    assert torch.equal(gx[0, 1:n - 1], upstream[0, 1:n - 1])
    assert gx[0, 0].item() == 0 and gx[0, n - 1].item() == 0
    beyond = slice(2 * n - 1, 2 * n + 5)
    assert torch.all(gx[0, beyond] == 0)
    assert torch.all(gx[0, 2 * n + 5:2 * n + 7] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_reference_on_random_tensors(bits, signed, impl):
    g = torch.Generator().manual_seed(100 + bits)
    x = torch.randn(8, 6, 5, 5, generator=g) * 2
    step = torch.tensor(0.37)
    up = torch.randn(x.shape, generator=g)
    out, gx, gs = _run(lsq_quantize, x, step, bits, signed, up, impl=impl)
    ref_out, ref_gx, ref_gs = _run(lsq_reference, x, step, bits, signed, up)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-6, atol=0)  # the reference computes g*s/s
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=_step_tol(up, bits, signed))
    assert out.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input_and_grad(impl):
    """Weight slices (w[:c_out, :c_in]) are not contiguous; the result must not care."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 12, 3, 3, generator=g)
    step = torch.tensor(0.2)
    for view in (w[:10, :7], w.transpose(0, 1), w[:, :, 1:, :2]):
        up = torch.randn(view.shape, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2)
        out, gx, gs = _run(lsq_quantize, view, step, 4, True, up, impl=impl)
        ref = _run(lsq_reference, view.contiguous(), step, 4, True, up.contiguous())
        torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, ref[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(gs, ref[2], rtol=1e-5, atol=_step_tol(up, 4, True))


@pytest.mark.parametrize("impl", IMPLS)
def test_step_gradient_by_hand(impl):
    # bits 2 signed: grid -2..1; s = 0.5; N = 4; g = 1/sqrt(4*1) = 0.5
    x = torch.tensor([0.3, -0.6, 2.0, -5.0])
    # v = x/s = [0.6, -1.2, 4, -10]; round(clip(v)) = [1, -1, 1, -2]
    out, gx, gs = _run(lsq_quantize, x, torch.tensor(0.5), 2, True, torch.ones(4), impl=impl)
    assert out.tolist() == [0.5, -0.5, 0.5, -1.0]
    assert gx.tolist() == [1.0, 1.0, 0.0, 0.0]
    # d out/ds: inside round(v)-v = [0.4, 0.2], clipped high Qp = 1, clipped low Qn = -2
    assert gs.item() == pytest.approx((0.4 + 0.2 + 1 - 2) * 0.5, abs=1e-6)
    assert grad_scale(4, 2, True) == 0.5
    # unsigned 3 bits: grid 0..7, g = 1/sqrt(N*7); weight the upstream gradient
    x = torch.tensor([[0.26, 1.0], [-0.3, 9.0]])
    up = torch.tensor([[2.0, 1.0], [3.0, -1.0]])
    out, gx, gs = _run(lsq_quantize, x, torch.tensor(1.0), 3, False, up, impl=impl)
    assert out.tolist() == [[0.0, 1.0], [0.0, 7.0]]
    assert gx.tolist() == [[2.0, 1.0], [0.0, 0.0]]
    expected = (2.0 * (0 - 0.26) + 1.0 * 0.0 + 3.0 * 0 + -1.0 * 7) / math.sqrt(4 * 7)
    assert gs.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_scale_follows_numel(impl):
    """Repeating a tensor k times multiplies the raw step gradient by k and the scale by
    1/sqrt(k): the step gradient grows by sqrt(k)."""
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    _, _, g1 = _run(lsq_quantize, x, torch.tensor(0.3), 4, True, torch.ones_like(x), impl=impl)
    x4 = x.repeat(4, 1)
    _, _, g4 = _run(lsq_quantize, x4, torch.tensor(0.3), 4, True, torch.ones_like(x4), impl=impl)
    assert g4.item() == pytest.approx(2.0 * g1.item(), rel=1e-5)
    # an explicit factor replaces the default one
    _, _, g_unit = _run(lsq_quantize, x, torch.tensor(0.3), 4, True, torch.ones_like(x),
                        grad_scale_factor=1.0, impl=impl)
    assert g_unit.item() == pytest.approx(g1.item() * math.sqrt(x.numel() * 7), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bounds_pass_no_gradient_to_x(impl):
    """LSQ eq. 5: the STE is 1 strictly inside Qn < v < Qp; exactly at a bound x gets nothing and
    d out/ds is the clipped value (Qn or Qp), not round(v) - v = 0."""
    # bits 2 signed: grid -2..1; s = 0.5; N = 4; g = 1/sqrt(4*1) = 0.5; v = [-2, 1, 0.6, -1]
    x = torch.tensor([-1.0, 0.5, 0.3, -0.5])
    up = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out, gx, gs = _run(lsq_quantize, x, torch.tensor(0.5), 2, True, up, impl=impl)
    assert out.tolist() == [-1.0, 0.5, 0.5, -0.5]
    assert gx.tolist() == [0.0, 0.0, 3.0, 4.0]
    # d out/ds: bounds Qn = -2 and Qp = 1, inside round(v) - v = [0.4, 0]
    assert gs.item() == pytest.approx((1.0 * -2 + 2.0 * 1 + 3.0 * 0.4 + 4.0 * 0.0) * 0.5, abs=1e-6)
    # unsigned: a zero input sits on Qn = 0 (what ReLU outputs are) and passes nothing either
    x = torch.tensor([0.0, 0.25, 3.5, 1.0])
    _, gx, gs = _run(lsq_quantize, x, torch.tensor(0.25), 4, False, torch.ones(4), impl=impl)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert gs.item() == pytest.approx(0.0, abs=1e-7)  # Qn = 0, then round(v) - v = 0 for v = 1, 14, 4


def _oqa_quantize(v: torch.Tensor, s: torch.Tensor, bits: int, activation: bool) -> torch.Tensor:
    """OQA's published LSQ (elastic_nn/modules/lsq_conv.py), written from its formula: the step's
    gradient scaled by 1/sqrt(N Qp), v/|s| clipped by hardtanh (no gradient at or beyond the
    bounds), straight-through round, times |s|; activations unsigned, weights signed."""
    qn, qp = (0, 2 ** bits - 1) if activation else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    g = 1.0 / math.sqrt(v.numel() * qp)
    s = (s - s * g).detach() + s * g
    t = torch.nn.functional.hardtanh(v / s.abs(), qn, qp)
    return ((t.round() - t).detach() + t) * s.abs()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", [True, False])
def test_matches_oqa_formula_with_a_step_of_shape_one(activation, impl):
    """OQA and lsq-net store a step of shape (1,): lsq_quantize takes it and returns a gradient of
    that shape, equal to OQA's on grid points, ties, both bounds and noise."""
    bits, s = 3, 0.25
    g = torch.Generator().manual_seed(21 + activation)
    x = _edge_inputs(bits, not activation, s, g)
    up = torch.randn(x.shape, generator=g)
    step = torch.tensor([s])
    out, gx, gs = _run(lsq_quantize, x, step, bits, not activation, up, impl=impl)
    ref_out, ref_gx, ref_gs = _run(lambda v, st, b, sg: _oqa_quantize(v, st, b, activation), x, step, bits,
                                   not activation, up)
    assert gs.shape == (1,) and out.shape == x.shape
    assert torch.equal(out, ref_out)
    assert torch.equal(gx, ref_gx)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=_step_tol(up, bits, not activation))
    # the same numbers as with a 0-dim step
    out0, gx0, gs0 = _run(lsq_quantize, x, torch.tensor(s), bits, not activation, up, impl=impl)
    assert torch.equal(out, out0) and torch.equal(gx, gx0) and gs0.shape == ()
    assert gs.item() == pytest.approx(gs0.item(), rel=1e-6, abs=1e-9)


def test_step_must_have_one_element():
    with pytest.raises(ValueError, match=r"step: expected a tensor of one element.*\(2,\)"):
        lsq_quantize(torch.randn(4), torch.tensor([0.1, 0.2]), 4, True)
    assert LSQQuantizer(4, signed=True).step.shape == ()  # the module keeps its 0-dim step


def test_bad_arguments():
    x, s = torch.randn(4), torch.tensor(0.1)
    for bits in (1, 17):
        with pytest.raises(ValueError, match=f"bits: {bits}"):
            lsq_quantize(x, s, bits, True)
    with pytest.raises(ValueError, match="impl: 'fast' is not one of"):
        lsq_quantize(x, s, 4, True, impl="fast")


def test_qrange_and_grad_scale():
    assert qrange(2, True) == (-2, 1)
    assert qrange(2, False) == (0, 3)
    assert qrange(3, True) == (-4, 3)
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, False) == (0, 15)
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert grad_scale(100, 4, False) == pytest.approx(1 / math.sqrt(1500))


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_initialises_on_first_forward(bits, signed):
    q = LSQQuantizer(bits, signed=signed, impl="eager")
    assert not bool(q.initialized)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(bits)) * 3
    out = q(x)
    qp = qrange(bits, signed)[1]
    expected = 2 * x.abs().mean().item() / math.sqrt(qp)
    assert q.step.item() == pytest.approx(expected, rel=1e-6)
    assert bool(q.initialized)
    assert torch.equal(out, lsq_quantize(x, q.step.detach().clone(), bits, signed, impl="eager"))
    # later batches do not re-initialise; the state dict carries the flag
    q(x * 10)
    assert q.step.item() == pytest.approx(expected, rel=1e-6)
    assert set(q.state_dict()) == {"step", "initialized"}
    fresh = LSQQuantizer(bits, signed=signed)
    fresh.load_state_dict(q.state_dict())
    fresh(x * 10)
    assert fresh.step.item() == q.step.item()


def test_quantizer_step_stays_positive():
    q = LSQQuantizer(4, signed=True, impl="eager")
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    q(x)
    with torch.no_grad():
        q.step.fill_(-0.3)
    assert q.effective_step().item() == pytest.approx(0.3)
    assert torch.equal(q(x), lsq_quantize(x, torch.tensor(0.3), 4, True, impl="eager"))
    with torch.no_grad():
        q.step.zero_()
    assert q.effective_step().item() == pytest.approx(STEP_EPS) and STEP_EPS > 0
    assert torch.isfinite(q(x)).all()
    # an all-zero first batch still gives a positive step
    z = LSQQuantizer(4, signed=False)
    z(torch.zeros(10))
    assert z.step.item() > 0


def test_quantizer_step_gets_gradient():
    q = LSQQuantizer(3, signed=False, impl="eager")
    x = torch.rand(50, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    q(x).pow(2).sum().backward()
    assert q.step.grad is not None and q.step.grad.item() != 0
    assert x.grad is not None


@pytest.mark.parametrize("bits", [None, 32])
def test_full_precision_quantizer_is_identity(bits):
    q = LSQQuantizer(bits, signed=True)
    assert q.bits == 32 and not q.enabled
    x = torch.randn(5, 5)
    assert q(x) is x
    assert not bool(q.initialized) and q.step.item() == 1.0
    assert set(q.state_dict()) == {"step", "initialized"}


def test_quantizer_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits: 9"):
        LSQQuantizer(9, signed=True)


# ----------------------------------------------------------------------------- fused activation
ACTS = {"relu": torch.relu, "h_swish": torch.nn.functional.hardswish}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["relu", "h_swish"])
@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (4, False), (8, True)])
def test_fused_activation_matches_activation_then_reference(bits, signed, act, impl):
    g = torch.Generator().manual_seed(bits * 10 + signed)
    s = 0.25
    # pre-activations around h_swish's kinks (-3, 0, 3), exactly on them, and wide noise
    z = torch.cat([torch.tensor([-3.0, 0.0, 3.0, -3.25, 2.75, -0.5]), 4 * torch.randn(600, generator=g)])
    z = z.reshape(2, 3, -1)
    up = torch.randn(z.shape, generator=g)
    out, gz, gs = _run(lsq_quantize, z, torch.tensor(s), bits, signed, up, impl=impl, act=act)
    ref_out, ref_gz, ref_gs = _run(lambda x, st, b, sg: lsq_reference(ACTS[act](x), st, b, sg),
                                   z, torch.tensor(s), bits, signed, up)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(gz, ref_gz, rtol=1e-6, atol=0)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=_step_tol(up, bits, signed))
    assert gz.abs().sum() > 0


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="act: 'gelu'"):
        lsq_quantize(torch.randn(3), torch.tensor(0.1), 4, True, act="gelu")


@pytest.mark.parametrize("act", ["relu", "h_swish"])
def test_quantizer_with_fused_activation(act):
    z = torch.randn(40, 30, generator=torch.Generator().manual_seed(5)) * 2
    q = LSQQuantizer(4, signed=act == "h_swish", impl="eager")
    out = q(z, act=act)
    a = ACTS[act](z)
    # initialised from the activation's output, not from the pre-activation
    qp = qrange(4, q.signed)[1]
    assert q.step.item() == pytest.approx(2 * a.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    assert torch.equal(out, q(a))
    # at full precision the quantizer is the activation itself
    fp = LSQQuantizer(None, signed=True)
    assert torch.equal(fp(z, act=act), a)


def test_auto_picks_native_kernels_for_cpu_float32_and_falls_back_otherwise():
    from oqat.quant.lsq import _native

    x = torch.randn(10)
    if _lsq_cpu.library() is not None:
        assert _native("auto", x) is _lsq_cpu.library()
    assert _native("eager", x) is None and _native("compiled", x) is None
    assert _native("auto", x.double()) is None
    with pytest.raises(RuntimeError, match="native LSQ kernels are unavailable.*float64"):
        lsq_quantize(x.double(), torch.tensor(0.1), 4, True, impl="native")
    # float64 goes through the other kernels and still matches the reference
    x64 = torch.randn(3, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    up = torch.randn(x64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    out, gx, gs = _run(lsq_quantize, x64, torch.tensor(0.3, dtype=torch.float64), 4, True, up)
    ref = _run(lsq_reference, x64, torch.tensor(0.3, dtype=torch.float64), 4, True, up)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(gx, ref[1])
    torch.testing.assert_close(gs, ref[2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("raw", [0.3, -0.3, 0.0])
def test_quantizer_step_gradient_through_abs(impl, raw):
    """The module quantizes with max(|step|, eps); its gradient is that of the plain formula
    (sign(step) times the LSQ gradient, 0 when the step is clamped)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 50, generator=g)
    up = torch.randn(x.shape, generator=g)
    q = LSQQuantizer(3, signed=True, impl=impl)
    q(x)  # initialise
    with torch.no_grad():
        q.step.fill_(raw)
    xa = x.clone().requires_grad_(True)
    q(xa).backward(up)
    step = torch.tensor(raw, requires_grad=True)
    xb = x.clone().requires_grad_(True)
    lsq_quantize(xb, step.abs().clamp_min(STEP_EPS), 3, True, impl="eager").backward(up)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.step.grad, step.grad, rtol=1e-5, atol=_step_tol(up, 3, True))
    if raw != 0.0:
        assert q.step.grad.item() != 0
        assert torch.sign(q.step.grad) == torch.sign(step.grad)
    else:
        assert q.step.grad.item() == 0


def test_quantizer_rejects_bad_impl_and_act():
    with pytest.raises(ValueError, match="impl: 'gpu'"):
        LSQQuantizer(4, signed=True, impl="gpu")
    q = LSQQuantizer(4, signed=True)
    with pytest.raises(ValueError, match="act: 'gelu'"):
        q(torch.randn(4), act="gelu")


def test_float32_quantizer_inside_a_float64_graph():
    """Autograd casts the float64 gradient back to float32 before it reaches the Function."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(11)).requires_grad_(True)
    s = torch.tensor(0.2, requires_grad=True)
    lsq_quantize(x, s, 4, True).double().pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    sr = torch.tensor(0.2, requires_grad=True)
    lsq_reference(xr, sr, 4, True).double().pow(2).sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(s.grad, sr.grad)
