"""Quantized layers that serve both the supernet and extracted subnets.

Every layer holds its weights at the largest size and, in ``forward``, uses the leading slice
that matches its input (and the requested output width / kernel size). An extracted subnet is
made of the same classes at exactly the active size, so the slice is the whole tensor and the
two compute the same thing. Quantizers sit on the sliced weight and on the layer input, and a
physical layer owns exactly one weight step and one activation step whatever slice is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import LSQQuantizer, activation, apply_activation_
from ..space import make_divisible
from .batchnorm import batch_norm
from .depthwise import depthwise_conv2d
from .pointwise import pointwise_conv2d


def output_can_be_negative(act: str | None) -> bool:
    """Whether a quantizer fed by `act` gets a signed grid.

    Only linear outputs (no activation: block outputs, residual sums) are signed. ReLU outputs
    are non-negative; h_swish outputs reach only -0.375, and spending half of a 2- or 3-bit grid
    on that lobe leaves a single positive level at 2 bit (measured: a 2-bit supernet inherited from
    3 bit then stayed at chance), so they are quantized unsigned like OQA does, the lobe clipped.
    """
    return act is None


def _leading(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The leading ``sizes`` slice of ``t``; ``t`` itself (not a view) when that is all of it, so
    extracted layers use their parameters directly (no-grad views of parameters break autograd
    hooks such as FlopCounterMode's module tracker)."""
    if all(n == m for n, m in zip(sizes, t.shape)):
        return t
    return t[tuple(slice(0, n) for n in sizes)]


def _copy_quantizer(dst: LSQQuantizer | None, src: LSQQuantizer | None) -> None:
    if dst is not None and src is not None:
        dst.step.data.copy_(src.step.data)
        dst.initialized.copy_(src.initialized)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``x.size(1)`` channels; running statistics of the slice are
    updated in place, so every subnet trains and re-calibrates the shared statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm2d's forward on the slice (the same momentum and running-statistics rules),
        through :func:`oqat.nn.batchnorm.batch_norm` (native CPU kernels where they apply)."""
        self._check_input_dim(x)
        c = x.size(1)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        mean, var, weight, bias = (None if t is None else _leading(t, c)
                                   for t in (self.running_mean, self.running_var, self.weight, self.bias))
        return batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)

    def extract(self, channels: int) -> nn.BatchNorm2d:
        bn = SlicedBatchNorm2d(channels, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:channels])
            bn.bias.copy_(self.bias[:channels])
            bn.running_mean.copy_(self.running_mean[:channels])
            bn.running_var.copy_(self.running_var[:channels])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class _QuantizedInputAndWeight:
    """What a layer with an input quantizer `act_quant` and a weight quantizer `weight_quant`
    (either may be None) does now; exporters and checks ask the layer, not its quantizers."""

    act_quant: LSQQuantizer | None
    weight_quant: LSQQuantizer | None

    @property
    def quantizes_input(self) -> bool:
        return self.act_quant is not None and self.act_quant.enabled

    @property
    def quantizes_weight(self) -> bool:
        return self.weight_quant is not None and self.weight_quant.enabled


class QConvBN(_QuantizedInputAndWeight, nn.Module):
    """act_quant -> conv (weight_quant on the weight slice) -> BN -> activation.

    ``bits=None`` or 32 keeps the quantizers as identities; ``quantize=False`` builds none (the
    full-precision stem). ``groups="depthwise"`` makes a depthwise conv whose width follows x.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 *, depthwise: bool = False, bn: bool = True, act: str | None = None,
                 bits: int | None = None, act_signed: bool = True, quantize: bool = True,
                 impl: str = "auto"):
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError("depthwise conv needs in_channels == out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.depthwise = kernel_size, stride, depthwise
        self.act_name = act
        self.act_quant = LSQQuantizer(bits, signed=act_signed, impl=impl, batched=True) if quantize else None
        self.weight = nn.Parameter(torch.empty(out_channels, 1 if depthwise else in_channels, kernel_size, kernel_size))
        self.weight_quant = LSQQuantizer(bits, signed=True, impl=impl) if quantize else None
        self.bn = SlicedBatchNorm2d(out_channels) if bn else None
        self.act = activation(act)
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else "conv"
        return f"{kind} {self.in_channels}->{self.out_channels}, k={self.kernel_size}, stride={self.stride}"

    def active_weight(self, in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
        """The weight slice a subnet uses (overridden by elastic kernels)."""
        if kernel_size != self.kernel_size:
            raise ValueError(f"kernel size {kernel_size} is not available in this layer (k={self.kernel_size})")
        return _leading(self.weight, out_channels, 1 if self.depthwise else in_channels)

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel_size: int | None = None, *,
                input_act: str | None = None, apply_act: bool = True) -> torch.Tensor:
        """``input_act``: `x` is a pre-activation (the previous layer ran with ``apply_act=False``)
        and this layer applies that activation first, inside its input quantizer's kernel when
        quantization is on (one memory pass instead of two), in place otherwise. ``apply_act=False``
        returns this layer's output before its activation, for the next layer to fuse."""
        in_channels = x.size(1)
        if self.depthwise:
            out_channels = in_channels
        elif out_channels is None:
            out_channels = self.out_channels
        kernel_size = kernel_size or self.kernel_size
        weight = self.active_weight(in_channels, out_channels, kernel_size)
        if input_act is not None and not self.quantizes_input:
            x = apply_activation_(x, input_act)
            input_act = None
        if self.act_quant is not None:
            x = self.act_quant(x, act=input_act)  # act=None: plain quantization
            weight = self.weight_quant(weight)
        if self.depthwise:
            x = depthwise_conv2d(x, weight, self.stride, kernel_size // 2)
        elif kernel_size == 1 and self.stride == 1:
            x = pointwise_conv2d(x, weight)
        else:
            x = F.conv2d(x, weight, None, self.stride, kernel_size // 2)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x) if apply_act else x

    def extract(self, in_channels: int, out_channels: int, kernel_size: int | None = None) -> "QConvBN":
        """A standalone layer of exactly the active size, with the same steps and statistics."""
        kernel_size = kernel_size or self.kernel_size
        bits = self.weight_quant.bits if self.weight_quant is not None else None
        act_signed = self.act_quant.signed if self.act_quant is not None else True
        impl = self.weight_quant.impl if self.weight_quant is not None else "auto"
        layer = QConvBN(in_channels, out_channels, kernel_size, self.stride, depthwise=self.depthwise,
                        bn=self.bn is not None, act=self.act_name, bits=bits, act_signed=act_signed,
                        quantize=self.act_quant is not None, impl=impl)
        with torch.no_grad():
            layer.weight.copy_(self.active_weight(in_channels, out_channels, kernel_size))
        _copy_quantizer(layer.act_quant, self.act_quant)
        _copy_quantizer(layer.weight_quant, self.weight_quant)
        if self.bn is not None:
            layer.bn = self.bn.extract(out_channels)
        return layer


class QLinear(_QuantizedInputAndWeight, nn.Module):
    """act_quant -> linear on the quantized weight, float bias: the classifier of a space with
    ``edge_bits`` (method.md: "first/last layer at 8 bit"). ``weight`` and ``bias`` keep
    nn.Linear's names, so its state-dict keys are a full-precision classifier's plus two steps."""

    def __init__(self, in_features: int, out_features: int, *, bits: int | None, act_signed: bool,
                 impl: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = LSQQuantizer(bits, signed=act_signed, impl=impl, batched=True)
        self.weight_quant = LSQQuantizer(bits, signed=True, impl=impl)
        reference = nn.Linear(in_features, out_features)  # nn.Linear's initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    def extra_repr(self) -> str:
        return f"linear {self.in_features}->{self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def extract(self) -> "QLinear":
        layer = QLinear(self.in_features, self.out_features, bits=self.weight_quant.bits,
                        act_signed=self.act_quant.signed, impl=self.weight_quant.impl)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        _copy_quantizer(layer.act_quant, self.act_quant)
        _copy_quantizer(layer.weight_quant, self.weight_quant)
        return layer


class ElasticDepthwise(QConvBN):
    """Depthwise conv with elastic kernel size: one k_max x k_max weight; a smaller kernel is
    the centre crop passed through a learned (k*k x k*k) transform, one per step down (OFA)."""

    def __init__(self, channels: int, kernel_choices: tuple[int, ...], stride: int = 1, **kwargs):
        super().__init__(channels, channels, max(kernel_choices), stride, depthwise=True, **kwargs)
        self.kernel_choices = tuple(sorted(kernel_choices))
        self.kernel_transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for small, big in zip(self.kernel_choices[:-1], self.kernel_choices[1:])
        })

    def active_weight(self, in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
        if kernel_size not in self.kernel_choices:
            raise ValueError(f"kernel size {kernel_size} is not one of {self.kernel_choices}")
        weight = _leading(self.weight, out_channels)
        size = self.kernel_size
        for big, small in zip(self.kernel_choices[::-1], self.kernel_choices[-2::-1]):
            if big <= kernel_size:
                break
            start = (big - small) // 2
            crop = weight[:, :, start:start + small, start:start + small].reshape(-1, small * small)
            weight = F.linear(crop, self.kernel_transforms[f"{big}to{small}"]).reshape(out_channels, 1, small, small)
            size = small
        assert size == kernel_size
        return weight


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite on the first ``x.size(1)`` channels (full precision, as in OQA)."""

    def __init__(self, channels: int, reduction: int = 4, divisor: int = 8):
        super().__init__()
        self.reduction, self.divisor = reduction, divisor
        mid = self.mid_channels(channels)
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)

    def mid_channels(self, channels: int) -> int:
        return make_divisible(channels // self.reduction, self.divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        mid = self.mid_channels(c)
        y = x.mean((2, 3), keepdim=True)
        reduce_w, reduce_b = _leading(self.reduce.weight, mid, c), _leading(self.reduce.bias, mid)
        expand_w, expand_b = _leading(self.expand.weight, c, mid), _leading(self.expand.bias, c)
        y = F.relu(F.conv2d(y, reduce_w, reduce_b), inplace=True)
        y = F.hardsigmoid(F.conv2d(y, expand_w, expand_b), inplace=True)
        return x * y

    def extract(self, channels: int) -> "SqueezeExcite":
        se = SqueezeExcite(channels, self.reduction, self.divisor)
        mid = self.mid_channels(channels)
        with torch.no_grad():
            se.reduce.weight.copy_(self.reduce.weight[:mid, :channels])
            se.reduce.bias.copy_(self.reduce.bias[:mid])
            se.expand.weight.copy_(self.expand.weight[:channels, :mid])
            se.expand.bias.copy_(self.expand.bias[:channels])
        return se
