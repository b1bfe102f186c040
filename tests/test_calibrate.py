"""BN re-calibration and evaluation: determinism, frozen weights/steps, supernet == extracted,
statistics equal to a direct computation, errors, and the distributed merge."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oqat import build_supernet
from oqat.measure import (
    CalibrationError,
    DirectAccuracy,
    bn_layers,
    bn_state,
    calibration_batches,
    evaluate,
    measure,
    recalibrate_bn,
    uninitialized_quantizers,
)


def _warm(net, space, bits=4, seed=0):
    """A few train-mode forwards: initialise every quantizer and move BN stats off their defaults."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for arch in (space.largest(bits), space.smallest(bits), space.sample(random.Random(seed), bits)):
            net.set_arch(arch)
            net(torch.randn(8, space.in_channels, arch.r, arch.r, generator=g))
    net.set_arch(space.largest(bits))
    net.eval()
    return net


@pytest.fixture(scope="module")
def net(space):
    torch.manual_seed(0)
    return _warm(build_supernet(space, 4, impl="eager"), space)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g))


@pytest.fixture(scope="module")
def arch(space):
    a = space.sample(random.Random(3), 4, resolution=28)
    return a.replace(d=(2, 3, 2, 4, 2))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "running_" not in k and "num_batches_tracked" not in k}


def test_deterministic_and_changes_stats(net, data, arch):
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    before = bn_state(a)
    for m in (a, b):
        m.set_arch(arch)
        assert recalibrate_bn(m, data, num_images=48, batch_size=16) == 48
    sa, sb = bn_state(a), bn_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], before[k]) for k in sa)


def test_weights_and_steps_untouched(net, data, arch):
    m = copy.deepcopy(net)
    m.set_arch(arch)
    before = _params(m)
    steps = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".step")}
    assert steps and all(bool(q.initialized) for n, q in m.named_modules() if hasattr(q, "initialized"))
    recalibrate_bn(m, data, num_images=32, batch_size=16)
    after = _params(m)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, steps[n]) for n, p in m.named_parameters() if n.endswith(".step"))
    # momentum and training flags are restored
    assert all(bn.momentum == 0.1 for _, bn in bn_layers(m))
    assert not any(mod.training for mod in m.modules())


def test_uninitialized_quantizer_is_an_error_and_leaves_model_unchanged(space, data):
    fresh = build_supernet(space, 4, impl="eager")
    assert uninitialized_quantizers(fresh)
    before = bn_state(fresh)
    with pytest.raises(CalibrationError, match="never been initialised"):
        recalibrate_bn(fresh, data, num_images=16, batch_size=16)
    after = bn_state(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert uninitialized_quantizers(fresh)  # nothing got initialised on the way
    assert all(bn.momentum == 0.1 for _, bn in bn_layers(fresh))


def test_supernet_then_extract_equals_extract_then_calibrate(net, data, arch):
    a = copy.deepcopy(net)
    a.set_arch(arch)
    recalibrate_bn(a, data, num_images=48, batch_size=16)
    sub_a = a.extract(arch)
    sub_b = copy.deepcopy(net).extract(arch)
    recalibrate_bn(sub_b, data, num_images=48, batch_size=16)
    sa, sb = bn_state(sub_a), bn_state(sub_b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    x = F.interpolate(data.tensors[0][:8], size=arch.r, mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(sub_a.eval()(x), sub_b.eval()(x), rtol=1e-4, atol=1e-4)


def test_unused_layers_and_channels_keep_their_statistics(space, net, data):
    small = space.smallest(4)
    m = copy.deepcopy(net)
    m.set_arch(small)
    before = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bn_layers(m)}
    recalibrate_bn(m, data, num_images=32, batch_size=16)
    unused_slots = set(range(space.num_blocks)) - set(space.active_blocks(small))
    for name, bn in bn_layers(m):
        mean0, var0 = before[name]
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) in unused_slots:
            assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0), name
    # An active expand layer at e=3 uses a leading slice of its 6x-wide BN: the rest is untouched.
    slot = space.active_blocks(small)[1]
    bn = m.blocks[slot].expand.bn
    c = space.hidden_channels(m.blocks[slot].in_channels, 3)
    name = f"blocks.{slot}.expand.bn"
    assert c < bn.num_features
    assert torch.equal(bn.running_mean[c:], before[name][0][c:])
    assert not torch.equal(bn.running_mean[:c], before[name][0][:c])


def test_statistics_equal_direct_computation(net, data):
    """The stem BN (full width, first layer) ends with the exact mean/var of its inputs."""
    m = copy.deepcopy(net)
    arch = m.space.largest(4).replace(r=24)
    m.set_arch(arch)
    batches = calibration_batches(data, 64, 16, seed=5)
    recalibrate_bn(m, batches, resolution=24)
    stem = m.stem
    xs = [F.conv2d(F.interpolate(x, size=24, mode="bilinear", antialias=True), stem.weight, None, stem.stride,
                   stem.kernel_size // 2) for x in batches]
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    vars_ = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(stem.bn.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem.bn.running_var, vars_.mean(0), rtol=1e-4, atol=1e-5)
    assert int(stem.bn.num_batches_tracked) == len(batches)


def test_dataset_path_is_the_fixed_seeded_subset(net, data, arch):
    a, b, c = (copy.deepcopy(net) for _ in range(3))
    for m in (a, b, c):
        m.set_arch(arch)
    recalibrate_bn(a, data, num_images=32, batch_size=16, seed=7)
    recalibrate_bn(b, calibration_batches(data, 32, 16, seed=7))
    recalibrate_bn(c, data, num_images=32, batch_size=16, seed=8)
    sa, sb, sc = bn_state(a), bn_state(b), bn_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_loader_cap_and_empty_data(net, data, arch):
    m = copy.deepcopy(net)
    m.set_arch(arch)
    assert recalibrate_bn(m, DataLoader(data, batch_size=20), num_images=50) == 50
    with pytest.raises(CalibrationError, match="no images"):
        recalibrate_bn(m, [])


def test_evaluate_counts_known_model():
    """A model whose logits are its input: accuracy, top-5 and loss are known exactly."""
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6.0]])
    labels = torch.tensor([0, 2, 0])
    model = nn.Flatten()
    out = evaluate(model, [(logits[:2].view(2, 7, 1, 1), labels[:2]), (logits[2:].view(1, 7, 1, 1), labels[2:])],
                   resolution=1)
    assert out["n"] == 3
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(200 / 3)   # sample 3's label is its lowest logit
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_measure_and_direct_accuracy_leave_supernet_alone(net, data, arch):
    before = copy.deepcopy(net.state_dict())
    loader = DataLoader(data, batch_size=32)
    r = measure(net, arch, data, loader, calib_images=32, calib_batch=16)
    assert r["n"] == 96 and r["calib_images"] == 32 and 0 <= r["top1"] <= 100 and r["seconds"] > 0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fn = DirectAccuracy(net, calibration_batches(data, 32, 16), list(loader))
    accs = fn([arch, arch])
    assert accs[0] == accs[1] == pytest.approx(r["top1"])
    assert fn.calls == 2


def _dist_worker(rank: int, world: int, port: int, shards, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    dataset = TensorDataset(shards, torch.zeros(len(shards), dtype=torch.long))
    from torch.utils.data.distributed import DistributedSampler

    loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=False))
    recalibrate_bn(model, loader)
    # plain lists: a tensor in a queue is shared memory that vanishes with this process
    queue.put((rank, model[1].running_mean.tolist(), model[1].running_var.tolist()))
    dist.destroy_process_group()


def test_distributed_merge_matches_single_process():
    """Sharded data (DistributedSampler): per-rank statistics are merged into the global ones."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 3, 3, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        y = model[0](x)
    mean = y.mean((0, 2, 3))
    (_, m0, v0), (_, m1, v1) = ((r, torch.tensor(m), torch.tensor(v)) for r, m, v in sorted(results, key=lambda t: t[0]))
    assert torch.equal(m0, m1) and torch.equal(v0, v1)           # identical on every rank
    torch.testing.assert_close(m0, mean, rtol=1e-5, atol=1e-5)    # the mean of all 16 images
    # variance: the per-batch variances averaged, merged across ranks (within a few % of the global)
    torch.testing.assert_close(v0, y.var((0, 2, 3)), rtol=0.1, atol=1e-3)
