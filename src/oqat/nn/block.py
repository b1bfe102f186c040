"""Inverted-residual (MBConv) block with elastic kernel size and expand ratio."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ElasticDepthwise, QConvBN, SqueezeExcite, output_can_be_negative


class MBConvBlock(nn.Module):
    """[1x1 expand] -> depthwise -> [SE] -> 1x1 project (linear), identity shortcut when shapes
    allow. Widths are the largest ones; ``set_active`` picks the hidden width and kernel that
    the next forward uses. An extracted block has exactly one choice of each.

    Activation quantizers are signed where their input can be negative: the block input (a
    linear bottleneck) always, the depthwise and project inputs when the activation is not ReLU.
    ``unsigned_activations`` forces OQA's all-unsigned behaviour.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, stride: int,
                 act: str, use_se: bool, kernel_choices: tuple[int, ...], *, expand: bool = True,
                 bits: int | None = None, unsigned_activations: bool = False, input_act: str | None = None,
                 se_reduction: int = 4, divisor: int = 8, impl: str = "auto"):
        super().__init__()
        if not expand and hidden_channels != in_channels:
            raise ValueError("a block without expansion needs hidden_channels == in_channels")
        signed = (lambda neg: neg and not unsigned_activations)
        common = dict(bits=bits, impl=impl)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.expand = (QConvBN(in_channels, hidden_channels, 1, act=act,
                               act_signed=signed(output_can_be_negative(input_act)), **common)
                       if expand else None)
        dw_input_act = act if expand else input_act
        self.depthwise = ElasticDepthwise(hidden_channels, kernel_choices, stride, act=act,
                                          act_signed=signed(output_can_be_negative(dw_input_act)), **common)
        self.se = SqueezeExcite(hidden_channels, se_reduction, divisor) if use_se else None
        self.project = QConvBN(hidden_channels, out_channels, 1, act=None,
                               act_signed=signed(output_can_be_negative(act)), **common)
        self.residual = stride == 1 and in_channels == out_channels
        self.active_hidden = hidden_channels
        self.active_kernel = max(kernel_choices)

    def set_active(self, hidden_channels: int, kernel_size: int) -> None:
        if self.expand is None and hidden_channels != self.in_channels:
            raise ValueError("this block has no expansion layer; its width is fixed")
        if hidden_channels > self.depthwise.out_channels:
            raise ValueError(f"hidden width {hidden_channels} exceeds the block's {self.depthwise.out_channels}")
        self.active_hidden, self.active_kernel = hidden_channels, kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The expand (and, without SE, the depthwise) activation is left to the next layer, which
        # applies it inside its input quantizer: the same numbers, one memory pass fewer.
        if self.expand is None:
            y, pending = x, None
        else:
            y, pending = self.expand(x, out_channels=self.active_hidden, apply_act=False), self.expand.act_name
        defer = self.se is None
        y = self.depthwise(y, kernel_size=self.active_kernel, input_act=pending, apply_act=not defer)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y, input_act=self.depthwise.act_name if defer else None)
        return x + y if self.residual else y

    def extract(self) -> "MBConvBlock":
        """A standalone block at the active width and kernel, sharing nothing with this one."""
        hidden, kernel = self.active_hidden, self.active_kernel
        block = MBConvBlock.__new__(MBConvBlock)
        nn.Module.__init__(block)
        block.in_channels, block.out_channels, block.stride = self.in_channels, self.out_channels, self.stride
        block.expand = None if self.expand is None else self.expand.extract(self.in_channels, hidden)
        block.depthwise = self.depthwise.extract(hidden, hidden, kernel)
        block.se = None if self.se is None else self.se.extract(hidden)
        block.project = self.project.extract(hidden, self.out_channels)
        block.residual = self.residual
        block.active_hidden, block.active_kernel = hidden, kernel
        return block
