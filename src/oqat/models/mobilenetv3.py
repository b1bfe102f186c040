"""The once-for-all MobileNetV3 supernet with shared-step LSQ quantization, and its subnets."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.block import MBConvBlock
from ..nn.layers import QConvBN, QLinear
from ..space import Arch, SearchSpace, normalize_bits

EDGE_LAYERS = ("stem", "classifier")  # the first and last layer: at the space's edge_bits, whatever the arch's bits


def _classifier(space: SearchSpace, bits: int | None, *, signed_inputs: bool, impl: str) -> nn.Module:
    """The float classifier (OQA), or a quantized one at the space's ``edge_bits``."""
    if space.edge_bits is None:
        return nn.Linear(space.feature_mix_channels, space.num_classes)
    return QLinear(space.feature_mix_channels, space.num_classes, bits=space.edge_layer_bits(bits),
                   act_signed=signed_inputs, impl=impl)


def _stem(space: SearchSpace, bits: int | None, *, signed_inputs: bool, impl: str) -> QConvBN:
    """The stem conv: full precision (OQA), or quantized at the space's ``edge_bits``; its input,
    the normalised image, is signed."""
    return QConvBN(space.in_channels, space.stem_channels, 3, space.stem_stride, act=space.stem_act,
                   bits=space.edge_layer_bits(bits), act_signed=signed_inputs,
                   quantize=space.edge_bits is not None, impl=impl)


class _MobileNetV3Base(nn.Module):
    """Stem, first block, a list of MBConv blocks, head. Subclasses decide which blocks run."""

    space: SearchSpace
    bits: int

    def _build_head(self, space: SearchSpace, bits: int | None, signed_inputs: bool, dropout: float, impl: str) -> None:
        self.final_expand = QConvBN(space.stages[-1].width, space.final_expand_channels, 1, act="h_swish",
                                    bits=bits, act_signed=signed_inputs, impl=impl)
        # its input is the pooled h_swish output of final_expand: unsigned (see output_can_be_negative)
        self.feature_mix = QConvBN(space.final_expand_channels, space.feature_mix_channels, 1, bn=False,
                                   act="h_swish", bits=bits, act_signed=False, impl=impl)
        self.dropout = nn.Dropout(dropout)
        self.classifier = _classifier(space, bits, signed_inputs=False, impl=impl)  # after h_swish: unsigned

    def _active_blocks(self) -> list[MBConvBlock]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_block(self.stem(x))
        for block in self._active_blocks():
            x = block(x)
        x = self.final_expand(x)
        x = self.feature_mix(x.mean((2, 3), keepdim=True))
        return self.classifier(self.dropout(torch.flatten(x, 1)))

    def step_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.endswith(".step")]


class Supernet(_MobileNetV3Base):
    """All subnets of ``space`` in one network. ``set_arch`` selects the subnet that ``forward``
    runs; ``extract`` copies it out as a standalone :class:`SubNet`."""

    def __init__(self, space: SearchSpace, bits: int | None = 4, *, unsigned_activations: bool = False,
                 dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.space = space
        self.bits = normalize_bits(bits)
        self.unsigned_activations = unsigned_activations
        common = dict(bits=bits, unsigned_activations=unsigned_activations, impl=impl,
                      se_reduction=space.se_reduction, divisor=space.channel_divisor)
        self.stem = _stem(space, bits, signed_inputs=not unsigned_activations, impl=impl)
        c = space.first_block_channels
        self.first_block = MBConvBlock(space.stem_channels, c, space.stem_channels, 1, space.first_block_act,
                                       False, (3,), expand=False, input_act=space.stem_act, **common)
        blocks = []
        for stage in space.stages:
            for i in range(space.max_depth):
                hidden = space.hidden_channels(c, max(space.expand_choices))
                blocks.append(MBConvBlock(c, stage.width, hidden, stage.stride if i == 0 else 1, stage.act,
                                          stage.se, space.kernel_choices, **common))
                c = stage.width
        self.blocks = nn.ModuleList(blocks)
        self._build_head(space, bits, not unsigned_activations, dropout, impl)
        self.arch = space.largest(self.bits)
        self.set_arch(self.arch)

    def set_arch(self, arch: Arch) -> None:
        """Select the subnet that the next forward runs (ValueError if it is not in the space)."""
        self.space.validate(arch)
        if arch.bits != self.bits:
            raise ValueError(f"bits: arch has {arch.bits} but this supernet is {self.bits}-bit")
        for slot, block in enumerate(self.blocks):
            block.set_active(self.space.hidden_channels(block.in_channels, arch.e[slot]), arch.ks[slot])
        self.arch = arch

    def _active_blocks(self) -> list[MBConvBlock]:
        return [self.blocks[i] for i in self.space.active_blocks(self.arch)]

    @torch.no_grad()
    def extract(self, arch: Arch | None = None) -> "SubNet":
        """A standalone copy of a subnet (default: the active one) with the same weights, BN
        statistics and step sizes, on the supernet's device; in eval mode it computes what the
        supernet computes."""
        previous = self.arch
        if arch is not None:
            self.set_arch(arch)
        try:
            return SubNet(self)
        finally:
            self.set_arch(previous)


class SubNet(_MobileNetV3Base):
    """A static subnet extracted from a :class:`Supernet` (no elastic choices left)."""

    def __init__(self, supernet: Supernet):
        super().__init__()
        self.space, self.bits, self.arch = supernet.space, supernet.bits, supernet.arch
        self.unsigned_activations = supernet.unsigned_activations
        s = supernet
        self.stem = s.stem.extract(s.stem.in_channels, s.stem.out_channels)
        self.first_block = s.first_block.extract()
        self.blocks = nn.ModuleList(block.extract() for block in s._active_blocks())
        self.final_expand = s.final_expand.extract(s.final_expand.in_channels, s.final_expand.out_channels)
        self.feature_mix = s.feature_mix.extract(s.feature_mix.in_channels, s.feature_mix.out_channels)
        self.dropout = nn.Dropout(s.dropout.p)
        if isinstance(s.classifier, QLinear):
            self.classifier = s.classifier.extract()
        else:
            self.classifier = nn.Linear(s.classifier.in_features, s.classifier.out_features)
            self.classifier.load_state_dict(s.classifier.state_dict())
        self.to(s.classifier.weight.device)  # the layers above are built on the CPU and copied into
        self.train(s.training)

    def _active_blocks(self) -> list[MBConvBlock]:
        return list(self.blocks)


def build_supernet(space: SearchSpace | str, bits: int | None = 4, num_classes: int | None = None, *,
                   in_channels: int | None = None, unsigned_activations: bool = False,
                   dropout: float = 0.0, impl: str = "auto") -> Supernet:
    """Build the quantized supernet of `space` (a SearchSpace or a preset name) at `bits`
    (2..8, or 32/None for full precision). `num_classes`/`in_channels` override the space's."""
    if isinstance(space, str):
        space = SearchSpace.preset(space)
    overrides = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v is not None}
    if overrides:
        space = space.replace(**overrides)
    return Supernet(space, bits, unsigned_activations=unsigned_activations, dropout=dropout, impl=impl)

