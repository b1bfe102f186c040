"""OpenVINO (CPU) as a second engine: run an exported file, check it, time it.

OpenVINO's ONNX reader maps QuantizeLinear/DequantizeLinear pairs to its FakeQuantize and its
low-precision transformations then run those convolutions on u8/i8 kernels; it reads
``ConvInteger`` too but executes it as a float convolution, and rejects ``QLinearConv`` with
per-channel scales. So the OpenVINO variant of a quantized subnet is the QCDQ file
(``--format onnx``, best with ``--onnx-weights int8``). The check mirrors the onnxruntime one:
structure (the compiled model's convolutions must run in u8/i8, as many as the subnet has
quantized convs), end-to-end top-1 agreement with PyTorch and the task-level top-1. Inference
precision is pinned to f32 (on CPUs with bf16 OpenVINO would otherwise run float layers in bf16).
Optional dependency: ``pip install oqat[deploy]``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .report import AgreementFigures
from .verify import MAX_TOP1_GAP, torch_forward
from .verify_int import count_convs, min_top1_for


def available() -> bool:
    """OpenVINO can be imported (an installation that fails to load counts as absent)."""
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def _core():
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("OpenVINO is not installed (pip install 'oqat[deploy]' or openvino)") from None
    return ov


@functools.cache
def _shared_core():
    """One OpenVINO Core per process (its plugins and thread pools are meant to be shared)."""
    return _core().Core()


def version() -> str:
    """The release, e.g. ``2026.4.1`` (without the build suffix)."""
    return _core().__version__.split("-")[0]


COMPILED_CACHE = 8  # compiled models kept per process: an export checks, scores and times each file


def compile_file(path: str | Path, batch: int, threads: int = 1, precision: str = "f32"):
    """An OpenVINO CPU compiled model of `path` at a static batch size (static shapes keep the
    integer kernels; ``threads=0`` lets OpenVINO choose).

    Compiling takes 0.3-1 s even for a small subnet, and an export asks for the same file at the
    same batch several times (check, then timing), so the last few compiled models are reused;
    the key holds the file's identity, size and modification time, so a rewritten file compiles
    anew. Each caller still makes its own infer request."""
    try:
        st = Path(path).stat()
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None                                              # compiling reports the error
    return _compile(str(path), identity, int(batch), int(threads), precision)


@functools.lru_cache(maxsize=COMPILED_CACHE)
def _compile(path: str, identity: tuple | None, batch: int, threads: int, precision: str):
    ov = _core()
    core = _shared_core()
    try:
        model = core.read_model(str(path))
        dims = list(model.inputs[0].get_partial_shape())[1:]           # (C, r, r) are fixed, batch is not
        model.reshape({model.inputs[0].get_any_name(): [batch] + [d.get_length() for d in dims]})
        return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_PRECISION_HINT": precision})
    except Exception as exc:
        raise ValueError(f"{path}: OpenVINO {ov.__version__} cannot compile it for CPU "
                         f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})") from None


class OpenVINOModel:
    """An exported file run by OpenVINO CPU: ``model(batch)`` -> logits, any batch size (one
    compiled model per size seen, as OpenVINO's integer kernels want static shapes)."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.path, self.threads = Path(path), int(threads)
        self._compiled: dict[int, tuple] = {}
        self.compiled(1)                                              # errors now, not at the first image

    def compiled(self, batch: int):
        if batch not in self._compiled:
            c = compile_file(self.path, batch, self.threads)
            self._compiled[batch] = (c, c.create_infer_request())
        return self._compiled[batch][0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.compiled(batch.shape[0])
        return np.array(self._compiled[batch.shape[0]][1].infer({0: batch})[0])


def conv_precisions(compiled) -> dict[str, int]:
    """Runtime precision -> number of Convolution nodes in the compiled (executed) model."""
    out: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind == "Convolution":
            p = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            out[p] = out.get(p, 0) + 1
    return out


@dataclass
class OpenVINOReport(AgreementFigures):
    """Figures of the OpenVINO cross-check; ``failures`` empty when it passed."""

    file: str
    images: int
    int_convs: int
    expected_int: int
    precisions: dict = field(default_factory=dict)
    top1_agree: int = 0
    labelled: int = 0
    reference_correct: int = 0
    exported_correct: int = 0
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, top1_agreement=self.top1_agreement)
        return d


def verify_openvino(path: str | Path, sub: nn.Module, inputs: torch.Tensor, *, labels: torch.Tensor | None = None,
                    batch_size: int = 32) -> OpenVINOReport:
    """Run `path` in OpenVINO CPU against the PyTorch subnet `sub` (see the module doc)."""
    model = OpenVINOModel(path)
    prec = conv_precisions(model.compiled(batch_size))
    q, _ = count_convs(sub)
    n_int = sum(v for k, v in prec.items() if k in ("u8", "i8"))
    rep = OpenVINOReport(str(path), 0, n_int, q, prec)
    if n_int < q:
        rep.failures.append(f"OpenVINO runs {n_int} convolutions in u8/i8 for {q} quantized convs ({prec})")
    sub.eval()
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i:i + batch_size]
        n = x.shape[0]
        out = model(x.numpy())
        ref, _ = torch_forward(sub, x)
        ref = ref.numpy()
        rep.top1_agree += int((out.argmax(1) == ref.argmax(1)).sum())
        rep.images += n
        if labels is not None:
            y = labels[i:i + n].numpy()
            rep.labelled += n
            rep.reference_correct += int((ref.argmax(1) == y).sum())
            rep.exported_correct += int((out.argmax(1) == y).sum())
    need = min_top1_for(sub.bits)
    if rep.top1_agreement < need:
        rep.failures.append(f"OpenVINO top-1 agreement {100 * rep.top1_agreement:.2f}% is below {100 * need:.1f}%")
    if rep.labelled:
        gap = 100.0 * abs(rep.exported_correct - rep.reference_correct) / rep.labelled
        if gap > MAX_TOP1_GAP:
            rep.failures.append(f"OpenVINO top-1 differs from the PyTorch subnet's by {gap:.2f} points "
                                f"(allowed {MAX_TOP1_GAP})")
    return rep


def openvino_latency(paths: dict, batch: int, shape: tuple[int, ...], *, threads: int = 1, runs: int = 10) -> dict:
    """Median ms of each file (name -> path) in OpenVINO CPU at `batch`, interleaved rounds."""
    from .deployment import interleaved_latency

    runners = {k: OpenVINOModel(p, threads) for k, p in paths.items()}
    return interleaved_latency(runners, (batch, *shape), runs)


__all__ = ["OpenVINOModel", "OpenVINOReport", "available", "compile_file", "conv_precisions", "openvino_latency",
           "verify_openvino", "version"]
