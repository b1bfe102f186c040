"""An exported file is the model that was measured: BN re-calibrated exactly as ``oqat eval`` and
the search do, verified on labelled held-out images, and reproduced by ``oqat predict``.

The supernet here is trained for a few sandwich steps on an ImageFolder of PNG files (written
from the synthetic data set), so the test split can be read back from disk by ``oqat predict``
exactly as the data pipeline reads it. Its running BN statistics are then scrambled: they
belong to no subnet, and a file exported with them would be a different network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from oqat.cli import main
from oqat.export import ExportedModel, read_onnx_info, verify_onnx
from oqat.export.meta import model_info, preprocessing_for
from oqat.export.onnx import build_onnx
from oqat.measure import load_context
from oqat.models import Checkpoint, load_checkpoint, load_supernet
from oqat.space import Arch
from oqat.training import load_train_config, train

SPACE = {"name": "ci-tiny", "stem_channels": 8, "stem_stride": 1, "first_block_channels": 8,
         "stages": [{"width": 8, "stride": 2, "act": "relu", "se": False},
                    {"width": 16, "stride": 2, "act": "h_swish", "se": True}],
         "max_depth": 2, "depth_choices": [1, 2], "kernel_choices": [3, 5], "expand_choices": [2, 3],
         "resolutions": [12, 16], "final_expand_channels": 32, "feature_mix_channels": 48}
ARCH = Arch(ks=[5, 3, 3, 5], e=[3, 2, 3, 2], d=[2, 1], r=16, bits=4)


def _write_image_folder(root):
    """train/ and val/ folders of 16 px PNGs drawn from the synthetic data set (4 classes)."""
    from PIL import Image

    from oqat.data import SyntheticImages

    for split, n in (("train", 224), ("val", 48)):
        ds = SyntheticImages(n, 4, 16, seed=0, split="train" if split == "train" else "test")
        for i in range(n):
            x, y = ds[i]
            folder = root / split / f"class{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(scrambled checkpoint, image folder): a 4-bit supernet trained 40 sandwich steps, whose
    running BN statistics were then replaced by random ones."""
    root = tmp_path_factory.mktemp("calibrated")
    images = root / "images"
    _write_image_folder(images)
    data = {"name": "imagefolder", "root": str(images), "image_size": 16, "holdout": 64, "augment": False}
    cfg = {"space": SPACE, "bits": 4, "data": data,
           "train": {"epochs": 20, "max_steps": 40, "batch_size": 32, "lr": 0.1, "num_random": 1, "log_every": 10,
                     "eval_images": 0, "device": "cpu", "label_smoothing": 0.0, "distill": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = train(load_train_config(root / "cfg.yaml"), root / "run", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    g = torch.Generator().manual_seed(0)
    state = dict(ckpt.model)
    for key in state:
        if key.endswith("running_mean"):
            state[key] = 3.0 * torch.randn(state[key].shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = 0.05 + 4.0 * torch.rand(state[key].shape, generator=g)
    scrambled = root / "scrambled.pt"
    Checkpoint(space=ckpt.space, bits=4, model=state, config=ckpt.config, step=ckpt.step).save(scrambled)
    return scrambled, images


def _arch_file(path, **extra):
    path.write_text(json.dumps({"arch": ARCH.to_dict(), **extra}))
    return path


def test_exported_file_is_the_recalibrated_subnet_not_the_supernets_statistics(trained, tmp_path, capsys):
    ckpt, _ = trained
    out = tmp_path / "m.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path / "a.json")), "-o", str(out),
                 "--verify-images", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    v = result["verification"]
    assert v["ok"] and v["images"] == 64 and v["reference_top1"] is not None
    assert abs(v["exported_top1"] - v["reference_top1"]) <= 0.2          # the task-level check
    # The measurement of `oqat eval` with its defaults (all 64 held-out images, batch 100, seed 0).
    ctx = load_context(ckpt, split="holdout")
    measured = ctx.deployable(ARCH)
    scrambled = load_supernet(ckpt)[0].extract(ARCH).eval()
    x, y = ctx.eval_tensors()
    model = ExportedModel(out)
    with torch.no_grad():
        want, stale = measured(x).numpy(), scrambled(x).numpy()
    got = model.logits(x.numpy())
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    assert np.abs(got - stale).max() > 10 * np.abs(got - want).max() + 0.1
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    # the file's accuracy is the one oqat eval reports for this subnet
    assert main(["eval", "--ckpt", str(ckpt), "--arch", str(tmp_path / "a.json"), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["top1"]
    assert model.top1(ctx.eval_data)["top1"] == pytest.approx(reported)
    stale_top1 = 100.0 * float((torch.from_numpy(stale).argmax(1) == y).float().mean())
    assert reported > stale_top1 + 10                                   # the scrambled statistics cost dearly
    info = read_onnx_info(out)
    assert info["bn_calibration"] == {"recalibrated": True, "split": "holdout", "images": 64, "batch": 100,
                                      "seed": 0, "data": "imagefolder"}


def test_export_takes_the_arch_files_measurement_settings(trained, tmp_path, capsys):
    ckpt, _ = trained
    arch = _arch_file(tmp_path / "best.json", accuracy=50.0,
                      accuracy_source={"source": "direct", "calib_images": 16, "calib_batch": 8, "calib_seed": 3})
    out = tmp_path / "m.oqat"
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(arch), "--format", "oqat", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "re-calibrated on 16 held-out images of imagefolder (batch 8, seed 3; the settings" in text
    from oqat.export import load_packed, read_packed_info

    info = read_packed_info(out)
    assert info["bn_calibration"] == {"recalibrated": True, "split": "holdout", "images": 16, "batch": 8, "seed": 3,
                                      "data": "imagefolder"}
    ctx = load_context(ckpt, calib_images=16, calib_batch=8, calib_seed=3)
    x, _ = ctx.eval_tensors()
    with torch.no_grad():
        torch.testing.assert_close(load_packed(out)(x), ctx.deployable(ARCH)(x), rtol=0, atol=1e-5)
    out2 = tmp_path / "m2.oqat"                                           # a flag overrides the file
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(arch), "--format", "oqat", "-o", str(out2),
                 "--calib-images", "24"]) == 0
    assert read_packed_info(out2)["bn_calibration"]["images"] == 24
    capsys.readouterr()


def test_no_data_needs_an_explicit_no_recalibrate(trained, tmp_path, capsys):
    ckpt, _ = trained
    out = tmp_path / "m.onnx"
    base = ["export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path / "a.json")), "-o", str(out)]
    assert main(base + ["--no-data"]) == 2 and not out.exists()
    assert "--no-recalibrate" in capsys.readouterr().err
    assert main(base + ["--no-data", "--no-recalibrate", "--verify-images", "8"]) == 0
    text = capsys.readouterr().out
    assert "random standard-normal inputs (--no-data)" in text and "NOT re-calibrated" in text
    info = read_onnx_info(out)
    assert info["bn_calibration"] == {"recalibrated": False, "reason": "--no-recalibrate"}
    assert info["preprocessing"]["crop_fraction"] == 0.875                # still the data's preprocessing


def test_task_check_fails_when_the_file_is_another_network(trained):
    """Verifying the stale (un-calibrated) file against the measured subnet fails on the task."""
    ckpt, _ = trained
    ctx = load_context(ckpt)
    measured = ctx.deployable(ARCH)
    stale = load_supernet(ckpt)[0].extract(ARCH).eval()
    prep, _ = preprocessing_for(stale.space, ARCH.r, None)
    model, _ = build_onnx(stale, info=model_info(stale, prep))
    x, y = ctx.eval_tensors()
    report = verify_onnx(model, measured, x, labels=y)
    assert not report.ok and report.labelled == 64
    assert any("labelled images" in f and "allowed gap 0.2 points" in f for f in report.failures)
    assert "top-1 on the 64 labelled images" in report.summary()


def test_predict_on_image_files_reproduces_the_files_accuracy(trained, tmp_path, capsys):
    ckpt, images = trained
    out = tmp_path / "m.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path / "a.json")), "-o", str(out)]) == 0
    capsys.readouterr()
    test = load_context(ckpt, split="test")               # the val/ folder, read by the data pipeline
    file_top1 = ExportedModel(out).top1(test.eval_data)["top1"]
    files = sorted((images / "val").glob("*/*.png"))
    assert main(["predict", str(out), *map(str, files), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    correct = [p["name"] == f.parent.name for p, f in zip(preds, files)]
    assert len(preds) == len(files) == test.settings["eval_images"]
    assert 100.0 * sum(correct) / len(files) == pytest.approx(file_top1)
    assert file_top1 > 40                                 # 4 classes: the trained subnet is well above chance
