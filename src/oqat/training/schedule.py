"""What each step trains on: the learning-rate schedule, the sandwich's subnets and the data order.

All three are pure functions of the seed and the step (or epoch), identical on every rank, which
makes resume exact.
"""

from __future__ import annotations

import math
import random

import torch
from torch.utils.data import Sampler

from ..space import Arch, SearchSpace
from .config import TrainConfig


# ----------------------------------------------------------------------------- schedule, sampling
def lr_factor(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up then cosine decay to `minimum`, as a multiplier of `base`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return (minimum + (base - minimum) * cosine) / base


def step_archs(space: SearchSpace, bits: int, cfg: TrainConfig, step: int) -> list[Arch]:
    """The subnets of one step: identical on every rank (seeded by seed and step)."""
    if cfg.arch is not None:
        return [Arch.from_dict({**cfg.arch, "bits": bits})]
    rng = random.Random(f"oqat-sandwich:{cfg.seed}:{step}")
    r = rng.choice(space.resolutions)
    archs = [space.largest(bits).replace(r=r), space.smallest(bits).replace(r=r)]
    archs += [space.sample(rng, bits, resolution=r) for _ in range(cfg.num_random)]
    return archs


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch of a seeded per-epoch permutation.

    Global batch b is ``perm[b*B*W:(b+1)*B*W]``; rank k takes the k-th slice of B. A run on one
    process with batch B*W therefore sees the same global batches as W ranks with batch B.
    ``start_batch`` skips batches already trained (resume) without loading them.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        self.n, self.batch, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world, self.start = rank, world_size, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        global_batch = self.batch * self.world
        for b in range(self.start, self.batches_per_epoch()):
            lo = b * global_batch + self.rank * self.batch
            yield perm[lo:lo + self.batch].tolist()


__all__ = ["GlobalBatchSampler", "lr_factor", "step_archs"]
