"""Analytic cost model: OFA/OQA reference values, agreement with FlopCounterMode and parameter
counts of extracted subnets, BitOPs / OQA-FLOPs / size conventions."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oqat import build_supernet
from oqat.space import QUANT_BITS, cost

FP_LAYERS = ("stem", "classifier")  # plus every SE conv


def _is_fp(name: str) -> bool:
    return name in FP_LAYERS or ".se." in name


# ----------------------------------------------------------------------------- reference values
def test_ofa_reference_macs(imagenet_space):
    assert round(cost.macs(imagenet_space, imagenet_space.largest(4)) / 1e6, 1) == 566.2
    assert imagenet_space.largest().r == 224
    assert round(cost.macs(imagenet_space, imagenet_space.smallest(4)) / 1e6, 1) == 41.5
    assert imagenet_space.smallest().r == 128


def test_oqa_readme_subnet(imagenet_space, oqa_arch):
    assert oqa_arch.bits == 4
    assert round(cost.macs(imagenet_space, oqa_arch) / 1e6, 3) == 55.385
    assert round(cost.params(imagenet_space, oqa_arch) / 1e6, 3) == 4.230
    assert round(cost.oqa_flops(imagenet_space, oqa_arch) / 1e6, 3) == 16.638
    summary = cost.summary(imagenet_space, oqa_arch)
    assert summary["macs"] == cost.macs(imagenet_space, oqa_arch)
    assert summary["oqa_flops"] == cost.oqa_flops(imagenet_space, oqa_arch)
    assert (summary["bits"], summary["resolution"]) == (4, 128)


def test_hand_computed_layers(imagenet_space):
    arch = imagenet_space.largest(4)
    by_name = {layer.name: layer for layer in cost.layers(imagenet_space, arch)}
    # stem: 3 -> 16, 3x3, stride 2: 112x112 outputs
    assert by_name["stem"].macs == 3 * 16 * 9 * 112 * 112
    assert by_name["first_block.depthwise"].macs == 16 * 9 * 112 * 112
    assert by_name["first_block.project"].macs == 16 * 16 * 112 * 112
    # block 0: 16 -> 96 (e=6) at 112 px, depthwise 7x7 stride 2 -> 56 px, project 96 -> 24
    assert by_name["blocks.0.expand"].macs == 16 * 96 * 112 * 112
    assert by_name["blocks.0.depthwise"].macs == 96 * 49 * 56 * 56
    assert by_name["blocks.0.project"].macs == 96 * 24 * 56 * 56
    # stage 2 has SE: block 4 hidden 24*6=144, SE mid make_divisible(36)=40, at one pixel
    assert by_name["blocks.4.se.reduce"].macs == 144 * 40
    assert by_name["blocks.4.se.expand"].macs == 40 * 144
    assert by_name["blocks.4.se.reduce"].other_params == 40  # bias only, no BN
    # head: 160 -> 960 at 7x7, 960 -> 1280 at 1x1, 1280 -> 1000
    assert by_name["final_expand"].macs == 160 * 960 * 7 * 7
    assert by_name["feature_mix"].macs == 960 * 1280
    assert by_name["classifier"].macs == 1280 * 1000
    assert by_name["classifier"].other_params == 1000
    for layer in by_name.values():
        assert layer.quantized == (not _is_fp(layer.name)), layer.name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitops_and_oqa_flops_by_hand(tiny_space, bits):
    arch = tiny_space.sample(random.Random(bits), bits=bits)
    layers = cost.layers(tiny_space, arch)
    q_macs = sum(layer.macs for layer in layers if not _is_fp(layer.name))
    fp_macs = sum(layer.macs for layer in layers if _is_fp(layer.name))
    assert q_macs > 0 and fp_macs > 0
    assert q_macs + fp_macs == cost.macs(tiny_space, arch)
    assert cost.bitops(tiny_space, arch) == q_macs * bits * bits + fp_macs * 32 * 32
    assert cost.oqa_flops(tiny_space, arch) == pytest.approx(q_macs * bits * bits / 64 + fp_macs)
    q_w = sum(layer.weight_params for layer in layers if not _is_fp(layer.name))
    other = sum(layer.weight_params for layer in layers if _is_fp(layer.name)) + sum(
        layer.other_params for layer in layers)
    assert cost.size_bits(tiny_space, arch) == q_w * bits + other * 32


def test_full_precision_costs(imagenet_space, oqa_arch):
    fp = oqa_arch.replace(bits=None)
    assert fp.bits == 32
    macs = cost.macs(imagenet_space, fp)
    assert macs == cost.macs(imagenet_space, oqa_arch)  # MACs do not depend on bits
    assert cost.bitops(imagenet_space, fp) == 1024 * macs
    assert cost.oqa_flops(imagenet_space, fp) == macs
    assert cost.size_bits(imagenet_space, fp) == 32 * cost.params(imagenet_space, fp)


def test_size_and_bitops_grow_with_bits(imagenet_space, oqa_arch):
    sizes = [cost.size_bits(imagenet_space, oqa_arch.replace(bits=b)) for b in QUANT_BITS + (32,)]
    bitops = [cost.bitops(imagenet_space, oqa_arch.replace(bits=b)) for b in QUANT_BITS + (32,)]
    assert sizes == sorted(set(sizes))
    assert bitops == sorted(set(bitops))
    params = {cost.params(imagenet_space, oqa_arch.replace(bits=b)) for b in QUANT_BITS + (32,)}
    assert len(params) == 1


def test_costs_scale_with_resolution_and_size(imagenet_space, oqa_arch):
    macs = [cost.macs(imagenet_space, oqa_arch.replace(r=r)) for r in imagenet_space.resolutions]
    assert macs == sorted(set(macs))
    assert {cost.params(imagenet_space, oqa_arch.replace(r=r)) for r in (128, 224)} == {
        cost.params(imagenet_space, oqa_arch)}
    rng = random.Random(0)
    big, small = imagenet_space.largest(4), imagenet_space.smallest(4)
    for _ in range(20):
        a = imagenet_space.sample(rng, bits=4)
        for f in (cost.macs, cost.params, cost.bitops, cost.size_bits):
            lo, hi = f(imagenet_space, small.replace(r=a.r)), f(imagenet_space, big.replace(r=a.r))
            assert lo <= f(imagenet_space, a) <= hi


def test_unused_slots_do_not_cost(imagenet_space, oqa_arch):
    canon = imagenet_space.canonical(oqa_arch)
    assert canon != oqa_arch
    assert cost.summary(imagenet_space, canon) == cost.summary(imagenet_space, oqa_arch)


def test_invalid_arch_is_rejected(imagenet_space, oqa_arch):
    with pytest.raises(ValueError, match="r: 130"):
        cost.macs(imagenet_space, oqa_arch.replace(r=130))


# ----------------------------------------------------------------------------- vs. the network
def _measured(sub: torch.nn.Module, r: int, in_channels: int) -> tuple[int, int]:
    sub.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sub(torch.randn(1, in_channels, r, r))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    n_params = sum(p.numel() for name, p in sub.named_parameters()
                   if not name.endswith(".step") and "kernel_transforms" not in name)
    return flops // 2, n_params


CASES = [("mbv3-tiny", 4, None, 6), ("mbv3-tiny", 32, None, 4), ("mbv3-tiny", 2, None, 2),
         ("mbv3-imagenet", 4, (128, 132, 136), 5), ("mbv3-imagenet", 32, (128,), 3)]


@pytest.mark.parametrize("space_name,bits,resolutions,count", CASES)
def test_analytic_costs_match_extracted_network(space_name, bits, resolutions, count):
    from oqat import SearchSpace

    space = SearchSpace.preset(space_name)
    net = build_supernet(space, bits=bits)
    rng = random.Random(f"{space_name}-{bits}")
    archs = [space.sample(rng, bits=bits, resolution=rng.choice(resolutions) if resolutions else None)
             for _ in range(count - 1)] + [space.smallest(bits).replace(r=(resolutions or space.resolutions)[0])]
    for arch in archs:
        sub = net.extract(arch)
        assert not any("kernel_transforms" in name for name, _ in sub.named_parameters())
        macs, n_params = _measured(sub, arch.r, space.in_channels)
        assert macs == cost.macs(space, arch), arch
        assert n_params == cost.params(space, arch), arch
