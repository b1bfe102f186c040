"""The deployment table row of one subnet: file sizes, resident weight memory and latency of its
FP32, QCDQ and integer ONNX files side by side, with the engine, threads and instruction set;
where OpenVINO is installed, its FP32 and QCDQ latencies too (it runs the QCDQ file on integer
kernels, onnxruntime in float), each compared with its own engine's FP32.

The FP32 reference of a quantized subnet is the same subnet with every quantizer disabled
(:func:`fp32_reference`: a copy whose quantizers are set to 32 bits, the identity), exported
with the ordinary exporter: the same weights, BN and float layers, no quantization.
Latencies are measured interleaved in one process (each round runs every file once), so the
ratios are fair on a shared machine; the median over ``runs`` rounds is reported.
"""

from __future__ import annotations

import copy
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from ..quant import LSQQuantizer
from . import openvino_check as ovc
from .verify import ort_session
from .verify_int import int_session

# most capable first: the first flag the CPU has names its integer dot-product instruction set
ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2", "asimddp", "i8mm", "asimd", "neon", "sse4_1")


def cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{"best": the most capable integer instruction set the CPU reports, "flags": those of
    ISA_FLAGS it has, "model": the CPU's name}; from /proc/cpuinfo (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"best": platform.machine() or "unknown", "flags": [], "model": platform.processor()}
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
    have = [f for f in ISA_FLAGS if f in flags]
    return {"best": have[0] if have else (platform.machine() or "unknown"), "flags": have, "model": model}


def fp32_reference(sub: nn.Module) -> nn.Module:
    """A copy of `sub` with every quantizer disabled (bits 32): its full-precision twin."""
    fp = copy.deepcopy(sub).eval()
    for m in fp.modules():
        if isinstance(m, LSQQuantizer):
            m.bits = 32
    return fp


def resident_weight_bytes(model_path: str | Path, integer: bool) -> int:
    """Bytes of the constants in onnxruntime's optimized graph of the file: the weights as the
    session holds them (float32 after folding for a QCDQ file, int8 codes for an integer one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "opt.onnx")
        if integer:
            int_session(model_path, optimized_path=out)
        else:
            _session(model_path, out)
        m = onnx.load(out, load_external_data=False)
    return int(sum(onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer))


def _session(path, optimized_path=None, threads=1):
    if optimized_path is None:
        return ort_session(path, optimize=True, threads=threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.log_severity_level = 3
    so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(runners: dict, batch_shape: tuple[int, ...], runs: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each ``runners[name](x)`` call, one call per runner per round."""
    x = np.random.default_rng(0).standard_normal(batch_shape).astype(np.float32)
    for fn in runners.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, fn in runners.items():
            t = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


@dataclass
class DeploymentFiles:
    """The exported files of one subnet (any may be None)."""

    fp32: str | Path | None = None        # ONNX of the subnet with quantizers disabled
    qcdq: str | Path | None = None        # --format onnx
    integer: str | Path | None = None     # --format onnx-int
    packed: str | Path | None = None      # --format oqat
    extra: dict = field(default_factory=dict)   # more variants: {"integer-fast": path, "qcdq-int8fp": path}

    def items(self):
        pairs = [("fp32", self.fp32), ("qcdq", self.qcdq), ("integer", self.integer), *self.extra.items()]
        return [(k, Path(v)) for k, v in pairs if v is not None]


@dataclass
class DeploymentRow:
    """One subnet's deployment figures (bytes, milliseconds)."""

    subnet: str
    bits: int
    resolution: int
    file_bytes: dict = field(default_factory=dict)        # fp32 / qcdq / integer / packed
    weight_bytes: dict = field(default_factory=dict)      # resident weight memory per ONNX file
    latency_ms: dict = field(default_factory=dict)        # {"fp32": {"1": ms, "32": ms}, ...}
    engine: str = ""
    openvino: str = ""                                    # OpenVINO version where it timed fp32 / qcdq too
    threads: int = 1
    isa: str = ""
    cpu: str = ""
    runs: int = 0

    def speedup(self, kind: str = "integer", batch: int = 32) -> float | None:
        """FP32 latency on the same engine / `kind` latency at `batch` (None where either is missing)."""
        a = self.latency_ms.get(f"{OV}fp32" if kind.startswith(OV) else "fp32", {}).get(str(batch))
        b = self.latency_ms.get(kind, {}).get(str(batch))
        return a / b if a and b else None

    def size_ratio(self, kind: str = "integer") -> float | None:
        a, b = self.file_bytes.get(kind), self.file_bytes.get("fp32")
        return a / b if a and b else None

    @classmethod
    def from_dict(cls, d: dict) -> DeploymentRow:
        """Inverse of :meth:`to_dict` (the derived ``speedup``/``size_ratio`` are recomputed)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speedup"] = {k: {str(b): self.speedup(k, b) for b in (1, 32)} for k in self.latency_ms
                        if k not in ("fp32", f"{OV}fp32")}
        d["size_ratio"] = {k: self.size_ratio(k) for k in self.file_bytes if k != "fp32"}
        return d

    def table(self) -> str:
        """Markdown rows: one per file kind."""
        lines = [f"{self.subnet}, {self.bits}-bit, {self.resolution} px; {self.engine}, {self.threads} thread(s), "
                 f"{self.isa} ({self.cpu}); median of {self.runs} interleaved runs",
                 "| file | size | resident weights | batch 1 ms | batch 32 ms | x FP32 (1 / 32) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        for label, size, weights, ms1, ms32, sp1, sp32 in self.cells():
            lines.append(f"| {label} | {size / 1e6:.2f} MB | {fmt(weights, '{:.0f}')} B | {fmt(ms1, '{:.2f}')} | "
                         f"{fmt(ms32, '{:.1f}')} | {fmt(sp1, '{:.2f}')} / {fmt(sp32, '{:.2f}')} |")
        return "\n".join(lines)

    def cells(self) -> list[tuple]:
        """(label, file bytes, resident weight bytes, ms at batch 1, ms at 32, x FP32 at 1, at 32) per
        table row, onnxruntime's then OpenVINO's (None where not measured; resident weights are
        onnxruntime's figure, so not given for OpenVINO rows)."""
        variants = lambda kind: [k for k in self.file_bytes if k.startswith(f"{kind}-")]  # noqa: E731
        files = ["fp32", "qcdq", *variants("qcdq"), "integer", *variants("integer"), "packed"]
        rows = [(k, k, k) for k in files if k in self.file_bytes]
        rows += [(f"{OV}{k}", f"{k} on OpenVINO", k) for k in files if f"{OV}{k}" in self.latency_ms]
        out = []
        for key, label, file in rows:
            lat = self.latency_ms.get(key, {})
            sp = (None, None) if key.endswith("fp32") else (self.speedup(key, 1), self.speedup(key, 32))
            weights = None if key.startswith(OV) else self.weight_bytes.get(file)
            out.append((label, self.file_bytes[file], weights, lat.get("1"), lat.get("32"), *sp))
        return out


OV = "openvino-"     # latency keys of the files OpenVINO timed


def deployment_row(files: DeploymentFiles, *, subnet: str, bits: int, resolution: int, in_channels: int = 3,
                   threads: int = 1, runs: int = 10, batches: tuple[int, ...] = (1, 32),
                   openvino: bool | None = None) -> DeploymentRow:
    """Measure the files of one subnet on onnxruntime CPU with `threads` intra-op threads, and the
    FP32 and QCDQ files (``qcdq``, ``qcdq-*`` variants) on OpenVINO CPU too (``openvino``; default:
    when it is installed), each engine's runs interleaved with its own FP32."""
    import onnxruntime as ort

    isa = cpu_isa()
    row = DeploymentRow(subnet, bits, resolution, engine=f"onnxruntime {ort.__version__} CPUExecutionProvider",
                        threads=threads, isa=isa["best"], cpu=isa["model"], runs=runs)
    sessions = {}
    for kind, path in files.items():
        if not path.is_file():
            raise ValueError(f"{path}: {kind} model file not found")
        row.file_bytes[kind] = path.stat().st_size
        integer = kind == "integer" or kind.startswith("integer-")
        row.weight_bytes[kind] = resident_weight_bytes(path, integer)
        sessions[kind] = int_session(path, threads=threads) if integer else ort_session(path, optimize=True,
                                                                                       threads=threads)
    if files.packed is not None:
        row.file_bytes["packed"] = Path(files.packed).stat().st_size
    runners = {k: (lambda s: (lambda x: s.run(None, {s.get_inputs()[0].name: x})))(s) for k, s in sessions.items()}
    groups = [runners]                      # each engine's files interleaved with its own FP32
    if (ovc.available() if openvino is None else openvino) and None not in (files.fp32, files.qcdq):
        row.openvino = ovc.version()
        groups.append({f"{OV}{k}": ovc.OpenVINOModel(p, threads) for k, p in files.items()
                       if k == "fp32" or k == "qcdq" or k.startswith("qcdq-")})
    for b in batches:
        for group in groups:
            for k, ms in interleaved_latency(group, (b, in_channels, resolution, resolution), runs).items():
                row.latency_ms.setdefault(k, {})[str(b)] = ms
    return row


__all__ = ["OV", "DeploymentFiles", "DeploymentRow", "ISA_FLAGS", "cpu_isa", "deployment_row", "fp32_reference",
           "interleaved_latency", "resident_weight_bytes"]
