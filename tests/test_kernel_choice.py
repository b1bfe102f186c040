"""Which LSQ kernels run on a device, and that every fallback says so."""

from __future__ import annotations

import pytest
import torch

from oqat.quant import kernel_impl, native
from oqat.quant.kernels import compiled_kernels


def test_kernel_impl_names_what_runs_on_the_cpu():
    assert kernel_impl("cpu", impl="eager") == "eager"
    assert kernel_impl(torch.device("cpu")) == ("native" if native.library() is not None
                                                else "compiled" if compiled_kernels("cpu") is not None else "eager")
    float64 = kernel_impl("cpu", dtype=torch.float64)  # the C loops are float32 only
    assert float64 == ("compiled" if compiled_kernels("cpu") is not None else "eager")
    with pytest.raises(ValueError, match="impl: 'gpu'"):
        kernel_impl("cpu", impl="gpu")
    with pytest.raises(RuntimeError, match="native LSQ kernels are unavailable.*float64"):
        kernel_impl("cpu", impl="native", dtype=torch.float64)


def test_missing_c_compiler_is_not_silent(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("OQAT_NATIVE_KERNELS", "1")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match=r"no C compiler .*torch.compile kernels"):
        assert native.library.__wrapped__() is None
