"""Datasets, transforms and loaders for supernet training, BN re-calibration and search.

Five sources share one interface: Fashion-MNIST (read offline from the Debian package
``dataset-fashion-mnist``), CIFAR-10/100 (files supplied by the user), any ImageFolder tree with
``train/`` and ``val/`` (the ImageNet layout) and a synthetic, seeded dataset for tests.

:func:`build_data` returns three splits:

* ``train``   -- the training split minus the held-out images, with train transforms;
* ``holdout`` -- a fixed, seeded subset of the training split (disjoint from ``train``) with
  eval transforms, reserved for BN re-calibration and search;
* ``test``    -- the test/val split with eval transforms, only for final reporting.

Loaders always yield images at ``cfg.image_size`` (the space's largest resolution); a subnet at
a smaller resolution gets the batch through :func:`resize_batch`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")

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


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

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


@dataclass
class Data:
    """The three splits of a dataset and what a model needs to know about it."""

    train: Dataset
    holdout: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    classes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Dataset helpers
# --------------------------------------------------------------------------------------------

class TransformedDataset(Dataset):
    """A view of `base` (which yields (image, label)) with `transform` applied to the image.

    The train and holdout splits share one underlying dataset and differ only in the transform.
    """

    def __init__(self, base: Dataset, transform: Callable | None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


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


def _cache_dir() -> Path:
    if os.environ.get("OQAT_CACHE"):
        return Path(os.environ["OQAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "oqat"


def _seeded_perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def calibration_subset(dataset: Dataset, n: int, seed: int) -> Subset:
    """A fixed, seeded subset of `n` items of `dataset` (all of it when `n` >= its length)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration size: expected a positive integer, got {n!r}")
    size = len(dataset)
    if size == 0:
        raise ValueError("calibration subset: the dataset is empty")
    return Subset(dataset, sorted(_seeded_perm(size, seed)[:n]))


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

def build_transforms(native_size: int | None, image_size: int, mean: Sequence[float], std: Sequence[float],
                     *, tensor_input: bool = False, small: bool | None = None) -> tuple[Callable, Callable]:
    """(train, eval) transforms for images of `native_size` px (None: any size, e.g. ImageFolder).

    Small images (`small`, by default native size <= 64 px): resize to `image_size` if the
    sizes differ, then train = pad-and-random-crop + horizontal flip, eval = the resize only.
    Other images: train = RandomResizedCrop(image_size) + flip, eval = resize to
    image_size / 0.875 and centre-crop. Both end with ToTensor (skipped for `tensor_input`)
    and Normalize(mean, std).
    """
    from torchvision import transforms as T

    to_tensor = [] if tensor_input else [T.ToTensor()]
    normalize = T.Normalize(mean, std)
    if small is None:
        small = native_size is not None and native_size <= SMALL_IMAGE
    if small:
        resize = [T.Resize((image_size, image_size))] if native_size != image_size else []
        padding = max(4, image_size // 8)
        train = T.Compose(resize + [T.RandomCrop(image_size, padding=padding), T.RandomHorizontalFlip()]
                          + to_tensor + [normalize])
        evaluate = T.Compose(resize + to_tensor + [normalize])
    else:
        train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + to_tensor + [normalize])
        evaluate = T.Compose([T.Resize(int(image_size / CROP_FRACTION)), T.CenterCrop(image_size)]
                             + to_tensor + [normalize])
    return train, evaluate


# --------------------------------------------------------------------------------------------
# Sources: each returns (train_base, test_base, classes, in_channels, native_size, tensor_input)
# --------------------------------------------------------------------------------------------

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
    cache = _cache_dir()
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


def split_indices(n_train: int, holdout: int, seed: int, train_limit: int | None = None) -> tuple[list[int], list[int]]:
    """(train, holdout) index lists of a training split of `n_train` items; disjoint and seeded."""
    if holdout >= n_train:
        raise ValueError(f"data.holdout: {holdout} held-out images leave none of the {n_train} training "
                         f"images for training; use data.holdout < {n_train} (e.g. {n_train // 10})")
    perm = _seeded_perm(n_train, seed)
    held, rest = sorted(perm[:holdout]), perm[holdout:]
    if train_limit is not None:
        rest = rest[:train_limit]                       # `perm` is random, so this is a seeded subset
    return sorted(rest), held


def build_data(cfg: DataConfig) -> Data:
    """Load `cfg.name` and return its train / holdout / test splits (see the module docstring)."""
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig.from_dict(cfg)
    train_base, test_base, classes, in_channels, native, tensor_input = _SOURCES[cfg.name](cfg)
    mean, std = MEAN_STD[cfg.name]
    # Synthetic images are generated at image_size: no resizing, cheap pad-and-crop at any size.
    small = True if cfg.name == "synthetic" else None
    train_tf, eval_tf = build_transforms(native, cfg.image_size, mean, std, tensor_input=tensor_input, small=small)
    if not cfg.augment:
        train_tf = eval_tf

    train_idx, held_idx = split_indices(len(train_base), cfg.holdout, cfg.seed, cfg.train_limit)
    train = Subset(TransformedDataset(train_base, train_tf), train_idx)
    holdout = Subset(TransformedDataset(train_base, eval_tf), held_idx)
    test: Dataset = TransformedDataset(test_base, eval_tf)
    if cfg.test_limit is not None and cfg.test_limit < len(test_base):
        test = Subset(test, sorted(_seeded_perm(len(test_base), cfg.seed + 1)[:cfg.test_limit]))
    return Data(train=train, holdout=holdout, test=test, num_classes=len(classes), in_channels=in_channels,
                mean=tuple(mean), std=tuple(std), image_size=cfg.image_size, classes=tuple(classes))


# --------------------------------------------------------------------------------------------
# Loading and resizing batches
# --------------------------------------------------------------------------------------------

def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                workers: int = 0, persistent_workers: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on `seed` (and the epoch).

    Single process: shuffling draws from a seeded ``torch.Generator`` (``loader.generator``;
    its state advances once per epoch, so save it to resume mid-run). When torch.distributed
    is initialised: a seeded ``DistributedSampler`` (``loader.sampler``; call
    ``set_epoch(epoch)`` every epoch); `batch_size` is then per rank.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected a non-negative integer, got {workers!r}")
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, drop_last=drop_last, num_workers=workers, generator=generator,
                      pin_memory=torch.cuda.is_available(), persistent_workers=persistent_workers and workers > 0)


def resize_batch(x: torch.Tensor, resolution: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a (N, C, H, W) batch to `resolution`; `x` itself when already that size.

    Antialiasing is on when shrinking (as a resized photo would be), off when enlarging.
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if x.dim() != 4:
        raise ValueError(f"resize_batch: expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


__all__ = ["DATASETS", "Data", "DataConfig", "MEAN_STD", "SyntheticImages", "TransformedDataset",
           "build_data", "build_transforms", "calibration_subset", "make_loader", "resize_batch",
           "split_indices"]
