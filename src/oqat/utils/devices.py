"""Where computation runs: one device resolver and one place that sets torch's thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str | None, where: str = "--device") -> torch.device:
    """``auto``/None (CUDA when available, else CPU), or a torch device name that exists here;
    ValueError naming `where` otherwise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where}: {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: {name!r} is not supported (cpu, cuda, cuda:N, auto)")
    return device


@contextmanager
def threads(n: int | None, where: str = "threads") -> Iterator[None]:
    """torch intra-op threads set to `n` (None: unchanged) inside the block, restored after it.

    The one place oqat changes the thread count, so a caller's own setting survives every call.
    """
    old = torch.get_num_threads()
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: expected a positive integer, got {n!r}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def capturing_graph() -> bool:
    """A trace (``torch.jit.trace``, the ONNX exporter) or ``torch.compile`` is recording the ops:
    the hand-written kernels and routes that replace PyTorch ops in eager mode give way to the
    plain ops there, so the recorded graph is the standard one."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


__all__ = ["capturing_graph", "resolve_device", "threads"]
