"""Small pieces several test modules share: a data split as tensors, a briefly trained subnet,
a one-step training run, the oqat command in a child process, the INT4-runtime skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from oqat.data import resize_batch
from oqat.export.onnx import int4_supported

# tests of INT4 weight files skip where onnxruntime cannot load them (requirements/lowest.txt pins 1.18)
NEEDS_INT4_RUNTIME = pytest.mark.skipif(not int4_supported(),
                                        reason="this onnxruntime cannot load INT4 weights (needs >= 1.23)")


def split_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of a dataset split, stacked."""
    x = torch.stack([split[i][0] for i in range(len(split))])
    y = torch.tensor([split[i][1] for i in range(len(split))])
    return x, y


def train_subnet(net, space, arch, x, y, opt_factory, steps: int, seed: int = 0) -> None:
    """Initialise the supernet's steps with one forward of the largest subnet (global generator),
    then train `arch` for `steps` batches of 32 drawn with a generator seeded `seed`."""
    net.train()
    with torch.no_grad():
        big = space.largest(arch.bits)
        net.set_arch(big)
        net(torch.randn(8, space.in_channels, big.r, big.r))
    net.set_arch(arch)
    opt = opt_factory(net.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(resize_batch(x[idx], arch.r)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def one_step_config(space, bits: int, init) -> dict:
    """A training config of one 16-image step on synthetic 32 px data, started from `init`."""
    return {"space": space, "bits": bits, "init": str(init),
            "data": {"name": "synthetic", "image_size": 32, "holdout": 16, "synthetic_size": 64},
            "train": {"max_steps": 1, "batch_size": 16, "eval_images": 0, "num_random": 0}}


def train_config(cfg: dict, folder):
    """Write `cfg` as `folder`.yaml and train it into `folder` (quietly); the TrainResult."""
    import yaml

    from oqat.training import load_train_config, train

    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return train(load_train_config(path), folder, progress=False)


SYNTHETIC = {"name": "synthetic", "image_size": 32, "holdout": 64, "synthetic_size": 256}


def slow_step_groups(net, lr: float) -> list[dict]:
    """Parameter groups of `net`: the weights at the optimizer's `lr`, the LSQ step sizes at
    lr / 10. From scratch on synthetic data, full-rate step updates can zero every activation
    code of a layer within a few dozen updates (Adam at 2 bits by step 28 on an AVX-512 CPU;
    SGD at 3 bits too, on one thread), and the dead layers' zero-variance batch norms then blow
    the gradients up to inf."""
    steps = [p for n, p in net.named_parameters() if n.endswith(".step")]
    weights = [p for n, p in net.named_parameters() if not n.endswith(".step")]
    return [{"params": weights}, {"params": steps, "lr": lr / 10}]


def adam_with_slow_steps(net, lr: float) -> torch.optim.Adam:
    """Adam at `lr` with the step sizes at lr / 10 (:func:`slow_step_groups`). Adam moves every
    parameter by about `lr` per update whatever its gradient's scale (LSQ's gradient scaling is
    made for SGD), a large relative move for a step of a few hundredths."""
    return torch.optim.Adam(slow_step_groups(net, lr), lr=lr)


def trained_smallest_subnet(space, bits: int, *, seed: int, steps: int, resolution: int = 24):
    """The smallest subnet of `space` at `bits` and `resolution` px, trained `steps` Adam steps on
    synthetic data (:data:`SYNTHETIC`), BN re-estimated: (subnet in eval mode, held-out images at
    its resolution, their labels). Real margins, so agreement between engines means something.
    The global generator is seeded first: the training split's augmentation draws from it."""
    from oqat import build_supernet
    from oqat import data as D
    from oqat.measure import recalibrate_bn

    torch.manual_seed(seed)
    data = D.build_data(D.DataConfig.from_dict(SYNTHETIC))
    x, y = split_tensors(data.train)
    net = build_supernet(space, bits)   # native LSQ kernels where a C compiler works: 17 vs 32 s eager here
    arch = space.smallest(bits).replace(r=resolution)
    # the slow steps only where from-scratch training needs them: the 3-8 bit subnets stay those the
    # export tests were tuned on (one flipped near-tie of 64 images already fails a 99.5% criterion)
    optimizer = (lambda _: adam_with_slow_steps(net, 3e-3)) if bits <= 2 else (lambda p: torch.optim.Adam(p, lr=3e-3))
    train_subnet(net, space, arch, x, y, optimizer, steps=steps)
    sub = net.extract(arch).eval()
    recalibrate_bn(sub, [resize_batch(x[i:i + 64], resolution) for i in range(0, 192, 64)])
    hx, hy = split_tensors(data.holdout)
    return sub, resize_batch(hx, resolution), hy


def oqat_env(extra: dict | None = None) -> dict:
    """This environment for a child oqat process, without OQAT_PROCS (the test's --procs decides)."""
    return {k: v for k, v in {**os.environ, **(extra or {})}.items() if k != "OQAT_PROCS"}


def oqat_command(*args) -> list[str]:
    return [sys.executable, "-m", "oqat", *map(str, args)]


def run_oqat(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m oqat ARGS`` in a child process, its output captured."""
    return subprocess.run(oqat_command(*args), capture_output=True, text=True, env=oqat_env(env), timeout=timeout)
