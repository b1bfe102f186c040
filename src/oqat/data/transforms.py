"""Train and eval transforms, and the batch resize that serves every subnet resolution."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import CROP_FRACTION, SMALL_IMAGE


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


def resize_batch(x: torch.Tensor, resolution: int | tuple[int, int] | None) -> torch.Tensor:
    """Bilinearly resize a (N, C, H, W) batch to `resolution`; `x` itself when already that size
    (or when `resolution` is None).

    Antialiasing is on when shrinking (as a resized photo would be), off when enlarging.
    """
    if resolution is None:
        return x
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if x.dim() != 4:
        raise ValueError(f"resize_batch: expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


__all__ = ["build_transforms", "resize_batch"]
