"""Analytic cost model of a subnet: MACs, parameters, BitOPs, OQA "quantized FLOPs", size.

MACs follow OFA's ``count_net_flops`` convention: multiply-accumulates of every conv and linear
layer (squeeze-excite convs included), nothing for BN, activations, pooling or additions.
Quantized layers (every conv in the blocks and the two 1x1 head convs) cost ``MACs*b*b`` BitOPs;
full-precision ones (stem, SE, classifier) ``MACs*32*32``; in a space with ``edge_bits`` the stem
and the classifier are quantized at that width in every quantized subnet. OQA's "quantized FLOPs" are
BitOPs/64 for quantized layers and plain MACs for full-precision ones. Parameters count conv and
linear weights, biases and BN affine parameters (as OFA's ``count_parameters``), not step sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .search_space import FULL_PRECISION, Arch, SearchSpace

FP_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    """One conv/linear layer of a subnet, as the cost model sees it."""

    name: str
    macs: int
    weight_params: int   # conv / linear weight elements (quantized when `quantized`)
    other_params: int    # biases and BN affine parameters (always 32-bit)
    quantized: bool
    block: int | None = None  # elastic block slot, None outside the elastic blocks
    fixed_bits: int | None = None  # a quantized layer's own width (the space's edge_bits), not the arch's


def _conv(name, cin, cout, k, hw_out, *, groups=1, bn=True, bias=False, quantized=True, block=None,
          fixed_bits=None):
    weight = cout * (cin // groups) * k * k
    other = (2 * cout if bn else 0) + (cout if bias else 0)
    return LayerCost(name, weight * hw_out, weight, other, quantized, block, fixed_bits)


def _down(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def layers(space: SearchSpace, arch: Arch) -> list[LayerCost]:
    """Every conv and linear layer of `arch`, in execution order."""
    space.validate(arch)
    out: list[LayerCost] = []
    size = _down(arch.r, space.stem_stride)
    edge = space.edge_bits is not None
    out.append(_conv("stem", space.in_channels, space.stem_channels, 3, size * size, quantized=edge,
                     fixed_bits=space.edge_bits))
    c = space.first_block_channels
    out.append(_conv("first_block.depthwise", space.stem_channels, space.stem_channels, 3, size * size,
                     groups=space.stem_channels))
    out.append(_conv("first_block.project", space.stem_channels, c, 1, size * size))
    active = set(space.active_blocks(arch))
    for s, stage in enumerate(space.stages):
        for i, slot in enumerate(space.block_slots(s)):
            cin = c
            c = stage.width
            if slot not in active:
                continue
            stride = stage.stride if i == 0 else 1
            hidden = space.hidden_channels(cin, arch.e[slot])
            k = arch.ks[slot]
            name = f"blocks.{slot}"
            out.append(_conv(f"{name}.expand", cin, hidden, 1, size * size, block=slot))
            size = _down(size, stride)
            out.append(_conv(f"{name}.depthwise", hidden, hidden, k, size * size, groups=hidden, block=slot))
            if stage.se:
                mid = space.se_channels(hidden)
                out.append(_conv(f"{name}.se.reduce", hidden, mid, 1, 1, bn=False, bias=True, quantized=False, block=slot))
                out.append(_conv(f"{name}.se.expand", mid, hidden, 1, 1, bn=False, bias=True, quantized=False, block=slot))
            out.append(_conv(f"{name}.project", hidden, c, 1, size * size, block=slot))
    out.append(_conv("final_expand", c, space.final_expand_channels, 1, size * size))
    out.append(_conv("feature_mix", space.final_expand_channels, space.feature_mix_channels, 1, 1, bn=False))
    f, n = space.feature_mix_channels, space.num_classes
    out.append(LayerCost("classifier", f * n, f * n, n, edge, fixed_bits=space.edge_bits))
    return out


def _bits(layer: LayerCost, arch: Arch) -> int:
    if not layer.quantized or arch.bits == FULL_PRECISION:
        return FP_BITS
    return layer.fixed_bits or arch.bits


def macs(space: SearchSpace, arch: Arch) -> int:
    return sum(layer.macs for layer in layers(space, arch))


def params(space: SearchSpace, arch: Arch) -> int:
    return sum(layer.weight_params + layer.other_params for layer in layers(space, arch))


def bitops(space: SearchSpace, arch: Arch) -> int:
    """Sum of MACs * b_w * b_a (b_w = b_a = arch.bits on quantized layers, 32 elsewhere)."""
    return sum(layer.macs * _bits(layer, arch) ** 2 for layer in layers(space, arch))


def oqa_flops(space: SearchSpace, arch: Arch) -> float:
    """OQA's "quantized FLOPs": MACs*b*b/64 on quantized layers, plain MACs elsewhere."""
    total = 0.0
    for layer in layers(space, arch):
        b = _bits(layer, arch)
        total += layer.macs * b * b / 64 if b != FP_BITS else layer.macs
    return total


def size_bits(space: SearchSpace, arch: Arch) -> int:
    """Model size: quantized weights at b bits, every other parameter at 32 bits."""
    return sum(layer.weight_params * _bits(layer, arch) + layer.other_params * FP_BITS
               for layer in layers(space, arch))


def summary(space: SearchSpace, arch: Arch) -> dict:
    """All cost figures of `arch` in one dict (units in the key names)."""
    return {
        "macs": macs(space, arch),
        "params": params(space, arch),
        "bitops": bitops(space, arch),
        "oqa_flops": oqa_flops(space, arch),
        "size_bits": size_bits(space, arch),
        "bits": arch.bits,
        "resolution": arch.r,
    }


def format_summary(costs: dict) -> str:
    return "\n".join([
        f"MACs       {costs['macs'] / 1e6:10.3f} M",
        f"params     {costs['params'] / 1e6:10.3f} M",
        f"BitOPs     {costs['bitops'] / 1e9:10.3f} G  (bits={costs['bits']})",
        f"OQA-FLOPs  {costs['oqa_flops'] / 1e6:10.3f} M",
        f"size       {costs['size_bits'] / 8 / 1024:10.1f} KiB  ({costs['size_bits']} bits)",
        f"resolution {costs['resolution']:10d} px",
    ])


__all__ = ["LayerCost", "layers", "macs", "params", "bitops", "oqa_flops", "size_bits", "summary"]
