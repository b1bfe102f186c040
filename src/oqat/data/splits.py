"""The train / held-out / test splits of a dataset, seeded subsets, and loaders.

:func:`build_data` returns three splits:

* ``train``   -- the training split minus the held-out images, with train transforms;
* ``holdout`` -- a fixed, seeded subset of the training split (disjoint from ``train``) with
  eval transforms, reserved for BN re-calibration and search;
* ``test``    -- the test/val split with eval transforms, only for final reporting.

Loaders always yield images at ``cfg.image_size`` (the space's largest resolution); a subnet at
a smaller resolution gets the batch through :func:`~oqat.data.transforms.resize_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import MEAN_STD, DataConfig
from .sources import _SOURCES
from .transforms import build_transforms


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


def is_sharded(loader: Any) -> bool:
    """Whether `loader` gives each torch.distributed rank different samples (a DistributedSampler)."""
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler)


__all__ = ["build_data", "calibration_subset", "Data", "is_sharded", "make_loader", "split_indices",
           "TransformedDataset"]
