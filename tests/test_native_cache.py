"""The native kernel cache never loads a library another user could have planted, and every
way the native kernels can be unavailable falls back to the same numbers with a warning."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from oqat.quant import lsq_quantize, lsq_reference, native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """library() decided anew with the environment the test sets, then restored."""
    native.library.cache_clear()
    monkeypatch.setenv("OQAT_KERNEL_CACHE", str(tmp_path / "kernels"))
    yield tmp_path / "kernels"
    native.library.cache_clear()


def _unavailable(match: str | None):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert native.library() is None
    if match is not None:
        assert any(match in str(w.message) for w in seen), [str(w.message) for w in seen]


def test_builds_into_a_private_folder(fresh):
    kernels = native.library()
    assert kernels is not None and kernels.path.parent == fresh
    assert os.stat(fresh).st_mode & 0o777 == 0o700
    assert os.stat(kernels.path).st_mode & 0o022 == 0


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("OQAT_NATIVE_KERNELS", "0")
    _unavailable(None)


def test_no_compiler(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh.parent / "no-such-compiler"))
    _unavailable("native LSQ kernels unavailable")


def test_unusable_cache_folder(fresh, monkeypatch):
    blocker = fresh.parent / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("OQAT_KERNEL_CACHE", str(blocker / "kernels"))   # a folder under a file
    _unavailable("native LSQ kernels unavailable")


def test_cache_writable_by_others_is_refused(fresh):
    fresh.mkdir(mode=0o700)
    os.chmod(fresh, 0o777)
    _unavailable("other users may write into it")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_foreign_owned_cache_is_refused(fresh):
    fresh.mkdir(mode=0o700)
    os.chown(fresh, 12345, 12345)
    _unavailable("owned by uid 12345")


def test_planted_library_is_refused(fresh):
    """A file with the library's exact name, writable by others (another user could have replaced
    it), is never loaded."""
    kernels = native.library()
    path = kernels.path
    native.library.cache_clear()
    os.chmod(path, 0o666)
    _unavailable("not a private file of yours")


def test_key_covers_the_cpu_features():
    cpu = native._cpu_id()
    if os.path.exists("/proc/cpuinfo") and "flags" in open("/proc/cpuinfo").read():
        assert cpu.startswith("flags") or "\nflags" in cpu


def test_fallback_computes_the_same_values(fresh, monkeypatch):
    monkeypatch.setenv("OQAT_NATIVE_KERNELS", "0")
    x = torch.randn(300, generator=torch.Generator().manual_seed(0), requires_grad=True)
    step = torch.tensor(0.2, requires_grad=True)
    out = lsq_quantize(x, step, 3, True)
    ref = lsq_reference(x, step, 3, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_self_test_leaves_the_global_random_state_alone():
    """The kernels are built and self-tested on first use, in the middle of a run: drawing from the
    global generator there would make a resumed run differ from an uninterrupted one."""
    kernels = native.library()
    if kernels is None:
        pytest.skip("no native kernels on this machine")
    state = torch.get_rng_state()
    native._self_test(kernels)
    assert torch.equal(torch.get_rng_state(), state)
