"""Small pieces several test modules share: a data split as tensors, a briefly trained subnet,
a one-step training run."""

from __future__ import annotations

import torch

from oqat.data import resize_batch


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
