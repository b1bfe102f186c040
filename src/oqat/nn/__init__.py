"""Quantized building blocks shared by supernets and extracted subnets."""

from .block import MBConvBlock
from .layers import ElasticDepthwise, QConvBN, QLinear, SlicedBatchNorm2d, SqueezeExcite

__all__ = ["MBConvBlock", "ElasticDepthwise", "QConvBN", "QLinear", "SlicedBatchNorm2d", "SqueezeExcite"]
