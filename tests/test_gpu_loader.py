"""The device-side ImageFolder loader (oqat.data.gpu_loader), run on the CPU: the same code a GPU
runs with device="cuda" (decode_jpeg, crops, flips and normalisation as tensor ops)."""

from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest
import torch
import yaml

from oqat.data import DataConfig, DeviceImageLoader, build_data, image_files, resolve_decode
from oqat.data.gpu_loader import eval_box, random_resized_crop_box
from oqat.training import load_train_config, train

SIZES = [(40, 56), (64, 48), (50, 50), (33, 71), (80, 60), (45, 38)]  # (h, w)


def _image(h: int, w: int, seed: int):
    """A smooth colour image (JPEG-friendly: blocks do not dominate) as a PIL image."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
    img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    n = 0
    for split in ("train", "val"):
        for c, name in enumerate(("ants", "bees")):
            d = root / split / name
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(SIZES):
                n += 1
                img = _image(h, w, n)
                if split == "train" and c == 1 and i == 0:
                    img.save(d / f"img{i}.png")          # not a JPEG: decoded on the CPU path
                else:
                    img.save(d / f"img{i}.jpg", quality=90)
    return root


def _data(folder: Path, **kw):
    cfg = DataConfig(name="imagefolder", root=str(folder), image_size=32, holdout=2, decode="gpu", **kw)
    return cfg, build_data(cfg)


def test_eval_path_matches_the_cpu_loaders_eval_transform(folder):
    _, data = _data(folder, augment=False)  # the train split then carries the eval transform
    files = image_files(data.train)
    assert len(files) == len(data.train) == 10 and any(p.endswith(".png") for p, _ in files)
    loader = DeviceImageLoader(files, [list(range(len(files)))], "cpu", image_size=32, mean=data.mean,
                               std=data.std, train=False, prefetch=0)
    (x, y), = list(loader)
    cpu = torch.stack([data.train[i][0] for i in range(len(files))])
    labels = torch.tensor([data.train[i][1] for i in range(len(files))])
    assert x.shape == cpu.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y, labels)
    # PIL resizes in 8-bit integers, the tensor path in float: at most ~1.5 levels of 255 apart
    diff = (x - cpu).abs() * torch.tensor(data.std).view(1, 3, 1, 1) * 255
    assert diff.max() < 2.0 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_train_path_crops_to_each_batchs_resolution_deterministically(folder):
    _, data = _data(folder)
    files = image_files(data.train)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    sizes = {0: 24, 1: 32, 2: 28}

    def load(**kw):
        args = dict(image_size=32, mean=data.mean, std=data.std, seed=5, epoch=1, resolution=sizes.__getitem__)
        return list(DeviceImageLoader(files, batches, "cpu", **{**args, **kw}))

    a = load(prefetch=2)
    assert [tuple(x.shape) for x, _ in a] == [(4, 3, 24, 24), (4, 3, 32, 32), (4, 3, 28, 28)]
    b = load(prefetch=0, threads=1)  # the background thread and the pool change nothing
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_epoch = load(epoch=2)
    assert not torch.equal(a[0][0], other_epoch[0][0])
    # a resumed epoch (first_batch) takes the crops of the uninterrupted one
    resumed = list(DeviceImageLoader(files, batches[1:], "cpu", image_size=32, mean=data.mean, std=data.std,
                                     seed=5, epoch=1, first_batch=1, resolution=sizes.__getitem__))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a[1:], resumed))
    # normalised like the CPU loader: roughly zero-mean, unit-scale values
    x = torch.cat([t.flatten() for t, _ in a])
    assert -1.5 < x.mean() < 1.5 and 0.2 < x.std() < 3


def test_random_resized_crop_boxes_are_distributed_like_torchvisions():
    from torchvision.transforms import RandomResizedCrop

    rng = random.Random(0)
    torch.manual_seed(0)
    ours, theirs = [], []
    for _ in range(3000):
        h, w = rng.randint(20, 300), rng.randint(20, 300)
        top, left, ch, cw = random_resized_crop_box(h, w, rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        ours.append((ch * cw / (h * w), cw / ch))
        _, _, th, tw = RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((th * tw / (h * w), tw / th))
    for k in (0, 1):  # area fraction, aspect ratio: same means and spreads (3000 draws each)
        a, b = torch.tensor([o[k] for o in ours]), torch.tensor([t[k] for t in theirs])
        assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03, (k, a.mean(), b.mean())
    assert min(o[0] for o in ours) > 0.05 and all(0.6 < o[1] < 1.6 for o in ours)
    # too thin for the ratio range: the centred fallback crop
    assert random_resized_crop_box(10, 1000, random.Random(0)) == (0, 493, 10, 13)
    # eval geometry: the short side to 32 / 0.875 = 36, then a centred 32-px crop
    assert eval_box(40, 56, 32) == ((36, 50), (2, 9))
    assert eval_box(64, 48, 32) == ((48, 36), (8, 2))


def test_unreadable_files_and_unsupported_data_are_errors(folder, tmp_path):
    _, data = _data(folder)
    files = image_files(data.train)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (bad, empty, tmp_path / "missing.jpg"):
        loader = DeviceImageLoader([files[0], (str(path), 0)], [[0, 1]], "cpu", image_size=32, mean=data.mean,
                                   std=data.std)
        with pytest.raises(ValueError, match=f"cannot read image {path}"):
            list(loader)
    synthetic = build_data(DataConfig(name="synthetic", image_size=32, holdout=8, synthetic_size=32))
    with pytest.raises(ValueError, match="data.decode: gpu decodes image files"):
        image_files(synthetic.train)
    with pytest.raises(ValueError, match="data.decode: 'gpu' decodes the image files"):
        DataConfig(name="synthetic", decode="gpu")
    with pytest.raises(ValueError, match="data.decode: unknown value 'nvjpeg'"):
        DataConfig.from_dict({"name": "imagefolder", "decode": "nvjpeg"})
    with pytest.raises(ValueError, match="mean/std: expected 3 channels"):
        DeviceImageLoader(files, [[0]], "cpu", image_size=32, mean=(0.5,), std=(0.5,))


def test_decode_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    folder_cfg = lambda d: DataConfig(name="imagefolder", root="/x", decode=d)  # noqa: E731
    assert DataConfig(name="imagefolder").decode == "auto"
    assert resolve_decode(folder_cfg("auto"), cpu) == "cpu"      # today's behaviour on CPU runs
    assert resolve_decode(folder_cfg("auto"), cuda) == "device"
    assert resolve_decode(folder_cfg("gpu"), cpu) == "device"    # the tensor pipeline on the CPU
    assert resolve_decode(folder_cfg("cpu"), cuda) == "cpu"
    assert resolve_decode(DataConfig(name="synthetic"), cuda) == "cpu"


def test_stopping_early_ends_the_background_thread(folder):
    _, data = _data(folder)
    files = image_files(data.train)
    before = threading.active_count()
    loader = DeviceImageLoader(files, [[0, 1]] * 20, "cpu", image_size=32, mean=data.mean, std=data.std, prefetch=2)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    import gc

    gc.collect()
    assert threading.active_count() == before


def test_training_with_decode_gpu_on_the_cpu(folder, tmp_path):
    cfg = {"space": "mbv3-tiny", "bits": 4,
           "data": {"name": "imagefolder", "root": str(folder), "image_size": 32, "holdout": 2, "decode": "gpu"},
           "train": {"epochs": 1, "batch_size": 4, "num_random": 1, "eval_images": 0, "log_every": 1, "seed": 2}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_train_config(path), tmp_path / "run", progress=False)
    assert result.steps == 2  # 10 training images, batch 4
    records = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_largest"]) for r in records)
    assert (tmp_path / "run" / "final.pt").exists()
