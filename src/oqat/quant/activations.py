"""The activations a quantizer can fuse, in one table.

Each name of ``oqat.space.ACTIVATIONS`` (tested to be the same set) maps to its code for the fused kernels (0 is the
identity), its out-of-place function and the in-place module and function the layers use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The fused kernels' activation codes (passed as a 0-dim tensor, so one compiled kernel serves
# every activation); None is the identity.
ACT_CODES = {None: 0, "relu": 1, "h_swish": 2}
# name -> (module class, functional form); both take ``inplace``
_FORMS = {"relu": (nn.ReLU, F.relu), "h_swish": (nn.Hardswish, F.hardswish)}


def _forms(name: str):
    try:
        return _FORMS[name]
    except KeyError:
        raise ValueError(f"act: {name!r} is not one of {list(_FORMS)}") from None


def activation_fn(name: str | None):
    """The out-of-place function of activation `name` (the identity for None)."""
    return (lambda t: t) if name is None else _forms(name)[1]


def activation(name: str | None) -> nn.Module:
    """An in-place module of activation `name` (``nn.Identity`` for None)."""
    return nn.Identity() if name is None else _forms(name)[0](inplace=True)


def apply_activation_(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The activation `name` applied in place (x must be a fresh tensor, e.g. a BN output)."""
    return x if name is None else _forms(name)[1](x, inplace=True)


def act_code(name: str | None) -> int:
    """The fused kernels' code of activation `name`."""
    if name not in ACT_CODES:
        raise ValueError(f"act: {name!r} is not one of {list(ACT_CODES)}")
    return ACT_CODES[name]


__all__ = ["ACT_CODES", "act_code", "activation", "activation_fn", "apply_activation_"]
