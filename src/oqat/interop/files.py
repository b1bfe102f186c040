"""Reading a foreign checkpoint without running any of its code.

OFA and OQA publish their supernets as ``torch.save`` pickles of ``{"state_dict": {...}}``. They
are read with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain
containers and refuses anything else (classes, functions, ``__reduce__`` calls), so a file that
carries code is rejected before any of it runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.files import load_torch_file


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the state dict, the other top-level entries) of a foreign checkpoint file.

    The file may be a bare state dict or a dict holding one under ``"state_dict"`` (the OFA/OQA
    model-zoo files). Every failure is a ValueError naming the file.
    """
    path = Path(path)
    data = load_torch_file(path, "PyTorch checkpoint")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(data).__name__}")
    if data.get("format") == "oqat-checkpoint":
        raise ValueError(f"{path}: is already an oqat checkpoint; nothing to convert")
    other: dict = {}
    if "state_dict" in data:
        other = {k: v for k, v in data.items() if k != "state_dict"}
        data = data["state_dict"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: 'state_dict' is a {type(data).__name__}, not a dict of tensors")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict: entry {bad[0]!r} is not a tensor"
                         + (" (an optimizer or training state? pass the model's state dict)" if len(bad) > 1 else ""))
    if not data:
        raise ValueError(f"{path}: the state dict is empty")
    return data, other


__all__ = ["read_state_dict"]
