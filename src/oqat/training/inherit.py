"""Bit inheritance (method.md section 4): the (b-k)-bit supernet starts from the b-bit one.

Weights, BN statistics, kernel transforms and step sizes are inherited; every step size is
multiplied by ``factor`` once per bit removed (default 2: s_(b-1) = 2 s_b), which keeps each
quantizer's clipping range almost unchanged while the grid halves. In a space with ``edge_bits``
the stem and classifier keep their width, so their steps are inherited unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models import EDGE_LAYERS, Checkpoint, CheckpointError, load_checkpoint
from ..space import FULL_PRECISION, QUANT_BITS, SearchSpace

DEFAULT_FACTOR = 2.0


def inherit_bits(state_dict: dict[str, torch.Tensor], from_bits: int, to_bits: int,
                 factor: float = DEFAULT_FACTOR, keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The initial state of the `to_bits` supernet from a `from_bits` one (a new dict).

    Every tensor is copied; each ``*.step`` is multiplied by ``factor ** (from_bits - to_bits)``,
    except those of the layers named in `keep` (module paths, e.g. the fixed-width edge layers).
    """
    if from_bits == FULL_PRECISION or from_bits not in QUANT_BITS:
        raise ValueError(f"from_bits: {from_bits} is not a quantized bit-width; bit inheritance starts "
                         f"from a {min(QUANT_BITS)}..{max(QUANT_BITS)}-bit supernet (use --init to start from FP)")
    if to_bits not in QUANT_BITS:
        raise ValueError(f"to_bits: {to_bits} is not supported; use {min(QUANT_BITS)}..{max(QUANT_BITS)}")
    if to_bits >= from_bits:
        raise ValueError(f"to_bits: {to_bits} must be lower than from_bits {from_bits}: inheritance only removes bits")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: must be a positive finite number, got {factor}")
    steps = [k for k in state_dict if k.endswith(".step")]
    if not steps:
        raise ValueError("state_dict has no '.step' entries: not a quantized oqat supernet")
    uninitialized = [k for k in state_dict if k.endswith(".initialized") and not bool(state_dict[k])]
    if uninitialized:
        raise ValueError(f"{len(uninitialized)} quantizer(s) were never initialised (e.g. {uninitialized[0]}): "
                         "the source supernet has not been trained at its bit-width")
    scale = factor ** (from_bits - to_bits)
    out = {}
    for key, value in state_dict.items():
        value = value.detach().clone()
        if key.endswith(".step") and key.split(".", 1)[0] not in keep:
            value.mul_(scale)
        out[key] = value
    return out


def inherit_checkpoint(path: str | Path, to_bits: int, out: str | Path, factor: float = DEFAULT_FACTOR,
                       expect_space: SearchSpace | None = None) -> Path:
    """Write the `to_bits` starting checkpoint derived from the checkpoint at `path`."""
    ckpt = load_checkpoint(path)
    if expect_space is not None and ckpt.space != expect_space:
        raise CheckpointError(f"{path}: checkpoint is for another space ({ckpt.space.differences(expect_space)})")
    try:
        keep = EDGE_LAYERS if ckpt.space.edge_bits is not None else ()
        state = inherit_bits(ckpt.model, ckpt.bits, to_bits, factor, keep=keep)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    config = dict(ckpt.config)
    config["bits"] = to_bits
    return Checkpoint(space=ckpt.space, bits=to_bits, model=state, step=0, epoch=0, config=config, kind="supernet",
                      extra={"inherited_from": {"path": str(path), "bits": ckpt.bits, "step": ckpt.step,
                                                "factor": factor}}).save(out)


__all__ = ["inherit_bits", "inherit_checkpoint", "DEFAULT_FACTOR"]
