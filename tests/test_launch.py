"""oqat starts its own single-threaded data-parallel processes: the same global batch, the same
result as torchrun with the per-process share of it, deterministic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import oqat_command, oqat_env, run_oqat

from oqat.models import load_checkpoint
from oqat.training.launch import (
    ERRORS_ENV,
    _other_ranks_errors,
    choose_procs,
    process_batch,
    report_error,
    usable_cores,
)

CFG = {"space": "mbv3-tiny", "bits": 4, "data": {"name": "synthetic", "image_size": 32, "holdout": 32,
                                                "synthetic_size": 160},
       "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 0.05, "num_random": 1, "log_every": 1,
                 "eval_images": 0, "seed": 3, "device": "cpu"}}


def _weights(path):
    return load_checkpoint(path).model


def test_choice_of_the_process_count(monkeypatch):
    monkeypatch.delenv("OQAT_PROCS", raising=False)
    assert choose_procs(None, "auto", "cpu") == usable_cores()
    assert choose_procs("1", "auto", "cpu") == 1 and choose_procs(None, 3, "cpu") == 3
    monkeypatch.setenv("OQAT_PROCS", "2")
    assert choose_procs(None, "auto", "cpu") == 2 and choose_procs("1", "auto", "cpu") == 1  # the flag wins
    monkeypatch.setenv("WORLD_SIZE", "4")   # already a rank of torchrun (or of launch): never again
    assert choose_procs("8", "auto", "cpu") == 1
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="procs: expected a positive integer or 'auto', got '0'"):
        choose_procs("0", "auto", "cpu")
    monkeypatch.setenv("OQAT_SPLIT_BATCH", "2")
    assert process_batch(64, 2) == 32 and process_batch(64, 1) == 64
    with pytest.raises(ValueError, match="does not split evenly over 2 processes"):
        process_batch(15, 2)


def test_two_processes_equal_torchrun_with_half_the_batch(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    own = run_oqat("train", cfg, "--out", tmp_path / "own", "--procs", "2", "--no-progress")
    assert own.returncode == 0, own.stderr
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "oqat", "train", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress",
                          "--set", "train.batch_size=8"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr
    a, b = _weights(tmp_path / "own" / "final.pt"), _weights(tmp_path / "ref" / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_oqat("train", cfg, "--out", tmp_path / "again", "--procs", "2", "--no-progress")
    assert again.returncode == 0
    c = _weights(tmp_path / "again" / "final.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)          # deterministic
    assert load_checkpoint(tmp_path / "own" / "final.pt").config["train"]["batch_size"] == 8


def test_a_failing_rank_fails_the_run(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "train": {**CFG["train"], "batch_size": 15}}))
    proc = run_oqat("train", cfg, "--out", tmp_path / "t", "--procs", "2", "--no-progress")
    assert proc.returncode == 2 and "does not split evenly over 2 processes" in proc.stderr
    assert proc.stderr.count("does not split evenly") == 1, proc.stderr   # both ranks failed, one line said it


def test_each_distinct_error_line_is_printed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    for rank, line in enumerate(["oqat run: error: bad input", "oqat run: error: bad input",
                                 "oqat run: error: rank 2's own trouble", "oqat run: error: rank 2's own trouble"]):
        monkeypatch.setenv("RANK", str(rank))
        report_error(line)
    assert capsys.readouterr().err == "oqat run: error: bad input\n"    # rank 0 alone prints as it fails
    assert _other_ranks_errors(tmp_path, 4) == ["oqat run: error: rank 2's own trouble (process 3 of 4)"]
    (tmp_path / "rank0.txt").unlink()         # rank 0 stopped before it could say anything
    assert _other_ranks_errors(tmp_path, 2) == ["oqat run: error: bad input (process 2 of 2)"]
    monkeypatch.delenv(ERRORS_ENV)
    monkeypatch.setenv("RANK", "1")           # a rank of torchrun: every rank says its own line
    report_error("oqat train: error: x")
    assert capsys.readouterr().err == "oqat train: error: x\n"


def _processes_naming(path: Path) -> list[str]:
    """Command lines of the live processes that name `path` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(path).encode() in argv:
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; parent-death signals are Linux's")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_stops_every_rank(tmp_path, sig):
    """kill, timeout or a scheduler stop the launcher: no rank may keep running (and holding the
    folder) after it, and a SIGTERM says how to continue."""
    import signal
    import time

    from oqat.utils.files import folder_lock

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "train": {**CFG["train"], "epochs": 100, "max_steps": 1000,
                                                    "ckpt_every": 1}}))
    out = tmp_path / "t"
    proc = subprocess.Popen(oqat_command("train", cfg, "--out", out, "--procs", "2", "--no-progress"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=oqat_env())
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and (out / "checkpoints" / "last.pt").exists(), "training did not start"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    if sig == "SIGTERM":
        assert proc.returncode == 143 and "stopped by SIGTERM; the same command with --resume continues" in err, err
    deadline = time.monotonic() + 30
    while _processes_naming(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(out) == []
    with folder_lock(out, "training folder"):  # free again: the run can be resumed
        pass
