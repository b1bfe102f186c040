"""The state-dict layout of OFA's and OQA's MobileNetV3 supernets, key by key, against oqat's.

Both projects build the same network (docs/interop.md has the derivation from their sources):

* ``first_conv`` (3x3 stem, BN, h_swish) -> ``stem``;
* ``blocks.0`` (the fixed first block: depthwise 3x3 + BN + ReLU, 1x1 + BN, identity shortcut)
  -> ``first_block``; static layers, so ``.conv.weight`` and ``.bn.*``;
* ``blocks.1`` .. ``blocks.<stages * max_depth>`` (the elastic blocks, stage by stage, each stage
  padded to its maximum depth) -> ``blocks.0`` ..; dynamic layers, which wrap one more level:
  ``inverted_bottleneck.conv.conv.weight``, ``depth_conv.bn.bn.*``; the depthwise conv holds
  one learned kernel transform per step down, ``depth_conv.conv.7to5_matrix`` and ``5to3_matrix``
  (per block, not shared), and squeeze-excite ``depth_conv.se.fc.reduce`` / ``fc.expand``;
* ``final_expand_layer`` (1x1 + BN + h_swish), ``feature_mix_layer`` (1x1, no BN, h_swish),
  ``classifier.linear`` -> ``final_expand``, ``feature_mix``, ``classifier``.

The model-zoo files name a block's body ``mobile_inverted_conv`` (the name OFA used when they
were trained, and OQA's code still uses); today's ``ofa`` package calls it ``conv`` and renames on
load. Both spellings are read; files are written with the published one, which both load.
OQA's quantized convs (``LsqConv``) add a weight step ``sw`` and an activation step ``sa``
of shape (1,) next to each quantized conv's ``weight``: every conv of the blocks and the two head
convs; the stem, squeeze-excite and classifier stay float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..space import SearchSpace

BODY = "mobile_inverted_conv"              # a block's body, as the published files spell it
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PACKAGE_BODY = re.compile(r"^blocks\.(\d+)\.conv\.")   # today's ofa package spelling


@dataclass(frozen=True)
class KeyPair:
    """One tensor: its key in the OFA/OQA file and in oqat's supernet state dict.

    ``kind`` is "tensor" for a plain copy, "weight_step"/"act_step" for OQA's ``sw``/``sa``.
    """

    foreign: str
    oqat: str
    kind: str = "tensor"


def _conv(foreign_conv: str, foreign_bn: str | None, oqat: str, steps: bool) -> list[KeyPair]:
    """A conv weight, its BN (unless None) and, with `steps`, OQA's two step sizes."""
    pairs = [KeyPair(f"{foreign_conv}.weight", f"{oqat}.weight")]
    if foreign_bn is not None:
        pairs += [KeyPair(f"{foreign_bn}.{f}", f"{oqat}.bn.{f}") for f in BN_FIELDS]
    if steps:
        pairs += [KeyPair(f"{foreign_conv}.sw", f"{oqat}.weight_quant.step", "weight_step"),
                  KeyPair(f"{foreign_conv}.sa", f"{oqat}.act_quant.step", "act_step")]
    return pairs


def key_pairs(space: SearchSpace, *, steps: bool) -> list[KeyPair]:
    """Every tensor of the OFA (``steps=False``) or OQA (``steps=True``) file of `space`'s supernet,
    in the files' order."""
    pairs = _conv("first_conv.conv", "first_conv.bn", "stem", False)
    b = f"blocks.0.{BODY}"
    pairs += _conv(f"{b}.depth_conv.conv", f"{b}.depth_conv.bn", "first_block.depthwise", steps)
    pairs += _conv(f"{b}.point_linear.conv", f"{b}.point_linear.bn", "first_block.project", steps)
    kernels = space.kernel_choices
    for stage in range(space.num_stages):
        se = space.stages[stage].se
        for slot in space.block_slots(stage):
            b, o = f"blocks.{slot + 1}.{BODY}", f"blocks.{slot}"
            pairs += _conv(f"{b}.inverted_bottleneck.conv.conv", f"{b}.inverted_bottleneck.bn.bn", f"{o}.expand", steps)
            pairs += _conv(f"{b}.depth_conv.conv.conv", f"{b}.depth_conv.bn.bn", f"{o}.depthwise", steps)
            # registered small-to-large in OFA (5to3 before 7to5); oqat's ParameterDict the same
            pairs += [KeyPair(f"{b}.depth_conv.conv.{big}to{small}_matrix", f"{o}.depthwise.kernel_transforms.{big}to{small}")
                      for small, big in zip(kernels[:-1], kernels[1:])]
            if se:
                pairs += [KeyPair(f"{b}.depth_conv.se.fc.{part}.{f}", f"{o}.se.{part}.{f}")
                          for part in ("reduce", "expand") for f in ("weight", "bias")]
            pairs += _conv(f"{b}.point_linear.conv.conv", f"{b}.point_linear.bn.bn", f"{o}.project", steps)
    pairs += _conv("final_expand_layer.conv", "final_expand_layer.bn", "final_expand", steps)
    pairs += _conv("feature_mix_layer.conv", None, "feature_mix", steps)
    pairs += [KeyPair("classifier.linear.weight", "classifier.weight"),
              KeyPair("classifier.linear.bias", "classifier.bias")]
    return pairs


def published_key(key: str) -> str:
    """`key` in the published spelling (``blocks.N.conv.`` of today's ofa package ->
    ``blocks.N.mobile_inverted_conv.``); other keys unchanged."""
    return _PACKAGE_BODY.sub(rf"blocks.\1.{BODY}.", key)


def package_key(key: str) -> str:
    """`key` as today's ofa package's own modules name it (the inverse of :func:`published_key`)."""
    return key.replace(f".{BODY}.", ".conv.")


__all__ = ["BN_FIELDS", "BODY", "KeyPair", "key_pairs", "package_key", "published_key"]
