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
or a folder in the temp directory when that cannot be made), a folder that must be this user's
and writable by nobody else (created 0700; checked, with the library file, before every load:
another user's library is never run), keyed by a hash of the source, the flags, the compiler
and the CPU's feature flags, and built under a file lock (one compile when several ranks start).
The outcome, kernels or none, is decided once per process. ``library()`` returns None (and ``oqat.quant`` falls back to
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
import stat
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..utils.files import cache_dir
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

/* grad_x = g * act'(z) strictly inside (Qn, Qp), 0 at and beyond the bounds;
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
            int inside = (v > qn) & (v < qp);                                              \
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

# -fno-trapping-math lets the compiler compute both arms of a select, which the backward's
# "inside the grid ?" needs to be vectorised at all (without it the loop ran scalar with a
# branch per element, 20x slower than the forward); it changes no value (no fast-math).
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c99"]


def _cpu_id() -> str:
    """The CPU's model and its feature flags: a ``-march=native`` library built for one CPU must
    never load on another that lacks some instruction (SIGILL), as can happen in a shared home."""
    keep = ("flags", "Features", "model name", "CPU implementer", "CPU part")
    try:
        with open("/proc/cpuinfo") as f:
            seen: dict[str, str] = {}
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in keep and key not in seen:
                    seen[key] = line.strip()
            if seen:
                return "\n".join(seen[k] for k in keep if k in seen)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can write (created 0700): a library in a folder that
    another user can write could be replaced by theirs and run inside this process."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path}: not a folder (a symlink?); the kernel cache must be a real folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"{path}: owned by uid {st.st_uid}, not by you; refusing to load kernels from it")
    if st.st_mode & 0o022:
        raise PermissionError(f"{path}: other users may write into it (mode {stat.S_IMODE(st.st_mode):o}); "
                              f"refusing to load kernels from it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours and written only by us so far: keep it private from now on
    return path


def _own_file(path: Path) -> bool:
    """Whether `path` is a regular file of this user that nobody else may write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
        raise PermissionError(f"{path}: not a private file of yours (owner {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):o}); refusing to load it")
    return True


def _cache_dir() -> Path:
    """``$OQAT_KERNEL_CACHE``, else ``<oqat cache>/kernels``, else a private folder in the temp dir."""
    env = os.environ.get("OQAT_KERNEL_CACHE")
    if env:
        return private_dir(Path(env))
    try:
        return private_dir(cache_dir() / "kernels")
    except OSError as exc:
        if isinstance(exc, PermissionError) and "refusing" in str(exc):
            raise
    return private_dir(Path(tempfile.gettempdir()) / f"oqat-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}")


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (one compile when several ranks start at once)."""
    with open(path, "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: the atomic rename below still keeps builds consistent
            pass
        yield


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    cache = _cache_dir()
    last_error = ""
    for extra in (["-march=native"], []):
        flags = BASE_FLAGS + extra
        key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), cc, version, platform.machine(), _cpu_id()])
                             .encode()).hexdigest()[:16]
        target = cache / f"lsq_{key}.so"
        with _locked(cache / f"lsq_{key}.lock"):
            if _own_file(target):
                return target
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "lsq.c"
                src.write_text(SOURCE)
                out = Path(tmp) / "lsq.so"
                proc = subprocess.run([cc, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode == 0:
                    os.chmod(out, 0o700)
                    os.replace(out, target)  # atomic: a reader sees the old file or the whole new one
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
        path = _build(cc)
        _own_file(path)  # checked again right before loading
        kernels = NativeKernels(path)
        _self_test(kernels)
        return kernels
    except Exception as exc:  # no OpenMP, odd platform, failed self-test, ...
        warnings.warn(f"oqat: native LSQ kernels unavailable ({exc}); {fallback}")
        return None


__all__ = ["NativeKernels", "SOURCE", "library", "private_dir", "supports"]
