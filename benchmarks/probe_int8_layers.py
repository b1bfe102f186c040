"""Does OpenVINO (or onnxruntime) compute a single QCDQ int8 conv or Gemm exactly on this CPU? (issue 12)

    .venv/bin/python benchmarks/probe_int8_layers.py
    .venv/bin/python benchmarks/probe_int8_layers.py --engine onnxruntime   # its deployment session

One ``QuantizeLinear -> Clip -> DequantizeLinear -> Conv`` file per case (int8 weight codes with
their ``DequantizeLinear``, as oqat's ``--onnx-weights int8`` files), run on OpenVINO CPU
against the exact integer convolution of the same codes (float64). Prints, per case, the largest
error in units of one code product, the share of outputs off by more than half a product, and
the error against the conv with halved weight codes ``round(c / 2) * 2``: zero there means the
engine halved the codes (oneDNN without VNNI, for signed inputs and kernels over 1x1). The
``split`` rows are the exporter's even/odd form (``oqat.export.code_split.EVEN_ODD``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from oqat.export.code_split import EVEN_ODD, INNER_OUTER, CodeSplit
from oqat.export.deployment import cpu_isa
from oqat.quant import qrange

X_SCALE, W_SCALE, SIZE, FEATURES = 0.02, 0.01, 14, 256
# (input channels, kernel (0: Gemm), groups, signed input, input bits, weight bits, split)
CASES = [(3, 3, 1, True, 8, 8, None), (3, 3, 1, True, 8, 8, EVEN_ODD), (16, 3, 1, True, 4, 4, None),
         (16, 3, 1, True, 4, 4, EVEN_ODD), (16, 3, 16, True, 4, 4, None), (16, 3, 16, True, 4, 4, EVEN_ODD),
         (16, 1, 1, True, 8, 8, None), (16, 3, 1, False, 8, 7, None), (16, 3, 1, False, 8, 8, None),
         (16, 3, 16, False, 4, 4, None), (FEATURES, 0, 1, False, 8, 8, None), (FEATURES, 0, 1, False, 8, 8, INNER_OUTER)]


def _file(shape: tuple, k: int, groups: int, signed: bool, in_bits: int, codes: np.ndarray,
          split: CodeSplit | None) -> bytes:
    qn, qp = qrange(in_bits, signed)
    dt = np.int8 if signed else np.uint8
    inits = [nh.from_array(np.array(X_SCALE, np.float32), "xs"), nh.from_array(np.array(0, dt), "xz"),
             nh.from_array(np.array(qn, dt), "lo"), nh.from_array(np.array(qp, dt), "hi"),
             nh.from_array(np.array(0, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"]),
             helper.make_node("DequantizeLinear", ["xc", "xs", "xz"], ["xd"])]
    parts = zip(split.split(codes), (W_SCALE, W_SCALE * split.second_scale)) if split else [(codes, W_SCALE)]
    outs = []
    for i, (part, scale) in enumerate(parts):
        inits += [nh.from_array(part.astype(np.int8), f"w{i}"), nh.from_array(np.array(scale, np.float32), f"ws{i}")]
        layer = (helper.make_node("Gemm", ["xd", f"wd{i}"], [f"y{i}"], transB=1) if k == 0 else
                 helper.make_node("Conv", ["xd", f"wd{i}"], [f"y{i}"], kernel_shape=[k, k], pads=[k // 2] * 4, group=groups))
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", "wz"], [f"wd{i}"]), layer]
        outs.append(f"y{i}")
    if len(outs) > 1:
        nodes.append(helper.make_node("Add", outs, ["y"]))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _runner(engine: str):
    """(description, run(file bytes, input) -> output) for one engine, 1 thread, float precision."""
    if engine == "openvino":
        import openvino

        core = openvino.Core()

        def run(data: bytes, x: np.ndarray) -> np.ndarray:
            compiled = core.compile_model(core.read_model(data, b""), "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                                             "INFERENCE_PRECISION_HINT": "f32"})
            return next(iter(compiled({"x": x}).values()))

        return f"OpenVINO {openvino.__version__}", run
    import onnxruntime as ort

    def run(data: bytes, x: np.ndarray) -> np.ndarray:
        so = ort.SessionOptions()                   # optimizations on: the QDQ fusions of a deployment
        so.intra_op_num_threads = 1
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    return f"onnxruntime {ort.__version__}", run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    name, run = _runner(ap.parse_args().engine)
    isa = cpu_isa()
    print(f"{name} on {isa['model']} ({isa['best']}); errors in units of one code product")
    print("| input | kernel | groups | in / w bits | split | max error | outputs off | error vs halved codes |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for cin, k, groups, signed, in_bits, w_bits, split in CASES:
        rng = np.random.default_rng(0)
        shape = (2, cin, SIZE, SIZE) if k else (8, cin)
        wn, wp = qrange(w_bits, True)
        codes = rng.integers(wn, wp + 1, size=(16, cin // groups, k, k) if k else (16, cin))
        x = rng.normal(0, 0.1 * 2 ** (in_bits - 4), size=shape).astype(np.float32)
        x = x if signed else np.abs(x)
        qn, qp = qrange(in_bits, signed)
        xc = torch.tensor(np.clip(np.round(x / np.float32(X_SCALE)), qn, qp), dtype=torch.float64)

        def layer(w: np.ndarray) -> np.ndarray:
            w = torch.tensor(w, dtype=torch.float64)
            return (xc @ w.T if k == 0 else torch.nn.functional.conv2d(xc, w, padding=k // 2, groups=groups)).numpy()

        data = _file(shape, k, groups, signed, in_bits, codes, split)
        out = run(data, x) / (X_SCALE * W_SCALE)
        err = np.abs(out - layer(codes))
        halved = np.abs(out - layer(2 * np.round(codes / 2))).max()
        name = {None: "no", EVEN_ODD: "even/odd", INNER_OUTER: "inner/outer"}[split]
        print(f"| {'signed' if signed else 'unsigned'} x {cin} | {f'{k}x{k}' if k else 'fc'} | {groups} | {in_bits} / {w_bits} | "
              f"{name} | {err.max():.2f} | {100 * (err > 0.5).mean():.1f}% | {halved:.2f} |")


if __name__ == "__main__":
    main()
