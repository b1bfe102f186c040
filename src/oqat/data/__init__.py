"""Datasets, transforms and loaders for supernet training, BN re-calibration and search.

Five sources share one interface: Fashion-MNIST (read offline from the Debian package
``dataset-fashion-mnist``), CIFAR-10/100 (files supplied by the user), any ImageFolder tree with
``train/`` and ``val/`` (the ImageNet layout) and a synthetic, seeded dataset for tests.
:func:`build_data` returns the train / held-out / test splits (:mod:`oqat.data.splits`).
"""

from .config import CROP_FRACTION, DATASETS, DECODERS, MEAN_STD, DataConfig
from .gpu_loader import DeviceImageLoader, image_files, probe_device_decode, resolve_decode
from .sources import SyntheticImages
from .splits import Data, TransformedDataset, build_data, calibration_subset, is_sharded, make_loader, split_indices
from .transforms import build_transforms, resize_batch

__all__ = ["CROP_FRACTION", "DATASETS", "DECODERS", "Data", "DataConfig", "DeviceImageLoader", "MEAN_STD",
           "SyntheticImages", "TransformedDataset", "build_data", "build_transforms", "calibration_subset", "image_files",
           "is_sharded", "make_loader", "probe_device_decode", "resize_batch", "resolve_decode", "split_indices"]
