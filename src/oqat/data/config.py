"""Which dataset to load and how (:class:`DataConfig`), and the constants of the sources."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


# Where training images are decoded and augmented: the CPU loader, the training device
# (oqat.data.gpu_loader; ImageFolder JPEGs), or the device when it is a GPU and the data are files.
DECODERS = ("cpu", "gpu", "auto")


# Where the Debian package `dataset-fashion-mnist` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist (or `make data`)"


# Per-channel statistics used by Normalize.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


# Eval transforms of ImageFolder data resize to image_size / CROP_FRACTION, then centre-crop.
CROP_FRACTION = 0.875


# Images at most this many pixels wide are "small": pad-and-crop augmentation instead of
# RandomResizedCrop, and no centre crop at eval.
SMALL_IMAGE = 64


def _int_field(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or null" if optional else "an integer"
        raise ValueError(f"data.{name}: expected {kind}, got {value!r}")
    if value < minimum:
        raise ValueError(f"data.{name}: must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how; a plain-data part of every training config."""

    name: str
    root: str | None = None
    image_size: int = 32
    holdout: int = 5000
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    synthetic_size: int = 512
    synthetic_classes: int = 10
    workers: int = 0
    augment: bool = True   # random crop + flip on the training split (off: eval transforms)
    decode: str = "auto"   # training images: cpu | gpu (on the training device) | auto (gpu for imagefolder on CUDA)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in DATASETS:
            raise ValueError(f"data.name: unknown dataset {self.name!r}; allowed: {list(DATASETS)}")
        if isinstance(self.root, os.PathLike):
            object.__setattr__(self, "root", os.fspath(self.root))
        if self.root is not None and not isinstance(self.root, str):
            raise ValueError(f"data.root: expected a path string or null, got {self.root!r}")
        _int_field("image_size", self.image_size, 8)
        _int_field("holdout", self.holdout, 0)
        _int_field("seed", self.seed, 0)
        _int_field("train_limit", self.train_limit, 1, optional=True)
        _int_field("test_limit", self.test_limit, 1, optional=True)
        _int_field("synthetic_size", self.synthetic_size, 2)
        _int_field("synthetic_classes", self.synthetic_classes, 2)
        _int_field("workers", self.workers, 0)
        if not isinstance(self.augment, bool):
            raise ValueError(f"data.augment: expected true/false, got {self.augment!r}")
        if self.decode not in DECODERS:
            raise ValueError(f"data.decode: unknown value {self.decode!r}; allowed: {list(DECODERS)}")
        if self.decode == "gpu" and self.name != "imagefolder":
            raise ValueError(f"data.decode: 'gpu' decodes the image files of data.name 'imagefolder'; "
                             f"{self.name!r} has none (use cpu or auto)")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        """Build from a dict (YAML/JSON); unknown keys and wrong types raise ValueError naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ValueError(f"data: unknown key(s) {unknown}; allowed: {sorted(cls.keys())}")
        if "name" not in data:
            raise ValueError(f"data.name: missing; one of {list(DATASETS)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DataConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["CROP_FRACTION", "DataConfig", "DATASETS", "DECODERS", "FASHION_MNIST_DIR", "FASHION_MNIST_FILES",
           "FASHION_MNIST_INSTALL", "SMALL_IMAGE"]
