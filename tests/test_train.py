"""Joint training: sandwich sampling, schedule, data order, checkpoints, resume, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from oqat import SearchSpace
from oqat.models import CheckpointError, load_checkpoint
from oqat.training import (
    GlobalBatchSampler,
    TrainConfig,
    TrainingDiverged,
    load_train_config,
    lr_factor,
    step_archs,
    train,
)

SPACE = SearchSpace.preset("mbv3-tiny")


def tiny_config(tmp_path: Path, **train_overrides) -> Path:
    cfg = {
        "space": "mbv3-tiny",
        "bits": 4,
        "data": {"name": "synthetic", "image_size": 32, "holdout": 32, "synthetic_size": 160},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "num_random": 1, "log_every": 1,
                  "eval_images": 0, "seed": 3, **train_overrides},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_step_archs_is_a_seeded_sandwich():
    cfg = TrainConfig(num_random=2, seed=5)
    archs = step_archs(SPACE, 4, cfg, step=7)
    assert archs == step_archs(SPACE, 4, cfg, step=7)
    assert len(archs) == 4
    r = archs[0].r
    assert all(a.r == r for a in archs), "one resolution per step"
    assert archs[0] == SPACE.largest(4).replace(r=r)
    assert archs[1] == SPACE.smallest(4).replace(r=r)
    others = {step_archs(SPACE, 4, cfg, step=s)[2] for s in range(20)}
    assert len(others) > 15, "random subnets change from step to step"
    assert {step_archs(SPACE, 4, cfg, step=s)[0].r for s in range(40)} == set(SPACE.resolutions)


def test_fixed_arch_trains_one_subnet():
    arch = SPACE.sample(__import__("random").Random(0), bits=4)
    cfg = TrainConfig(arch=arch.to_dict())
    assert step_archs(SPACE, 4, cfg, 0) == [arch]


def test_lr_schedule_warmup_then_cosine():
    base, total, warm = 0.1, 100, 10
    lrs = [base * lr_factor(s, total, warm, base, 0.0) for s in range(total)]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.05, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert base * lr_factor(total, total, warm, base, 0.001) == pytest.approx(0.001)


def test_global_batches_are_split_across_ranks_and_resumable():
    single = list(GlobalBatchSampler(100, 8, seed=1, epoch=2))
    ranks = [list(GlobalBatchSampler(100, 4, seed=1, epoch=2, rank=k, world_size=2)) for k in range(2)]
    assert len(single) == 12 and all(len(r) == 12 for r in ranks)
    for b, batch in enumerate(single):
        assert batch == ranks[0][b] + ranks[1][b]
    flat = [i for batch in single for i in batch]
    assert len(set(flat)) == len(flat)
    assert list(GlobalBatchSampler(100, 8, seed=1, epoch=2, start_batch=5)) == single[5:]
    assert list(GlobalBatchSampler(100, 8, seed=1, epoch=3)) != single


def test_config_errors_name_the_key(tmp_path):
    path = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"train\.lr: expected a number"):
        load_train_config(path, ["train.lr=fast"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        load_train_config(path, ["train.bogus=1"])
    with pytest.raises(ValueError, match=r"bits"):
        load_train_config(path, ["bits=9"])
    with pytest.raises(ValueError, match=r"data"):
        load_train_config(path, ["data.name=imagenet-22k"])
    with pytest.raises(ValueError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")


def test_training_learns_and_writes_checkpoints(tmp_path):
    cfg = load_train_config(tiny_config(tmp_path, epochs=3, ckpt_every=4, grad_clip=5.0))
    result = train(cfg, tmp_path / "run", progress=False)
    final = load_checkpoint(result.checkpoint)
    assert final.bits == 4 and final.space.name == "mbv3-tiny" and final.space.num_classes == 10
    assert final.step == result.steps == 3 * (128 // 16)
    assert final.config["data"]["name"] == "synthetic" and final.config["train"]["batch_size"] == 16
    assert all(bool(v) for k, v in final.model.items() if k.endswith(".initialized"))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert {"optimizer", "scheduler", "rng"} <= set(last.extra)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_largest"] for r in records if "loss_largest" in r]
    assert len(losses) == result.steps
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, "the largest subnet's loss goes down"
    assert all(r["images_per_s"] > 0 for r in records if "images_per_s" in r)


def test_divergence_stops_with_the_step_named(tmp_path):
    cfg = load_train_config(tiny_config(tmp_path, lr=1e30, momentum=0.0, label_smoothing=0.0, ckpt_every=1))
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss of subnet"):
        train(cfg, tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last.model.values() if v.is_floating_point())


def _oqat(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "oqat", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.timeout(2400)  # three training processes; minutes on a loaded 2-core machine
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, ckpt_every=3)
    ref = _oqat("train", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()

    run = tmp_path / "killed"
    proc = _oqat("train", str(cfg), "--out", str(run), "--no-progress")
    deadline = time.time() + 900
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:  # kill mid-epoch, a step after a checkpoint was written
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt").step
    assert 0 < killed_at < 16 and not (run / "final.pt").exists()

    resumed = _oqat("train", str(cfg), "--out", str(run), "--resume", "--no-progress")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
    a, b = load_checkpoint(tmp_path / "ref" / "final.pt"), load_checkpoint(run / "final.pt")
    assert a.step == b.step == 16
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key


def test_truncated_and_foreign_checkpoints_fail_clearly(tmp_path):
    cfg = load_train_config(tiny_config(tmp_path, max_steps=2))
    result = train(cfg, tmp_path / "run", progress=False)
    raw = result.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not an oqat checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_the_log_names_the_lsq_kernels_the_supernet_runs(tmp_path, monkeypatch, caplog):
    """A supernet built with eager kernels is logged as eager (the log once asked for the default
    kernels, which also built torch.compile'd ones that the run never used)."""
    import logging

    from helpers import train_config

    import oqat.training.loop as loop

    build = loop.build_supernet
    monkeypatch.setattr(loop, "build_supernet", lambda *a, **k: build(*a, **{**k, "impl": "eager"}))
    cfg = {"space": "mbv3-tiny", "bits": 4,
           "data": {"name": "synthetic", "image_size": 32, "holdout": 16, "synthetic_size": 64},
           "train": {"max_steps": 1, "batch_size": 16, "eval_images": 0, "num_random": 0}}
    with caplog.at_level(logging.INFO, logger="oqat"):
        train_config(cfg, tmp_path / "run")
    assert "LSQ kernels on cpu: eager" in caplog.text
