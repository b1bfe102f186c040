"""Checkpoints that carry their own metadata, saved atomically and loaded without unpickling.

A checkpoint is a plain dict of tensors and JSON-like values:
``{"format": "oqat-checkpoint", "version": 1, "kind": "supernet", "space": {...}, "bits": 4,
"model": state_dict, "step": int, "epoch": int, "config": {...}, "versions": {...}, ...}``
plus whatever training state the caller adds (optimizer, scheduler, RNG states). It is written
to a temporary file, fsynced and renamed, so an interruption never leaves a half-written file
under the final name, and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..space import SearchSpace, normalize_bits
from ..utils.files import atomic_writer, load_torch_file
from ..utils.fmt import few
from ..utils.version import __version__
from .mobilenetv3 import build_supernet

FORMAT = "oqat-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable oqat checkpoint (missing, truncated, foreign, mismatched)."""


def library_versions() -> dict[str, str]:
    return {"oqat": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` written atomically (:func:`oqat.utils.files.atomic_writer`)."""
    with atomic_writer(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model state and its metadata, plus any extra training state."""

    space: SearchSpace
    bits: int
    model: dict[str, torch.Tensor]
    step: int = 0
    epoch: int = 0
    config: dict = field(default_factory=dict)
    kind: str = "supernet"
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "space": self.space.to_dict(),
            "bits": self.bits, "model": self.model, "step": self.step, "epoch": self.epoch,
            "config": self.config, "versions": self.versions or library_versions(), **self.extra,
        }

    def save(self, path: str | Path) -> Path:
        self.path = save_atomic(self.to_dict(), path)
        return self.path


_CORE_KEYS = {"format", "version", "kind", "space", "bits", "model", "step", "epoch", "config", "versions"}


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of `state` that hold NaN or infinity."""
    return [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; every failure is a CheckpointError naming the file."""
    path = Path(path)
    try:
        data = load_torch_file(path, "checkpoint", map_location)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an oqat checkpoint (no '{FORMAT}' format tag)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('version')!r} is not supported (expected {VERSION})")
    missing = sorted(k for k in ("space", "bits", "model") if k not in data)
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {missing}")
    try:
        space = SearchSpace.from_dict(data["space"])
        bits = normalize_bits(data["bits"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid metadata: {exc}") from None
    model = data["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    bad = nonfinite_tensors(model)
    if bad:  # a diverged run's weights: evaluating, searching or inheriting them measures nothing
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) hold NaN or infinity ({few(bad)}); refused")
    return Checkpoint(
        space=space, bits=bits, model=model, step=int(data.get("step", 0)), epoch=int(data.get("epoch", 0)),
        config=data.get("config") or {}, kind=str(data.get("kind", "supernet")), versions=data.get("versions") or {},
        extra={k: v for k, v in data.items() if k not in _CORE_KEYS}, path=path,
    )


def load_supernet(path: str | Path, map_location: str | torch.device = "cpu", **build_kwargs):
    """Rebuild the supernet a checkpoint was saved from and load its weights."""
    ckpt = load_checkpoint(path, map_location)
    model_cfg = ckpt.config.get("model", {}) if isinstance(ckpt.config, dict) else {}
    kwargs = {k: model_cfg[k] for k in ("unsigned_activations", "dropout") if k in model_cfg}
    kwargs.update(build_kwargs)
    net = build_supernet(ckpt.space, ckpt.bits, **kwargs)
    try:
        net.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt.space.name} supernet: {exc}") from None
    return net, ckpt


__all__ = ["nonfinite_tensors", "Checkpoint", "CheckpointError", "save_atomic", "load_checkpoint", "load_supernet", "library_versions"]
