"""The hot path reads nothing back from the device: quantizers after initialisation, whole training
steps; losses are checked once per interval and a NaN still names its first step and subnet.

Counting runs on the CPU: every tensor -> Python scalar conversion (``item``, ``bool``, ``float``,
``int``) goes through ``aten._local_scalar_dense``, which a dispatch mode sees; ``tolist`` and
``numpy`` are counted by wrapping them. On a GPU each of these is a host sync
(tests/test_cuda.py checks that with ``torch.cuda.set_sync_debug_mode("error")``). The native C
kernels read the step as a float from CPU memory (no device involved), so the counts use the
kernels a GPU runs: eager and compiled.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from oqat import SearchSpace
from oqat.models import build_supernet, load_checkpoint
from oqat.quant import LSQQuantizer
from oqat.quant.kernels import compiled_kernels
from oqat.training import TrainConfig, TrainingDiverged, load_train_config, step_archs, train
from oqat.training.step import LossWindow, StepOptions, all_finite, first_non_finite, train_step

DEVICE_IMPLS = ["eager", pytest.param("compiled", marks=pytest.mark.skipif(compiled_kernels() is None,
                                                                          reason="no torch.compile"))]


class HostReads(TorchDispatchMode):
    """Counts tensor -> Python conversions while active (see the module docstring)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("bits,signed", [(4, True), (2, False)])
def test_quantizer_reads_nothing_back_after_initialisation(monkeypatch, impl, bits, signed):
    q = LSQQuantizer(bits, signed=signed, impl=impl)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=g, requires_grad=True)
    with HostReads(monkeypatch) as first:
        q(x).sum().backward()
    # the first call reads the buffer once and initialises the step (a compiled kernel may also
    # be compiled then, for this shape: dynamo's tracing reads sizes)
    assert first.count == 1 if impl == "eager" else first.count >= 1
    assert q.is_initialized
    with HostReads(monkeypatch) as later:
        for act in (None, "relu", "h_swish"):
            q(x, act=act).mul(torch.randn(x.shape, generator=g)).sum().backward()
        q(x.detach()[:3])  # another shape, no grad
    assert later.count == 0
    with HostReads(monkeypatch) as control:  # the counter sees what the old forward did
        bool(q.initialized)
        q.step.tolist()
    assert control.count == 2


def test_initialized_flag_follows_the_buffer():
    fresh = LSQQuantizer(4, signed=True)
    trained = LSQQuantizer(4, signed=True)
    trained(torch.randn(50))
    assert trained.is_initialized and not fresh.is_initialized
    fresh.load_state_dict(trained.state_dict())            # resume / --init
    assert fresh.is_initialized and fresh.step.item() == trained.step.item()
    with torch.no_grad():
        fresh.initialized.fill_(False)                      # in-place writes are seen
    assert not fresh.is_initialized
    fresh.initialized.copy_(torch.tensor(True))
    assert fresh.is_initialized
    clone = copy.deepcopy(trained)
    assert clone.is_initialized and clone.initialized is not trained.initialized
    moved = copy.deepcopy(fresh).to(torch.float64)          # another tensor in the buffer's place
    assert moved.is_initialized
    assert set(trained.state_dict()) == {"step", "initialized"}  # checkpoint format unchanged
    assert trained.state_dict()["initialized"].dtype == torch.bool
    # writes through .data are invisible until refreshed (what broadcast_module does)
    trained.initialized.data.fill_(False)
    assert trained.is_initialized
    assert trained.refresh_initialized() is False and not trained.is_initialized
    with torch.inference_mode():  # inference tensors have no version counter: read directly
        q = LSQQuantizer(4, signed=True)
        assert not q.is_initialized
        q(torch.randn(10))
        assert q.is_initialized


def test_extracted_and_reloaded_quantizers_know_they_are_initialised(tiny_space):
    net = build_supernet(tiny_space, bits=4, impl="eager")
    net.set_arch(tiny_space.largest(4))
    net(torch.randn(2, 3, 32, 32))
    sub = net.extract(tiny_space.sample(random.Random(1), 4))
    quantizers = [m for m in sub.modules() if isinstance(m, LSQQuantizer)]
    assert quantizers and all(q.is_initialized for q in quantizers)
    other = build_supernet(tiny_space, bits=4)
    other.load_state_dict(net.state_dict())
    assert all(q.is_initialized for q in other.modules() if isinstance(q, LSQQuantizer))


def _sandwich_setup(space: SearchSpace, impl: str = "eager", bits: int = 4):
    torch.manual_seed(0)
    net = build_supernet(space, bits=bits, impl=impl)
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = TrainConfig(num_random=2, grad_clip=5.0)
    return net, params, optimizer, scheduler, cfg


def test_training_step_reads_nothing_back(monkeypatch, tiny_space):
    net, params, optimizer, scheduler, cfg = _sandwich_setup(tiny_space)
    opts = StepOptions.from_config(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    first = train_step(net, optimizer, scheduler, params, x, y, step_archs(tiny_space, 4, cfg, 0), opts)
    assert first.shape == (4,) and first.dtype == torch.float32  # largest, smallest, 2 random
    with HostReads(monkeypatch) as reads:
        for step in (1, 2):
            losses = train_step(net, optimizer, scheduler, params, x, y, step_archs(tiny_space, 4, cfg, step), opts)
    assert reads.count == 0
    assert bool(torch.isfinite(losses).all())


def test_loss_window_reads_once_and_finds_the_first_bad_loss(monkeypatch, tiny_space):
    archs = step_archs(tiny_space, 4, TrainConfig(num_random=1), 0)
    window = LossWindow()
    window.add(5, archs, torch.tensor([1.0, 2.0, 3.0]))
    window.add(6, archs, torch.tensor([1.5, float("inf"), float("nan")]))
    window.add(7, archs, torch.tensor([float("nan"), 1.0, 1.0]))
    with HostReads(monkeypatch) as reads:
        rows = window.read()
    assert reads.count == 1 and len(window) == 0 and window.read() == []
    assert [r.step for r in rows] == [5, 6, 7] and rows[0].values == (1.0, 2.0, 3.0)
    row, subnet = first_non_finite(rows)
    assert (row.step, subnet) == (6, 1) and row.archs[1] == archs[1]
    assert first_non_finite(rows[:1]) is None
    assert all_finite([torch.ones(3), torch.tensor([1, 2])])
    assert not all_finite([torch.ones(3), torch.tensor([0.0, float("inf")])])


def _config(tmp_path, **train):
    cfg = {"space": "mbv3-tiny", "bits": 4,
           "data": {"name": "synthetic", "image_size": 32, "holdout": 32, "synthetic_size": 160},
           "train": {"epochs": 2, "batch_size": 16, "num_random": 1, "eval_images": 0, "seed": 3,
                     "lr": 1e30, "momentum": 0.0, "label_smoothing": 0.0, **train}}
    path = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_train_config(path)


def _bad_step(message: str) -> tuple[int, int]:
    m = re.match(r"step (\d+): loss of subnet (\d+) ", message)
    assert m, message
    return int(m.group(1)), int(m.group(2))


def test_delayed_loss_check_names_the_same_first_bad_step(tmp_path):
    """Reading the losses every 5 steps finds the step and subnet a check after every step finds,
    and says which checkpoint is the last good one."""
    with pytest.raises(TrainingDiverged) as every_step:
        train(_config(tmp_path, log_every=1), tmp_path / "a", progress=False)
    with pytest.raises(TrainingDiverged) as delayed:
        train(_config(tmp_path, log_every=5), tmp_path / "b", progress=False)
    bad = _bad_step(str(every_step.value))
    assert _bad_step(str(delayed.value)) == bad
    assert bad[0] < 5, "the test needs the divergence inside the first interval"
    assert "stopped at step 5 " in str(delayed.value) and "No checkpoint of this run" in str(delayed.value)
    assert not (tmp_path / "b" / "checkpoints" / "last.pt").exists()
    # a checkpoint every step: the last one written holds finite tensors only and is the one named
    with pytest.raises(TrainingDiverged) as saved:
        train(_config(tmp_path, log_every=5, ckpt_every=1), tmp_path / "c", progress=False)
    last = load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")
    assert _bad_step(str(saved.value)) == bad
    assert last.step == bad[0]  # the steps before the bad one were good
    assert f"last good checkpoint is {tmp_path / 'c' / 'checkpoints' / 'last.pt'} (step {last.step})" in str(saved.value)
    assert all(torch.isfinite(v).all() for v in last.model.values() if v.is_floating_point())


def test_metrics_keep_their_keys_with_a_log_interval(tmp_path):
    cfg = _config(tmp_path, lr=0.05, momentum=0.9, epochs=1, log_every=3)
    result = train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, result.steps]
    assert all(set(r) == {"step", "epoch", "lr", "loss_largest", "loss_smallest", "loss_mean", "images_per_s",
                          "resolution"} for r in records)
    assert all(isinstance(r["loss_largest"], float) and r["loss_mean"] > 0 for r in records)
