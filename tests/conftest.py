"""Shared fixtures: the packaged spaces, the OQA README subnet, and a way to make a network's
BN statistics, kernel transforms and step sizes non-trivial before comparing outputs."""

from __future__ import annotations

import os
import tempfile

# The native LSQ kernels are built into a private folder of this test session, never into the
# user's cache (tests must not depend on, or write to, what a previous run left there).
os.environ.setdefault("OQAT_KERNEL_CACHE", tempfile.mkdtemp(prefix="oqat-test-kernels-"))
# `oqat run`/`oqat train` called in-process stay one process (tests of --procs ask for it explicitly).
os.environ.setdefault("OQAT_PROCS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread by default: the tests run small tensors, where a second thread gains little,
# and on a busy 2-core machine every OpenMP barrier can wait a whole scheduler slice for the other
# thread (measured: tests/test_supernet.py 15 s with one thread, 114 s with two under load).
torch.set_num_threads(int(os.environ.get("OQAT_TEST_THREADS", "1")))

from oqat import Arch, SearchSpace  # noqa: E402  (after the thread count, before any torch work)

# The 4-bit subnet listed in the OQA README (ks / e / d / r flags).
OQA_README_FLAGS = {
    "ks": "3,3,5,3,3,5,5,7,3,5,5,3,5,5,3,5,3,5,7,5",
    "expand": "3,3,4,4,3,4,3,3,3,3,3,4,4,3,6,6,6,4,3,3",
    "depth": "2,2,3,2,3",
    "resolution": "128",
}


@pytest.fixture(scope="session")
def tiny_space() -> SearchSpace:
    return SearchSpace.preset("mbv3-tiny")


@pytest.fixture(scope="session")
def space(tiny_space) -> SearchSpace:
    """The space of the calibration, search, predictor and latency tests."""
    return tiny_space


@pytest.fixture(scope="session")
def imagenet_space() -> SearchSpace:
    return SearchSpace.preset("mbv3-imagenet")


@pytest.fixture(scope="session")
def oqa_flags() -> dict:
    return dict(OQA_README_FLAGS)


@pytest.fixture(scope="session")
def oqa_arch() -> Arch:
    f = OQA_README_FLAGS
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    return Arch(ks=ints(f["ks"]), e=ints(f["expand"]), d=ints(f["depth"]), r=int(f["resolution"]), bits=4)


@pytest.fixture(scope="session")
def perturb():
    """perturb(net, seed): random BN running stats and affine parameters, and kernel transforms
    away from the identity, so that slicing mistakes show up in the outputs."""

    @torch.no_grad()
    def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
        for name, p in net.named_parameters():
            if "kernel_transforms" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    return _perturb
