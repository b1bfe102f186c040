"""torchrun data parallelism on CPU (gloo): identical ranks, equivalence to one process.

At 4 bit the equivalence test starts from random (nonzero) BN biases. From the default init
(bias 0) a 4-bit run is not reproducible to rounding even on one process: reversing the order of
the images inside each global batch moves the weights by ~0.35 after 3 steps (float64), as much
as going to 2 ranks does (~0.34). The cause is exact ties, not data parallelism: the quantized
inputs of a BN channel are integer multiples of (activation step x weight step), so now and then
a channel's integer codes sum to exactly 0; its batch mean is then +-1e-20 of pure rounding
residue, and its many exactly-0 inputs (all-zero quantized patches) come out of BN as
-mean*scale + bias = +-1e-18 when bias is 0. After h_swish/ReLU they sit on the clipping bound 0
of the next, unsigned, LSQ quantizer, whose straight-through gradient is g on one side and 0 on
the other, so the summation order of the BN sums decides whole gradient entries. With nonzero
biases those inputs land far from the bound and the 2-rank run matches the 1-process run to
~3e-14 (the reversed-batch control: ~6e-15), while a real data-parallel error still shows: with
the activation step-gradient scale counting only the local N (LSQQuantizer(batched=False)) the
same comparison gives ~0.3.

The runs use float64 so that floating-point summation order (per-rank partial sums, then an
all-reduce) stays far below the tolerances: in float32 a freshly initialised supernet has BN
channels of tiny variance whose gradients carry ~1% rounding noise in any run, 1 or 2 processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(tmp_path: Path, name: str, nproc: int, batch: int, sync_bn: bool, bits: int, data_seed: int = 0,
         bn_bias_std: float = 0.0) -> list[dict]:
    cfg = {
        "space": "mbv3-tiny", "bits": bits,
        "data": {"name": "synthetic", "image_size": 32, "holdout": 32, "synthetic_size": 160, "augment": False,
                 "seed": data_seed},
        "model": {"dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": batch, "lr": 0.05, "num_random": 1,
                  "eval_images": 0, "seed": 1, "sync_bn": sync_bn, "log_every": 1},
    }
    out = tmp_path / name
    out.mkdir()
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = [str(WORKER), str(out / "cfg.yaml"), str(out), "float64", str(bn_bias_std)]
    cmd = [sys.executable, *args] if nproc == 1 else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("bits", [32, 4])
def test_two_ranks_with_sync_bn_match_one_process(tmp_path, bits):
    # 4 bit: nonzero BN biases keep exactly-0 BN inputs off the quantizers' clipping bound (see
    # the module docstring); full precision needs no such help.
    bn_bias_std = 0.1 if bits != 32 else 0.0
    ranks = _run(tmp_path, "ddp", nproc=2, batch=8, sync_bn=True, bits=bits, bn_bias_std=bn_bias_std)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
    (single,) = _run(tmp_path, "single", nproc=1, batch=16, sync_bn=True, bits=bits, bn_bias_std=bn_bias_std)
    # Same global batches, global-batch BN statistics, averaged gradients, LSQ step gradients
    # scaled by the global element count, rank-averaged step init: equal up to float64 rounding
    # (~3e-14 measured at 4 bit after 3 steps). A real mismatch is orders of magnitude above 1e-8
    # (a local instead of global N in the activation step-gradient scale gives ~0.3).
    assert _max_diff(ranks[0], single) < 1e-8


def _distance(a: dict, b: dict) -> float:
    """L2 distance between the parameters (not BN buffers) of two state dicts."""
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in keys) ** 0.5


def test_two_ranks_without_sync_bn_stay_identical(tmp_path):
    ranks = _run(tmp_path, "ddp", nproc=2, batch=8, sync_bn=False, bits=4)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
    (single,) = _run(tmp_path, "single", nproc=1, batch=16, sync_bn=False, bits=4)
    # Per-rank BN statistics (here of 8 images) make the run differ from the single-process one,
    # and by no small amount: after 3 steps, 2 ranks vs 1 process measured 8.7 (4 bit) and 4.8
    # (FP), a single process on other data 9.1 and 5.0, also with nonzero BN biases. No tolerance
    # tighter than "as far as other data" holds, so only "different but finite" is asserted; the
    # exact equivalence is the sync-BN test's.
    near = _distance(ranks[0], single)
    assert 0 < near < float("inf")
