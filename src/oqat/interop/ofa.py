"""OFA's full-precision MobileNetV3 supernet state dict <-> oqat's supernet state dict.

Reading checks the file against the layout of a space before anything is copied: the number of
elastic blocks (depth), every key (missing and unexpected ones are named) and every shape (width,
kernel size); the space is the first of :data:`OFA_SPACES` that fits, or the one given. Values are
copied unchanged: OFA's supernet and oqat's compute the same function of the same tensors
(tests/test_interop.py proves it against the ``ofa`` package), so no transform is needed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from ..models import build_supernet
from ..space import FULL_PRECISION, SearchSpace
from .layout import KeyPair, key_pairs, published_key

# The spaces of the published OFA/OQA MobileNetV3 supernets (w1.0 and w1.2), tried in this order.
OFA_SPACES = ("mbv3-imagenet", "mbv3-imagenet-w1.2")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_QUANTIZER_STATE = re.compile(r"\.(act_quant|weight_quant)\.(step|initialized)$")


@dataclass
class Imported:
    """An oqat supernet state dict made from a foreign one, with what it was made for."""

    space: SearchSpace
    bits: int
    model: dict[str, torch.Tensor]
    layout: str                      # "ofa" or "oqa"
    config: dict = field(default_factory=dict)


def published(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`sd` with every key in the published spelling (:func:`published_key`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = published_key(key)
        if new in out:
            raise ValueError(f"{where}: keys {key!r} and another one both mean {new!r}")
        out[new] = value
    return out


def candidate_spaces(sd: dict[str, torch.Tensor]) -> list[SearchSpace]:
    """The published spaces, with the file's number of classes when its classifier says so."""
    spaces = [SearchSpace.preset(name) for name in OFA_SPACES]
    weight = sd.get("classifier.linear.weight")
    if weight is not None and weight.dim() == 2 and weight.size(0) != spaces[0].num_classes:
        spaces = [s.replace(num_classes=int(weight.size(0))) for s in spaces]
    return spaces


def _first(items, n: int = 3) -> str:
    items = sorted(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"


@functools.lru_cache(maxsize=8)
def expected_shapes(space: SearchSpace) -> dict[str, torch.Size]:
    """Shapes of the full-precision oqat supernet of `space` (cached: read, never modify)."""
    return {k: v.shape for k, v in build_supernet(space, FULL_PRECISION).state_dict().items()}


def layout_problems(sd: dict[str, torch.Tensor], space: SearchSpace, pairs: list[KeyPair],
                    shapes: dict[str, torch.Size]) -> list[str]:
    """What keeps `sd` (published spelling) from being `space`'s supernet; empty when it fits."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, sd) if m}
    if blocks:
        have, want = max(blocks), space.num_blocks
        if have != want:
            return [f"the file has {have} elastic blocks (blocks.1..blocks.{have}), space {space.name} has "
                    f"{want} ({space.num_stages} stages x max depth {space.max_depth})"]
    expected = {p.foreign for p in pairs}
    missing, unexpected = expected - set(sd), set(sd) - expected
    problems = []
    if missing:
        problems.append(f"missing key(s) {_first(missing)} of space {space.name}'s layout")
    if unexpected:
        problems.append(f"unexpected key(s) {_first(unexpected)} for space {space.name}'s layout")
    for p in pairs:
        if p.foreign not in sd:
            continue
        got = tuple(sd[p.foreign].shape)
        if p.kind == "tensor":
            want = tuple(shapes[p.oqat])
            if got != want:
                problems.append(f"{p.foreign}: shape {got} in the file, space {space.name} needs {want}")
        elif sd[p.foreign].numel() != 1:
            problems.append(f"{p.foreign}: a step size of shape {got}, expected one value (shape (1,))")
        if len(problems) >= 3:
            break
    return problems


def match_space(sd: dict[str, torch.Tensor], steps: bool, space: SearchSpace | None,
                where: str) -> tuple[SearchSpace, list[KeyPair]]:
    """The space `sd` is the supernet of (the given one, else the first published one that fits),
    and its key pairs; a ValueError naming the mismatch otherwise."""
    if "first_conv.conv.weight" not in sd or "classifier.linear.weight" not in sd:
        raise ValueError(f"{where}: not an OFA/OQA MobileNetV3 state dict (no 'first_conv.conv.weight' / "
                         f"'classifier.linear.weight'; its first keys are {list(sd)[:3]})")
    report = []
    for candidate in [space] if space is not None else candidate_spaces(sd):
        pairs = key_pairs(candidate, steps=steps)
        problems = layout_problems(sd, candidate, pairs, expected_shapes(candidate))
        if not problems:
            return candidate, pairs
        report.append(f"{candidate.name}: " + "; ".join(problems))
    raise ValueError(f"{where}: does not fit " + (" nor ".join(report) if len(report) > 1 else report[0]))


def fill(sd: dict[str, torch.Tensor], space: SearchSpace, pairs: list[KeyPair], bits: int, *,
         unsigned_activations: bool = False, step_value=None) -> dict[str, torch.Tensor]:
    """oqat's supernet state dict of `space` at `bits` with every paired tensor taken from `sd`.

    Keys the file has no counterpart for are the quantizers' steps and init flags: they keep the
    fresh supernet's values (step 1, not initialised: a quantized run started from it initialises
    them from data). `step_value(pair, tensor)` converts OQA's steps; it also marks them initialised.
    """
    target = build_supernet(space, bits, unsigned_activations=unsigned_activations).state_dict()
    covered = {p.oqat for p in pairs}
    left = [k for k in target if k not in covered and not _QUANTIZER_STATE.search(k)]
    if left:  # the layout table and the model disagree: a bug here, not in the file
        raise RuntimeError(f"interop layout does not cover oqat keys {left[:3]}")
    model = dict(target)
    for p in pairs:
        value = sd[p.foreign]
        if p.kind == "tensor":
            model[p.oqat] = value.detach().to(target[p.oqat].dtype).clone()
        else:
            model[p.oqat] = step_value(p, value).to(target[p.oqat].dtype).reshape(target[p.oqat].shape)
            model[p.oqat.rsplit(".", 1)[0] + ".initialized"] = torch.tensor(True)
    return model


def from_ofa(sd: dict[str, torch.Tensor], space: SearchSpace | None = None, where: str = "state dict") -> Imported:
    """A full-precision oqat supernet state dict from OFA's (either key spelling)."""
    sd = published(sd, where)
    steps = sorted(k for k in sd if k.endswith((".sa", ".sw")))
    if steps:
        raise ValueError(f"{where}: holds LSQ step sizes ({steps[0]!r}, ...): a quantized OQA supernet, "
                         "not a full-precision OFA one; convert it as OQA (--from oqa)")
    space, pairs = match_space(sd, False, space, where)
    return Imported(space=space, bits=FULL_PRECISION, model=fill(sd, space, pairs, FULL_PRECISION), layout="ofa")


def ofa_compatible(space: SearchSpace) -> bool:
    """Whether OFA's OFAMobileNetV3 can hold `space`'s supernet (one of the published widths;
    any number of classes and resolutions)."""
    for name in OFA_SPACES:
        ref = SearchSpace.preset(name)
        if space.replace(name=ref.name, num_classes=ref.num_classes, resolutions=ref.resolutions) == ref:
            return True
    return False


def to_foreign(model: dict[str, torch.Tensor], space: SearchSpace, steps: bool, where: str,
               step_value=None) -> dict[str, torch.Tensor]:
    """The OFA/OQA-layout state dict (published spelling) of an oqat supernet state dict."""
    if not ofa_compatible(space):
        raise ValueError(f"{where}: space {space.name!r} is not one of OFA's MobileNetV3 spaces {list(OFA_SPACES)} "
                         "(widths, depths, kernels, expand ratios and head must match one of them)")
    out = {}
    for p in key_pairs(space, steps=steps):
        if p.oqat not in model:
            raise ValueError(f"{where}: the checkpoint has no {p.oqat!r}")
        value = model[p.oqat].detach()
        out[p.foreign] = (value.clone() if p.kind == "tensor" else step_value(p, value)).contiguous()
    return out


def to_ofa(model: dict[str, torch.Tensor], space: SearchSpace, bits: int, where: str = "checkpoint") -> dict:
    """OFA's state dict of a full-precision oqat supernet (OFA has no quantizers to hold steps)."""
    if bits != FULL_PRECISION:
        raise ValueError(f"{where}: a {bits}-bit supernet; OFA's layout holds full-precision supernets only "
                         "(export quantized ones with --to oqa)")
    if space.edge_bits is not None:
        raise ValueError(f"{where}: its space sets edge_bits: {space.edge_bits} (stem and classifier quantizers), "
                         "which OFA's layout has no place for; OFA's spaces keep them full precision")
    return to_foreign(model, space, False, where)


__all__ = ["Imported", "OFA_SPACES", "candidate_spaces", "fill", "from_ofa", "layout_problems", "match_space",
           "ofa_compatible", "published", "to_foreign", "to_ofa"]
