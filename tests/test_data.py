"""Tests for oqat.data: configs, splits, transforms, loaders and every dataset source."""

from __future__ import annotations

import pytest
import torch

from oqat import data as D
from oqat.data import DataConfig, build_data, calibration_subset, make_loader, resize_batch
from oqat.data import config as DC
from oqat.data import sources as DS


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Decompressed Fashion-MNIST goes to a per-session cache, never the user's home.
    monkeypatch.setenv("OQAT_CACHE", str(tmp_path_factory.getbasetemp() / "oqat-cache"))


def synth(**kw) -> DataConfig:
    base = dict(name="synthetic", holdout=32, synthetic_size=160, synthetic_classes=5, image_size=16)
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------------------- DataConfig

def test_config_round_trip_and_defaults():
    cfg = DataConfig("cifar10", root="/data", image_size=40, train_limit=100)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert DataConfig.from_dict({"name": "synthetic"}).holdout == 5000


@pytest.mark.parametrize("bad, key", [
    ({"name": "synthetic", "colour": 1}, "colour"),
    ({"name": "synthetic", "image_size": "32"}, "image_size"),
    ({"name": "synthetic", "image_size": 32.0}, "image_size"),
    ({"name": "synthetic", "holdout": True}, "holdout"),
    ({"name": "synthetic", "holdout": -1}, "holdout"),
    ({"name": "synthetic", "train_limit": 0}, "train_limit"),
    ({"name": "synthetic", "root": 3}, "root"),
    ({"holdout": 10}, "name"),
])
def test_config_rejects_bad_keys_and_types(bad, key):
    with pytest.raises(ValueError, match=key):
        DataConfig.from_dict(bad)


def test_config_unknown_dataset_names_allowed_ones():
    with pytest.raises(ValueError) as err:
        DataConfig.from_dict({"name": "mnist"})
    for name in D.DATASETS:
        assert name in str(err.value)


# ---------------------------------------------------------------------------- synthetic + splits

def test_synthetic_shapes_dtypes_labels():
    cfg = synth()
    d = build_data(cfg)
    assert (d.num_classes, d.in_channels, d.image_size) == (5, 3, 16)
    assert len(d.train) + len(d.holdout) == cfg.synthetic_size
    assert len(d.holdout) == cfg.holdout and len(d.test) > 0
    assert d.mean == (0.5, 0.5, 0.5) and d.std == (0.5, 0.5, 0.5)
    for split in (d.train, d.holdout, d.test):
        x, y = split[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert isinstance(y, int)
    xb, yb = next(iter(make_loader(d.train, 64, shuffle=False)))
    assert xb.shape == (64, 3, 16, 16) and yb.dtype == torch.int64
    labels = [d.test[i][1] for i in range(len(d.test))]
    assert set(labels) == set(range(5))                 # balanced labels cover every class
    # Normalize(0.5, 0.5) maps [0, 1] images into [-1, 1].
    assert xb.min() >= -1 and xb.max() <= 1


def test_synthetic_is_deterministic_and_eval_items_repeat():
    a, b = build_data(synth()), build_data(synth())
    xa, ya = a.holdout[3]
    xb, yb = b.holdout[3]
    assert ya == yb and torch.equal(xa, xb)
    assert torch.equal(a.holdout[3][0], xa)            # eval transforms are deterministic
    other = build_data(synth(seed=1))
    assert not torch.equal(other.test[0][0], a.test[0][0])


def test_holdout_disjoint_stable_and_seeded():
    d1, d2 = build_data(synth()), build_data(synth())
    train, held = set(d1.train.indices), set(d1.holdout.indices)
    assert not train & held
    assert train | held == set(range(160))
    assert d1.holdout.indices == d2.holdout.indices
    assert d1.train.indices == d2.train.indices
    d3 = build_data(synth(seed=7))
    assert set(d3.holdout.indices) != held
    # train and holdout are views of the same images with different transforms
    assert d1.train.dataset.base is d1.holdout.dataset.base


def test_holdout_larger_than_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match=r"holdout.*160"):
        build_data(synth(holdout=160))
    with pytest.raises(ValueError, match="holdout"):
        build_data(DataConfig("synthetic"))              # default 5000 > 512 synthetic images
    assert len(build_data(synth(holdout=0)).holdout) == 0


def test_limits_take_seeded_subsets():
    full = build_data(synth())
    d = build_data(synth(train_limit=20, test_limit=7))
    assert len(d.train) == 20 and len(d.test) == 7
    assert set(d.train.indices) <= set(full.train.indices)
    assert d.holdout.indices == full.holdout.indices   # limits never move the holdout
    again = build_data(synth(train_limit=20, test_limit=7))
    assert d.train.indices == again.train.indices and d.test.indices == again.test.indices
    big = build_data(synth(train_limit=10_000, test_limit=10_000))
    assert len(big.train) == len(full.train) and len(big.test) == len(full.test)


def test_calibration_subset_fixed_and_seeded():
    d = build_data(synth())
    a, b = calibration_subset(d.holdout, 10, seed=3), calibration_subset(d.holdout, 10, seed=3)
    assert a.indices == b.indices and len(a) == 10 and len(set(a.indices)) == 10
    assert calibration_subset(d.holdout, 10, seed=4).indices != a.indices
    assert len(calibration_subset(d.holdout, 1000, seed=0)) == len(d.holdout)
    with pytest.raises(ValueError, match="calibration"):
        calibration_subset(d.holdout, 0, seed=0)


def test_make_loader_seeded_order():
    d = build_data(synth())
    def labels(seed):
        return torch.cat([y for _, y in make_loader(d.holdout, 8, shuffle=True, seed=seed)])
    assert torch.equal(labels(0), labels(0))
    order = lambda seed: [i for b in make_loader(list(range(100)), 10, shuffle=True, seed=seed) for i in b.tolist()]
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(100))
    loader = make_loader(d.train, 50, shuffle=False, drop_last=True)
    assert len(loader) == len(d.train) // 50 and not loader.persistent_workers
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(d.train, 0, shuffle=False)


def test_loader_with_workers_yields_same_batches():
    d = build_data(synth(train_limit=40))
    a = [x for x, _ in make_loader(d.holdout, 16, shuffle=False, workers=0)]
    b = [x for x, _ in make_loader(d.holdout, 16, shuffle=False, workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# ---------------------------------------------------------------------------- resize_batch

def test_resize_batch_shapes_and_identity():
    x = torch.randn(2, 3, 32, 32)
    assert resize_batch(x, 32) is x
    assert resize_batch(x, 24).shape == (2, 3, 24, 24)
    assert resize_batch(x, 40).shape == (2, 3, 40, 40)
    assert resize_batch(x, (20, 28)).shape == (2, 3, 20, 28)
    const = torch.full((1, 1, 32, 32), 0.7)             # bilinear + antialias keeps a flat image flat
    assert torch.allclose(resize_batch(const, 13), torch.full((1, 1, 13, 13), 0.7))
    with pytest.raises(ValueError, match="N, C, H, W"):
        resize_batch(torch.randn(3, 32, 32), 16)


def test_resize_batch_antialiases_when_shrinking():
    # A pixel-level checkerboard: antialiased shrinking averages it to ~0.5 everywhere, plain
    # bilinear sampling would alias it.
    x = (torch.arange(64)[:, None] + torch.arange(64)[None, :]).remainder(2).float()[None, None]
    y = resize_batch(x, 16)
    assert torch.allclose(y, torch.full_like(y, 0.5), atol=0.05)


# ---------------------------------------------------------------------------- Fashion-MNIST

fmnist_present = all((DC.FASHION_MNIST_DIR / f"{f}.gz").is_file() for f in DC.FASHION_MNIST_FILES)


@pytest.mark.skipif(not fmnist_present, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_resized_to_32():
    d = build_data(DataConfig("fashion-mnist", image_size=32, holdout=1000, train_limit=200, test_limit=100))
    assert (d.num_classes, d.in_channels) == (10, 1)
    assert len(d.train) == 200 and len(d.holdout) == 1000 and len(d.test) == 100
    assert d.mean == (0.2860,) and d.std == (0.3530,)
    for split in (d.train, d.holdout, d.test):
        x, y = split[0]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    xb, yb = next(iter(make_loader(d.holdout, 256, shuffle=False)))
    assert yb.min() >= 0 and yb.max() <= 9 and len(set(yb.tolist())) == 10
    # normalised with the dataset's own statistics: roughly zero mean, unit std
    assert abs(xb.mean().item()) < 0.25 and 0.7 < xb.std().item() < 1.3
    native = build_data(DataConfig("fashion-mnist", image_size=28, holdout=10, test_limit=5))
    assert native.test[0][0].shape == (1, 28, 28)
    assert len(native.train) == 60000 - 10


def test_fashion_mnist_missing_package_names_path_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(DS, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(ValueError) as err:
        build_data(DataConfig("fashion-mnist"))
    msg = str(err.value)
    assert str(tmp_path / "absent") in msg and "apt-get install dataset-fashion-mnist" in msg


# ---------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder_is_named(tmp_path, name, folder):
    with pytest.raises(ValueError) as err:
        build_data(DataConfig(name, root=str(tmp_path)))
    assert str(tmp_path / folder) in str(err.value)
    with pytest.raises(ValueError, match="data.root"):
        build_data(DataConfig(name))
    (tmp_path / folder).mkdir()                          # present but empty: corrupted, named
    with pytest.raises(ValueError, match=folder):
        build_data(DataConfig(name, root=str(tmp_path)))


# ---------------------------------------------------------------------------- ImageFolder

def _write_tree(root, classes=("cat", "dog", "eel"), per_class=4, val_classes=None, size=(40, 30)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_loads_with_imagenet_transforms(tmp_path):
    root = _write_tree(tmp_path)
    d = build_data(DataConfig("imagefolder", root=str(root), image_size=24, holdout=3))
    assert (d.num_classes, d.in_channels, d.classes) == (3, 3, ("cat", "dog", "eel"))
    assert len(d.train) == 9 and len(d.holdout) == 3 and len(d.test) == 12
    assert d.mean == (0.485, 0.456, 0.406)
    for split in (d.train, d.holdout, d.test):
        x, y = split[0]
        assert x.shape == (3, 24, 24) and 0 <= y < 3
    labels = sorted(y for _, y in d.test)
    assert labels == [0] * 4 + [1] * 4 + [2] * 4


def test_imagefolder_corrupt_image_error_names_file(tmp_path):
    root = _write_tree(tmp_path)
    bad = root / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    d = build_data(DataConfig("imagefolder", root=str(root), image_size=16, holdout=2))
    with pytest.raises(ValueError, match="broken.png"):
        for _ in make_loader(d.test, 4, shuffle=False):
            pass
    truncated = root / "train" / "cat" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    d = build_data(DataConfig("imagefolder", root=str(root), image_size=16, holdout=0))
    with pytest.raises(ValueError, match=r"cat.0\.png"):
        d.train[0]


def test_imagefolder_missing_split_and_class_mismatch(tmp_path):
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"only.val"):
        build_data(DataConfig("imagefolder", root=str(tmp_path / "only")))
    with pytest.raises(ValueError, match="does not exist"):
        build_data(DataConfig("imagefolder", root=str(tmp_path / "nowhere")))
    root = _write_tree(tmp_path / "mismatch", val_classes=("cat", "dog", "fox"), per_class=1)
    with pytest.raises(ValueError, match="fox"):
        build_data(DataConfig("imagefolder", root=str(root), holdout=1))


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    root = _write_tree(tmp_path, per_class=1)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        build_data(DataConfig("imagefolder", root=str(root)))


def test_train_split_is_augmented_holdout_is_not():
    d = build_data(synth())
    torch.manual_seed(0)
    i = d.train.indices[0]
    views = [d.train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])   # random crop / flip
    base = D.TransformedDataset(d.holdout.dataset.base, d.holdout.dataset.transform)
    assert torch.equal(base[i][0], base[i][0])


def test_make_loader_uses_distributed_sampler_when_initialised(tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        loader = make_loader(list(range(30)), 4, shuffle=True, seed=5)
        assert isinstance(loader.sampler, DistributedSampler)
        assert loader.sampler.seed == 5 and loader.sampler.shuffle
        loader.sampler.set_epoch(0)
        first = [i for b in loader for i in b.tolist()]
        again = [i for b in make_loader(list(range(30)), 4, shuffle=True, seed=5) for i in b.tolist()]
        assert first == again and sorted(first) == list(range(30))
    finally:
        dist.destroy_process_group()


def test_augment_off_gives_deterministic_training_images():
    cfg = DataConfig(name="synthetic", image_size=16, holdout=8, synthetic_size=32, augment=False)
    data = build_data(cfg)
    a, _ = data.train[0]
    b, _ = data.train[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="data.augment"):
        DataConfig(name="synthetic", augment="yes")
