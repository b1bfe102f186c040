"""Native CPU kernels for ``lsq_quantize``, training-mode batch norm and the depthwise weight
gradient (float32), built once with the system C compiler.

Why: a ``torch.compile``'d function costs about 20 us per call in guards and wrappers, and a
supernet step makes two calls per quantizer (hundreds per step), which is as much time as the
arithmetic itself on small subnets. These two C loops (forward; backward with the step-gradient
sum) do exactly what the eager kernels in ``oqat.quant`` do, element for element (the same
float32 operations in the same order, no fast-math; round half to even), are vectorised by the
compiler and parallelised with OpenMP (the process's one libgomp, the one torch loaded), and
are called through ctypes for a few microseconds. The step-gradient sum is accumulated in
double precision.

The batch-norm pair (used by :mod:`oqat.nn.batchnorm`) exists because PyTorch's CPU training-mode
``batch_norm`` forward runs at about a third of memory speed on the small NCHW maps of these
supernets (11 ms for a 64x64x28x28 batch, against 3.7 ms here); it works one channel at a time,
so the variance and normalisation passes read the channel from cache. It equals PyTorch's
batch norm to float rounding (checked on start-up, rtol 1e-4), not bit for bit.

The depthwise weight gradient (used by :mod:`oqat.nn.depthwise` for 5x5 and 7x7 kernels) exists
because PyTorch's CPU routes for it ran 2-5x slower on the quickstart's maps; it makes a block of
32 images the vector lanes (see the C comment), equal to PyTorch's to float rounding (checked on
start-up, rtol 1e-4).

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
#include <stdlib.h>

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
/* Training-mode batch norm of x (N, C, HW), one channel at a time so that the second and third
   passes over a channel read it from cache: mean and biased variance (float lanes within a
   plane, double across planes), y = x * a + b with a = w / sqrt(var + eps), b = bias - mean * a.
   Writes mean, invstd and the biased variance per channel. */
void oqat_bn_forward(const float* x, float* y, int64_t N, int64_t C, int64_t HW, const float* w,
                     const float* bias, float eps, float* mean, float* invstd, float* var, int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) if(N * C * HW >= PARALLEL_MIN) schedule(static)")
    for (int64_t c = 0; c < C; ++c) {
        double s = 0.0, q = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const float* p = x + (n * C + c) * HW;
            float part = 0.0f;
            _Pragma("omp simd reduction(+:part)")
            for (int64_t i = 0; i < HW; ++i) part += p[i];
            s += part;
        }
        const float m = (float)(s / (double)(N * HW));
        for (int64_t n = 0; n < N; ++n) {
            const float* p = x + (n * C + c) * HW;
            float part = 0.0f;
            _Pragma("omp simd reduction(+:part)")
            for (int64_t i = 0; i < HW; ++i) { float d = p[i] - m; part += d * d; }
            q += part;
        }
        const float v = (float)(q / (double)(N * HW));
        const float is = (float)(1.0 / sqrt((double)v + (double)eps));
        const float a = w[c] * is, b = bias[c] - m * a;
        for (int64_t n = 0; n < N; ++n) {
            const float* p = x + (n * C + c) * HW;
            float* r = y + (n * C + c) * HW;
            _Pragma("omp simd")
            for (int64_t i = 0; i < HW; ++i) r[i] = p[i] * a + b;
        }
        mean[c] = m; invstd[c] = is; var[c] = v;
    }
}

/* Its backward: gw = sum(g * (x - mean)) * invstd, gb = sum(g), and
   gx = (g - gb / M - (x - mean) * invstd^2 * sum(g * (x - mean)) / M) * invstd * w. */
void oqat_bn_backward(const float* g, const float* x, float* gx, int64_t N, int64_t C, int64_t HW,
                      const float* w, const float* mean, const float* invstd, float* gw, float* gb, int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) if(N * C * HW >= PARALLEL_MIN) schedule(static)")
    for (int64_t c = 0; c < C; ++c) {
        double s = 0.0, d = 0.0;
        const float m = mean[c];
        for (int64_t n = 0; n < N; ++n) {
            const float* p = x + (n * C + c) * HW;
            const float* q = g + (n * C + c) * HW;
            float ps = 0.0f, pd = 0.0f;
            _Pragma("omp simd reduction(+:ps,pd)")
            for (int64_t i = 0; i < HW; ++i) { ps += q[i]; pd += q[i] * (p[i] - m); }
            s += ps; d += pd;
        }
        const double M = (double)(N * HW), is = invstd[c];
        const float k1 = (float)(is * w[c]);
        const double proj = d * is * is / M;
        const float k2 = (float)(-proj * is * w[c]);
        const float k3 = (float)((-s / M + m * proj) * is * w[c]);
        if (gx) {
            for (int64_t n = 0; n < N; ++n) {
                const float* p = x + (n * C + c) * HW;
                const float* q = g + (n * C + c) * HW;
                float* r = gx + (n * C + c) * HW;
                _Pragma("omp simd")
                for (int64_t i = 0; i < HW; ++i) r[i] = q[i] * k1 + p[i] * k2 + k3;
            }
        }
        gw[c] = (float)(d * is); gb[c] = (float)s;
    }
}

/* Depthwise convolution weight gradient, NCHW float32, square kernel k, stride s, padding p. Per
   channel, blocks of DW_LANES images are transposed to (position, image) order, in tiles so the
   writes stay in cache (missing images are zeros): the images are then the vector lanes and each
   kernel tap is a run of whole-vector multiply-adds over the output positions it touches. */
#define DW_LANES 32
#define DW_TILE 16

/* plane c of images n0 .. n0+real-1 of t (N, C, len) into lanes[len][DW_LANES] */
static void dw_to_lanes(const float* t, float* lanes, int64_t n0, int64_t real, int64_t C, int64_t c, int64_t len) {
    for (int64_t i0 = 0; i0 < len; i0 += DW_TILE) {
        const int64_t i1 = i0 + DW_TILE < len ? i0 + DW_TILE : len;
        for (int64_t n = 0; n < DW_LANES; ++n) {
            const float* src = t + ((n0 + n) * C + c) * len;
            for (int64_t i = i0; i < i1; ++i) lanes[i * DW_LANES + n] = n < real ? src[i] : 0.0f;
        }
    }
}

/* the output rows (or columns) [*lo, *hi] that tap offset `kt` maps inside an input side of `in`;
   false when it maps none */
static inline int dw_range(int64_t kt, int64_t in, int64_t out, int64_t s, int64_t p, int64_t* lo, int64_t* hi) {
    if (in - 1 + p - kt < 0) return 0;
    *lo = kt >= p ? 0 : (p - kt + s - 1) / s;
    *hi = (in - 1 + p - kt) / s < out - 1 ? (in - 1 + p - kt) / s : out - 1;
    return *lo <= *hi;
}

/* gw[c][ki][kj] = sum over n, oh, ow of g[n][c][oh][ow] * x[n][c][s*oh + ki - p][s*ow + kj - p]:
   one horizontal sum per tap and block of images, accumulated in double. Returns the number of
   threads that could not allocate their buffers (their channels are then left unwritten). */
int oqat_dw_grad_weight(const float* x, const float* g, float* gw, int64_t N, int64_t C, int64_t H, int64_t W,
                         int64_t OH, int64_t OW, int64_t k, int64_t s, int64_t p, int nthreads) {
    const int64_t HW = H * W, OHW = OH * OW;
    int failed = 0;
    _Pragma("omp parallel num_threads(nthreads) if(N * C * HW >= PARALLEL_MIN) reduction(+:failed)")
    {
        float* xt = (float*)malloc(sizeof(float) * (size_t)((HW + OHW) * DW_LANES));
        double* acc = (double*)malloc(sizeof(double) * (size_t)(k * k));
        float* gt = xt + HW * DW_LANES;
        failed += !xt || !acc;
        _Pragma("omp for schedule(static)")
        for (int64_t c = 0; c < C; ++c) {
            if (!xt || !acc) continue;
            for (int64_t t = 0; t < k * k; ++t) acc[t] = 0.0;
            for (int64_t n0 = 0; n0 < N; n0 += DW_LANES) {
                const int64_t real = N - n0 < DW_LANES ? N - n0 : DW_LANES;
                dw_to_lanes(x, xt, n0, real, C, c, HW);
                dw_to_lanes(g, gt, n0, real, C, c, OHW);
                int64_t oh0, oh1, ow0, ow1;
                for (int64_t ki = 0; ki < k; ++ki) {
                    if (!dw_range(ki, H, OH, s, p, &oh0, &oh1)) continue;
                    for (int64_t kj = 0; kj < k; ++kj) {
                        if (!dw_range(kj, W, OW, s, p, &ow0, &ow1)) continue;
                        float v[DW_LANES] = {0};
                        for (int64_t oh = oh0; oh <= oh1; ++oh) {
                            const int64_t ih = s * oh + ki - p;
                            for (int64_t ow = ow0; ow <= ow1; ++ow) {
                                const float* xr = xt + (ih * W + s * ow + kj - p) * DW_LANES;
                                const float* gr = gt + (oh * OW + ow) * DW_LANES;
                                _Pragma("omp simd")
                                for (int64_t n = 0; n < DW_LANES; ++n) v[n] += gr[n] * xr[n];
                            }
                        }
                        double t = 0.0;
                        for (int64_t n = 0; n < DW_LANES; ++n) t += v[n];
                        acc[ki * k + kj] += t;
                    }
                }
            }
            for (int64_t t = 0; t < k * k; ++t) gw[c * k * k + t] = (float)acc[t];
        }
        free(acc);
        free(xt);
    }
    return failed;
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
        lib.oqat_bn_forward.argtypes = [p, p, i64, i64, i64, p, p, f, p, p, p, i32]
        lib.oqat_bn_forward.restype = None
        lib.oqat_bn_backward.argtypes = [p, p, p, i64, i64, i64, p, p, p, p, p, i32]
        lib.oqat_bn_backward.restype = None
        lib.oqat_dw_grad_weight.argtypes = [p, p, p] + [i64] * 9 + [i32]
        lib.oqat_dw_grad_weight.restype = ctypes.c_int
        self._fwd, self._bwd, self.path = lib.oqat_lsq_forward, lib.oqat_lsq_backward, path
        self._bn_fwd, self._bn_bwd = lib.oqat_bn_forward, lib.oqat_bn_backward
        self._dw_grad_weight = lib.oqat_dw_grad_weight

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

    def batch_norm_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-mode batch norm of a contiguous (N, C, H, W) `x` with batch statistics:
        (y, stats) with stats rows mean, 1/sqrt(var + eps) and the biased variance."""
        n, c = x.shape[:2]
        y, stats = torch.empty_like(x), torch.empty(3, c, dtype=x.dtype)
        weight, bias = weight.contiguous(), bias.contiguous()
        self._bn_fwd(x.data_ptr(), y.data_ptr(), n, c, x[0, 0].numel(), weight.data_ptr(), bias.data_ptr(), eps,
                     stats[0].data_ptr(), stats[1].data_ptr(), stats[2].data_ptr(), torch.get_num_threads())
        return y, stats

    def batch_norm_backward(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            invstd: torch.Tensor, input_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(grad of x or None, rows grad of weight and grad of bias) of :meth:`batch_norm_forward`."""
        n, c = x.shape[:2]
        gx = torch.empty_like(x) if input_grad else None
        grads, weight = torch.empty(2, c, dtype=x.dtype), weight.contiguous()
        self._bn_bwd(g.data_ptr(), x.data_ptr(), gx.data_ptr() if gx is not None else None, n, c, x[0, 0].numel(),
                     weight.data_ptr(), mean.data_ptr(), invstd.data_ptr(), grads[0].data_ptr(), grads[1].data_ptr(),
                     torch.get_num_threads())
        return gx, grads

    def depthwise_grad_weight(self, x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int,
                              padding: int) -> torch.Tensor:
        """The (C, 1, k, k) weight gradient of a depthwise convolution of contiguous (N, C, H, W)
        `x` with output gradient `grad` (contiguous, N, C, OH, OW)."""
        n, c, h, w = x.shape
        gw = torch.empty(c, 1, kernel, kernel, dtype=x.dtype)
        if self._dw_grad_weight(x.data_ptr(), grad.data_ptr(), gw.data_ptr(), n, c, h, w, grad.size(2),
                                grad.size(3), kernel, stride, padding, torch.get_num_threads()):
            raise MemoryError(f"native depthwise weight gradient: no memory for its buffers ({n}x{c}x{h}x{w})")
        return gw


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
    for shape in ((4, 3, 5, 7), (8, 5, 90, 100)):  # serial and parallel paths, against PyTorch's batch norm
        x = 3 * torch.randn(shape, generator=g) + 1
        w, b, up = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g), torch.randn(shape, generator=g)
        y, stats = k.batch_norm_forward(x, w, b, 1e-5)
        gx, grads = k.batch_norm_backward(up, x, w, stats[0], stats[1])
        # aten's kernels, not autograd: the first call may come from inside no_grad or inference mode
        yr, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
        ref = (yr, *torch.ops.aten.native_batch_norm_backward(up, x, w, None, None, mean, invstd, True, 1e-5,
                                                               [True, True, True]))
        if not all(torch.allclose(a, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
                   for a, r in zip((y, gx, grads[0], grads[1]), ref)):
            raise RuntimeError(f"native batch-norm kernels disagree with PyTorch's (shape {shape})")
    for n, c, side, ks, stride in ((3, 4, 9, 5, 1), (33, 40, 14, 5, 2), (2, 3, 6, 7, 3)):  # lanes, threads, edges
        x, w = torch.randn(n, c, side, side, generator=g), torch.randn(c, 1, ks, ks, generator=g)
        out = (side + 2 * (ks // 2) - ks) // stride + 1
        up = torch.randn(n, c, out, out, generator=g)  # this generator: the global one is the user's
        ref = torch.ops.aten.convolution_backward(up, x, w, None, [stride] * 2, [ks // 2] * 2, [1, 1], False, [0, 0],
                                                  c, [False, True, False])[1]
        if not torch.allclose(k.depthwise_grad_weight(x, up, ks, stride, ks // 2), ref, rtol=1e-4,
                              atol=1e-4 * float(ref.abs().max())):
            raise RuntimeError(f"native depthwise weight gradient disagrees with PyTorch's ({n}x{c}x{side}, k {ks})")


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
