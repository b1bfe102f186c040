"""What an exported model says about itself: arch, space, bits, steps, preprocessing, classes.

Both deployment formats carry the same description (:func:`model_info`): an ONNX file as
``metadata_props`` (one entry per top-level key, JSON-encoded except plain strings) and a packed
``.oqat`` file in the safetensors header. :func:`preprocessing_for` derives the input pipeline
from a training checkpoint's data config, so ``oqat predict`` feeds a model what it was
trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .. import data as D
from ..models import library_versions
from ..quant import LSQQuantizer

FORMAT = "oqat-model"
VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys stored as plain strings in ONNX metadata_props; every other key is JSON.
_STRING_KEYS = ("format", "space_name")


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input tensor (what ``oqat predict`` does).

    ``crop_fraction`` 1.0: resize to ``resolution`` x ``resolution``. Below 1: resize the shorter
    side to ``resolution / crop_fraction`` and take the centre ``resolution`` square (the
    ImageFolder eval transform). Then scale to [0, 1], convert to ``in_channels`` (1: grayscale,
    3: RGB) and normalise per channel with ``mean``/``std``.
    """

    resolution: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    source: str = "default"

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"preprocessing: mean/std need {self.in_channels} values, "
                             f"got {list(self.mean)} / {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing.std: values must be positive, got {list(self.std)}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"preprocessing.crop_fraction: must lie in (0, 1], got {self.crop_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing: expected a mapping, got {data!r}")
        try:
            return cls(resolution=int(data["resolution"]), in_channels=int(data["in_channels"]),
                       mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                       crop_fraction=float(data.get("crop_fraction", 1.0)),
                       interpolation=str(data.get("interpolation", "bilinear")),
                       source=str(data.get("source", "default")))
        except KeyError as exc:
            raise ValueError(f"preprocessing: missing key {exc.args[0]!r}") from None


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return tuple(values) * channels
    raise ValueError(f"preprocessing: {len(values)} normalisation values do not fit {channels} input channels")


def preprocessing_for(space, resolution: int, data_config: dict | None) -> tuple[Preprocessing, str | None]:
    """The eval preprocessing of a model trained with ``data_config`` (a DataConfig dict).

    Returns (preprocessing, note); the note says why defaults were used, None otherwise.
    Normalisation comes from ``oqat.data.MEAN_STD``; ImageFolder data is centre-cropped like its
    eval transform, small-image datasets are resized whole. Without a usable data config the
    ImageNet statistics are used.
    """
    mean, std, crop, source, note = IMAGENET_MEAN, IMAGENET_STD, 1.0, "default (ImageNet mean/std)", None
    if data_config:
        try:
            cfg = D.DataConfig.from_dict(dict(data_config))
            mean, std = D.MEAN_STD[cfg.name]
            crop = D.CROP_FRACTION if cfg.name == "imagefolder" else 1.0
            source = f"data config ({cfg.name})"
        except ImportError:
            note = "oqat.data is not available; ImageNet mean/std used for preprocessing"
        except (ValueError, KeyError) as exc:
            note = f"checkpoint data config unusable ({exc}); ImageNet mean/std used for preprocessing"
    else:
        note = "the checkpoint has no data config; ImageNet mean/std used for preprocessing"
    c = space.in_channels
    return Preprocessing(resolution=int(resolution), in_channels=c, mean=_fit_channels(tuple(mean), c),
                         std=_fit_channels(tuple(std), c), crop_fraction=crop, source=source), note


def quantizer_table(model: nn.Module) -> dict[str, dict]:
    """{module name: {bits, signed, step}} for every enabled quantizer (step = effective step)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer) and m.enabled:
            out[name] = {"bits": m.bits, "signed": m.signed, "step": float(m.effective_step().item())}
    return out


def check_initialized(model: nn.Module) -> None:
    """ValueError naming the first enabled quantizer whose step was never initialised."""
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer) and m.enabled and not m.is_initialized:
            raise ValueError(f"quantizer {name}: step size was never initialised (the checkpoint's "
                             f"supernet never ran this layer); train or calibrate it before exporting")


def model_info(sub, preprocessing: Preprocessing, *, class_names=None, accuracy: float | None = None,
               source: dict | None = None, calibration: dict | None = None) -> dict:
    """The self-description stored in exported models (see the module docstring).

    ``bn_calibration`` records how the subnet's BN statistics were re-estimated before export
    (split, images, batch, seed, data), or ``{"recalibrated": false, "reason": ...}``.
    """
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != sub.space.num_classes:
            raise ValueError(f"class names: {len(class_names)} given but the model has {sub.space.num_classes} classes")
    if accuracy is not None and not (isinstance(accuracy, (int, float)) and math.isfinite(accuracy)):
        raise ValueError(f"accuracy: expected a number, got {accuracy!r}")
    return {
        "format": FORMAT, "version": VERSION, "arch": sub.arch.to_dict(), "bits": sub.bits,
        "space_name": sub.space.name, "space": sub.space.to_dict(),
        "unsigned_activations": bool(sub.unsigned_activations), "dropout": float(sub.dropout.p),
        "preprocessing": preprocessing.to_dict(), "class_names": class_names,
        "accuracy": None if accuracy is None else float(accuracy), "source": source or {},
        "bn_calibration": calibration or {"recalibrated": False, "reason": "not recorded"},
        "quantizers": quantizer_table(sub), "versions": library_versions(),
    }


def to_string_map(info: dict) -> dict[str, str]:
    return {k: (v if k in _STRING_KEYS and isinstance(v, str) else json.dumps(v)) for k, v in info.items()}


def from_string_map(props: dict[str, str], where: str) -> dict:
    """Inverse of :func:`to_string_map`; ValueError naming ``where`` if it is no oqat model."""
    if props.get("format") != FORMAT:
        raise ValueError(f"{where}: no oqat model metadata (format tag {FORMAT!r} missing); "
                         f"was it written by `oqat export`?")
    out: dict[str, Any] = {}
    for k, v in props.items():
        if k in _STRING_KEYS:
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: metadata entry {k!r} is not valid JSON") from None
    if int(out.get("version", -1)) != VERSION:
        raise ValueError(f"{where}: model metadata version {out.get('version')!r} is not supported (expected {VERSION})")
    for key in ("arch", "space", "bits", "preprocessing"):
        if key not in out:
            raise ValueError(f"{where}: model metadata lacks {key!r}")
    return out


def stored_accuracy(data: dict) -> float | None:
    """An accuracy stored beside the arch in an arch file's data (keys ``accuracy``, ``top1``, ``acc``)."""
    for key in ("accuracy", "top1", "acc"):
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None
