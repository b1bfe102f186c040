"""Integer ONNX form of an extracted subnet: every quantized conv runs on an integer kernel.

Each quantized conv becomes ``QLinearConv`` (uint8 activation codes x int8 weight codes -> int32
accumulator -> requantized 8-bit output) or, where its output must stay exact in float,
``ConvInteger`` followed by a float epilogue. What the conv's output feeds decides which:

``mode="exact"``: every quantized conv is ``ConvInteger`` (the int32 accumulator of the trained
codes), ``Cast``, one ``Mul`` by the per-channel scale ``s_x * s_w * gamma / sigma`` and one
``Add`` of the BN bias in float, then the float ops (activation, squeeze-excite, residual) and
``QuantizeLinear`` + ``Clip`` into the next quantizer: PyTorch's arithmetic up to float rounding.

``mode="fast"``: every quantized conv is a requantizing ``QLinearConv`` (MLAS's uint8 x int8
kernels), BN folded into per-output-channel weight scales and an int32 bias:

* **direct** (the conv is followed, through nothing or a ReLU, by the next layer's activation
  quantizer): ``QLinearConv`` writes the next quantizer's codes itself (``y_scale`` = its step,
  zero point 0 or 128) and an integer ``Clip`` holds the b-bit grid (ReLU = the lower bound 0).
  The only inexactness is the int32 bias: it is rounded to the accumulator's unit, which per
  channel gains (see :func:`choose_gains`) make up to 127/max|code| times finer.
* **intermediate** (h_swish, squeeze-excite or a residual add sits between the conv and the next
  quantizer): ``QLinearConv`` into an 8-bit tensor whose range comes from the BN statistics (or,
  before h_swish, from the next quantizer's grid), ``DequantizeLinear``, the float ops, then
  ``QuantizeLinear`` + ``Clip``: one extra rounding, so codes near a boundary move, by one where
  the intermediate's 8-bit step is finer than the next quantizer's, by more where it is not
  (seen at 2 bit after the global pool that feeds ``feature_mix``: 2-3).

Layers that a requantizing QLinearConv cannot express exactly enough (a BN channel of zero
variance, an 8-bit -128 code to negate) take the exact route in both modes; ``feature_mix``
(no BN, float classifier after it) always does.

Codes: weights are the trained int8 codes; a channel whose BN scale is negative has its codes
negated (the folded scale must be positive); an 8-bit code of -128 cannot be negated, so such a
layer keeps its codes and takes the exact route. Activations of a signed quantizer are held as
uint8 with zero point 128 (onnxruntime's x86 kernels run uint8 x int8 about 10x faster than
int8 x int8), of an unsigned one as uint8 with zero point 0. ``weight_gain`` > 1 stores
``gain * code`` (still int8; the accumulator is exactly ``gain`` times the trained one) so the
int32 BN bias is ``gain`` times finer: see :func:`layer_gain`.

The stem, squeeze-excite and classifier stay float (as OQA) unless the space has ``edge_bits``:
then the stem is a quantized conv like the others and the classifier a float ``Gemm`` on its
dequantized 8-bit input and weight codes. Everything the verification needs
(which tensor holds which quantizer's codes, with which zero point, gain and sign) is in the
returned :class:`IntCodes` list and in the file's ``integer`` metadata.

(One module of more than 400 lines, on purpose: the exact and the fast route and the per-layer
fallback between them share one graph builder, its names and its state; split it by route
when a third form is added.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto

from ..nn.block import MBConvBlock
from ..nn.layers import QConvBN, QLinear
from ..quant import LSQQuantizer, qrange
from .graph import FLOAT_WEIGHTS, INPUT_NAME, GraphBuilder
from .onnx import (
    DEFAULT_OPSET,
    _check_supported,
    _scale_value,
    dequantized_weight_codes,
    weight_codes,
    weight_split,
)

MODES = ("exact", "fast")
DEFAULT_MODE = "exact"
MAX_BITS = 8
BN_RANGE_SIGMAS = 6.0          # fast route: an intermediate covers beta +- 6 |gamma| of every channel
INT_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv", "MatMulInteger", "MatMulIntegerToFloat",
                "QGemm", "DynamicQuantizeMatMul")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "ConvTranspose", "MatMul", "Gemm", "FusedGemm",
                  "FusedMatMul")


@dataclass
class IntCodes:
    """Where one quantizer's integer codes are in the graph: code = (stored - zero_point) / gain,
    weights also times ``sign`` per output channel (-1 where the codes were negated)."""

    name: str                 # quantizer module path
    kind: str                 # "weight" or "activation"
    bits: int
    signed: bool
    tensor: str               # graph tensor (activation) or initializer (weight)
    zero_point: int = 0
    gain: list[int] | int = 1                            # weights: per output channel
    negated: list[int] = field(default_factory=list)   # weight channels stored negated
    split: str = ""           # weights stored in two parts (code_split.SPLITS_BY_NAME); tensor = the first

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IntLayer:
    """How one quantized conv was written: its node, route and folding figures."""

    name: str
    op: str                   # "QLinearConv" or "ConvInteger"
    route: str                # "direct", "fast" or "exact"
    gain: int
    negated_channels: int
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _fail(name: str, why: str):
    raise ValueError(f"onnx-int: layer {name}: {why}")


def _zero_point(q: LSQQuantizer) -> int:
    return 128 if q.signed else 0


def _grid(q: LSQQuantizer) -> tuple[int, int]:
    """The b-bit grid of `q` in its uint8 container (stored values)."""
    qn, qp = qrange(q.bits, q.signed)
    z = _zero_point(q)
    return qn + z, qp + z


def choose_gains(max_codes: np.ndarray, bias_acc: np.ndarray, x_max: int) -> np.ndarray:
    """Per output channel, the integer gain g (1 <= g <= :func:`layer_gain`) that makes the int32
    bias most exact: it minimises the rounding error of ``g * bias_acc`` (the BN bias in units of
    the trained accumulator) measured in output units, ``dist(g * bias_acc, Z) / g``."""
    out = np.ones(len(max_codes), np.int64)
    for c, (mc, b) in enumerate(zip(max_codes, bias_acc)):
        top = layer_gain(int(mc), x_max)
        if not np.isfinite(b):
            continue
        gs = np.arange(1, top + 1)
        err = np.abs(gs * b - np.rint(gs * b)) / gs
        out[c] = int(gs[np.flatnonzero(err <= err.min() * (1 + 1e-9))[-1]])
    return out


def layer_gain(max_code: int, x_max: int) -> int:
    """The largest integer gain with ``gain * max|code| <= 127`` whose products also stay clear of
    int16 saturation on x86 without VNNI (``2 * x_max * w_max <= 32767``: MLAS's AVX2 uint8 x int8
    kernel sums pairs of products in int16)."""
    if max_code <= 0:
        return 1
    g = 127 // max_code
    while g > 1 and 2 * x_max * g * max_code > 32767:
        g -= 1
    return max(1, g)


@dataclass
class _Folded:
    """A conv with BN folded: int8 weights (codes * gain * sign), positive per-channel scales such
    that z = acc * x_scale * w_scale + bias (float), and the float BN bias."""

    weight: np.ndarray        # int8, shape of the conv weight
    w_scale: np.ndarray       # float64 (C_out,), positive
    bias: np.ndarray          # float64 (C_out,), in output units
    gain: np.ndarray          # int (C_out,): stored = code * sign * gain
    negated: list[int]
    codes: np.ndarray         # the trained codes (int, unsigned by sign)
    mult: np.ndarray          # float64 (C_out,): z = acc_of_trained_codes * x_scale * mult + bias (signed)


def needs_exact(layer: QConvBN) -> str | None:
    """Why `layer` cannot be a requantizing QLinearConv (None if it can): a BN channel with zero
    variance (a channel that was constant on the calibration data: its folded scale is
    ``gamma / sqrt(eps)``, so the int32 bias rounding would move its codes by many steps), or an
    8-bit code of -128 in a channel with a negative BN scale (not negatable in int8)."""
    bn = layer.bn
    if bn is not None and bn.running_var is not None and bool((bn.running_var == 0).any()):
        return f"BatchNorm channel {int((bn.running_var == 0).nonzero()[0])} has zero variance"
    if layer.weight_quant.bits == 8 and bn is not None:
        codes = weight_codes(layer.weight, layer.weight_quant)
        neg = (bn.weight.detach() < 0).reshape(-1, *([1] * (codes.dim() - 1)))
        if bool(((codes == -128) & neg).any()):
            return "an 8-bit weight code of -128 in a channel with a negative BatchNorm scale (not negatable in int8)"
    return None


def fold(name: str, layer: QConvBN, *, gain: bool, negate: bool = True) -> _Folded:
    """Fold BN into per-channel scales/bias without changing the codes (see module doc)."""
    wq, aq = layer.weight_quant, layer.act_quant
    codes = weight_codes(layer.weight, wq).cpu().numpy().astype(np.int64)
    s_w = float(_scale_value(wq))
    cout = codes.shape[0]
    if layer.bn is not None:
        bn = layer.bn
        if bn.running_mean is None or bn.running_var is None:
            _fail(name, "its BatchNorm has no running statistics")
        var = bn.running_var.detach().double().cpu().numpy()
        bad = np.flatnonzero(~(np.isfinite(var) & (var + float(bn.eps) > 0) & (var >= 0)))
        if bad.size:
            c = int(bad[0])
            _fail(name, f"BatchNorm channel {c} has running variance {var[c]} with eps {bn.eps}: the normalisation "
                        f"is undefined (re-calibrate BN before exporting)")
        sigma = np.sqrt(var + float(bn.eps))
        gamma = bn.weight.detach().double().cpu().numpy()
        beta = bn.bias.detach().double().cpu().numpy()
        mean = bn.running_mean.detach().double().cpu().numpy()
        mult = s_w * gamma / sigma
        bias = beta - gamma * mean / sigma
    else:
        mult = np.full(cout, s_w)
        bias = np.zeros(cout)
    if not np.all(np.isfinite(mult)) or not np.all(np.isfinite(bias)):
        _fail(name, "BatchNorm parameters are not finite")
    sign = np.where(mult < 0, -1, 1) if negate else np.ones(cout, np.int64)
    stored = codes * sign.reshape(-1, *([1] * (codes.ndim - 1)))
    if stored.max(initial=0) > 127:
        _fail(name, "an 8-bit weight code of -128 in a channel with a negative BatchNorm scale cannot be negated "
                    "in int8")
    cout_shape = (-1, *([1] * (codes.ndim - 1)))
    g = np.ones(cout, np.int64)
    if gain:
        s_a = float(_scale_value(aq))
        x_max = _zero_point(aq) + qrange(aq.bits, aq.signed)[1]
        g = choose_gains(np.abs(stored).reshape(cout, -1).max(1), bias / (s_a * np.abs(mult)), x_max)
    w_scale = (np.abs(mult) if negate else mult) / g
    zero = np.flatnonzero(w_scale == 0)
    if zero.size:
        # gamma == 0: the channel is the constant beta; any positive scale, codes irrelevant
        w_scale[zero] = 1e-12
        stored[zero] = 0
    return _Folded((stored * g.reshape(cout_shape)).astype(np.int8), w_scale, bias, g, [int(c) for c in np.flatnonzero(sign < 0)],
                   codes, mult)


@dataclass
class _Q:
    """An 8-bit tensor of the graph: value = (stored - zp) * scale."""

    name: str
    scale: float
    zp: int
    dtype: type = np.uint8


class _IntGraph(GraphBuilder):
    def __init__(self, mode: str, gain: bool, float_weights: str = "float"):
        super().__init__(float_weights)
        self.mode, self.gain = mode, gain
        self.codes: list[IntCodes] = []
        self.layers: list[IntLayer] = []

    # -------------------------------------------------------------- primitives
    def scalar(self, name: str, value, dtype) -> str:
        return self.const(name, np.array(value, dtype))

    # -------------------------------------------------------------- quantizers
    def clip_codes(self, qname: str, y: str, q: LSQQuantizer, lo_extra: int | None = None) -> str:
        """The b-bit grid of `q` on its uint8 tensor `y` (nothing to do at 8 bits unless `lo_extra`)."""
        lo, hi = _grid(q)
        if lo_extra is not None:
            lo = max(lo, lo_extra)
        if (lo, hi) == (0, 255):
            self.record(qname, q, y)
            return y
        c = self.op("Clip", [y, self.scalar(f"{qname}.qmin", lo, np.uint8), self.scalar(f"{qname}.qmax", hi, np.uint8)],
                    f"{qname}.codes")
        self.record(qname, q, c)
        return c

    def record(self, qname: str, q: LSQQuantizer, tensor: str) -> None:
        self.codes.append(IntCodes(qname, "activation", q.bits, q.signed, tensor, _zero_point(q)))

    def quantize(self, qname: str, x: str, q: LSQQuantizer) -> _Q:
        """Float `x` -> codes of `q` (QuantizeLinear rounds half to even and saturates, like torch)."""
        s = float(_scale_value(q))
        y = self.op("QuantizeLinear", [x, self.scalar(f"{qname}.scale", s, np.float32),
                                       self.scalar(f"{qname}.zero_point", _zero_point(q), np.uint8)],
                    f"{qname}.quantize")
        return _Q(self.clip_codes(qname, y, q), s, _zero_point(q))

    def dequantize(self, name: str, t: _Q) -> str:
        return self.op("DequantizeLinear", [t.name, self.scalar(f"{name}.dq_scale", t.scale, np.float32),
                                            self.scalar(f"{name}.dq_zero_point", t.zp, np.uint8)], f"{name}.dequantize")

    # -------------------------------------------------------------- convs
    def _weight_record(self, name: str, layer: QConvBN, f: _Folded, tensor: str, zero_point: int = 0) -> None:
        wq = layer.weight_quant
        self.codes.append(IntCodes(f"{name}.weight_quant", "weight", wq.bits, True, tensor, zero_point,
                                   [int(v) for v in f.gain], f.negated))

    def _conv_attrs(self, layer: QConvBN) -> dict:
        k = int(layer.weight.shape[-1])
        return dict(kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[k // 2] * 4,
                    group=int(layer.weight.shape[0]) if layer.depthwise else 1)

    def _check_layer(self, name: str, layer: QConvBN) -> None:
        for q, what in ((layer.act_quant, "activation"), (layer.weight_quant, "weight")):
            if q is None or not q.enabled:
                _fail(name, f"its {what} is not quantized; the integer form needs a quantized conv")
            if q.bits > MAX_BITS:
                _fail(name, f"{what} quantizer has {q.bits} bits; integer kernels take at most {MAX_BITS} "
                            f"(export --format onnx instead)")
        if not layer.weight_quant.signed:
            _fail(name, "unsigned weight quantizer; int8 weight codes need a signed one")

    def qlinear_conv(self, name: str, layer: QConvBN, x: _Q, y_scale: float, y_zp: int, route: str,
                     reason: str = "") -> str:
        """QLinearConv of codes `x` into an 8-bit tensor of (y_scale, y_zp)."""
        f = fold(name, layer, gain=self.gain)
        w = self.const(f"{name}.weight_quant.codes", f.weight)
        self._weight_record(name, layer, f, w)
        s_x = x.scale
        bias = np.rint(f.bias / (s_x * f.w_scale))
        if np.abs(bias).max(initial=0) >= 2**31 - 1:
            _fail(name, "the folded BatchNorm bias does not fit in int32 (a BN scale near zero?)")
        cout = f.weight.shape[0]
        inputs = [x.name, self.scalar(f"{name}.x_scale", s_x, np.float32), self.scalar(f"{name}.x_zero_point", x.zp, np.uint8),
                  w, self.const(f"{name}.w_scale", f.w_scale.astype(np.float32)),
                  self.const(f"{name}.w_zero_point", np.zeros(cout, np.int8)),
                  self.scalar(f"{name}.y_scale", y_scale, np.float32), self.scalar(f"{name}.y_zero_point", y_zp, np.uint8),
                  self.const(f"{name}.bias", bias.astype(np.int32))]
        self.layers.append(IntLayer(name, "QLinearConv", route, int(f.gain.max()), len(f.negated), reason))
        return self.op("QLinearConv", inputs, f"{name}.qlinearconv", **self._conv_attrs(layer))

    def conv_integer(self, name: str, layer: QConvBN, x: _Q, reason: str) -> str:
        """ConvInteger of codes `x` (int32), then z = acc * scale_c + bias_c in float (BN folded).

        The weight codes are held as uint8 with zero point 128: onnxruntime's ConvInteger runs
        uint8 x uint8 3-5x faster than uint8 x int8 (measured, 1 thread)."""
        f = fold(name, layer, gain=False, negate=False)
        w = self.const(f"{name}.weight_quant.codes", (f.codes + 128).astype(np.uint8))
        self._weight_record(name, layer, f, w, zero_point=128)
        acc = self.op("ConvInteger", [x.name, w, self.scalar(f"{name}.x_zero_point", x.zp, np.uint8),
                                      self.scalar(f"{name}.w_zero_point", 128, np.uint8)],
                      f"{name}.convinteger", **self._conv_attrs(layer))
        accf = self.op("Cast", [acc], f"{name}.accumulator", to=TensorProto.FLOAT)
        cout = f.weight.shape[0]
        m = self.const(f"{name}.scale", (x.scale * f.mult).astype(np.float32).reshape(1, cout, 1, 1))
        y = self.op("Mul", [accf, m], f"{name}.scaled")
        self.layers.append(IntLayer(name, "ConvInteger", "exact", 1, 0, reason))
        if layer.bn is None:
            return y
        return self.op("Add", [y, self.const(f"{name}.bias", f.bias.astype(np.float32).reshape(1, cout, 1, 1))],
                       f"{name}.bn")

    def conv_direct(self, name: str, layer: QConvBN, x: _Q, qname: str, q: LSQQuantizer) -> _Q:
        """Conv whose output goes (through nothing or ReLU) straight into quantizer `q`."""
        s = float(_scale_value(q))
        why = "exact mode" if self.mode == "exact" else needs_exact(layer)
        if why:
            z = self.conv_integer(name, layer, x, why)
            return self.quantize(qname, self.activation(name, layer.act, z), q)
        y = self.qlinear_conv(name, layer, x, s, _zero_point(q), "direct")
        relu = layer.act_name == "relu"
        return _Q(self.clip_codes(qname, y, q, lo_extra=_zero_point(q) if relu else None), s, _zero_point(q))

    def conv_float(self, name: str, layer: QConvBN, x: _Q, reason: str, *, lo: float | None = None,
                   hi: float | None = None) -> str:
        """Conv whose float output (after BN, before the activation) the graph needs.

        Fast route: an intermediate uint8 tensor covering [lo, hi] (default: beta +- 6|gamma|)."""
        why = None if self.mode == "exact" or layer.bn is None else needs_exact(layer)
        if why:
            reason = f"{reason}; {why}"
        if self.mode == "exact" or layer.bn is None or why:
            return self.conv_integer(name, layer, x, reason)
        bn = layer.bn
        gamma = bn.weight.detach().double().cpu().numpy()
        beta = bn.bias.detach().double().cpu().numpy()
        blo = float((beta - BN_RANGE_SIGMAS * np.abs(gamma)).min())
        bhi = float((beta + BN_RANGE_SIGMAS * np.abs(gamma)).max())
        lo = blo if lo is None else max(lo, blo)
        hi = bhi if hi is None else min(hi, bhi)
        lo, hi = min(lo, 0.0), max(hi, lo + 1e-6, 0.0)
        t = (hi - lo) / 255.0
        zp = int(min(255, max(0, round(-lo / t))))
        y = self.qlinear_conv(name, layer, x, t, zp, "fast", reason)
        return self.dequantize(name, _Q(y, t, zp))

    # -------------------------------------------------------------- edge layers
    def quantized_linear_inputs(self, name: str, linear: QLinear, x: str) -> tuple[str, tuple[str, ...]]:
        """A quantized classifier (the space's ``edge_bits``): its input codes (uint8) and int8
        weight codes, each dequantized into a float Gemm (onnxruntime may fuse them into QGemm):
        1280 x classes MACs per image, too few to be worth an integer epilogue of its own."""
        x = self.dequantize(f"{name}.act_quant", self.quantize(f"{name}.act_quant", x, linear.act_quant))
        wq, qname = linear.weight_quant, f"{name}.weight_quant"
        split = weight_split(linear)     # QGemm saturates int16 on codes beyond +-64 without VNNI
        inits, weights = dequantized_weight_codes(self, qname, linear.weight, wq, split)
        self.codes.append(IntCodes(qname, "weight", wq.bits, True, inits[0], split=split.name if split else ""))
        return x, weights

    def stem(self, layer: QConvBN, x: str) -> str:
        """The stem's float output (the first block's residual adds it): a float conv (OQA), or
        on integer kernels when the space quantizes it (``edge_bits``)."""
        if not layer.quantizes_input:
            return self.float_conv("stem", layer, x)
        codes = self.quantize("stem.act_quant", x, layer.act_quant)
        return self.conv_to_float_act("stem", layer, codes, "the first block's residual adds its output")

    # -------------------------------------------------------------- float parts
    def float_conv(self, name: str, layer: QConvBN, x: str) -> str:
        """A full-precision conv (the stem): Conv + BatchNormalization (onnxruntime folds them)."""
        k = int(layer.weight.shape[-1])
        y = self.op("Conv", [x, self.param(f"{name}.weight", layer.weight)], f"{name}.conv", kernel_shape=[k, k],
                    strides=[layer.stride] * 2, pads=[k // 2] * 4, group=int(layer.weight.shape[0]) if layer.depthwise else 1)
        if layer.bn is not None:
            y = self.batchnorm(name, layer.bn, y)
        return self.activation(name, layer.act, y)

    # -------------------------------------------------------------- structure
    def conv_to_float_act(self, name: str, layer: QConvBN, x: _Q, reason: str, hi: float | None = None) -> str:
        """Conv -> BN -> its activation, as a float tensor."""
        act = layer.act_name
        lo = 0.0 if act == "relu" else (-3.0 if act == "h_swish" else None)
        z = self.conv_float(name, layer, x, reason, lo=lo, hi=hi)
        return self.activation(name, layer.act, z)

    def conv_to_codes(self, name: str, layer: QConvBN, x: _Q, qname: str, q: LSQQuantizer) -> _Q:
        """Conv -> BN -> activation -> the codes of the next quantizer `q`."""
        if layer.act_name in (None, "relu"):
            return self.conv_direct(name, layer, x, qname, q)
        # h_swish: codes 0 below z = 0 and Qp above hswish^-1((Qp + 1/2) s); the fast route's
        # intermediate covers exactly that range
        top = (qrange(q.bits, q.signed)[1] + 0.5) * float(_scale_value(q))
        hi = top if top >= 3.0 else (-3.0 + math.sqrt(9.0 + 24.0 * top)) / 2.0
        z = self.conv_float(name, layer, x, "h_swish before the next quantizer", lo=0.0 if not q.signed else None,
                            hi=hi * 1.01 if not q.signed else None)
        return self.quantize(qname, self.activation(name, layer.act, z), q)

    def block(self, name: str, block: MBConvBlock, x_float: str | None, x_codes: _Q | None,
              need_float: bool, next_q: tuple[str, LSQQuantizer] | None) -> tuple[str | None, _Q | None]:
        """One MBConv block. Input: its float value (needed for a residual) and/or the codes of
        its first quantizer. Returns (float output if `need_float`, codes of `next_q` if given)."""
        first = block.expand if block.expand is not None else block.depthwise
        first_name = f"{name}.expand" if block.expand is not None else f"{name}.depthwise"
        if x_codes is None:
            x_codes = self.quantize(f"{first_name}.act_quant", x_float, first.act_quant)
        if block.expand is not None:
            y = self.conv_to_codes(f"{name}.expand", block.expand, x_codes, f"{name}.depthwise.act_quant",
                                   block.depthwise.act_quant)
        else:
            y = x_codes
        pq = (f"{name}.project.act_quant", block.project.act_quant)
        if block.se is not None:
            d = self.conv_to_float_act(f"{name}.depthwise", block.depthwise, y, "squeeze-excite follows")
            d = self.se(f"{name}.se", block.se, d)
            y = self.quantize(pq[0], d, pq[1])
        else:
            y = self.conv_to_codes(f"{name}.depthwise", block.depthwise, y, *pq)
        if block.residual or need_float:
            reason = "residual add" if block.residual else "the next block adds it to its output"
            z = self.conv_float(f"{name}.project", block.project, y, reason)
            out = self.op("Add", [x_float, z], f"{name}.residual") if block.residual else z
            codes = self.quantize(next_q[0], out, next_q[1]) if next_q else None
            return out, codes
        return None, self.conv_to_codes(f"{name}.project", block.project, y, *next_q)


def _first_quantizer(block: MBConvBlock) -> tuple[str, LSQQuantizer]:
    return ("expand", block.expand.act_quant) if block.expand is not None else ("depthwise", block.depthwise.act_quant)


def build_onnx_int(sub, *, info: dict | None = None, opset: int | None = None, mode: str = DEFAULT_MODE,
                   weight_gain: bool = True, float_weights: str = "float"
                   ) -> tuple[onnx.ModelProto, list[IntCodes], list[IntLayer]]:
    """The integer ONNX model of a quantized subnet, where each quantizer's codes are, and how
    each conv was written. ValueError naming the layer for anything it cannot express.

    ``float_weights="int8"`` stores the squeeze-excite and classifier weights as 8-bit (see
    :meth:`.graph.GraphBuilder.fp_weight`); a float stem stays float32 (432 weights)."""
    if mode not in MODES:
        raise ValueError(f"onnx-int mode: {mode!r} is not one of {list(MODES)}")
    if float_weights not in FLOAT_WEIGHTS:
        raise ValueError(f"float weights: {float_weights!r} is not one of {list(FLOAT_WEIGHTS)}")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < 13:
        raise ValueError(f"opset: {opset} is too old; the integer form needs opset >= 13 (use 17)")
    _check_supported(sub)
    if not sub.arch.quantized or not any(isinstance(m, LSQQuantizer) and m.enabled for m in sub.modules()):
        raise ValueError("onnx-int: the subnet is full precision; there is nothing to run on integer kernels "
                         "(export --format onnx)")
    g = _IntGraph(mode, weight_gain, float_weights)
    blocks = [("first_block", sub.first_block)] + [(f"blocks.{i}", b) for i, b in enumerate(sub.blocks)]
    for name, b in blocks:
        for part in ("expand", "depthwise", "project"):
            layer = getattr(b, part)
            if layer is not None:
                g._check_layer(f"{name}.{part}", layer)
    for name in ("final_expand", "feature_mix"):
        g._check_layer(name, getattr(sub, name))
    if sub.stem.quantizes_input:
        g._check_layer("stem", sub.stem)
    with torch.no_grad():
        x = g.stem(sub.stem, INPUT_NAME)
        codes = None
        for i, (name, b) in enumerate(blocks):
            nxt = blocks[i + 1][1] if i + 1 < len(blocks) else None
            if nxt is not None:
                part, q = _first_quantizer(nxt)
                next_q = (f"{blocks[i + 1][0]}.{part}.act_quant", q)
            else:
                next_q = ("final_expand.act_quant", sub.final_expand.act_quant)
            need_float = nxt is not None and nxt.residual
            x, codes = g.block(name, b, x, codes, need_float, next_q)
        y = g.conv_to_float_act("final_expand", sub.final_expand, codes, "global pooling follows")
        y = g.op("GlobalAveragePool", [y], "pool")
        y = g.quantize("feature_mix.act_quant", y, sub.feature_mix.act_quant)
        y = g.conv_to_float_act("feature_mix", sub.feature_mix, y, "the float classifier follows (no BN)")
        g.classifier(sub.classifier, y)
    props = dict(info or {})
    props["integer"] = integer_info(mode, weight_gain, g.codes, g.layers)
    props["integer"]["float_weights"] = float_weights
    model = g.model(sub, name=f"oqat-{sub.space.name}-{sub.bits}bit-int", opset=opset, props=props,
                    doc=f"oqat subnet of {sub.space.name} at {sub.bits} bit, integer form ({mode})")
    return model, g.codes, g.layers


def integer_info(mode: str, weight_gain: bool, codes: list[IntCodes], layers: list[IntLayer]) -> dict:
    """The ``integer`` metadata entry: enough to read every code tensor back and check the graph."""
    return {"mode": mode, "weight_gain": weight_gain, "codes": [c.to_dict() for c in codes],
            "layers": [lay.to_dict() for lay in layers]}


def codes_from_info(info: dict) -> list[IntCodes]:
    """The code tensors recorded in a file's ``integer`` metadata (ValueError if it has none)."""
    block = info.get("integer") if isinstance(info, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("codes"), list):
        raise ValueError("not an integer (onnx-int) file: its metadata has no 'integer' entry")
    return [IntCodes(**c) for c in block["codes"]]


__all__ = ["DEFAULT_MODE", "FLOAT_CONV_OPS", "INT_CONV_OPS", "IntCodes", "IntLayer", "MODES", "build_onnx_int",
           "codes_from_info", "fold", "integer_info", "layer_gain"]
