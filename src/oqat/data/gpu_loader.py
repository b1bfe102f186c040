"""ImageFolder batches decoded and augmented on the training device (``data.decode: gpu``).

Why: a GPU trains a MobileNet-class network on thousands of images per second, more than a few
CPU workers decode and augment with PIL. Here the host only reads the files' bytes (threads);
``torchvision.io.decode_jpeg`` decodes a whole batch on the device (nvJPEG on CUDA), and the
random-resized crop, the flip and the normalisation run there as tensor ops. The crop is
resized straight to the step's resolution (the sandwich rule draws one per step), so no second
resize follows. The same code runs with ``device="cpu"`` (libjpeg through torchvision), which
is how it is tested without a GPU.

Randomness is a pure function of (seed, epoch, rank, batch index), like the data order, so a
resumed run takes the same crops as an uninterrupted one. The deterministic path
(``train=False``: resize the short side to ``image_size / 0.875``, centre crop) is the CPU
loader's eval transform on tensors. Files other than JPEGs, and JPEGs the device decoder
rejects (e.g. CMYK), are decoded on the CPU. NVIDIA DALI would be another way to do all this;
it is not a dependency.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .config import CROP_FRACTION, DataConfig

SCALE = (0.08, 1.0)            # RandomResizedCrop's defaults (torchvision's, as the CPU loader uses)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JPEG_MAGIC = b"\xff\xd8\xff"


def image_files(dataset: Dataset) -> list[tuple[str, int]]:
    """(path, label) of each item of `dataset`, an ImageFolder split as build_data makes it
    (Subsets of a TransformedDataset of an ImageFolder); ValueError for any other dataset."""
    positions: list[int] | None = None
    d = dataset
    while True:
        if isinstance(d, Subset):
            idx = list(d.indices)
            positions = idx if positions is None else [idx[i] for i in positions]
            d = d.dataset
        elif hasattr(d, "base") and not hasattr(d, "samples"):  # TransformedDataset
            d = d.base
        else:
            break
    samples = getattr(d, "samples", None)
    if samples is None:
        raise ValueError(f"data.decode: gpu decodes image files; {type(d).__name__} has none (use data.decode: cpu)")
    samples = [(str(p), int(c)) for p, c in samples]
    return samples if positions is None else [samples[i] for i in positions]


def resolve_decode(cfg: DataConfig, device: torch.device) -> str:
    """Where `cfg`'s training images are decoded: "cpu" (the DataLoader with PIL transforms) or
    "device" (this module, on `device`). ``auto`` is "device" for ImageFolder data on CUDA."""
    if cfg.decode == "cpu" or cfg.name != "imagefolder":  # DataConfig refuses decode "gpu" for the others
        return "cpu"
    if cfg.decode == "auto" and device.type != "cuda":
        return "cpu"
    return "device"


# ----------------------------------------------------------------------------- geometry
def random_resized_crop_box(height: int, width: int, rng: random.Random,
                            scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in
    `ratio` (log-uniform), as torchvision's RandomResizedCrop draws it; ten tries, then the
    largest centred crop within the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_box(height: int, width: int, image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (top, left)) of the eval transform: the short side resized to
    ``int(image_size / CROP_FRACTION)`` (torchvision's Resize(int)), then an `image_size` centre crop."""
    short_target = int(image_size / CROP_FRACTION)
    if width <= height:
        size = (int(short_target * height / width), short_target)
    else:
        size = (short_target, int(short_target * width / height))
    top = int(round((size[0] - image_size) / 2.0))
    left = int(round((size[1] - image_size) / 2.0))
    return size, (top, left)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float -> (C, *size), bilinear with antialiasing (PIL's and torchvision's resize)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


# ----------------------------------------------------------------------------- the loader
class DeviceImageLoader:
    """Batches ``(images, labels)`` on `device`: float32 (N, 3, r, r), normalised, and int64 (N,).

    `files` are (path, label) pairs; `batch_sampler` yields lists of indices into them (e.g.
    :class:`oqat.training.schedule.GlobalBatchSampler`), `first_batch` being the epoch's index of
    its first batch. With `train`, each image gets a random-resized crop resized to
    ``resolution(batch index)`` (default `image_size`) and a random horizontal flip; without,
    the eval transform at `image_size`. `threads` read files; `prefetch` batches are prepared
    ahead in a background thread (0: in the caller's thread).
    """

    def __init__(self, files: Sequence[tuple[str, int]], batch_sampler: Iterable[list[int]], device: torch.device | str,
                 *, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool = True, seed: int = 0,
                 epoch: int = 0, rank: int = 0, first_batch: int = 0, resolution: Callable[[int], int] | None = None,
                 threads: int = 4, prefetch: int = 2):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std: expected 3 channels (RGB images), got {len(mean)} and {len(std)}")
        self.files, self.batch_sampler = files, batch_sampler
        self.device = torch.device(device)
        self.image_size, self.train = image_size, train
        self.seed, self.epoch, self.rank, self.first_batch = seed, epoch, rank, first_batch
        self.resolution = resolution
        self.threads, self.prefetch = max(1, threads), max(0, prefetch)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    # -- one batch
    def _read(self, indices: list[int], pool: ThreadPoolExecutor) -> list[tuple[str, bool, torch.Tensor]]:
        """(path, is a JPEG, the file's bytes as a uint8 tensor) of each index, read by the pool."""
        return list(pool.map(lambda i: _read_file(self.files[i][0]), indices))

    def _decode(self, raw: list[tuple[str, bool, torch.Tensor]]) -> list[torch.Tensor]:
        """uint8 (3, H, W) images on the device: JPEGs in one batched call there, the rest on the CPU."""
        import torchvision.io as tio

        rgb = tio.ImageReadMode.RGB
        out: list[torch.Tensor | None] = [None] * len(raw)
        jpegs = [i for i, (_, is_jpeg, _) in enumerate(raw) if is_jpeg]
        if jpegs:
            try:
                decoded = tio.decode_jpeg([raw[i][2] for i in jpegs], mode=rgb, device=self.device)
                for i, img in zip(jpegs, decoded):
                    out[i] = img
            except RuntimeError as exc:  # one the device decoder rejects (e.g. CMYK): the batch on the CPU below
                warnings.warn(f"oqat: decoding a batch on {self.device} failed, decoding it on the CPU "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        for i, (path, _, data) in enumerate(raw):
            if out[i] is None:
                try:
                    img = tio.decode_image(data, mode=rgb)
                except RuntimeError as exc:
                    raise ValueError(f"cannot read image {path}: {exc}") from None
                out[i] = img.to(self.device, non_blocking=True)
        return out  # type: ignore[return-value]

    def _transform(self, images: list[torch.Tensor], batch: int) -> torch.Tensor:
        if self.train:
            rng = random.Random(f"oqat-device-augment:{self.seed}:{self.epoch}:{self.rank}:{batch}")
            size = self.resolution(batch) if self.resolution is not None else self.image_size
            crops = []
            for img in images:
                top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], rng)
                crop = _resize(img[:, top:top + h, left:left + w].float(), (size, size))
                crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
            x = torch.stack(crops)
        else:
            crops = []
            for img in images:
                resized, (top, left) = eval_box(img.shape[-2], img.shape[-1], self.image_size)
                full = _resize(img.float(), resized)
                crops.append(full[:, top:top + self.image_size, left:left + self.image_size])
            x = torch.stack(crops)
        return (x - self._mean) / self._std

    def _batch(self, indices: list[int], batch: int, pool: ThreadPoolExecutor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._transform(self._decode(self._read(indices, pool)), batch)
        y = torch.tensor([self.files[i][1] for i in indices], dtype=torch.int64).to(self.device, non_blocking=True)
        return x, y

    # -- iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="oqat-read") as pool:
            if self.prefetch == 0:
                for b, indices in enumerate(self.batch_sampler, start=self.first_batch):
                    yield self._batch(list(indices), b, pool)
                return
            yield from self._prefetched(pool)

    def _prefetched(self, pool: ThreadPoolExecutor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches made by a background thread `prefetch` ahead (on CUDA on its own stream)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for b, indices in enumerate(self.batch_sampler, start=self.first_batch):
                    if stop.is_set():
                        return
                    if cuda:
                        with torch.cuda.device(self.device), torch.cuda.stream(stream):
                            x, y = self._batch(list(indices), b, pool)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        (x, y), event = self._batch(list(indices), b, pool), None
                    if not put((x, y, event)):
                        return
                put(done)
            except BaseException as exc:  # handed to the consumer, which raises it
                put(exc)

        worker = threading.Thread(target=produce, name="oqat-device-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y, event = item
                if event is not None:  # the batch was made on the loader's stream
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            worker.join()


def _read_file(path: str) -> tuple[str, bool, torch.Tensor]:
    try:
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    if not data:
        raise ValueError(f"cannot read image {path}: the file is empty")
    return path, data[:3] == _JPEG_MAGIC, torch.frombuffer(data, dtype=torch.uint8)


def probe_device_decode(path: str, device: torch.device) -> str | None:
    """None when `device` decodes the JPEG at `path`, else why not (one line)."""
    import torchvision.io as tio

    try:
        _, is_jpeg, data = _read_file(path)
        if not is_jpeg:
            return None  # not a JPEG: decoded on the CPU anyway
        tio.decode_jpeg([data], mode=tio.ImageReadMode.RGB, device=device)
        return None
    except Exception as exc:  # no nvJPEG, a torchvision built without it, ...
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def warn_fallback(reason: str) -> None:
    warnings.warn(f"oqat: data.decode: decoding on the device failed ({reason}); using the CPU loader")


__all__ = ["DeviceImageLoader", "eval_box", "image_files", "probe_device_decode", "random_resized_crop_box",
           "resolve_decode", "warn_fallback"]
