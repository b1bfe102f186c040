"""Files in, files out: a published OFA/OQA supernet -> an oqat checkpoint, and back.

Everything is checked before anything is written, and the output is written atomically, so a
failed conversion leaves no file behind.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DataConfig
from ..models import Checkpoint, load_checkpoint
from ..models.checkpoint import save_atomic
from ..space import SearchSpace
from .files import read_state_dict
from .ofa import from_ofa, to_ofa
from .oqa import from_oqa, to_oqa

SOURCES = ("auto", "ofa", "oqa")
TARGETS = ("ofa", "oqa")
# ImageNet as an ImageFolder (root/train, root/val), what the published supernets were trained on;
# the root is left to --data-root / data.root. 10000 held-out training images as in OFA.
IMAGENET = {"name": "imagefolder", "holdout": 10000}
_BITS_SUFFIX = re.compile(r"_b(\d+)$")


@dataclass(frozen=True)
class Conversion:
    """What a conversion read and wrote."""

    source: Path
    out: Path
    layout: str        # the foreign layout: "ofa" or "oqa"
    space: str
    bits: int
    tensors: int       # tensors in the foreign state dict

    def describe(self) -> str:
        bits = "full precision" if self.bits == 32 else f"{self.bits}-bit"
        return f"{self.source} ({self.layout.upper()}, {self.tensors} tensors) -> {self.out}: {self.space}, {bits}"


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """"oqa" when the state dict holds LSQ step sizes, else "ofa"."""
    return "oqa" if any(k.endswith((".sa", ".sw")) for k in sd) else "ofa"


def bits_from_name(path: str | Path) -> int | None:
    """The bit-width in a model-zoo file name (``oqa_mbv3_d234_e346_k357_w1.0_b4`` -> 4), else None."""
    match = _BITS_SUFFIX.search(Path(path).name.removesuffix(".pth").removesuffix(".pt").removesuffix(".tar"))
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_paths(src: Path, out: Path) -> None:
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"-o: {out} is the input file; write the result elsewhere")
    if out.is_dir():
        raise ValueError(f"-o: {out} is a folder; name the output file")


def convert_file(src: str | Path, out: str | Path, *, source: str = "auto", bits: int | None = None,
                 space: SearchSpace | None = None) -> Conversion:
    """Convert an OFA (full precision) or OQA (quantized) supernet file into an oqat checkpoint.

    `source` "auto" tells them apart by OQA's step keys; `bits` (OQA only) defaults to the file
    name's ``_b<bits>``; `space` defaults to the published space the file fits.
    """
    src, out = Path(src), Path(out)
    if source not in SOURCES:
        raise ValueError(f"--from: {source!r} is not one of {list(SOURCES)}")
    _check_paths(src, out)
    sd, _ = read_state_dict(src)
    layout = detect_layout(sd) if source == "auto" else source
    if layout == "ofa":
        if bits is not None and bits != 32:
            raise ValueError(f"--bits: {src} is a full-precision OFA supernet; it converts at 32 bits only "
                             f"(start {bits}-bit training from the converted checkpoint instead)")
        imported = from_ofa(sd, space, where=str(src))
    else:
        named = bits_from_name(src)
        if bits is not None and named is not None and bits != named:
            raise ValueError(f"--bits: {bits} disagrees with the file name {src.name} (_b{named})")
        imported = from_oqa(sd, bits if bits is not None else named, space, where=str(src))
    data = DataConfig(**IMAGENET, image_size=max(imported.space.resolutions)).to_dict()
    ckpt = Checkpoint(space=imported.space, bits=imported.bits, model=imported.model,
                      config={**imported.config, "data": data},
                      extra={"converted_from": {"layout": layout, "file": src.name, "sha256": _sha256(src)}})
    ckpt.save(out)
    return Conversion(src, out, layout, imported.space.name, imported.bits, len(sd))


def export_file(ckpt_path: str | Path, out: str | Path, *, to: str = "ofa") -> Conversion:
    """Write an oqat supernet checkpoint in OFA's layout (full precision) or OQA's (quantized, all
    activations unsigned), as the model-zoo files are: ``{"state_dict": ...}``."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    if to not in TARGETS:
        raise ValueError(f"--to: {to!r} is not one of {list(TARGETS)}")
    _check_paths(ckpt_path, out)
    ckpt = load_checkpoint(ckpt_path)
    where = str(ckpt_path)
    if to == "ofa":
        sd = to_ofa(ckpt.model, ckpt.space, ckpt.bits, where)
    else:
        model_cfg = ckpt.config.get("model", {}) if isinstance(ckpt.config, dict) else {}
        sd = to_oqa(ckpt.model, ckpt.space, ckpt.bits, bool(model_cfg.get("unsigned_activations", False)), where)
    save_atomic({"state_dict": sd}, out)
    return Conversion(ckpt_path, out, to, ckpt.space.name, ckpt.bits, len(sd))


__all__ = ["Conversion", "SOURCES", "TARGETS", "bits_from_name", "convert_file", "detect_layout", "export_file"]
