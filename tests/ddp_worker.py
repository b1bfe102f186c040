"""Run by tests/test_distributed.py under torchrun: train, then save this rank's weights."""

import sys
from pathlib import Path

import torch

from oqat.train import load_train_config, train

config, out = sys.argv[1], Path(sys.argv[2])
if len(sys.argv) > 3:  # e.g. float64: rounding far below what the comparisons look at
    torch.set_default_dtype(getattr(torch, sys.argv[3]))
result = train(load_train_config(config), out, progress=False)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
