"""Supernet builders, extracted subnets, and the checkpoint file that carries a supernet."""

from .checkpoint import Checkpoint, CheckpointError, library_versions, load_checkpoint, load_supernet, nonfinite_tensors
from .mobilenetv3 import EDGE_LAYERS, SubNet, Supernet, build_supernet

__all__ = ["EDGE_LAYERS", "Checkpoint", "CheckpointError", "SubNet", "Supernet", "build_supernet", "library_versions",
           "load_checkpoint", "load_supernet", "nonfinite_tensors"]
