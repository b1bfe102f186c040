"""OQA's quantized MobileNetV3 supernet state dict <-> oqat's, with LSQ steps mapped by their meaning.

OQA (elastic_nn/modules/lsq_conv.py) quantizes with ``round(hardtanh(v / |s|, Qn, Qp)) * |s|``:
weights signed, ``[-2^(b-1), 2^(b-1)-1]``; *every* activation unsigned, ``[0, 2^b-1]``, including
block inputs and residual sums, whose negative part is clipped; step gradient scaled by
``1/sqrt(N Qp)``; no gradient to v at or beyond the bounds. oqat's LSQQuantizer computes the same
with ``max(|step|, 1e-8)`` and signedness per layer, so the converted supernet is built with
``unsigned_activations=True`` and each step becomes ``|s|`` as a 0-dim tensor, marked initialised
(OQA's ``flag`` is 1 on construction: its steps come from the file, never from data). The file
does not record its bit-width; the caller names it (the model-zoo file names end in ``_b<bits>``).
Stem, squeeze-excite and classifier are float in both.
"""

from __future__ import annotations

import math

import torch

from ..quant import STEP_EPS
from ..space import QUANT_BITS, SearchSpace, normalize_bits
from .layout import KeyPair
from .ofa import Imported, fill, match_space, published, to_foreign

MODEL_CONFIG = {"unsigned_activations": True}   # what OQA's networks need (see the module docstring)


def check_bits(bits: int | None, where: str) -> int:
    if bits is None:
        raise ValueError(f"{where}: an OQA file does not record its bit-width; name it (--bits 4, 3 or 2; "
                         "the published files end in _b4, _b3, _b2)")
    if bits not in QUANT_BITS:
        raise ValueError(f"bits: {bits!r} is not a bit-width oqat quantizes to ({QUANT_BITS[0]}..{QUANT_BITS[-1]})")
    return normalize_bits(bits)


def _step_from_file(where: str):
    def convert(pair: KeyPair, value: torch.Tensor) -> torch.Tensor:
        s = float(value.detach().reshape(()).abs())
        if not math.isfinite(s) or s < STEP_EPS:
            raise ValueError(f"{where}: {pair.foreign}: step size {float(value.detach().reshape(())):g} is not a usable "
                             f"LSQ step (|s| must be finite and >= {STEP_EPS:g})")
        return torch.tensor(s)
    return convert


def from_oqa(sd: dict[str, torch.Tensor], bits: int | None, space: SearchSpace | None = None,
             where: str = "state dict") -> Imported:
    """A `bits`-bit oqat supernet state dict (all activations unsigned) from OQA's."""
    bits = check_bits(bits, where)
    sd = published(sd, where)
    if not any(k.endswith(".sa") for k in sd):
        raise ValueError(f"{where}: holds no LSQ step sizes ('.sa'/'.sw' keys): a full-precision OFA supernet, "
                         "not a quantized OQA one; convert it as OFA (--from ofa)")
    space, pairs = match_space(sd, True, space, where)
    model = fill(sd, space, pairs, bits, unsigned_activations=True, step_value=_step_from_file(where))
    return Imported(space=space, bits=bits, model=model, layout="oqa", config={"model": dict(MODEL_CONFIG)})


def to_oqa(model: dict[str, torch.Tensor], space: SearchSpace, bits: int, unsigned_activations: bool,
           where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """OQA's state dict of a quantized oqat supernet whose activations are all unsigned (OQA's code
    has no signed activation grid); steps as OQA stores them, shape (1,), the value oqat uses."""
    if bits not in QUANT_BITS:
        raise ValueError(f"{where}: a full-precision supernet has no step sizes; export it with --to ofa")
    if space.edge_bits is not None:
        raise ValueError(f"{where}: its space quantizes the stem and the classifier (edge_bits: {space.edge_bits}); "
                         "OQA's layout keeps them full precision and has no steps for them")
    if not unsigned_activations:
        raise ValueError(f"{where}: its activation quantizers are signed where the input can be negative "
                         "(model.unsigned_activations: false); OQA quantizes every activation unsigned, so its "
                         "code would compute another network")

    def convert(pair: KeyPair, value: torch.Tensor) -> torch.Tensor:
        flag = model.get(pair.oqat.rsplit(".", 1)[0] + ".initialized")
        if flag is None or not bool(flag):
            raise ValueError(f"{where}: {pair.oqat} was never initialised (the supernet was not trained at "
                             f"{bits} bit); OQA's code would use it as it is")
        return value.abs().clamp_min(STEP_EPS).reshape(1).clone()

    return to_foreign(model, space, True, where, convert)


__all__ = ["MODEL_CONFIG", "check_bits", "from_oqa", "to_oqa"]
