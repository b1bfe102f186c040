"""The ONNX graph under construction that both exported forms build on: unique tensor names,
initializers, nodes, the float layers they write alike (activations, BatchNormalization,
squeeze-excite, the classifier) and the checked model around them. :mod:`.onnx` adds the QCDQ
quantizers, :mod:`.onnx_int` the integer convs."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..nn.layers import QLinear, SqueezeExcite
from ..utils.version import __version__
from .meta import to_string_map

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# How the full-precision layers' weights are stored (GraphBuilder.fp_weight): all float32, all
# int8 (squeeze-excite and a float classifier), or only the classifier's int8.
FLOAT_WEIGHTS = ("float", "int8", "int8-classifier")


class GraphBuilder:
    def __init__(self, float_weights: str = "float") -> None:
        if float_weights not in FLOAT_WEIGHTS:
            raise ValueError(f"float weights: {float_weights!r} is not one of {list(FLOAT_WEIGHTS)}")
        self.float_weights = float_weights
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def _new(self, name: str) -> str:
        if name in self._names:
            raise RuntimeError(f"duplicate ONNX tensor name {name}")
        self._names.add(name)
        return name

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), self._new(name)))
        return name

    def int4_const(self, name: str, codes: np.ndarray) -> str:
        """An INT4 initializer of integer `codes` in [-8, 7], packed two per byte in raw data
        (the first of each pair in the low nibble, as ONNX lays them out): ``make_tensor`` on the
        values themselves writes one varint per pair, 1.4x the packed size."""
        nibbles = (np.asarray(codes, np.int8).ravel() & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        self.inits.append(helper.make_tensor(self._new(name), TensorProto.INT4, codes.shape, packed.tobytes(), raw=True))
        return name

    def param(self, name: str, t: torch.Tensor) -> str:
        return self.const(name, t.detach().cpu().float().numpy())

    def fp_weight(self, name: str, t: torch.Tensor, role: str = "se") -> str:
        """A full-precision layer's weight (`role` "se" for squeeze-excite, "classifier" for a
        float classifier): float32, or where ``float_weights`` asks (``"int8"``: both roles;
        ``"int8-classifier"``: the classifier only) int8 with one symmetric scale per output
        channel (max|w| / 127) and a DequantizeLinear: 4x smaller, still computed in float; the
        only change to the trained network's arithmetic an export makes, so the export's
        verification measures it. Squeeze-excite gates whole channels and was the sensitive part
        on trained subnets (RESULTS.md "Session 14"), hence the classifier-only choice."""
        if self.float_weights == "float" or (self.float_weights == "int8-classifier" and role != "classifier"):
            return self.param(name, t)
        w = t.detach().cpu().double().numpy()
        scale = np.abs(w.reshape(w.shape[0], -1)).max(1) / 127.0
        scale[scale == 0] = 1.0
        codes = np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.int8)
        c = self.const(f"{name}.int8", codes)
        s = self.const(f"{name}.int8_scale", scale.astype(np.float32))
        z = self.const(f"{name}.int8_zero_point", np.zeros(w.shape[0], np.int8))
        return self.op("DequantizeLinear", [c, s, z], f"{name}.dequantize", axis=0)

    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [self._new(name)], name=name, domain=domain or None,
                                           **attrs))
        return name

    def activation(self, name: str, act: nn.Module, x: str) -> str:
        if isinstance(act, nn.Identity):
            return x
        if isinstance(act, nn.ReLU):
            return self.op("Relu", [x], f"{name}.relu")
        if isinstance(act, nn.Hardswish):
            return self.op("HardSwish", [x], f"{name}.hardswish")
        raise ValueError(f"export: activation {name} of type {type(act).__name__} is not supported")

    def batchnorm(self, name: str, bn: nn.BatchNorm2d, y: str) -> str:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"export: {name}.bn has no running statistics")
        return self.op("BatchNormalization",
                       [y, self.param(f"{name}.bn.weight", bn.weight), self.param(f"{name}.bn.bias", bn.bias),
                        self.param(f"{name}.bn.running_mean", bn.running_mean),
                        self.param(f"{name}.bn.running_var", bn.running_var)], f"{name}.bn", epsilon=float(bn.eps))

    def se(self, name: str, se: SqueezeExcite, x: str) -> str:
        y = self.op("GlobalAveragePool", [x], f"{name}.pool")
        y = self.op("Conv", [y, self.fp_weight(f"{name}.reduce.weight", se.reduce.weight),
                             self.param(f"{name}.reduce.bias", se.reduce.bias)], f"{name}.reduce", kernel_shape=[1, 1])
        y = self.op("Relu", [y], f"{name}.relu")
        y = self.op("Conv", [y, self.fp_weight(f"{name}.expand.weight", se.expand.weight),
                             self.param(f"{name}.expand.bias", se.expand.bias)], f"{name}.expand", kernel_shape=[1, 1])
        y = self.op("HardSigmoid", [y], f"{name}.hardsigmoid", alpha=1.0 / 6.0, beta=0.5)
        return self.op("Mul", [x, y], f"{name}.scale")

    def classifier(self, linear: nn.Module, x: str) -> str:
        """The classifier on the pooled features; its output is the graph's ``logits``. A float
        one (OQA) as Gemm; a quantized one (:class:`QLinear`) as Gemm on the dequantized codes of
        its input and weight, written by the form's :meth:`quantized_linear_inputs`."""
        x = self.op("Flatten", [x], "flatten", axis=1)
        if isinstance(linear, QLinear):
            x, weights = self.quantized_linear_inputs("classifier", linear, x)
        else:
            weights = (self.fp_weight("classifier.weight", linear.weight, role="classifier"),)
        bias = self.param("classifier.bias", linear.bias)
        out = self._new(OUTPUT_NAME)
        if len(weights) == 1:
            self.nodes.append(helper.make_node("Gemm", [x, weights[0], bias], [out], name="classifier", transB=1))
        else:                           # the weight in parts (QCDQ form, code_split): Gemms added up
            parts = [self.op("Gemm", [x, w] + ([bias] if i == 0 else []), f"classifier.{i}", transB=1)
                     for i, w in enumerate(weights)]
            self.nodes.append(helper.make_node("Add", parts, [out], name="classifier"))
        return out

    def quantized_linear_inputs(self, name: str, linear: QLinear, x: str) -> tuple[str, tuple[str, ...]]:
        """The (float) input and the weight(s) of a quantized linear layer's Gemm, as each form
        writes them; several weights are parts whose Gemms add up."""
        raise NotImplementedError(f"export: {type(self).__name__} does not write quantized linear layers")

    def model(self, sub, *, name: str, doc: str, opset: int, props: dict | None = None,
              extra_outputs: tuple = ()) -> onnx.ModelProto:
        """The checked ONNX model of this graph: ``input`` (batch, C, r, r) with a dynamic batch to
        ``logits`` (batch, classes), plus ``extra_outputs`` (value infos), and ``props`` as metadata."""
        space, r = sub.space, sub.arch.r
        inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", space.in_channels, r, r])]
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", space.num_classes]),
                   *extra_outputs]
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="oqat",
                                  producer_version=__version__, doc_string=doc)
        # The lowest IR version that carries this opset: older runtimes can read the file too.
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        if props:
            helper.set_model_props(model, to_string_map(props))
        onnx.checker.check_model(model)
        return model


__all__ = ["FLOAT_WEIGHTS", "INPUT_NAME", "OUTPUT_NAME", "GraphBuilder"]
