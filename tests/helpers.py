"""Small pieces several test modules share: a data split as tensors, a briefly trained subnet."""

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
