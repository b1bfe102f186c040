"""Checkpoint + arch -> verified deployment file: what ``oqat export`` and the benchmark run."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .meta import model_info, preprocessing_for
from .onnx import DEFAULT_OPSET, build_onnx
from .packed import load_packed, plain_permissions, save_packed
from .verify import VerificationError, VerifyReport, verification_inputs, verify_models, verify_onnx

FORMATS = ("onnx", "oqat")


@dataclass
class ExportResult:
    path: Path
    format: str
    size: int                       # bytes on disk
    info: dict
    report: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "size_bytes": self.size, "notes": self.notes,
                "arch": self.info["arch"], "bits": self.info["bits"], "space": self.info["space_name"],
                "verification": None if self.report is None else self.report.to_dict()}


def load_subnet(ckpt_path: str | Path, arch):
    """(SubNet in eval mode, Checkpoint) for ``arch`` of the supernet saved in ``ckpt_path``."""
    from ..checkpoint import load_supernet

    net, ckpt = load_supernet(ckpt_path, impl="eager")
    if arch.bits != ckpt.bits:
        raise ValueError(f"{ckpt_path}: the checkpoint is a {ckpt.bits}-bit supernet but the arch asks for "
                         f"{arch.bits} bits (drop --bits or use a {arch.bits}-bit checkpoint)")
    sub = net.extract(arch).eval()
    return sub, ckpt


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read class names ({exc.strerror or exc})") from None
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(names, list):
            raise ValueError(f"{path}: expected a JSON list of class names")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def unverified_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.unverified{path.suffix}")


def export_subnet(sub, out: str | Path, fmt: str = "onnx", *, config: dict | None = None, verify: bool = True,
                  verify_images: int = 256, seed: int = 0, batch_size: int = 32, accuracy: float | None = None,
                  class_names: list[str] | None = None, source: dict | None = None, opset: int = DEFAULT_OPSET,
                  weights: str = "float", inputs: tuple[torch.Tensor, str] | None = None,
                  progress: bool | None = None) -> ExportResult:
    """Write ``sub`` to ``out`` as ONNX (``fmt="onnx"``) or packed (``"oqat"``) and verify the file.

    The model is written beside ``out`` under a temporary name, verified, then renamed to
    ``out``. A model that fails verification is kept as ``<name>.unverified<suffix>`` and
    :class:`VerificationError` (a ValueError) is raised with the figures. ``inputs`` overrides
    the verification inputs as (tensor, description).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    out = Path(out)
    notes: list[str] = []
    sub.eval()
    prep, note = preprocessing_for(sub.space, sub.arch.r, (config or {}).get("data") if isinstance(config, dict) else None)
    if note:
        notes.append(note)
    x = desc = None
    if verify:
        if inputs is not None:
            x, desc = inputs
        else:
            x, desc, data_classes, in_note = verification_inputs(config, sub.space, sub.arch.r, verify_images, seed)
            if in_note:
                notes.append(f"verification on random inputs: {in_note}")
            if class_names is None and data_classes and len(data_classes) == sub.space.num_classes:
                class_names = list(data_classes)
    info = model_info(sub, prep, class_names=class_names, accuracy=accuracy, source=source)
    tmp = _temp_beside(out)
    try:
        if fmt == "onnx":
            model, _ = build_onnx(sub, info=info, opset=opset, weights=weights)
            import onnx

            onnx.save_model(model, str(tmp))
        else:
            save_packed(sub, tmp, info)
        report = None
        if verify:
            if fmt == "onnx":
                report = verify_onnx(tmp, sub, x, input_desc=desc, batch_size=batch_size, progress=progress)
            else:
                report = verify_models(sub, load_packed(tmp), x, target="packed round trip", input_desc=desc,
                                       batch_size=batch_size)
            if not report.ok:
                bad = unverified_path(out)
                plain_permissions(tmp)
                os.replace(tmp, bad)
                raise VerificationError(
                    f"{out}: exported model FAILED verification ({'; '.join(report.failures)}); "
                    f"not written there, kept as {bad} for inspection", report)
        plain_permissions(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, out.stat().st_size, info, report, notes)


__all__ = ["ExportResult", "FORMATS", "export_subnet", "load_subnet", "read_class_names", "unverified_path"]
