"""The image sources: Fashion-MNIST (offline Debian package), CIFAR-10/100, ImageFolder, synthetic.

Each ``_<source>(cfg)`` returns ``(train_base, test_base, classes, in_channels, native_size,
tensor_input)``; nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..utils.files import cache_dir
from .config import FASHION_MNIST_DIR, FASHION_MNIST_FILES, FASHION_MNIST_INSTALL, DataConfig


class SyntheticImages(Dataset):
    """A deterministic, learnable image-classification set, generated on the fly.

    Each class has a seeded low-frequency colour pattern (4x4, mirror-symmetric so horizontal
    flips keep it, upsampled to `image_size`); an image is its class pattern plus seeded
    per-image Gaussian noise, clipped to [0, 1]. Labels are balanced and shuffled. Images are
    float tensors (C, H, W) in [0, 1], so only tensor transforms apply. Item `i` is the same for
    the same (seed, split, i), in any process.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int = 0,
                 split: str = "train", channels: int = 3):
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        self.size, self.num_classes, self.image_size = size, num_classes, image_size
        self.channels = channels
        self.seed = seed
        self._split_offset = 0 if split == "train" else 1 << 40
        g = torch.Generator().manual_seed(seed)
        patterns = torch.rand(num_classes, channels, 4, 4, generator=g) * 2 - 1
        self.patterns = (patterns + patterns.flip(-1)) / 2            # mirror-symmetric
        g = torch.Generator().manual_seed(seed + 1 + self._split_offset)
        labels = torch.arange(size) % num_classes
        self.targets = labels[torch.randperm(size, generator=g)].tolist()
        self.classes = tuple(f"class{i}" for i in range(num_classes))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        label = self.targets[index]
        pattern = F.interpolate(self.patterns[label][None], size=(self.image_size,) * 2,
                                mode="bilinear", align_corners=False)[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._split_offset + index)
        noise = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        return (0.5 + 0.35 * pattern + 0.2 * noise).clamp_(0.0, 1.0), label


def _read_image(path: str):
    """ImageFolder loader: an RGB PIL image, or ValueError naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def _prepare_fashion_mnist(cfg: DataConfig) -> Path:
    """Return a folder `R` with R/FashionMNIST/raw/<idx files>, decompressing into the cache once."""
    source = Path(cfg.root).expanduser() if cfg.root else FASHION_MNIST_DIR
    if cfg.root and all((source / "FashionMNIST" / "raw" / f).is_file() for f in FASHION_MNIST_FILES):
        return source                                    # already in torchvision's layout
    missing = [source / f"{f}.gz" for f in FASHION_MNIST_FILES if not (source / f"{f}.gz").is_file()]
    if missing:
        where = "the folder given as data.root" if cfg.root else "the Debian package dataset-fashion-mnist"
        raise ValueError(f"Fashion-MNIST not found: missing {missing[0]} (expected from {where}); "
                         f"install it with: {FASHION_MNIST_INSTALL}")
    cache = cache_dir()
    if cfg.root:
        tag = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
        root = cache / f"fashion-mnist-{tag}"
    else:
        root = cache / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    for name in FASHION_MNIST_FILES:
        target, packed = raw / name, source / f"{name}.gz"
        if target.is_file() and target.stat().st_mtime >= packed.stat().st_mtime:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=raw)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(packed, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, target)                     # atomic: concurrent ranks are safe
        except (OSError, EOFError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise ValueError(f"cannot decompress {packed} into {raw}: {exc}") from None
    return root


def _fashion_mnist(cfg: DataConfig):
    from torchvision.datasets import FashionMNIST

    root = _prepare_fashion_mnist(cfg)
    try:
        train = FashionMNIST(str(root), train=True, download=False)
        test = FashionMNIST(str(root), train=False, download=False)
    except (RuntimeError, AssertionError, OSError) as exc:
        raise ValueError(f"cannot read Fashion-MNIST from {root / 'FashionMNIST' / 'raw'}: {exc}") from None
    return train, test, tuple(train.classes), 1, 28, False


def _cifar(cfg: DataConfig):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if cfg.name == "cifar10" else (CIFAR100, "cifar-100-python")
    if not cfg.root:
        raise ValueError(f"data.root: {cfg.name} needs the folder that contains {folder}/ "
                         f"(torchvision's layout; this project never downloads it)")
    root = Path(cfg.root).expanduser()
    if root.name == folder:                             # pointed at the inner folder itself
        root = root.parent
    if not (root / folder).is_dir():
        raise ValueError(f"{cfg.name} not found: expected the folder {root / folder} "
                         f"(data.root must contain {folder}/ from the official python archive)")
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read {cfg.name} from {root / folder} (missing or corrupted files): {exc}") from None
    return train, test, tuple(train.classes), 3, 32, False


def _image_folder(cfg: DataConfig):
    from torchvision.datasets import ImageFolder

    if not cfg.root:
        raise ValueError("data.root: imagefolder needs a folder with train/ and val/ subfolders")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data.root: folder {root} does not exist")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"imagefolder: missing folder {root / split} (expected {root}/train/<class>/<image> "
                             f"and {root}/val/<class>/<image>)")
    splits = {}
    for split in ("train", "val"):
        path = root / split
        try:
            splits[split] = ImageFolder(str(path), loader=_read_image)
        except (FileNotFoundError, OSError) as exc:
            raise ValueError(f"imagefolder: {path}: {exc}") from None
    train, val = splits["train"], splits["val"]
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"imagefolder: {root / 'val'} must have the same class folders as {root / 'train'}; "
                         f"only in train: {only_train[:10]}, only in val: {only_val[:10]}")
    return train, val, tuple(train.classes), 3, None, False


def _synthetic(cfg: DataConfig):
    train = SyntheticImages(cfg.synthetic_size, cfg.synthetic_classes, cfg.image_size, seed=cfg.seed, split="train")
    test = SyntheticImages(max(cfg.synthetic_classes, cfg.synthetic_size // 4), cfg.synthetic_classes,
                           cfg.image_size, seed=cfg.seed, split="test")
    return train, test, train.classes, 3, cfg.image_size, True


_SOURCES = {"fashion-mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
            "imagefolder": _image_folder, "synthetic": _synthetic}


__all__ = ["SyntheticImages"]
