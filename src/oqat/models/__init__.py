"""Supernet builders and extracted subnets."""

from .mobilenetv3 import SubNet, Supernet, build_supernet

__all__ = ["Supernet", "SubNet", "build_supernet"]
