"""Native CPU kernels for ``lsq_quantize`` (float32), built once with the system C compiler.

Why: a ``torch.compile``'d function costs about 20 us per call in guards and wrappers, and a
supernet step makes two calls per quantizer (hundreds per step), which is as much time as the
arithmetic itself on small subnets. These two C loops (forward; backward with the step-gradient
sum) do exactly what the eager kernels in ``oqat.quant`` do, element for element (the same
float32 operations in the same order, no fast-math; round half to even), are vectorised by the
compiler and parallelised with OpenMP (the process's one libgomp, the one torch loaded), and
are called through ctypes for a few microseconds. The step-gradient sum is accumulated in
double precision.

The shared library is cached under ``$OQAT_KERNEL_CACHE`` (default ``~/.cache/oqat/kernels``,
or the temp directory when that is not writable), keyed by a hash of the source, the flags, the
compiler and the CPU. ``library()`` returns None (and ``oqat.quant`` falls back to
``torch.compile`` or eager PyTorch) when no compiler works or the built kernels disagree with
the eager ones on a self-test. ``OQAT_NATIVE_KERNELS=0`` disables them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .kernels import eager_backward, eager_forward  # the definition the kernels must match

SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* code: 0 identity, 1 ReLU, 2 h_swish; the same formulas as oqat.quant's eager kernels */
static inline float act_value(float z, int code) {
    if (code == 1) return z < 0.0f ? 0.0f : z;
    if (code == 2) {
        float t = z + 3.0f;
        t = t < 0.0f ? 0.0f : t;
        t = t > 6.0f ? 6.0f : t;
        return z * t / 6.0f;
    }
    return z;
}

static inline float act_slope(float z, int code) {
    if (code == 1) return z > 0.0f ? 1.0f : 0.0f;
    if (code == 2) return z <= -3.0f ? 0.0f : (z < 3.0f ? z / 3.0f + 0.5f : 1.0f);
    return 1.0f;
}

#define PARALLEL_MIN 65536

#define FWD_LOOP(CODE)                                                                     \
    _Pragma("omp parallel for simd num_threads(nthreads) if(n >= PARALLEL_MIN) schedule(static)") \
    for (int64_t i = 0; i < n; ++i) {                                                      \
        float v = act_value(x[i], CODE) / s;                                               \
        v = v < qn ? qn : (v > qp ? qp : v);                                               \
        out[i] = nearbyintf(v) * s;                                                        \
    }

void oqat_lsq_forward(const float* x, float* out, int64_t n, float s, float qn, float qp,
                      int code, int nthreads) {
    if (code == 1) { FWD_LOOP(1) } else if (code == 2) { FWD_LOOP(2) } else { FWD_LOOP(0) }
}

/* grad_x = g * act'(z) inside [Qn, Qp] (bounds included), 0 outside;
   returns sum(g * (inside ? round(v) - v : clip(v))), v = act(z) / s, unscaled */
#define BWD_LOOP(CODE)                                                                     \
    _Pragma("omp parallel for num_threads(nthreads) if(n >= PARALLEL_MIN) schedule(static) reduction(+:total)") \
    for (int64_t c0 = 0; c0 < n; c0 += 4096) {                                             \
        int64_t c1 = c0 + 4096 < n ? c0 + 4096 : n;                                        \
        float part = 0.0f;                                                                 \
        _Pragma("omp simd reduction(+:part)")                                              \
        for (int64_t i = c0; i < c1; ++i) {                                                \
            float z = x[i];                                                                \
            float v = act_value(z, CODE) / s;                                              \
            int inside = (v >= qn) & (v <= qp);                                            \
            float q = nearbyintf(v < qn ? qn : (v > qp ? qp : v));                         \
            gx[i] = inside ? g[i] * act_slope(z, CODE) : 0.0f;                             \
            part += g[i] * (inside ? q - v : q);                                           \
        }                                                                                  \
        total += (double)part;                                                             \
    }

double oqat_lsq_backward(const float* g, const float* x, float* gx, int64_t n, float s,
                         float qn, float qp, int code, int nthreads) {
    double total = 0.0;
    if (code == 1) { BWD_LOOP(1) } else if (code == 2) { BWD_LOOP(2) } else { BWD_LOOP(0) }
    return total;
}
"""

BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-std=c99"]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    env = os.environ.get("OQAT_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "oqat" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"oqat-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    last_error = ""
    for extra in (["-march=native"], []):
        flags = BASE_FLAGS + extra
        key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), version, platform.machine(), _cpu_id()])
                             .encode()).hexdigest()[:16]
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / f"lsq_{key}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "lsq.c"
            src.write_text(SOURCE)
            out = Path(tmp) / "lsq.so"
            proc = subprocess.run([cc, *flags, "-o", str(out), str(src)], capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders (DDP ranks) agree
                return target
            last_error = proc.stderr.strip()[-500:]
    raise RuntimeError(f"compiling the LSQ kernels failed: {last_error}")


class NativeKernels:
    """ctypes wrappers; tensors must be contiguous float32 CPU tensors."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        f, i64, i32, p = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.oqat_lsq_forward.argtypes = [p, p, i64, f, f, f, i32, i32]
        lib.oqat_lsq_forward.restype = None
        lib.oqat_lsq_backward.argtypes = [p, p, p, i64, f, f, f, i32, i32]
        lib.oqat_lsq_backward.restype = ctypes.c_double
        self._fwd, self._bwd, self.path = lib.oqat_lsq_forward, lib.oqat_lsq_backward, path

    def forward(self, x: torch.Tensor, s: float, qn: float, qp: float, code: int) -> torch.Tensor:
        out = torch.empty_like(x)
        self._fwd(x.data_ptr(), out.data_ptr(), x.numel(), s, qn, qp, code, torch.get_num_threads())
        return out

    def backward(self, g: torch.Tensor, x: torch.Tensor, s: float, qn: float, qp: float,
                 code: int) -> tuple[torch.Tensor, float]:
        gx = torch.empty_like(x)
        total = self._bwd(g.data_ptr(), x.data_ptr(), gx.data_ptr(), x.numel(), s, qn, qp, code,
                          torch.get_num_threads())
        return gx, total


def supports(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def _self_test(k: NativeKernels) -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1000, 70000):  # serial and parallel paths
        x = torch.cat([torch.arange(-40, 41, dtype=torch.float32) * 0.125, 4 * torch.randn(n, generator=g)])
        up = torch.randn(x.shape, generator=g)
        for code in (0, 1, 2):
            for s, qn, qp in ((0.25, -8.0, 7.0), (0.37, 0.0, 3.0)):
                st, c = torch.tensor(s), torch.tensor(code)
                ref = eager_forward(x, st, torch.tensor(qn), torch.tensor(qp), c)
                rgx, rgs = eager_backward(up, x, st, torch.tensor(qn), torch.tensor(qp), c)
                gx, gs = k.backward(up, x, s, qn, qp, code)
                tol = 1e-5 * float((up.abs() * max(abs(qn), qp)).sum())
                if not (torch.equal(k.forward(x, s, qn, qp, code), ref) and torch.equal(gx, rgx)
                        and abs(gs - float(rgs)) <= tol):
                    raise RuntimeError(f"native LSQ kernels disagree with eager ones (code {code}, n {n})")


@functools.cache
def library() -> NativeKernels | None:
    """The native kernels, or None where they cannot be built (a warning says why)."""
    if os.environ.get("OQAT_NATIVE_KERNELS", "1") == "0":
        return None
    fallback = "CPU float32 tensors use the torch.compile kernels (or eager ones where compiling fails)"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        warnings.warn(f"oqat: native LSQ kernels unavailable: no C compiler ($CC, gcc, cc); {fallback}")
        return None
    try:
        kernels = NativeKernels(_build(cc))
        _self_test(kernels)
        return kernels
    except Exception as exc:  # no OpenMP, odd platform, failed self-test, ...
        warnings.warn(f"oqat: native LSQ kernels unavailable ({exc}); {fallback}")
        return None


__all__ = ["library", "supports", "NativeKernels", "SOURCE"]
