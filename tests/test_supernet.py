"""Supernet and extracted subnets: equal outputs, shared step sizes, signedness, naming."""

from __future__ import annotations

import random

import pytest
import torch

from oqat import build_supernet
from oqat.nn.layers import QConvBN
from oqat.quant import LSQQuantizer


def _warm_up(net, space, rng: random.Random, steps: int = 2, batch: int = 2) -> None:
    """A few training-mode forwards (and backwards) over random subnets: BN statistics move and
    every quantizer gets a data-driven step; then a small SGD step so steps differ from init."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # the largest subnet first (at the smallest resolution): every quantizer gets initialised
    first = space.largest(net.bits).replace(r=space.resolutions[0])
    archs = [first] + [space.sample(rng, bits=net.bits) for _ in range(steps - 1)]
    for arch in archs:
        net.set_arch(arch)
        x = torch.randn(batch, space.in_channels, arch.r, arch.r)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), torch.randint(space.num_classes, (batch,))).backward()
        opt.step()


def _quantized_layers(net) -> list[QConvBN]:
    return [m for m in net.modules() if isinstance(m, QConvBN) and m.act_quant is not None]


def _check_equal(net, space, archs, batch=2, tol=1e-5) -> None:
    net.eval()
    for arch in archs:
        net.set_arch(arch)
        sub = net.extract(arch).eval()
        assert (sub.arch, sub.bits, sub.space) == (arch, net.bits, space)
        x = torch.randn(batch, space.in_channels, arch.r, arch.r)
        with torch.no_grad():
            ref = net(x)
            out = sub(x)
        assert out.shape == (batch, space.num_classes)
        assert torch.isfinite(ref).all()
        diff = (out - ref).abs().max().item()
        assert diff <= tol, f"{arch}: max abs diff {diff}"


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
def test_extracted_tiny_subnets_match_supernet(tiny_space, perturb, bits):
    torch.manual_seed(bits)
    rng = random.Random(bits)
    net = build_supernet(tiny_space, bits=bits)
    _warm_up(net, tiny_space, rng)
    perturb(net, seed=bits)
    archs = [tiny_space.sample(rng, bits=bits, resolution=r) for r in (24, 28, 32) for _ in range(2)]
    archs += [tiny_space.smallest(bits), tiny_space.largest(bits).replace(r=24)]
    _check_equal(net, tiny_space, archs)
    if bits != 32:  # the quantizers really quantize: steps were initialised and moved
        steps = [q.step.item() for q in net.modules() if isinstance(q, LSQQuantizer)]
        assert all(s != 1.0 for s in steps)
        assert all(bool(q.initialized) for q in net.modules() if isinstance(q, LSQQuantizer))


@pytest.mark.parametrize("bits", [4, 2])
def test_extracted_imagenet_subnets_match_supernet(imagenet_space, perturb, bits):
    torch.manual_seed(10 + bits)
    rng = random.Random(10 + bits)
    net = build_supernet(imagenet_space, bits=bits, num_classes=10)
    space = net.space
    # warm-up at small resolutions only (the largest subnet at 224 px is slow on 2 cores); the
    # largest subnet first, so that every quantizer is initialised from data
    net.train()
    for arch in (space.largest(bits).replace(r=128), space.sample(rng, bits=bits, resolution=144)):
        net.set_arch(arch)
        net(torch.randn(2, 3, arch.r, arch.r)).sum().backward()
    assert all(bool(q.initialized) for q in net.modules() if isinstance(q, LSQQuantizer))
    perturb(net, seed=bits)
    archs = [space.sample(rng, bits=bits, resolution=r) for r in (128, 144, 160)]
    _check_equal(net, space, archs, batch=2)


def test_step_parameters_shared_and_fixed_in_number(tiny_space):
    net = build_supernet(tiny_space, bits=4)
    n_layers = 2 + 3 * tiny_space.num_blocks + 2  # first block dw+project, 3 per block, 2 head convs
    assert len(_quantized_layers(net)) == n_layers
    steps = net.step_parameters()
    assert len(steps) == 2 * n_layers
    ids = {id(p) for p in steps}
    rng = random.Random(0)
    for arch in [tiny_space.smallest(4), tiny_space.largest(4)] + [tiny_space.sample(rng, bits=4) for _ in range(5)]:
        net.set_arch(arch)
        assert {id(p) for p in net.step_parameters()} == ids
        sub = net.extract(arch)
        n_sub = 2 + 3 * sum(arch.d) + 2
        assert len(sub.step_parameters()) == 2 * n_sub
    # full precision supernets keep the same parameters and state dict keys
    fp = build_supernet(tiny_space, bits=None)
    assert fp.bits == 32
    assert len(fp.step_parameters()) == len(steps)
    assert fp.state_dict().keys() == net.state_dict().keys()


def test_backward_through_two_subnets_updates_the_same_step(tiny_space):
    torch.manual_seed(0)
    net = build_supernet(tiny_space, bits=4)
    net.train()
    a = tiny_space.smallest(4).replace(r=24)
    b = tiny_space.largest(4).replace(r=28)
    assert a.ks[0] != b.ks[0] and a.e[0] != b.e[0]
    shared = dict(net.named_parameters())
    names = ["blocks.0.depthwise.weight_quant.step", "blocks.0.expand.act_quant.step", "final_expand.weight_quant.step"]
    unused = "blocks.3.depthwise.weight_quant.step"  # slot 3 runs only when stage 0 has depth 4
    grads = {}
    for arch in (a, b):
        net.zero_grad(set_to_none=True)
        net.set_arch(arch)
        x = torch.randn(2, 3, arch.r, arch.r)
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1])).backward()
        grads[arch] = {n: shared[n].grad.clone() for n in names}
        for n in names:
            assert shared[n].grad.item() != 0, (arch, n)
        unused_grad = shared[unused].grad
        assert (unused_grad is None or unused_grad.item() == 0) == (arch.d[0] < 4)
    assert all(grads[a][n].item() != grads[b][n].item() for n in names)
    # an optimizer step moves the shared step, and both subnets' extractions carry the new value
    opt = torch.optim.SGD([shared[names[0]]], lr=0.1)
    before = shared[names[0]].item()
    opt.step()
    after = shared[names[0]].item()
    assert after != before
    for arch in (a, b):
        sub = dict(net.extract(arch).named_parameters())
        assert sub[names[0]].item() == after


def test_extract_copies_and_restores(tiny_space):
    net = build_supernet(tiny_space, bits=4)
    rng = random.Random(1)
    active = tiny_space.sample(rng, bits=4)
    other = tiny_space.sample(rng, bits=4)
    net.set_arch(active)
    sub = net.extract(other)
    assert net.arch == active and sub.arch == other
    assert net.extract().arch == active
    # nothing is shared: editing the copy leaves the supernet alone
    with torch.no_grad():
        next(iter(sub.step_parameters())).add_(1.0)
        sub.blocks[0].depthwise.weight.zero_()
    assert net.step_parameters()[0].item() == 1.0
    assert net.blocks[0].depthwise.weight.abs().sum() > 0
    # the extracted net has exactly the active kernels and widths
    for block, slot in zip(sub.blocks, tiny_space.active_blocks(other)):
        assert block.depthwise.weight.shape[-1] == other.ks[slot]
        assert block.depthwise.weight.shape[0] == tiny_space.hidden_channels(block.in_channels, other.e[slot])
    assert len(sub.blocks) == sum(other.d)


def test_set_arch_rejects_other_bits_and_invalid_arch(tiny_space, imagenet_space):
    net = build_supernet(tiny_space, bits=4)
    with pytest.raises(ValueError, match="bits: arch has 2"):
        net.set_arch(tiny_space.largest(2))
    with pytest.raises(ValueError, match="bits: arch has 32"):
        net.set_arch(tiny_space.largest(None))
    arch = tiny_space.largest(4)
    with pytest.raises(ValueError, match=r"ks\[0\]: 4"):
        net.set_arch(arch.replace(ks=(4,) + arch.ks[1:]))
    with pytest.raises(ValueError, match="r: 224"):
        net.set_arch(imagenet_space.largest(4))
    with pytest.raises(ValueError, match=r"d: expected 5"):
        net.extract(arch.replace(d=(2, 2)))
    assert net.arch == tiny_space.largest(4)  # failed calls leave the active subnet alone
    with pytest.raises(ValueError, match="bits"):
        build_supernet(tiny_space, bits=9)


def test_activation_signedness(tiny_space):
    default = build_supernet(tiny_space, bits=4)
    m = dict(default.named_modules())
    assert [s.act for s in tiny_space.stages][:3] == ["relu", "relu", "h_swish"]
    # block input = linear bottleneck output: signed
    assert m["blocks.0.expand.act_quant"].signed is True
    # relu stage: depthwise and project inputs come after ReLU
    assert m["blocks.0.depthwise.act_quant"].signed is False
    assert m["blocks.0.project.act_quant"].signed is False
    assert m["blocks.5.depthwise.act_quant"].signed is False
    # h_swish stage (slot 8 is stage 2): h_swish outputs are quantized unsigned (the -0.375 lobe is
    # clipped, as in OQA), only linear outputs get a signed grid
    assert m["blocks.8.depthwise.act_quant"].signed is False
    assert m["blocks.8.project.act_quant"].signed is False
    assert m["blocks.8.expand.act_quant"].signed is True
    # first block's depthwise input is the h_swish stem; final_expand's is the last block's linear
    # output; feature_mix's the pooled h_swish output of final_expand
    assert m["first_block.depthwise.act_quant"].signed is False
    assert m["final_expand.act_quant"].signed is True
    assert m["feature_mix.act_quant"].signed is False
    quantizers = {n: q for n, q in default.named_modules() if isinstance(q, LSQQuantizer)}
    assert all(q.signed for n, q in quantizers.items() if n.endswith("weight_quant"))
    # OQA compatibility: every activation quantizer unsigned, weights still signed
    oqa = build_supernet(tiny_space, bits=4, unsigned_activations=True)
    for name, q in oqa.named_modules():
        if isinstance(q, LSQQuantizer):
            assert q.signed is name.endswith("weight_quant"), name
    sub = oqa.extract(tiny_space.sample(random.Random(0), bits=4))
    assert sub.unsigned_activations
    assert not any(q.signed for n, q in sub.named_modules() if n.endswith("act_quant"))
    # the OQA switch really clips negative inputs to zero: quantized outputs of a negative
    # block input differ between the two nets once both have the same step
    x = -torch.rand(1, 16, 8, 8) - 0.1
    q_signed, q_unsigned = m["blocks.0.expand.act_quant"], dict(oqa.named_modules())["blocks.0.expand.act_quant"]
    with torch.no_grad():
        q_signed.initialized.fill_(True)
        q_unsigned.initialized.fill_(True)
        q_signed.step.fill_(0.1)
        q_unsigned.step.fill_(0.1)
        assert torch.all(q_unsigned(x) == 0) and torch.all(q_signed(x) < 0)


def test_step_names_in_state_dict(tiny_space):
    net = build_supernet(tiny_space, bits=4)
    keys = list(net.state_dict())
    step_keys = [k for k in keys if k.endswith(".step")]
    quantizer_names = [n for n, q in net.named_modules() if isinstance(q, LSQQuantizer)]
    assert step_keys == [f"{n}.step" for n in quantizer_names]
    assert len(step_keys) == len(net.step_parameters())
    assert "blocks.3.depthwise.weight_quant.step" in step_keys
    assert "blocks.3.depthwise.act_quant.step" in step_keys
    # nothing else ends in "step" (kernel transforms, BN buffers, ...)
    assert not [k for k in keys if k.endswith("step") and not k.endswith(".step")]
    params = dict(net.named_parameters())
    assert all(params[k].dim() == 0 for k in step_keys)
    sub = net.extract(tiny_space.smallest(4))
    assert all(k in keys for k in sub.state_dict() if k.endswith(".step") and not k.startswith("blocks."))


def test_supernet_from_preset_name_and_overrides():
    net = build_supernet("mbv3-tiny", bits=3, num_classes=7, in_channels=1)
    assert net.space.num_classes == 7 and net.space.in_channels == 1 and net.bits == 3
    assert net.arch == net.space.largest(3)
    net.eval()
    net.set_arch(net.space.smallest(3))
    with torch.no_grad():
        assert net(torch.randn(2, 1, 24, 24)).shape == (2, 7)


@pytest.mark.parametrize("bits", [4, 32])
def test_block_fuses_activations_without_changing_results(tiny_space, perturb, bits):
    """MBConvBlock hands the expand (and, without SE, the depthwise) activation to the next
    layer's quantizer; layer-by-layer evaluation with the activations in place must agree."""
    torch.manual_seed(3)
    net = build_supernet(tiny_space, bits=bits)
    _warm_up(net, tiny_space, random.Random(3))
    perturb(net, seed=3)
    names = {"blocks.1": False, "blocks.5": True}  # stage 0 has no SE, stage 1 has SE
    for name, has_se in names.items():
        block = dict(net.named_modules())[name]
        assert (block.se is not None) == has_se
        block.set_active(block.depthwise.out_channels // 2, 5)
        for mode in ("eval", "train"):
            block.train(mode == "train")
            x = torch.randn(2, block.in_channels, 12, 12)
            outs, grads = [], []
            for fused in (True, False):
                xi = x.clone().requires_grad_(True)
                if fused:
                    y = block(xi)
                else:
                    y = block.expand(xi, out_channels=block.active_hidden)
                    y = block.depthwise(y, kernel_size=block.active_kernel)
                    y = block.se(y) if block.se is not None else y
                    y = block.project(y)
                    y = xi + y if block.residual else y
                net.zero_grad(set_to_none=True)
                y.pow(2).sum().backward()
                outs.append(y.detach())
                grads.append([xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None])
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
            assert len(grads[0]) == len(grads[1]) > 5
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
