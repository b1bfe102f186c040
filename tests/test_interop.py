"""Published supernets in and out: OFA's MobileNetV3 (full precision) and OQA's (LSQ, 4/3/2 bit).

OFA: the ``ofa`` package (test extra) builds its own OFAMobileNetV3 with random weights, BN
statistics and kernel transforms; oqat's converted supernet must give the same logits.
OQA (not on PyPI): OQA's network is OFA's with every conv of the blocks and the two head convs
replaced by ``LsqConv`` (elastic_nn/modules/lsq_conv.py, dynamic_quant_op.py, lsq_layers.py,
networks/ofa_lsq_mbv3.py). The reference here is therefore the ``ofa`` package's network with
OQA's published quantizer formula put where OQA puts it: on the input and on the active (sliced,
kernel-transformed) weight of exactly those convs. Nothing of oqat's quantizer is used for the
expected numbers.

Why these tests fail on a wrong map: every tensor is random and distinct, so any mis-assigned
key of matching shape changes the logits (tests below swap keys, use another block's kernel
transforms, transpose them, and flip activation signedness, and see the logits move by far more
than the tolerance); a mis-assigned key of another shape fails the converter's shape check.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicConv2d, DynamicSeparableConv2d
from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3, OFAProxylessNASNets

from oqat.cli.main import main as cli
from oqat.interop import bits_from_name, detect_layout, from_ofa, from_oqa, key_pairs, to_ofa, to_oqa
from oqat.interop import layout as layout_mod
from oqat.interop import ofa as ofa_mod
from oqat.models import Checkpoint, build_supernet, load_checkpoint, load_supernet
from oqat.space import Arch, SearchSpace, cost

TOL = 1e-4
RESOLUTIONS = (128, 160, 192, 224)


# ----------------------------------------------------------------------------- helpers
def _ofa_net(width: float = 1.0, seed: int = 0, **kw) -> OFAMobileNetV3:
    """OFA's own supernet with random weights, kernel transforms (each keeps its crop's energy
    and mixes its taps) and BN affine parameters; BN statistics come from :func:`_calibrate`."""
    args = dict(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    args.update(kw)
    torch.manual_seed(seed)
    net = OFAMobileNetV3(dropout_rate=0, width_mult=width, **args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_matrix"):  # e.g. "7to5_matrix"
                big, small = (int(v) for v in name.rsplit(".", 1)[1].removesuffix("_matrix").split("to"))
                n = p.size(0)
                p.copy_(big / small * (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n ** 0.5))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
        net.classifier.linear.weight.mul_(3.0)  # logits of a few units: 1e-4 means something
    _calibrate(net, None, seed)
    return net.eval()


def _set_subnet(net: OFAMobileNetV3, arch) -> None:
    if arch is None:
        net.set_max_net()
    else:
        net.set_active_subnet(ks=list(arch.ks), e=list(arch.e), d=list(arch.d))


@torch.no_grad()
def _draw_bn_stats(net: torch.nn.Module, r: int, seed: int) -> None:
    """Random BN statistics that suit the active subnet: measured on random images at `r` px (as
    OFA re-calibrates a subnet), then each channel's mean and variance moved at random, so that
    signals neither vanish nor explode through 20 blocks and every logit depends on the input."""
    g = torch.Generator().manual_seed(seed + 2)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the statistics of this one batch
    net.train()(torch.randn(4, 3, r, r, generator=g))
    for m in bns:
        m.momentum = 0.1
        std = m.running_var.sqrt()
        m.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=g))
        m.running_var.mul_(torch.empty(std.shape).uniform_(0.7, 1.4, generator=g))
        m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    net.eval()


def _calibrate(net: OFAMobileNetV3, arch, seed: int = 0) -> None:
    """:func:`_draw_bn_stats` for `arch` of OFA's supernet (None: its largest subnet at 128 px)."""
    _set_subnet(net, arch)
    _draw_bn_stats(net, 128 if arch is None else arch.r, seed)


def _archs(space: SearchSpace, n_random: int, seed: int = 0):
    """The largest, the smallest and `n_random` seeded random subnets, resolutions cycling."""
    rng = random.Random(seed)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n_random)]
    return [a.replace(r=RESOLUTIONS[i % len(RESOLUTIONS)]) for i, a in enumerate(archs)]


def _logit_diff(ofa_net, oqat_net, arch, seed: int = 0) -> float:
    """|logit difference| of `arch` (a batch of 2, eval mode), after checking that the logits
    depend on the input (else equal logits would prove little)."""
    x = torch.randn(2, 3, arch.r, arch.r, generator=torch.Generator().manual_seed(seed))
    _set_subnet(ofa_net, arch)
    oqat_net.set_arch(arch.replace(bits=oqat_net.bits))
    with torch.no_grad():
        want, got = ofa_net(x), oqat_net(x)
    _check_informative(want)
    return (want - got).abs().max().item()


def _check_informative(logits: torch.Tensor) -> None:
    """Logits that make a 1e-4 comparison mean something: they differ between the two images by
    500 times that on average (so the input reaches them), and are not so large that float32
    rounding alone approaches the tolerance."""
    assert (logits[0] - logits[1]).abs().mean() > 0.05 and logits.abs().max() < 100.0, "degenerate logits"


def _max_diff(ofa_net, archs, convert, seed: int = 0) -> float:
    """Largest |logit difference| over `archs`; before each, the BN statistics are re-drawn for it
    and the OFA supernet converted anew (`convert(ofa_net)` -> oqat supernet)."""
    worst = 0.0
    for i, arch in enumerate(archs):
        _calibrate(ofa_net, arch, seed + i)
        worst = max(worst, _logit_diff(ofa_net, convert(ofa_net), arch, seed + i))
    return worst


def _oqat_net(imported, unsigned: bool | None = None):
    unsigned = imported.bits != 32 if unsigned is None else unsigned
    net = build_supernet(imported.space, imported.bits, unsigned_activations=unsigned)
    net.load_state_dict(imported.model)
    return net.eval()


@pytest.fixture(scope="module")
def ofa10():
    return _ofa_net(1.0)


# ----------------------------------------------------------------------------- OFA -> oqat
def _from_ofa(ofa_net):
    return _oqat_net(from_ofa(ofa_net.state_dict()))


def test_ofa_supernet_gives_the_same_logits(ofa10):
    imported = from_ofa(ofa10.state_dict())
    assert imported.space == SearchSpace.preset("mbv3-imagenet") and imported.bits == 32
    assert _max_diff(ofa10, _archs(imported.space, 8), _from_ofa) <= TOL
    # the extracted subnet computes what OFA's own extracted subnet computes
    arch = _archs(imported.space, 3, seed=5)[-1]
    _calibrate(ofa10, arch)
    sub_ofa = ofa10.get_active_subnet(preserve_weight=True).eval()
    sub = _from_ofa(ofa10).extract(arch).eval()
    x = torch.randn(2, 3, arch.r, arch.r, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (sub_ofa(x) - sub(x)).abs().max().item() <= TOL


def test_ofa_width_1_2_supernet_gives_the_same_logits():
    ofa12 = _ofa_net(1.2, seed=3)
    imported = from_ofa(ofa12.state_dict())
    assert imported.space == SearchSpace.preset("mbv3-imagenet-w1.2")
    assert _max_diff(ofa12, _archs(imported.space, 2, seed=1), _from_ofa) <= TOL


def test_converted_fp_supernet_starts_a_quantized_run(ofa10):
    """What `--init` / stages.supernet.init does with it: a 4-bit supernet of the same space takes
    the weights; its quantizers are uninitialised, so their steps come from the first batch."""
    imported = from_ofa(ofa10.state_dict())
    net = build_supernet(imported.space, 4)
    net.load_state_dict(imported.model)
    quantizers = [m for m in net.modules() if hasattr(m, "initialized")]
    assert len(quantizers) == 128 and not any(bool(q.initialized) for q in quantizers)
    assert torch.equal(net.blocks[3].depthwise.weight, imported.model["blocks.3.depthwise.weight"])
    net.set_arch(imported.space.smallest(4))
    with torch.no_grad():
        net.train()(torch.randn(2, 3, 128, 128))
    assert all(bool(q.initialized) for q in net.first_block.modules() if hasattr(q, "initialized"))


def test_both_key_spellings_are_read(ofa10):
    sd = ofa10.state_dict()
    published = {layout_mod.published_key(k): v for k, v in sd.items()}
    assert any(".mobile_inverted_conv." in k for k in published)
    a, b = from_ofa(sd).model, from_ofa(published).model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the tests can fail
def _all_kernels(space: SearchSpace, k: int, r: int = 160):
    """The largest subnet with kernel `k` in every block (k = 3 runs both transforms)."""
    return space.largest().replace(ks=tuple([k] * space.num_blocks), r=r)


def _swapped(a: str, b: str):
    """key_pairs with the file keys of oqat keys `a` and `b` exchanged (tensors of one shape)."""
    original = layout_mod.key_pairs

    def pairs(space, *, steps):
        out = original(space, steps=steps)
        idx = {p.oqat: i for i, p in enumerate(out)}
        i, j = idx[a], idx[b]
        out[i], out[j] = (layout_mod.KeyPair(out[j].foreign, out[i].oqat, out[i].kind),
                          layout_mod.KeyPair(out[i].foreign, out[j].oqat, out[j].kind))
        return out
    return pairs


@pytest.mark.parametrize("a,b", [
    ("blocks.5.expand.bn.weight", "blocks.5.expand.bn.bias"),                  # two BN fields
    ("blocks.1.project.weight", "blocks.2.project.weight"),                    # two blocks of one stage
    ("blocks.9.depthwise.kernel_transforms.5to3", "blocks.10.depthwise.kernel_transforms.5to3"),  # per block
])
def test_a_wrong_key_map_is_caught(ofa10, monkeypatch, a, b):
    arch = _all_kernels(SearchSpace.preset("mbv3-imagenet"), 3)
    _calibrate(ofa10, arch)
    monkeypatch.setattr(ofa_mod, "key_pairs", _swapped(a, b))
    assert _logit_diff(ofa10, _from_ofa(ofa10), arch) > 100 * TOL


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("wrong", ["transposed", "shared"])
def test_a_wrong_kernel_transform_is_caught(ofa10, wrong, k):
    """A converter that transposed the matrices, or took one block's for all (OFA's are per block)."""
    arch = _all_kernels(SearchSpace.preset("mbv3-imagenet"), k, r=128)
    _calibrate(ofa10, arch)
    imported = from_ofa(ofa10.state_dict())
    model = dict(imported.model)
    for key in [k for k in model if ".kernel_transforms." in k]:
        model[key] = model[key].t() if wrong == "transposed" else \
            model["blocks.0.depthwise.kernel_transforms." + key.rsplit(".", 1)[1]]
    imported.model = model
    assert _logit_diff(ofa10, _oqat_net(imported), arch) > 100 * TOL


# ----------------------------------------------------------------------------- oqat -> OFA
def test_oqat_supernet_exports_to_a_state_dict_ofa_loads(tmp_path):
    space = SearchSpace.preset("mbv3-imagenet")
    net = build_supernet(space, 32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # random kernel transforms, BN affine and logits of O(1)
        for name, t in net.named_parameters():
            if ".kernel_transforms." in name:
                big, small = (int(v) for v in name.rsplit(".", 1)[1].split("to"))
                t.copy_(big / small * (torch.eye(t.size(0)) + 0.3 * torch.randn(t.shape, generator=g) / t.size(0) ** 0.5))
            elif name.endswith("bn.weight"):
                t.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("bn.bias"):
                t.normal_(0, 0.2, generator=g)
        net.classifier.weight.mul_(3.0)
    ofa = OFAMobileNetV3(dropout_rate=0, width_mult=1.0, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6],
                         depth_list=[2, 3, 4]).eval()
    worst = 0.0
    for i, arch in enumerate(_archs(space, 8, seed=2)):
        net.set_arch(arch)
        _draw_bn_stats(net, arch.r, seed=i)
        sd = to_ofa(net.state_dict(), space, 32)
        # OFA's load_state_dict fills keys a file lacks from the model itself: check the key set too
        assert {layout_mod.package_key(k) for k in sd} == set(ofa.state_dict())
        ofa.load_state_dict(sd, strict=True)
        torch.nn.Module.load_state_dict(ofa, {layout_mod.package_key(k): v for k, v in sd.items()}, strict=True)
        worst = max(worst, _logit_diff(ofa, net, arch, seed=i))
    assert worst <= TOL
    # the file `oqat convert --to ofa` writes: {"state_dict": ...}, as OFA's model zoo reads it
    ckpt = tmp_path / "oqat.pt"
    Checkpoint(space=space, bits=32, model=net.state_dict()).save(ckpt)
    assert cli(["convert", str(ckpt), "--to", "ofa", "-o", str(tmp_path / "ofa.pth")]) == 0
    zoo = torch.load(tmp_path / "ofa.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert zoo.keys() == sd.keys() and all(torch.equal(zoo[k], sd[k]) for k in sd)


def test_quantized_supernet_does_not_export_to_ofa():
    space = SearchSpace.preset("mbv3-imagenet")
    with pytest.raises(ValueError, match="4-bit supernet; OFA's layout holds full-precision"):
        to_ofa(build_supernet(space, 4).state_dict(), space, 4)
    tiny = SearchSpace.preset("mbv3-tiny")
    with pytest.raises(ValueError, match="not one of OFA's MobileNetV3 spaces"):
        to_ofa(build_supernet(tiny, 32).state_dict(), tiny, 32)


# ----------------------------------------------------------------------------- OQA
def _oqa_quantize(v: torch.Tensor, s: torch.Tensor, bits: int, activation: bool) -> torch.Tensor:
    """OQA's quantize() forward (lsq_conv.py): round(hardtanh(v / |s|, Qn, Qp)) * |s|, activations
    on the unsigned grid [0, 2^b - 1], weights on the signed [-2^(b-1), 2^(b-1) - 1]."""
    qn, qp = (0, 2 ** bits - 1) if activation else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.round(F.hardtanh(v / s.abs(), qn, qp)) * s.abs()


def _quantized_convs(net: OFAMobileNetV3) -> list[tuple[str, torch.nn.Module]]:
    """The convs OQA makes LsqConv: every conv of the blocks (not SE's) and the two head convs;
    named by their module path (the OQA key of its weight is '<name>.weight')."""
    out = []
    for name, m in net.named_modules():
        if name.startswith("first_conv") or ".se." in name:
            continue
        if isinstance(m, (DynamicConv2d, DynamicSeparableConv2d)):
            out.append((name + ".conv", m))
        elif isinstance(m, torch.nn.Conv2d) and not any(name.startswith(o + ".conv") for o, _ in out):
            out.append((name, m))
    return out


class _OQAReference:
    """The ofa package's supernet turned into OQA's: OQA's quantizer on the input and on the active
    weight of each LsqConv position, with the given steps; records both, in execution order."""

    def __init__(self, net: OFAMobileNetV3, steps: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int):
        self.net, self.inputs, self.weights = net, [], []
        for name, m in _quantized_convs(net):
            sa, sw = steps[name]
            m.register_forward_pre_hook(self._input_hook(sa, bits))
            if isinstance(m, (DynamicConv2d, DynamicSeparableConv2d)):
                m.get_active_filter = self._filter(m.get_active_filter, sw, bits)
            else:
                m.forward = self._static(m, sw, bits)

    def _input_hook(self, sa, bits):
        def hook(module, args):
            q = _oqa_quantize(args[0], sa, bits, activation=True)
            self.inputs.append(q)
            return (q,)
        return hook

    def _filter(self, original, sw, bits):
        def active(*args):
            q = _oqa_quantize(original(*args), sw, bits, activation=False)
            self.weights.append(q)
            return q
        return active

    def _static(self, conv, sw, bits):
        def forward(x):
            q = _oqa_quantize(conv.weight, sw, bits, activation=False)
            self.weights.append(q)
            return F.conv2d(x, q, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return forward


def _oqa_case(net: OFAMobileNetV3, bits: int, arch, seed: int = 0):
    """(a hand-built OQA-layout state dict, the reference network it stands for), for `arch`.

    The state dict is OFA's (BN statistics drawn for `arch`) in the published spelling, plus
    ``sa``/``sw`` of shape (1,) next to each LsqConv's weight: what OQA's strict load_state_dict of
    OFALSQMobileNetV3 takes. Steps: OQA initialises s = 2 mean|v| / sqrt(Qp); here each is that
    times a random factor in [0.7, 1.3] (activations from a float forward of `arch`), and a third
    of them negative (OQA quantizes with |s|).
    """
    _calibrate(net, arch, seed)
    convs = _quantized_convs(net)
    means: dict[str, float] = {}

    def record(name):
        def hook(module, args):
            means.setdefault(name, args[0].abs().mean().item())
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in convs]
    r = 128 if arch is None else arch.r
    with torch.no_grad():
        net(torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(seed)))
    for h in handles:
        h.remove()
    g = torch.Generator().manual_seed(seed + 7)
    qa, qw = 2 ** bits - 1, 2 ** (bits - 1) - 1
    steps = {}
    for name, m in convs:
        weight = m.conv.weight if isinstance(m, (DynamicConv2d, DynamicSeparableConv2d)) else m.weight
        factors = 0.7 + 0.6 * torch.rand(2, generator=g)
        signs = torch.where(torch.rand(2, generator=g) < 1 / 3, -1.0, 1.0)
        sa = (signs[0] * factors[0] * 2 * means.get(name, 1.0) / qa ** 0.5).reshape(1)
        sw = (signs[1] * factors[1] * 2 * weight.abs().mean() / qw ** 0.5).reshape(1)
        steps[name] = (sa, sw)
    ref = _OQAReference(copy.deepcopy(net), steps, bits)
    # BN statistics of the quantized network itself (else a 2-bit signal fades to a constant)
    _set_subnet(ref.net, arch) if arch is not None else ref.net.set_max_net()
    _draw_bn_stats(ref.net, r, seed + 1)
    ref.inputs.clear()
    ref.weights.clear()
    sd = {layout_mod.published_key(k): v.clone() for k, v in ref.net.state_dict().items()}
    for name, (sa, sw) in steps.items():
        key = layout_mod.published_key(name)
        sd[f"{key}.sa"], sd[f"{key}.sw"] = sa.clone(), sw.clone()
    return sd, ref


@pytest.fixture(scope="module")
def ofa_oqa():
    """A second random OFA supernet, the float part of the OQA cases."""
    return _ofa_net(1.0, seed=20)


def test_hand_built_oqa_file_has_exactly_oqa_keys(ofa_oqa):
    sd, _ = _oqa_case(ofa_oqa, 4, None)
    # 475 tensors of OFA's supernet + sa/sw for 64 LsqConvs: first block 2, 20 blocks x 3, head 2
    assert len(sd) == 475 + 2 * 64
    for key in ["blocks.0.mobile_inverted_conv.depth_conv.conv.sa", "blocks.0.mobile_inverted_conv.point_linear.conv.sw",
                "blocks.1.mobile_inverted_conv.inverted_bottleneck.conv.conv.sw",
                "blocks.1.mobile_inverted_conv.depth_conv.conv.conv.sa",
                "blocks.1.mobile_inverted_conv.depth_conv.conv.7to5_matrix",
                "blocks.5.mobile_inverted_conv.depth_conv.se.fc.reduce.bias",
                "final_expand_layer.conv.sa", "feature_mix_layer.conv.sw", "classifier.linear.bias"]:
        assert key in sd, key
    assert not any(k.startswith("first_conv") and k.endswith((".sa", ".sw")) for k in sd)
    assert {p.foreign for p in key_pairs(SearchSpace.preset("mbv3-imagenet"), steps=True)} == set(sd)


def _compare_oqa(ref: _OQAReference, net, arch, seed: int = 0) -> float:
    """Layer by layer (the quantized input and weight of every LsqConv, in execution order), then
    the logits; returns the largest logit difference."""
    got_inputs, got_weights = [], []
    handles = []
    for m in net.modules():
        if getattr(m, "act_quant", None) is not None:
            handles.append(m.act_quant.register_forward_hook(lambda mod, a, out: got_inputs.append(out)))
            handles.append(m.weight_quant.register_forward_hook(lambda mod, a, out: got_weights.append(out)))
    ref.inputs.clear()
    ref.weights.clear()
    x = torch.randn(2, 3, arch.r, arch.r, generator=torch.Generator().manual_seed(seed))
    _set_subnet(ref.net, arch)
    net.set_arch(arch.replace(bits=net.bits))
    try:
        with torch.no_grad():
            want, got = ref.net(x), net(x)
    finally:
        for h in handles:
            h.remove()
    assert len(ref.inputs) == len(got_inputs) == len(ref.weights) == len(got_weights) > 0
    for i, (a, b) in enumerate(zip(ref.weights, got_weights)):
        assert torch.equal(a, b), f"quantized weight of LsqConv #{i}"
    for i, (a, b) in enumerate(zip(ref.inputs, got_inputs)):
        # the same grid points, up to float rounding upstream moving a value across a rounding
        # boundary (one step, rarely)
        assert a.shape == b.shape and (a != b).float().mean().item() <= 1e-4, f"quantized input of LsqConv #{i}"
    _check_informative(want)
    return (want - got).abs().max().item()


@pytest.mark.parametrize("bits", [4, 2])
def test_oqa_supernet_matches_oqa_formula_layer_by_layer(ofa_oqa, bits):
    worst = 0.0
    for i, arch in enumerate(_archs(SearchSpace.preset("mbv3-imagenet"), 2, seed=bits)):
        sd, ref = _oqa_case(ofa_oqa, bits, arch, seed=i)
        imported = from_oqa(sd, bits)
        assert imported.config == {"model": {"unsigned_activations": True}}
        steps = [k for k in imported.model if k.endswith(".step")]
        assert all(imported.model[k].shape == () and imported.model[k] > 0 for k in steps)
        assert all(bool(imported.model[k.replace(".step", ".initialized")]) for k in steps)
        worst = max(worst, _compare_oqa(ref, _oqat_net(imported), arch, seed=i))
    assert worst <= TOL


def test_signed_activations_are_caught(ofa_oqa):
    """oqat's default (signed quantizers where the input can be negative) is another network than
    OQA's all-unsigned one: the same converted tensors give other quantized inputs and logits."""
    arch = SearchSpace.preset("mbv3-imagenet").largest().replace(r=128)
    sd, ref = _oqa_case(ofa_oqa, 4, arch)
    with pytest.raises(AssertionError, match="quantized input of LsqConv"):
        _compare_oqa(ref, _oqat_net(from_oqa(sd, 4), unsigned=False), arch)


@pytest.mark.parametrize("a,b,where", [
    ("blocks.3.expand.weight_quant.step", "blocks.3.expand.act_quant.step", "quantized weight"),   # sw <-> sa
    ("blocks.2.project.act_quant.step", "blocks.3.project.act_quant.step", "quantized input"),    # two blocks' sa
])
def test_a_wrong_step_map_is_caught(ofa_oqa, monkeypatch, a, b, where):
    arch = SearchSpace.preset("mbv3-imagenet").largest().replace(r=128)
    sd, ref = _oqa_case(ofa_oqa, 4, arch)
    monkeypatch.setattr(ofa_mod, "key_pairs", _swapped(a, b))
    with pytest.raises(AssertionError, match=where):
        _compare_oqa(ref, _oqat_net(from_oqa(sd, 4)), arch)


def test_oqat_quantized_supernet_round_trips_through_oqa_layout(ofa_oqa):
    sd, _ = _oqa_case(ofa_oqa, 3, None, seed=2)
    imported = from_oqa(sd, 3)
    back = to_oqa(imported.model, imported.space, 3, unsigned_activations=True)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        want = v.abs() if k.endswith((".sa", ".sw")) else v
        assert back[k].shape == v.shape and torch.equal(back[k], want), k
    with pytest.raises(ValueError, match="OQA quantizes every activation unsigned"):
        to_oqa(imported.model, imported.space, 3, unsigned_activations=False)
    fresh = build_supernet(imported.space, 3, unsigned_activations=True).state_dict()
    with pytest.raises(ValueError, match="never initialised"):
        to_oqa(fresh, imported.space, 3, unsigned_activations=True)


# ----------------------------------------------------------------------------- files and the CLI
def test_convert_cli_writes_checkpoints_that_load(tmp_path, ofa10, ofa_oqa):
    arch = SearchSpace.preset("mbv3-imagenet").largest().replace(r=160)
    _calibrate(ofa10, arch)
    src = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    torch.save({"state_dict": ofa10.state_dict()}, src)
    out = tmp_path / "ofa-w1.0.pt"
    assert cli(["convert", str(src), "-o", str(out)]) == 0
    net, ckpt = load_supernet(out)
    assert ckpt.bits == 32 and ckpt.space == SearchSpace.preset("mbv3-imagenet")
    assert ckpt.config["data"]["name"] == "imagefolder" and ckpt.extra["converted_from"]["layout"] == "ofa"
    assert _logit_diff(ofa10, net.eval(), arch) <= TOL

    sd, ref = _oqa_case(ofa_oqa, 2, arch, seed=3)
    src = tmp_path / "oqa_mbv3_d234_e346_k357_w1.0_b2"
    torch.save({"state_dict": sd}, src)
    out = tmp_path / "oqa-b2.pt"
    assert cli(["convert", str(src), "-o", str(out)]) == 0     # OQA and 2 bit from the file and its name
    net, ckpt = load_supernet(out)
    assert ckpt.bits == 2 and ckpt.config["model"]["unsigned_activations"] is True
    assert all(not m.act_quant.signed for m in net.modules() if getattr(m, "act_quant", None) is not None)
    assert _compare_oqa(ref, net.eval(), arch, seed=3) <= TOL


def test_shipped_oqa_subnets_have_the_published_costs():
    """configs/oqa-subnets: the OQA README's 19 Pareto subnets; oqat's cost model must give the
    README's MMACs and parameter counts (OFA's count_net_flops / count_parameters) to the digit."""
    space = SearchSpace.preset("mbv3-imagenet")
    files = sorted((Path(__file__).resolve().parent.parent / "configs" / "oqa-subnets").glob("*.json"))
    per_bits: dict[int, int] = {}
    for path in files:
        arch = space.validate(Arch.load(path))
        published = json.loads(path.read_text())["published"]
        per_bits[arch.bits] = per_bits.get(arch.bits, 0) + 1
        assert abs(cost.macs(space, arch) / 1e6 - published["mmacs"]) < 5e-4, path.name
        assert abs(cost.params(space, arch) / 1e6 - published["params_m"]) < 5e-4, path.name
        assert path.stem == f"{arch.bits}bit-{round(published['mmacs'])}M"
    assert per_bits == {4: 7, 3: 6, 2: 6}


def test_bits_and_layout_from_the_file():
    assert bits_from_name("oqa_mbv3_d234_e346_k357_w1.0_b4") == 4
    assert bits_from_name("/x/oqa_mbv3_d234_e346_k357_w1.0_b2.pth") == 2
    assert bits_from_name("ofa_mbv3_d234_e346_k357_w1.0") is None
    assert detect_layout({"final_expand_layer.conv.sa": torch.ones(1)}) == "oqa"
    assert detect_layout({"final_expand_layer.conv.weight": torch.ones(1)}) == "ofa"


def _expect_error(capsys, argv, *patterns):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for p in patterns:
        assert p in err, err
    return err


def test_bad_inputs_name_the_problem_and_write_nothing(tmp_path, capsys, ofa10):
    out = tmp_path / "out.pt"
    sd = ofa10.state_dict()

    def case(name, payload, *patterns, extra=()):
        path = tmp_path / name
        torch.save(payload, path)
        _expect_error(capsys, ["convert", str(path), "-o", str(out), *extra], *patterns)
        assert not out.exists() and not list(tmp_path.glob(".out.pt.*"))

    # another network (OFA's ProxylessNAS supernet has the same stem and classifier names)
    proxyless = OFAProxylessNASNets(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    case("proxyless.pth", {"state_dict": proxyless.state_dict()}, "does not fit")
    case("resnet.pth", {"state_dict": {"input_stem.0.conv.conv.weight": torch.zeros(1)}},
         "not an OFA/OQA MobileNetV3 state dict")
    # depth, width and kernel mismatches
    case("d23.pth", _ofa_net(1.0, depth_list=[2, 3]).state_dict(), "has 15 elastic blocks", "has 20")
    case("w12.pth", _ofa_net(1.2).state_dict(), "first_conv.conv.weight: shape (24, 3, 3, 3)",
         "needs (16, 3, 3, 3)", extra=("--space", "mbv3-imagenet"))
    case("k35.pth", _ofa_net(1.0, ks_list=[3, 5]).state_dict(), "shape (96, 1, 5, 5)", "(96, 1, 7, 7)")
    # missing and extra keys
    missing = {k: v for k, v in sd.items() if not k.startswith("blocks.7.conv.point_linear.bn.bn.running_var")}
    case("missing.pth", missing, "missing key(s)", "blocks.7.mobile_inverted_conv.point_linear.bn.bn.running_var")
    case("extra.pth", {**sd, "blocks.3.conv.extra": torch.zeros(2)}, "unexpected key(s)",
         "blocks.3.mobile_inverted_conv.extra")
    # the wrong kind, or the bit-width missing / not supported / contradicting the name
    oqa, _ = _oqa_case(_ofa_net(1.0, seed=5), 4, None)
    case("ofa_as_oqa.pth", sd, "no LSQ step sizes", "--from ofa", extra=("--from", "oqa", "--bits", "4"))
    case("oqa_as_ofa.pth", oqa, "holds LSQ step sizes", "--from oqa", extra=("--from", "ofa"))
    case("oqa_nobits.pth", oqa, "does not record its bit-width", "--bits")
    case("oqa_w1.0_b1.pth", oqa, "bits: 1 is not a bit-width")
    case("oqa_w1.0_b4.pth", oqa, "--bits: 3 disagrees with the file name", extra=("--bits", "3"))
    bad_step = dict(oqa, **{"final_expand_layer.conv.sa": torch.zeros(1)})
    case("oqa_zero_b4.pth", bad_step, "final_expand_layer.conv.sa: step size 0")
    case("notdict.pth", [torch.zeros(1)], "expected a dict of tensors")


class _Payload:
    """Pickles as a call of os.makedirs: unpickling it would create the sentinel folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_file_with_pickled_code_is_refused_unrun(tmp_path, capsys, ofa10):
    sentinel = tmp_path / "code-ran"
    src = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    torch.save({"state_dict": ofa10.state_dict(), "hook": _Payload(str(sentinel))}, src)
    out = tmp_path / "out.pt"
    err = _expect_error(capsys, ["convert", str(src), "-o", str(out)],
                        "holds pickled Python objects or code", "os.makedirs", "nothing in it was loaded or run")
    assert "weights_only" not in err
    assert not sentinel.exists() and not out.exists()
    # an oqat checkpoint is recognised, not converted
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": ofa10.state_dict()}, src)
    assert cli(["convert", str(src), "-o", str(ckpt)]) == 0
    _expect_error(capsys, ["convert", str(ckpt), "-o", str(tmp_path / "again.pt")], "already an oqat checkpoint")
    _expect_error(capsys, ["convert", str(src), "-o", str(src)], "is the input file")
    assert load_checkpoint(ckpt).bits == 32
