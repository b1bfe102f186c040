"""Verification of an integer (onnx-int) file: structure, codes, agreement, task.

Stricter than "it runs":

* **structure**: onnxruntime writes its optimized graph (``optimized_model_filepath``, the
  graph a deployment executes) and the integer conv nodes in it are counted (``QLinearConv``,
  ``ConvInteger`` and the fused forms such as ``com.microsoft`` NHWC ``QLinearConv``). Their
  number must equal the subnet's quantized convs, and no more float convs may be left than the
  subnet's full-precision ones (stem, squeeze-excite): otherwise a quantized conv runs in float.
* **codes**: every quantizer's integer codes in the deployed session against the PyTorch subnet,
  aligned as in :mod:`oqat.export.verify` (PyTorch fed onnxruntime's codes): at most
  ``MAX_CODE_SHARE`` of a tensor's codes may differ, none by more than one; the exact share of
  each tensor is in the report (and end to end, as a deployment sees it).
* **agreement**: end-to-end top-1 agreement with PyTorch >= 99.5% at 3 bits and more, >= 99% at
  2 bits (``MIN_TOP1_INT``).
* **task** (labelled images): the file's top-1 within ``MAX_TOP1_GAP`` points of the subnet's.
"""

from __future__ import annotations

import collections
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..nn.layers import QConvBN
from .code_split import SPLITS_BY_NAME
from .graph import INPUT_NAME, OUTPUT_NAME
from .onnx_int import FLOAT_CONV_OPS, INT_CONV_OPS, IntCodes, codes_from_info
from .verify import (
    MAX_CODE_DIFF,
    MAX_CODE_SHARE,
    VerificationError,
    VerifyReport,
    _batches,
    _Compare,
    compare_batch,
    quantizers_of,
)

MIN_TOP1_INT = {2: 0.99}          # by bits; every other bit-width 0.995
DEFAULT_MIN_TOP1_INT = 0.995


def integer_metadata(model: onnx.ModelProto) -> dict:
    """{"integer": ...} from the model's metadata (ValueError if it is not an integer file)."""
    props = {p.key: p.value for p in model.metadata_props}
    if "integer" not in props:
        raise ValueError("not an integer (onnx-int) model: its metadata has no 'integer' entry")
    return {"integer": json.loads(props["integer"])}


def min_top1_for(bits: int) -> float:
    return MIN_TOP1_INT.get(int(bits), DEFAULT_MIN_TOP1_INT)


@dataclass
class GraphCheck:
    """Node counts of onnxruntime's optimized graph of the file."""

    int_convs: int                    # integer conv nodes found
    float_convs: int                  # float conv nodes found
    expected_int: int                 # quantized convs of the subnet
    allowed_float: int                # full-precision convs of the subnet
    ops: dict = field(default_factory=dict)   # "domain:op" -> count

    @property
    def failures(self) -> list[str]:
        out = []
        if self.int_convs < self.expected_int:
            out.append(f"onnxruntime's optimized graph has {self.int_convs} integer conv nodes for "
                       f"{self.expected_int} quantized convs")
        if self.float_convs > self.allowed_float:
            out.append(f"onnxruntime's optimized graph runs {self.float_convs} convs in float where the subnet has "
                       f"{self.allowed_float} full-precision ones: a quantized conv runs in float")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def int_session(model: onnx.ModelProto | str | Path, *, threads: int | None = None, optimized_path: str | None = None):
    """A deployment session of an integer file (all graph optimisations). onnxruntime without a
    kernel the file needs (an old or trimmed build) is a ValueError naming the node."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # NOT_IMPLEMENTED, INVALID_GRAPH, ...
        raise ValueError(f"onnxruntime {ort.__version__} cannot run the integer model on CPU "
                         f"({type(exc).__name__}: {str(exc).strip()[:300]}); it needs QLinearConv/ConvInteger "
                         f"kernels for uint8 x int8 (onnxruntime >= 1.16 on x86-64 or ARM64)") from None


def count_convs(sub: nn.Module) -> tuple[int, int]:
    """(quantized convs, full-precision convs) of the subnet."""
    q = fp = 0
    for m in sub.modules():
        if isinstance(m, QConvBN):
            if m.quantizes_weight:
                q += 1
            else:
                fp += 1
        elif isinstance(m, nn.Conv2d):
            fp += 1
    return q, fp


def check_graph(model: onnx.ModelProto, sub: nn.Module) -> GraphCheck:
    """Let onnxruntime optimize `model`, read back its graph, count integer and float convs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        int_session(model, optimized_path=path)
        opt = onnx.load(path, load_external_data=False)
    ops = collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in opt.graph.node)
    int_convs = sum(c for k, c in ops.items() if k.split(":")[1] in INT_CONV_OPS)
    float_convs = sum(c for k, c in ops.items() if k.split(":")[1] in FLOAT_CONV_OPS and not k.endswith(":Gemm")
                      and not k.endswith(":FusedGemm"))
    q, fp = count_convs(sub)
    return GraphCheck(int_convs, float_convs, q, fp, dict(sorted(ops.items())))


def weight_codes_of(model: onnx.ModelProto, codes: list[IntCodes]) -> dict[str, np.ndarray]:
    """The trained weight codes recovered from the file: (stored - zero point) / gain * sign."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for c in codes:
        if c.kind != "weight":
            continue
        if c.tensor not in inits:
            raise VerificationError(f"{c.name}: weight codes {c.tensor} are not in the file")
        w = numpy_helper.to_array(inits[c.tensor]).astype(np.int32) - c.zero_point
        if c.split:
            split = SPLITS_BY_NAME.get(c.split)
            if split is None:
                raise VerificationError(f"{c.name}: unknown weight split {c.split!r} (known: {sorted(SPLITS_BY_NAME)})")
            second = c.tensor[: -len(split.suffixes[0])] + split.suffixes[1]
            if second not in inits:
                raise VerificationError(f"{c.name}: weight codes {second} are not in the file")
            w = split.join(w, numpy_helper.to_array(inits[second])).astype(np.int32)
        shape = (-1,) + (1,) * (w.ndim - 1)
        gain = np.asarray(c.gain if isinstance(c.gain, list) else [c.gain] * w.shape[0]).reshape(shape)
        if np.any(w % gain):
            raise VerificationError(f"{c.name}: stored weights are not multiples of their recorded gain")
        sign = np.ones(w.shape[0], np.int32)
        sign[c.negated] = -1
        out[c.name] = ((w // gain) * sign.reshape(shape)).astype(np.int16)
    return out


def verify_onnx_int(model: onnx.ModelProto | str | Path, sub: nn.Module, inputs: torch.Tensor, *,
                    input_desc: str = "given inputs", batch_size: int = 32, labels: torch.Tensor | None = None,
                    min_top1: float | None = None, max_code_share: float = MAX_CODE_SHARE,
                    max_code_diff: int = MAX_CODE_DIFF, progress: bool | None = None,
                    raise_on_failure: bool = False) -> VerifyReport:
    """Verify an integer file against the PyTorch subnet (see the module doc). The report's
    ``graph`` holds the :class:`GraphCheck` figures."""
    from tqdm import tqdm

    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"{path}: ONNX file not found")
        model = onnx.load(str(path))
    info = integer_metadata(model)
    if inputs.dim() != 4 or inputs.shape[0] < 1:
        raise ValueError(f"verification inputs: expected a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    codes = codes_from_info(info)
    min_top1 = min_top1_for(sub.bits) if min_top1 is None else min_top1
    quantizers = quantizers_of(sub)
    cmp = _Compare("onnxruntime (integer)", quantizers, input_desc,
                   dict(min_top1=min_top1, max_code_share=max_code_share, max_code_diff=max_code_diff))
    graph = check_graph(model, sub)
    cmp.report.failures.extend(graph.failures)
    found = {c.name for c in codes}
    if set(quantizers) - found:
        cmp.report.failures.append(f"quantized tensors missing from the integer graph: {sorted(set(quantizers) - found)[:5]}")
    acts = [c for c in codes if c.kind == "activation" and c.name in quantizers]
    weights = weight_codes_of(model, codes)
    vmodel = onnx.ModelProto()
    vmodel.CopyFrom(model)
    present = {o.name for o in vmodel.graph.output}
    for c in acts:
        if c.tensor not in present:
            vmodel.graph.output.append(onnx.ValueInfoProto(name=c.tensor))
    session = int_session(vmodel)
    deployed = int_session(model) if labels is not None else None
    names = [OUTPUT_NAME] + [c.tensor for c in acts]
    total = math.ceil(inputs.shape[0] / batch_size)
    sub.eval()
    for x, y in tqdm(_batches(inputs, batch_size, labels), total=total, desc="verify", leave=False,
                     disable=True if progress is False else None):
        feed = {INPUT_NAME: x.numpy().astype(np.float32)}
        outs = session.run(names, feed)
        ort_codes = {c.name: o.astype(np.int16) - c.zero_point for c, o in zip(acts, outs[1:])}
        ort_codes.update({n: w for n, w in weights.items() if n in quantizers})
        compare_batch(cmp, sub, x, y, outs[0], ort_codes, deployed, feed)
    report = cmp.finish(min_top1, max_code_share, max_code_diff, None)
    report.graph = graph.to_dict()
    if raise_on_failure and not report.ok:
        raise VerificationError("integer ONNX model failed verification: " + "; ".join(report.failures), report)
    return report


__all__ = ["DEFAULT_MIN_TOP1_INT", "GraphCheck", "MIN_TOP1_INT", "check_graph", "count_convs", "int_session", "min_top1_for",
           "verify_onnx_int", "weight_codes_of"]
