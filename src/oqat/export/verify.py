"""Check an exported model against the PyTorch subnet it came from.

Both run on the same inputs; the report gives the largest absolute logit difference, the top-1
agreement and, for every quantized tensor, how many integer codes differ and by how much. The
PyTorch codes are ``round(q(x) / s)`` of each quantizer's output (exactly the integers its
forward used); the ONNX codes are the outputs of the graph's Clip nodes (``<quantizer>.codes``),
exposed as extra outputs of an in-memory copy of the model, or the int8 weight initializers.
onnxruntime runs with graph optimisations disabled, so the graph is executed as written.

A float rounding difference (e.g. a different summation order inside a conv) may push a value
across a rounding boundary: its code then moves by one, rarely. Downstream of such a flip the
two runs no longer see the same integers, and a later layer (a depthwise conv with few inputs,
say) may then differ by several codes: that is propagation, not an export error. So codes are
compared twice per batch:

* end to end: PyTorch and onnxruntime each run freely (what a deployment sees);
* aligned: PyTorch runs again with every quantizer's output replaced by onnxruntime's codes
  times the step, so each layer of both runs receives the same integers and each quantizer's
  codes differ only by the rounding of the float work since the previous quantizer.

Verification fails when the top-1 agreement (end to end) is below 99.9%, or when, aligned, any
code moves by more than one or more than 0.1% of the codes of any tensor differ. With labels
(held-out images) it also checks the task: the exported file's top-1, run as a deployment runs
it (onnxruntime with its graph optimisations), must equal the PyTorch subnet's within 0.2 points.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..quant import LSQQuantizer
from .code_split import joined_codes
from .graph import INPUT_NAME, OUTPUT_NAME
from .inputs import VerificationData, random_inputs, verification_inputs
from .report import MAX_CODE_DIFF, MAX_CODE_SHARE, MAX_TOP1_GAP, MIN_TOP1, TensorCheck, VerificationError, VerifyReport


# ---------------------------------------------------------------------------------- PyTorch side
def quantizers_of(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Every enabled quantizer of `model` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.enabled}



def _codes(output: torch.Tensor, q: LSQQuantizer) -> torch.Tensor:
    # output = code * s in float32, so output / s is within a few ulps of the integer code.
    return torch.round(output.detach() / q.effective_step().detach().to(output.dtype)).to(torch.int16)



@contextmanager
def _hooks(model: nn.Module, store: dict, force: dict | None = None):
    """Record every quantizer's codes into `store`; with `force` ({name: codes}), replace the
    quantizer's output by ``force[name] * step`` so that later layers see those integers."""
    handles = []

    def make(name, q):
        def fn(module, inputs, output):
            store[name] = _codes(output, q)
            if force is not None and name in force:
                s = q.effective_step().detach().to(output.dtype)
                return torch.from_numpy(np.array(force[name])).to(output.dtype).reshape(output.shape) * s
            return None
        return fn

    for name, q in quantizers_of(model).items():
        handles.append(q.register_forward_hook(make(name, q)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()



def torch_forward(model: nn.Module, x: torch.Tensor, force: dict | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every quantizer's integer codes (int16) of one eval forward; ``force`` as in
    the aligned comparison (codes replace the quantizer outputs)."""
    codes: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad(), _hooks(model, codes, force):
        logits = model(x)
    return logits, codes



# ---------------------------------------------------------------------------------- comparison
def _diff(a: np.ndarray, b: np.ndarray, name: str) -> tuple[int, int]:
    if a.shape != b.shape:
        raise VerificationError(f"{name}: exported codes have shape {b.shape}, expected {a.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(np.count_nonzero(d)), int(d.max(initial=0))



class _Compare:
    def __init__(self, target: str, quantizers: dict[str, LSQQuantizer], inputs: str, thresholds: dict):
        self.report = VerifyReport(target=target, images=0, inputs=inputs, thresholds=thresholds)
        self.checks = {n: TensorCheck(n, "weight" if n.endswith("weight_quant") else "activation", q.bits, q.signed)
                       for n, q in quantizers.items()}
        self.report.tensors = list(self.checks.values())
        self.weights_done: set[str] = set()

    def logits(self, ref: np.ndarray, out: np.ndarray, aligned: np.ndarray | None = None) -> None:
        r = self.report
        if out.shape != ref.shape:
            raise VerificationError(f"logits have shape {out.shape}, expected {ref.shape}")
        if not np.isfinite(ref).all() and "PyTorch" not in " ".join(r.failures):
            r.failures.append("the PyTorch model itself produces non-finite logits (a broken checkpoint?)")
        if not np.isfinite(out).all() and "exported" not in " ".join(r.failures):
            r.failures.append("the exported model produced non-finite logits")
        diff = np.nan_to_num(np.abs(out.astype(np.float64) - ref.astype(np.float64)), nan=np.inf)
        r.max_abs_diff = max(r.max_abs_diff, float(diff.max(initial=0.0)))
        if aligned is not None:
            adiff = np.nan_to_num(np.abs(out.astype(np.float64) - aligned.astype(np.float64)), nan=np.inf)
            r.aligned_max_abs_diff = max(r.aligned_max_abs_diff, float(adiff.max(initial=0.0)))
        r.max_abs_logit = max(r.max_abs_logit, float(np.abs(ref).max(initial=0.0)))
        r.top1_agree += int((out.argmax(1) == ref.argmax(1)).sum())
        r.images += ref.shape[0]

    def labels(self, ref: np.ndarray, out: np.ndarray, y: np.ndarray) -> None:
        """The task-level count: `ref` and `out` logits of the same labelled images `y`."""
        r = self.report
        r.labelled += int(y.shape[0])
        r.reference_correct += int((ref.argmax(1) == y).sum())
        r.exported_correct += int((out.argmax(1) == y).sum())

    def codes(self, name: str, out: np.ndarray, e2e: np.ndarray, aligned: np.ndarray) -> None:
        c = self.checks[name]
        if c.kind == "weight":
            if name in self.weights_done:
                return
            self.weights_done.add(name)
        n, m = _diff(aligned, out, name)
        c.differing += n
        c.max_diff = max(c.max_diff, m)
        n, m = _diff(e2e, out, name)
        c.e2e_differing += n
        c.e2e_max_diff = max(c.e2e_max_diff, m)
        c.count += out.size

    def finish(self, min_top1: float, max_share: float, max_diff: int, max_logit_diff: float | None) -> VerifyReport:
        r = self.report
        if r.top1_agreement < min_top1:
            r.failures.append(f"top-1 agreement {100 * r.top1_agreement:.2f}% is below {100 * min_top1:.1f}%")
        if r.labelled and abs(r.exported_top1 - r.reference_top1) > MAX_TOP1_GAP:
            r.failures.append(f"top-1 on {r.labelled} labelled images: exported {r.exported_top1:.2f}% vs PyTorch "
                              f"subnet {r.reference_top1:.2f}% (allowed gap {MAX_TOP1_GAP} points)")
        if max_logit_diff is not None and not r.max_abs_diff <= max_logit_diff:
            r.failures.append(f"max |logit difference| {r.max_abs_diff:.3g} exceeds {max_logit_diff:.3g}")
        for c in r.tensors:
            if c.max_diff > max_diff:
                r.failures.append(f"{c.name}: a code differs by {c.max_diff} (allowed {max_diff})")
            if c.share > max_share:
                r.failures.append(f"{c.name}: {100 * c.share:.3f}% of codes differ (allowed {100 * max_share:.1f}%)")
        return r



def compare_batch(cmp: _Compare, sub: nn.Module, x: torch.Tensor, y, logits: np.ndarray, ort_codes: dict,
                  deployed, feed: dict) -> None:
    """One batch of an ONNX verification: PyTorch run freely and aligned to the file's codes, both
    against the file's logits and codes; with labels `y`, the deployment session's top-1 too."""
    ref_logits, ref_codes = torch_forward(sub, x)
    aligned_logits, aligned_codes = torch_forward(sub, x, force=ort_codes)
    cmp.logits(ref_logits.numpy(), logits, aligned_logits.numpy())
    if y is not None:
        cmp.labels(ref_logits.numpy(), deployed.run([OUTPUT_NAME], feed)[0], y)
    for name, codes in ort_codes.items():
        cmp.codes(name, codes, ref_codes[name].numpy(), aligned_codes[name].numpy())


def _batches(x: torch.Tensor, batch_size: int, labels: torch.Tensor | None = None):
    """(images, labels or None) in batches of `batch_size`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size: expected a positive integer, got {batch_size!r}")
    if labels is not None and labels.shape[0] != x.shape[0]:
        raise ValueError(f"verification labels: {labels.shape[0]} labels for {x.shape[0]} images")
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size], None if labels is None else labels[i:i + batch_size].numpy()



def ort_session(model: onnx.ModelProto | str | Path, *, optimize: bool = True, threads: int | None = None,
                fold_weights: bool = True):
    """An onnxruntime CPU session; ``optimize=False`` disables every graph optimisation.

    With ``optimize`` and ``fold_weights`` (the default) onnxruntime's QDQ transformers are
    turned off (``session.disable_quant_qdq``), which lets constant folding turn each weight's
    QuantizeLinear -> Clip -> DequantizeLinear into a float constant: the convs then get
    constant, pre-packed weights (about 10x faster on CPU than the unfused QCDQ graph, where
    every run re-quantizes every weight). The activations are still quantized in the graph.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimize and fold_weights:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])



def _with_code_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], dict[str, np.ndarray]]:
    """A copy whose Clip outputs ``<q>.codes`` are graph outputs; also the int8 / INT4 weight-code initializers."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    outputs: dict[str, str] = {}
    for node in m.graph.node:
        if node.op_type == "Clip" and node.output[0].endswith(".codes"):
            tensor = node.output[0]
            outputs[tensor[: -len(".codes")]] = tensor
            if tensor not in present:
                m.graph.output.append(onnx.ValueInfoProto(name=tensor))
    arrays = {i.name: numpy_helper.to_array(i).astype(np.int8) if i.data_type == onnx.TensorProto.INT4
              else numpy_helper.to_array(i) for i in m.graph.initializer}     # ml_dtypes int4 arithmetic wraps
    inits = {name[: -len(".codes")]: a for name, a in arrays.items() if name.endswith(".codes")}
    inits.update(joined_codes(arrays))
    return m, outputs, inits



def verify_onnx(model: onnx.ModelProto | str | Path, sub: nn.Module, inputs: torch.Tensor, *,
                input_desc: str = "given inputs", batch_size: int = 32, min_top1: float = MIN_TOP1,
                max_code_share: float = MAX_CODE_SHARE, max_code_diff: int = MAX_CODE_DIFF,
                raise_on_failure: bool = False, progress: bool | None = None,
                labels: torch.Tensor | None = None) -> VerifyReport:
    """Run ``model`` in onnxruntime (optimisations off) and ``sub`` in PyTorch on ``inputs``.

    With ``labels`` the task-level check runs too: the model in a deployment session
    (optimisations on) classifies the inputs, and its top-1 is compared with ``sub``'s.
    Returns the :class:`VerifyReport`; with ``raise_on_failure`` a failed check raises
    :class:`VerificationError` (a ValueError) carrying the report. ``progress`` None shows a
    progress bar on a terminal only.
    """
    from tqdm import tqdm

    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"{path}: ONNX file not found")
        model = onnx.load(str(path))
    if inputs.dim() != 4 or inputs.shape[0] < 1:
        raise ValueError(f"verification inputs: expected a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    vmodel, code_outputs, code_inits = _with_code_outputs(model)
    quantizers = quantizers_of(sub)
    cmp = _Compare("onnxruntime", quantizers, input_desc,
                   dict(min_top1=min_top1, max_code_share=max_code_share, max_code_diff=max_code_diff))
    found = set(code_outputs) | set(code_inits)
    if sorted(set(quantizers) - found):
        cmp.report.failures.append(f"quantized tensors missing from the ONNX graph: {sorted(set(quantizers) - found)[:5]}")
    if sorted(found - set(quantizers)):
        cmp.report.failures.append(f"the ONNX graph quantizes tensors that PyTorch does not: {sorted(found - set(quantizers))[:5]}")
    session = ort_session(vmodel, optimize=False)
    deployed = ort_session(model, optimize=True) if labels is not None else None
    keys = [n for n in quantizers if n in code_outputs]
    names = [OUTPUT_NAME] + [code_outputs[n] for n in keys]
    sub.eval()
    total = math.ceil(inputs.shape[0] / batch_size)
    for x, y in tqdm(_batches(inputs, batch_size, labels), total=total, desc="verify", leave=False,
                     disable=True if progress is False else None):
        feed = {INPUT_NAME: x.numpy().astype(np.float32)}
        outs = session.run(names, feed)
        ort_codes = dict(zip(keys, outs[1:]))
        ort_codes.update({n: c for n, c in code_inits.items() if n in quantizers})
        compare_batch(cmp, sub, x, y, outs[0], ort_codes, deployed, feed)
    report = cmp.finish(min_top1, max_code_share, max_code_diff, None)
    if raise_on_failure and not report.ok:
        raise VerificationError("exported ONNX model failed verification: " + "; ".join(report.failures), report)
    return report



def verify_models(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor, *, target: str = "packed",
                  input_desc: str = "given inputs", batch_size: int = 32, max_logit_diff: float = 1e-6,
                  raise_on_failure: bool = False, labels: torch.Tensor | None = None) -> VerifyReport:
    """Compare two PyTorch subnets (e.g. a packed model reloaded): logits within
    ``max_logit_diff``, identical top-1 and identical integer codes everywhere."""
    if inputs.dim() != 4 or inputs.shape[0] < 1:
        raise ValueError(f"verification inputs: expected a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    quantizers = quantizers_of(reference)
    cmp = _Compare(target, quantizers, input_desc, dict(max_logit_diff=max_logit_diff, max_code_diff=0))
    other = set(quantizers_of(candidate))
    if other != set(quantizers):
        cmp.report.failures.append(f"quantized tensors differ: {sorted(set(quantizers) ^ other)[:5]}")
    for x, y in _batches(inputs, batch_size, labels):
        ref_logits, ref_codes = torch_forward(reference, x)
        out_logits, out_codes = torch_forward(candidate, x)
        cmp.logits(ref_logits.numpy(), out_logits.numpy())
        if y is not None:
            cmp.labels(ref_logits.numpy(), out_logits.numpy(), y)
        for name in quantizers:
            if name in out_codes:
                ref = ref_codes[name].numpy()
                cmp.codes(name, out_codes[name].numpy(), ref, ref)
    report = cmp.finish(1.0, 0.0, 0, max_logit_diff)
    if raise_on_failure and not report.ok:
        raise VerificationError(f"{target} model failed verification: " + "; ".join(report.failures), report)
    return report


__all__ = ["MAX_TOP1_GAP", "TensorCheck", "VerificationData", "VerificationError", "VerifyReport", "compare_batch", "ort_session",
           "quantizers_of", "random_inputs", "torch_forward", "verification_inputs", "verify_models", "verify_onnx"]
