"""ONNX export of an extracted subnet in QCDQ form, built node by node from the module tree.

Every quantized tensor (the weight and the input activation of each quantized conv) becomes
``QuantizeLinear -> Clip -> DequantizeLinear``: an int8 (signed) or uint8 (unsigned) container,
scale = the quantizer's effective step ``|s|``, zero point 0, and a Clip that carries the b-bit
integer range ``qrange(b, signed)``. ``QuantizeLinear`` rounds half to even and saturates like
``torch.round``/``torch.clamp``, and since the grid bounds are integers
``clip(round(v)) == round(clip(v))``: the graph computes exactly the PyTorch forward
``round(clip(x / s, Qn, Qp)) * s``. Full-precision layers (squeeze-excite; the stem and the
classifier unless the space has ``edge_bits``) are float ops. BatchNorm stays a float ``BatchNormalization`` after the conv: LSQ quantizes the
weight *before* BN, so folding BN into the weight would change the integer codes.

The graph is written with ``onnx.helper`` rather than traced: the network is a fixed, small
set of layer types, and writing it directly gives stable node names (module paths), the exact
QCDQ pattern, and access to every code tensor for verification, independent of the
torch.onnx exporter in use.

``weights="int8"`` stores the weight codes themselves as int8 initializers followed by
``DequantizeLinear`` (about 4x smaller files; the codes are checked to lie in the b-bit range);
``weights="int4"`` stores those of 4 bits or fewer two per byte (opset 21), the same computation.
``float_weights="int8"`` (or ``"int8-classifier"``) does the same for the full-precision layers'
weights (squeeze-excite and a float classifier, or the classifier alone) with an 8-bit per-channel
grid of their own (:meth:`.graph.GraphBuilder.fp_weight`): the one option that changes the
network's arithmetic, measured by the export's verification.

The stem of an ``edge_bits`` space (a signed input, a 3x3 kernel), and its 8-bit classifier where
a trained code lies beyond +-64, are each written as two layers on the same input, on two int8
parts of the codes, plus an ``Add`` (:mod:`.code_split`): OpenVINO on CPUs without VNNI halves
the codes of the first kind and saturates int16 on such codes, and lost 17-49 points of top-1
agreement on the stem alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..models import SubNet
from ..nn.block import MBConvBlock
from ..nn.layers import QConvBN, QLinear, SqueezeExcite
from ..quant import LSQQuantizer, qrange
from .code_split import CodeSplit, split_for
from .graph import INPUT_NAME, GraphBuilder
from .meta import check_initialized, from_string_map

DEFAULT_OPSET = 17
INT4_OPSET = 21          # the first opset with INT4 tensors (and their Cast)
WEIGHT_MODES = ("float", "int8", "int4")
INT4_RANGE = (-8, 7)
INT4_ONNXRUNTIME = (1, 23)   # the first onnxruntime with a Cast from INT4 (1.18-1.22 refuse such a file, measured)


def _onnxruntime_version(version: str | None) -> str:
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    return version


def int4_supported(onnxruntime_version: str | None = None) -> bool:
    """Whether onnxruntime (the installed one by default) loads a ``weights="int4"`` file."""
    version = _onnxruntime_version(onnxruntime_version)
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= INT4_ONNXRUNTIME


def check_int4_runtime(onnxruntime_version: str | None = None) -> None:
    """ValueError unless onnxruntime can run (and so verify) an int4 file."""
    version = _onnxruntime_version(onnxruntime_version)
    if not int4_supported(version):
        raise ValueError(f"int4 weight storage: onnxruntime {version} cannot load INT4 weights (their Cast needs "
                         f"onnxruntime >= {'.'.join(map(str, INT4_ONNXRUNTIME))}); use int8 or upgrade onnxruntime")


def default_opset(weights: str) -> int:
    """The opset a QCDQ file with `weights` storage is written in unless asked otherwise."""
    return INT4_OPSET if weights == "int4" else DEFAULT_OPSET


def _scale_value(quantizer: LSQQuantizer) -> np.float32:
    """The scale written into the graph: the step the PyTorch forward divides by."""
    return np.float32(quantizer.effective_step().detach().float().item())


def weight_codes(weight: torch.Tensor, quantizer: LSQQuantizer) -> torch.Tensor:
    """Integer codes of a weight as the PyTorch forward computes them (float tensor of integers)."""
    qn, qp = qrange(quantizer.bits, quantizer.signed)
    s = quantizer.effective_step().detach().to(weight.dtype)
    return torch.clamp(weight.detach() / s, qn, qp).round()


def dequantized_weight_codes(g: GraphBuilder, qname: str, weight: torch.Tensor, q: LSQQuantizer,
                             split: CodeSplit | None = None, int4: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A weight's trained codes as the int8 initializer ``<qname>.codes`` and its
    ``DequantizeLinear`` (scale ``|s|``, zero point 0), or with ``split`` as its two int8 parts
    ``<qname><suffix>``, each with its own: (code initializers, dequantized weights), weights whose
    layers add up to the layer on the codes. How both ONNX forms store a quantized weight that a
    float op consumes. ``int4``: the codes of a weight of 4 bits or fewer are stored as INT4 (two per byte)
    and ``Cast`` to int8 before their DequantizeLinear: engines fold the Cast into an int8
    constant, so OpenVINO still runs the layer on int8 kernels (a DequantizeLinear of the INT4
    tensor itself made it decompress the weights and convolve in f32, measured)."""
    if not q.signed:
        raise ValueError(f"{qname}: int8 weight storage needs a signed weight quantizer")
    codes = weight_codes(weight, q).cpu().numpy()
    qn, qp = qrange(q.bits, q.signed)
    if codes.min() < qn or codes.max() > qp:  # cannot happen: clamp above
        raise RuntimeError(f"{qname}: weight codes outside [{qn}, {qp}]")
    step = _scale_value(q)
    if split is None:   # (initializer suffix, node-name suffix, codes, scale)
        parts = [(".codes", "", codes, step)]
    else:
        first, second = split.split(codes.astype(np.int16))
        parts = [(split.suffixes[0], split.suffixes[0], first, step),
                 (split.suffixes[1], split.suffixes[1], second, np.float32(step * split.second_scale))]
    z = g.const(f"{qname}.zero_point", np.array(0, np.int8))
    inits, weights = [], []
    for init_suffix, node_suffix, part, scale in parts:
        if int4 and q.bits <= 4:
            if part.min() < INT4_RANGE[0] or part.max() > INT4_RANGE[1]:  # cannot happen: b <= 4 codes and parts
                raise RuntimeError(f"{qname}{init_suffix}: codes outside the INT4 range")
            inits.append(g.int4_const(f"{qname}{init_suffix}", part))
            stored = g.op("Cast", [inits[-1]], f"{qname}{node_suffix}.int8", to=TensorProto.INT8)
        else:
            inits.append(g.const(f"{qname}{init_suffix}", part.astype(np.int8)))
            stored = inits[-1]
        sc = g.const(f"{qname}{node_suffix}.scale", scale)
        weights.append(g.op("DequantizeLinear", [stored, sc, z], f"{qname}{node_suffix}.dequantize"))
    return tuple(inits), tuple(weights)


def weight_split(layer: QConvBN | QLinear) -> CodeSplit | None:
    """The split an int8-weight quantized layer needs (:func:`.code_split.split_for`), or None."""
    linear = isinstance(layer, QLinear)
    return split_for(signed_input=layer.quantizes_input and layer.act_quant.signed,
                     kernel=1 if linear else int(layer.weight.shape[-1]),
                     max_code=int(weight_codes(layer.weight, layer.weight_quant).abs().max()), linear=linear)


@dataclass
class CodeTensor:
    """One quantized tensor of the graph: its quantizer's module name and where its codes are."""

    name: str                # quantizer module path, e.g. "blocks.2.expand.act_quant"
    kind: str                # "weight" or "activation"
    bits: int
    signed: bool
    tensor: str              # graph tensor holding the integer codes (Clip output or initializer)
    initializer: bool = False


class _Graph(GraphBuilder):
    """The QCDQ graph: every quantized tensor as QuantizeLinear -> Clip -> DequantizeLinear."""

    def __init__(self, weights: str, float_weights: str = "float"):
        super().__init__(float_weights)
        self.weights = weights
        self.codes: list[CodeTensor] = []

    # ------------------------------------------------------------------ quantization
    def qcdq(self, qname: str, x: str, q: LSQQuantizer, kind: str) -> str:
        qn, qp = qrange(q.bits, q.signed)
        dtype = np.int8 if q.signed else np.uint8
        s = self.const(f"{qname}.scale", _scale_value(q))
        z = self.const(f"{qname}.zero_point", np.array(0, dtype))
        lo = self.const(f"{qname}.qmin", np.array(qn, dtype))
        hi = self.const(f"{qname}.qmax", np.array(qp, dtype))
        y = self.op("QuantizeLinear", [x, s, z], f"{qname}.quantize")
        c = self.op("Clip", [y, lo, hi], f"{qname}.codes")
        self.codes.append(CodeTensor(qname, kind, q.bits, q.signed, c))
        return self.op("DequantizeLinear", [c, s, z], f"{qname}.dequantize")

    def int_weights(self, qname: str, weight: torch.Tensor, q: LSQQuantizer, split: CodeSplit | None) -> tuple[str, ...]:
        inits, weights = dequantized_weight_codes(self, qname, weight, q, split, int4=self.weights == "int4")
        self.codes.append(CodeTensor(qname, "weight", q.bits, q.signed, inits[0], initializer=True))
        return weights

    def layer_weights(self, name: str, layer: QConvBN | QLinear) -> tuple[str, ...]:
        """The weight tensor(s) of a conv or linear layer: float, QCDQ, int8 codes, or two int8
        parts where :func:`weight_split` asks for them."""
        if not layer.quantizes_weight:
            return (self.param(f"{name}.weight", layer.weight),)
        q, qname = layer.weight_quant, f"{name}.weight_quant"
        if self.weights == "float":
            return (self.qcdq(qname, self.param(f"{name}.weight", layer.weight), q, "weight"),)
        return self.int_weights(qname, layer.weight, q, weight_split(layer))

    # ------------------------------------------------------------------ layers
    def qconvbn(self, name: str, layer: QConvBN, x: str) -> str:
        if layer.quantizes_input:
            x = self.qcdq(f"{name}.act_quant", x, layer.act_quant, "activation")
        k = int(layer.weight.shape[-1])
        weights = self.layer_weights(name, layer)
        groups = int(layer.weight.shape[0]) if layer.depthwise else 1
        convs = [self.op("Conv", [x, w], f"{name}.conv" + (f".{i}" if len(weights) > 1 else ""),
                         kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[k // 2] * 4, group=groups)
                 for i, w in enumerate(weights)]
        y = convs[0] if len(convs) == 1 else self.op("Add", convs, f"{name}.conv")
        if layer.bn is not None:
            y = self.batchnorm(name, layer.bn, y)
        return self.activation(name, layer.act, y)

    def quantized_linear_inputs(self, name: str, linear: QLinear, x: str) -> tuple[str, tuple[str, ...]]:
        x = self.qcdq(f"{name}.act_quant", x, linear.act_quant, "activation") if linear.quantizes_input else x
        return x, self.layer_weights(name, linear)

    def block(self, name: str, block: MBConvBlock, x: str) -> str:
        y = x if block.expand is None else self.qconvbn(f"{name}.expand", block.expand, x)
        y = self.qconvbn(f"{name}.depthwise", block.depthwise, y)
        if block.se is not None:
            y = self.se(f"{name}.se", block.se, y)
        y = self.qconvbn(f"{name}.project", block.project, y)
        return self.op("Add", [x, y], f"{name}.residual") if block.residual else y


_SUPPORTED = (QConvBN, QLinear, SqueezeExcite, MBConvBlock, LSQQuantizer, nn.BatchNorm2d, nn.Conv2d, nn.Linear,
              nn.Dropout, nn.ReLU, nn.Hardswish, nn.Identity, nn.ModuleList)


def _check_supported(sub: nn.Module) -> None:
    if not isinstance(sub, SubNet):
        raise ValueError(f"export: expected an extracted SubNet (supernet.extract(arch)), got {type(sub).__name__}")
    for name, m in sub.named_modules():
        if name and not isinstance(m, _SUPPORTED):
            raise ValueError(f"export: module {name} of type {type(m).__name__} is not supported by the ONNX exporter")
    check_initialized(sub)


def build_onnx(sub, *, info: dict | None = None, opset: int | None = None, weights: str = "float",
               float_weights: str = "float", expose_codes: bool = False) -> tuple[onnx.ModelProto, list[CodeTensor]]:
    """The ONNX model of an extracted subnet (eval semantics), and its quantized tensors.

    ``expose_codes`` adds every Clip output (the integer codes) as an extra graph output: the
    verification copy. Input ``input`` is (batch, C, r, r) with a dynamic batch; output ``logits``.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights: {weights!r} is not one of {list(WEIGHT_MODES)}")
    opset = default_opset(weights) if opset is None else opset
    if opset < 13:
        raise ValueError(f"opset: {opset} is too old; Clip on int8/uint8 needs opset >= 13 (use 17)")
    if weights == "int4" and opset < INT4_OPSET:
        raise ValueError(f"opset: {opset} has no INT4 tensors; int4 weight storage needs opset >= {INT4_OPSET}")
    _check_supported(sub)
    g = _Graph(weights, float_weights)
    with torch.no_grad():
        x = g.qconvbn("stem", sub.stem, INPUT_NAME)
        x = g.block("first_block", sub.first_block, x)
        for i, block in enumerate(sub.blocks):
            x = g.block(f"blocks.{i}", block, x)
        x = g.qconvbn("final_expand", sub.final_expand, x)
        x = g.op("GlobalAveragePool", [x], "pool")
        x = g.qconvbn("feature_mix", sub.feature_mix, x)
        g.classifier(sub.classifier, x)
    code_outputs = tuple(
        helper.make_tensor_value_info(c.tensor, TensorProto.INT8 if c.signed else TensorProto.UINT8, None)
        for c in g.codes if expose_codes and not c.initializer)
    props = {**(info or {}), "float_weights": float_weights}
    model = g.model(sub, name=f"oqat-{sub.space.name}-{sub.bits}bit", opset=opset, props=props,
                    doc=f"oqat subnet of {sub.space.name} at {sub.bits} bit, QCDQ form", extra_outputs=code_outputs)
    return model, g.codes


def export_onnx(sub, path: str | Path, *, info: dict | None = None, opset: int | None = None,
                weights: str = "float", float_weights: str = "float") -> Path:
    """Write the ONNX model of ``sub`` to ``path`` (see :func:`build_onnx`)."""
    model, _ = build_onnx(sub, info=info, opset=opset, weights=weights, float_weights=float_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def read_onnx_info(path: str | Path) -> dict:
    """The oqat metadata of an exported ONNX file (ValueError if it has none)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return from_string_map({p.key: p.value for p in model.metadata_props}, str(path))
