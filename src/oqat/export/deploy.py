"""Checkpoint + arch -> verified deployment file: what ``oqat export`` and the benchmark run."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data import resize_batch
from ..measure import DEFAULT_CALIB_BATCH, DEFAULT_CALIB_IMAGES, load_context
from ..models import Checkpoint, load_checkpoint, load_supernet, nonfinite_tensors
from ..utils.fmt import few
from . import openvino_check as ovc
from .meta import model_info, preprocessing_for, to_string_map
from .onnx import build_onnx, check_int4_runtime
from .onnx_int import DEFAULT_MODE, build_onnx_int
from .packed import load_packed, plain_permissions, save_packed
from .verify import (
    VerificationData,
    VerificationError,
    VerifyReport,
    random_inputs,
    verification_inputs,
    verify_models,
    verify_onnx,
)
from .verify_int import count_convs, min_top1_for, verify_onnx_int

FORMATS = ("onnx", "oqat", "onnx-int")


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
                "bn_calibration": self.info["bn_calibration"],
                "verification": None if self.report is None else self.report.to_dict(),
                "openvino": self.info.get("openvino")}


NOT_RECALIBRATED = "BN statistics NOT re-calibrated: the supernet's running statistics, which belong to no subnet"


@dataclass
class Deployable:
    """A subnet ready to export: BN re-calibrated exactly as the measurement that reported it
    (``calibration`` says how, or that it was not), and the data to verify the file on."""

    sub: nn.Module
    ckpt: Checkpoint
    calibration: dict
    verification: VerificationData | None = None


def context_verification(ctx, arch) -> VerificationData:
    """The labelled held-out images of an EvalContext, resized to the subnet's resolution."""
    x, y = ctx.eval_tensors()
    name = ctx.settings["data"]["name"]
    return VerificationData(resize_batch(x, arch.r), y, f"{x.shape[0]} held-out images of {name} at {arch.r} px",
                            ctx.classes or None)


def deployable_from_checkpoint(ckpt_path: str | Path, arch, *, calib_images: int = DEFAULT_CALIB_IMAGES,
                               calib_batch: int = DEFAULT_CALIB_BATCH, calib_seed: int = 0,
                               verify_images: int = 256, verify_seed: int = 0, data: str | None = None,
                               data_root: str | None = None, use_data: bool = True,
                               recalibrate: bool = True) -> Deployable:
    """The deployable subnet `arch` of the supernet in `ckpt_path`.

    With ``recalibrate`` (the default) its BN statistics are re-estimated on `calib_images`
    held-out images (batch `calib_batch`, seed `calib_seed`): the measurement of ``oqat eval``
    and ``oqat search`` with the same settings. That needs the checkpoint's data (or `data`);
    without it this raises ValueError rather than export a model nobody measured, unless
    ``recalibrate=False`` says so explicitly (the file's metadata then records it).
    ``use_data=False`` reads no data at all (verification on random inputs) and requires
    ``recalibrate=False``.
    """
    header = load_checkpoint(ckpt_path)
    if arch.bits != header.bits:
        raise ValueError(f"{ckpt_path}: the checkpoint is a {header.bits}-bit supernet but the arch asks for "
                         f"{arch.bits} bits (drop --bits or use a {arch.bits}-bit checkpoint)")
    if recalibrate and not use_data:
        raise ValueError("--no-data: without data the subnet's BN statistics cannot be re-calibrated; "
                         "add --no-recalibrate to export it with the supernet's running statistics anyway")
    has_data = data is not None or bool(isinstance(header.config, dict) and header.config.get("data"))
    if recalibrate:
        if not has_data:
            raise ValueError(f"{ckpt_path}: the checkpoint's config has no 'data' section, so the subnet's BN "
                             f"statistics cannot be re-calibrated; name the dataset with --data (and --data-root), "
                             f"or pass --no-recalibrate to export it with the supernet's running statistics")
        ctx = load_context(ckpt_path, split="holdout", calib_images=calib_images, calib_batch=calib_batch,
                           calib_seed=calib_seed, eval_images=verify_images, eval_seed=verify_seed, device="cpu",
                           data=data, data_root=data_root)
        return Deployable(ctx.deployable(arch), ctx.ckpt, ctx.calibration(), context_verification(ctx, arch))
    net, ckpt = load_supernet(ckpt_path)
    if use_data:
        verification, _ = verification_inputs(ckpt.config, ckpt.space, arch.r, verify_images, verify_seed)
    else:
        verification = random_inputs(ckpt.space, arch.r, verify_images, verify_seed, "--no-data")
    calibration = {"recalibrated": False, "reason": "--no-recalibrate"}
    return Deployable(net.extract(arch).eval(), ckpt, calibration, verification)


def openvino_verdict(path: Path, sub, v: VerificationData, batch_size: int, notes: list[str]) -> dict:
    """The OpenVINO check of a QCDQ file as a metadata record (a failure becomes a note)."""
    try:
        rep = ovc.verify_openvino(path, sub, v.images, labels=v.labels, batch_size=batch_size)
    except Exception as exc:   # an optional engine failing must not cost the onnxruntime-verified file
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        notes.append(f"OpenVINO check not run ({why}): `oqat predict` runs this file on onnxruntime")
        return {"version": ovc.version(), "verified": False, "failures": [why]}
    if not rep.ok:
        notes.append(f"OpenVINO check FAILED ({'; '.join(rep.failures)}): `oqat predict` runs this file on "
                     f"onnxruntime")
    return {"version": ovc.version(), "verified": rep.ok, "top1_agreement": rep.top1_agreement,
            "integer_convs": rep.int_convs, "quantized_convs": rep.expected_int, "failures": rep.failures}


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
                  class_names: list[str] | None = None, source: dict | None = None, opset: int | None = None,
                  weights: str = "int8", verification: VerificationData | None = None,
                  calibration: dict | None = None, progress: bool | None = None,
                  int_mode: str = DEFAULT_MODE, float_weights: str = "float",
                  openvino: bool | None = None) -> ExportResult:
    """Write ``sub`` to ``out`` as ONNX (``fmt="onnx"``), integer ONNX (``"onnx-int"``, mode
    ``int_mode``, see :mod:`oqat.export.onnx_int`) or packed (``"oqat"``) and verify the file.
    ``float_weights="int8"`` / ``"int8-classifier"`` stores the full-precision layers' weights of
    either ONNX form (or the classifier's alone) as int8 (:meth:`oqat.export.graph.GraphBuilder.fp_weight`);
    the verification measures what that costs. ``weights="int4"`` needs onnxruntime >= 1.23.

    ``sub`` is exported as it is: pass the deployable (BN re-calibrated) subnet and its
    ``calibration`` record (:class:`Deployable`), which the metadata stores; without one the
    metadata says that BN was not re-calibrated. The model is written beside ``out`` under a
    temporary name, verified on ``verification`` (default: ``verify_images`` held-out images of
    ``config["data"]``, else random inputs), then renamed to ``out``. A model that fails
    verification is kept as ``<name>.unverified<suffix>`` and :class:`VerificationError` (a
    ValueError) is raised with the figures.

    A verified quantized QCDQ file is also checked on OpenVINO (``openvino``; default: when it is
    installed, see :mod:`oqat.export.openvino_check`), the engine that runs it on integer kernels;
    the outcome goes into the metadata (``openvino``), which ``oqat predict`` reads to pick it.
    Failing that check is a note, not an error: onnxruntime has verified the file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    if fmt == "onnx" and weights == "int4":
        check_int4_runtime()            # before anything is written: the verification could not load the file
    out = Path(out)
    bad = nonfinite_tensors(sub.state_dict())
    if bad:  # before anything is written: no file of such a model computes anything meaningful
        raise ValueError(f"{out}: cannot export: NaN or infinite values in {few(bad)} "
                         "(a diverged training run?)")
    notes: list[str] = []
    sub.eval()
    prep, note = preprocessing_for(sub.space, sub.arch.r, (config or {}).get("data") if isinstance(config, dict) else None)
    if note:
        notes.append(note)
    calibration = calibration or {"recalibrated": False, "reason": "no calibration record given to export_subnet"}
    if not calibration.get("recalibrated"):
        notes.append(f"{NOT_RECALIBRATED} ({calibration.get('reason')})")
    if verify and verification is None:
        verification, in_note = verification_inputs(config, sub.space, sub.arch.r, verify_images, seed)
        if in_note:
            notes.append(f"verification on random inputs: {in_note}")
    if verification is not None and class_names is None and verification.class_names \
            and len(verification.class_names) == sub.space.num_classes:
        class_names = list(verification.class_names)
    info = model_info(sub, prep, class_names=class_names, accuracy=accuracy, source=source, calibration=calibration)
    tmp = _temp_beside(out)
    try:
        if fmt in ("onnx", "onnx-int"):
            import onnx
            from onnx import helper

            if fmt == "onnx":
                model, _ = build_onnx(sub, info=info, opset=opset, weights=weights, float_weights=float_weights)
            else:
                model, _, _ = build_onnx_int(sub, info=info, opset=opset, mode=int_mode, float_weights=float_weights)
            onnx.save_model(model, str(tmp))
        else:
            save_packed(sub, tmp, info)
        report = None
        if verify:
            v = verification
            if fmt == "onnx":
                # int8 full-precision weights change the arithmetic a little, as the integer form's
                # float rounding does: its agreement criterion, not the exact form's 99.9%
                criteria = {} if float_weights == "float" else {"min_top1": min_top1_for(sub.bits)}
                report = verify_onnx(tmp, sub, v.images, input_desc=v.description, batch_size=batch_size,
                                     progress=progress, labels=v.labels, **criteria)
            elif fmt == "onnx-int":
                report = verify_onnx_int(tmp, sub, v.images, input_desc=v.description, batch_size=batch_size,
                                         progress=progress, labels=v.labels)
            else:
                report = verify_models(sub, load_packed(tmp), v.images, target="packed round trip",
                                       input_desc=v.description, batch_size=batch_size, labels=v.labels)
            if not report.ok:
                bad = unverified_path(out)
                plain_permissions(tmp)
                os.replace(tmp, bad)
                raise VerificationError(
                    f"{out}: exported model FAILED verification ({'; '.join(report.failures)}); "
                    f"not written there, kept as {bad} for inspection", report)
            if fmt == "onnx" and (ovc.available() if openvino is None else openvino) and count_convs(sub)[0]:
                info["openvino"] = openvino_verdict(tmp, sub, verification, batch_size, notes)
                helper.set_model_props(model, to_string_map(info))
                onnx.save_model(model, str(tmp))
        plain_permissions(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, out.stat().st_size, info, report, notes)


__all__ = ["Deployable", "ExportResult", "FORMATS", "NOT_RECALIBRATED", "VerificationData", "context_verification",
           "deployable_from_checkpoint", "export_subnet", "read_class_names", "unverified_path"]
