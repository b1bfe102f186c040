"""Mixed precision keeps the LSQ grid: under autocast (here the CPU's, bf16) the convs run in
bf16 while the quantizers compute in float32, so a quantized tensor equals the float32
quantizer's output on the same input, as in the float32 export."""

from __future__ import annotations

import pytest
import torch

from oqat.models import build_supernet
from oqat.quant import IMPLS, LSQQuantizer, lsq_quantize
from oqat.quant.kernels import compiled_kernels
from oqat.training import TrainConfig, step_archs
from oqat.training.step import StepOptions, train_step

IMPLS_HERE = [pytest.param(i, marks=pytest.mark.skipif(i == "compiled" and compiled_kernels() is None,
                                                       reason="no torch.compile")) for i in IMPLS if i != "native"]
STEP = 0.0123457  # not a bf16 number: a grid on bf16(STEP) differs


def _bf16_input(seed: int = 0, n: int = 4000) -> torch.Tensor:
    """bf16 values as an autocast conv produces them, spread over a few grid steps."""
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.08).bfloat16()


@pytest.mark.parametrize("impl", IMPLS_HERE)
@pytest.mark.parametrize("act", [None, "relu", "h_swish"])
@pytest.mark.parametrize("bits,signed", [(4, True), (2, False), (8, True)])
def test_quantized_values_under_autocast_equal_float32(impl, act, bits, signed):
    xb = _bf16_input()
    up = torch.randn(xb.shape, generator=torch.Generator().manual_seed(1))
    x32 = xb.float().requires_grad_(True)
    s32 = torch.tensor(STEP, requires_grad=True)
    ref = lsq_quantize(x32, s32, bits, signed, impl=impl, act=act)
    ref.backward(up)
    xa = xb.clone().requires_grad_(True)
    sa = torch.tensor(STEP, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lsq_quantize(xa, sa, bits, signed, impl=impl, act=act)
        assert out.dtype == torch.float32
        out.backward(up)  # a CPU backward runs in the caller's autocast state
    assert torch.equal(out, ref)
    assert sa.grad.dtype == torch.float32 and torch.equal(sa.grad, s32.grad)
    assert xa.grad.dtype == torch.bfloat16 and torch.equal(xa.grad, x32.grad.bfloat16())


def test_the_bf16_grid_would_differ():
    """What the test above rules out: quantizing on the step cast to bf16 moves many values."""
    x = _bf16_input().float()
    s = torch.tensor(STEP)
    on_bf16_step = torch.clamp(x / s.bfloat16().float(), -8, 7).round() * s.bfloat16().float()
    exact = lsq_quantize(x, s, 4, True, impl="eager")
    assert (on_bf16_step != exact).float().mean() > 0.5


def test_auto_impl_uses_the_native_float32_kernels_under_autocast():
    from oqat.quant import native

    if native.library() is None:
        pytest.skip("no native kernels here")
    xb = _bf16_input(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lsq_quantize(xb, torch.tensor(STEP), 4, True, impl="auto")
    assert torch.equal(out, lsq_quantize(xb.float(), torch.tensor(STEP), 4, True, impl="native"))


def test_every_quantizer_of_a_supernet_keeps_the_float32_grid_under_autocast(tiny_space):
    net = build_supernet(tiny_space, bits=4, impl="eager")
    net.set_arch(tiny_space.largest(4))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    net(x)  # initialise the steps in float32
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, kw, o: seen.append((m, a[0].detach(), kw.get("act"), o.detach())),
                                     with_kwargs=True)
             for m in net.modules() if isinstance(m, LSQQuantizer)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    for h in hooks:
        h.remove()
    assert logits.dtype == torch.bfloat16  # the convs did run in bf16
    assert any(i.dtype == torch.bfloat16 for _, i, _, _ in seen)  # activations arrive in bf16
    assert any(act is not None for _, _, act, _ in seen)           # some with a fused activation
    for q, inp, act, out in seen:
        assert out.dtype == torch.float32
        assert torch.equal(out, q(inp.float(), act=act))  # the float32 quantizer, outside autocast


def test_a_bf16_training_step_gives_float32_gradients(tiny_space):
    torch.manual_seed(0)
    net = build_supernet(tiny_space, bits=4)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    cfg = TrainConfig(num_random=1)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    opts = StepOptions(amp_dtype=torch.bfloat16)
    losses = train_step(net, opt, None, params, x, y, step_archs(tiny_space, 4, cfg, 0), opts)
    assert losses.dtype == torch.float32 and bool(torch.isfinite(losses).all())
    steps = net.step_parameters()
    assert all(p.dtype == torch.float32 for p in params)
    assert all(s.grad is not None and s.grad.dtype == torch.float32 for s in steps)
    assert StepOptions.from_config(TrainConfig(amp=True), torch.device("cpu")).amp_dtype is None  # CUDA only
    assert StepOptions.from_config(TrainConfig(amp=True), torch.device("cuda")).amp_dtype == torch.bfloat16
