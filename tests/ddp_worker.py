"""Run by tests/test_distributed.py under torchrun: train, then save this rank's weights.

Arguments: CONFIG OUT [DTYPE [BN_BIAS_STD]]. The supernet runs the eager LSQ kernels (the
reference ones). A BN_BIAS_STD > 0 draws the supernet's BN biases from N(0, std^2) (one fixed
seed, so every run starts alike) instead of 0; see test_distributed.py for why the 4-bit
comparison needs that.
"""

import sys
from pathlib import Path

import torch

import oqat.training.loop
from oqat.training import load_train_config, train

config, out = sys.argv[1], Path(sys.argv[2])
if len(sys.argv) > 3:  # e.g. float64: rounding far below what the comparisons look at
    torch.set_default_dtype(getattr(torch, sys.argv[3]))
bn_bias_std = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
build = oqat.training.loop.build_supernet


def build_for_the_test(*args, **kwargs):
    # Eager LSQ kernels: the native ones are float32 only, and building the torch.compile'd
    # float64 ones took ~7 s in every process for a 3-step run.
    net = build(*args, **{**kwargs, "impl": "eager"})
    if bn_bias_std > 0:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.bias.copy_(bn_bias_std * torch.randn(m.bias.shape, generator=g))
    return net


oqat.training.loop.build_supernet = build_for_the_test
result = train(load_train_config(config), out, progress=False)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
