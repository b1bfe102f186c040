"""The CUDA path against the CPU one (skipped without a GPU; run with ``pytest -m cuda``).

LSQ forward/backward on CUDA vs CPU, one sandwich step on CUDA vs CPU, extraction on CUDA, a
training step with no host sync (``torch.cuda.set_sync_debug_mode("error")``), the fused kernels
self-tested on CUDA, device-side JPEG decoding, and a short training run.

Tolerances for the CUDA-vs-CPU comparisons are first estimates (no GPU was available when this
file was written): eager element-wise kernels use IEEE float32 division on both devices and
must agree exactly; Triton may divide less exactly, so compiled kernels may move a value by one
grid step; cuDNN convolutions sum in another order (TF32 is switched off here).
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from oqat.models import build_supernet  # noqa: E402
from oqat.quant import LSQQuantizer, kernel_impl, lsq_quantize  # noqa: E402
from oqat.quant.kernels import compiled_kernels  # noqa: E402
from oqat.training import TrainConfig, step_archs  # noqa: E402
from oqat.training.step import StepOptions, sandwich_backward, train_step  # noqa: E402

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 convolutions and matmuls, so CUDA and CPU differ by summation order only."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def sync_errors():
    """Any host sync inside raises (a CUDA-side assert of torch)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_kernels_are_self_tested_on_cuda():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        impl = kernel_impl(CUDA)
    assert impl == "compiled", f"eager on CUDA: {[str(w.message) for w in caught]}"
    assert compiled_kernels("cuda") is not None


@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("act", [None, "relu", "h_swish"])
@pytest.mark.parametrize("bits,signed", [(4, True), (2, False), (8, True)])
def test_lsq_forward_backward_cuda_matches_cpu(impl, act, bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 513, generator=g) * 2
    up = torch.randn(x.shape, generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        s = torch.tensor(0.0731, device=device, requires_grad=True)
        out = lsq_quantize(xd, s, bits, signed, impl="eager" if device == "cpu" else impl, act=act)
        out.backward(up.to(device))
        results[device] = (out.detach().cpu(), xd.grad.cpu(), s.grad.cpu())
    (o_cpu, gx_cpu, gs_cpu), (o_gpu, gx_gpu, gs_gpu) = results["cpu"], results["cuda"]
    if impl == "eager":
        assert torch.equal(o_gpu, o_cpu) and torch.equal(gx_gpu, gx_cpu)
    else:  # Triton: at most a few values one grid step away
        moved = (o_gpu != o_cpu)
        assert moved.float().mean() < 1e-3
        assert ((o_gpu - o_cpu).abs()[moved] <= 0.0731 * 1.001).all()
        assert (gx_gpu != gx_cpu).float().mean() < 1e-3
    tol = dict(rtol=1e-4, atol=1e-6) if impl == "eager" else dict(rtol=1e-2, atol=1e-3)  # a moved value moves it
    torch.testing.assert_close(gs_gpu, gs_cpu, **tol)


def _nets(space, bits=4):
    torch.manual_seed(0)
    cpu = build_supernet(space, bits=bits)
    return cpu, copy.deepcopy(cpu).to(CUDA)


def _batch(space, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, max(space.resolutions), max(space.resolutions), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_one_sandwich_step_cuda_matches_cpu(tiny_space):
    cpu, gpu = _nets(tiny_space)
    x, y = _batch(tiny_space)
    archs = step_archs(tiny_space, 4, TrainConfig(num_random=2), 0)
    opts = StepOptions()
    loss_cpu = sandwich_backward(cpu, x, y, archs, opts)
    loss_gpu = sandwich_backward(gpu, x.to(CUDA), y.to(CUDA), archs, opts)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=2e-3, atol=1e-4)
    pairs = [(p.grad, q.grad) for p, q in zip(cpu.parameters(), gpu.parameters()) if p.grad is not None]
    a = torch.cat([p.flatten() for p, _ in pairs])
    b = torch.cat([q.flatten().cpu() for _, q in pairs])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert abs(b.norm() / a.norm() - 1) < 0.01
    steps = [(p.grad, q.grad.cpu()) for p, q in zip(cpu.step_parameters(), gpu.step_parameters()) if p.grad is not None]
    sa, sb = torch.stack([s for s, _ in steps]), torch.stack([s for _, s in steps])
    assert torch.nn.functional.cosine_similarity(sa, sb, dim=0) > 0.99


def test_bf16_channels_last_step_stays_close_to_float32(tiny_space):
    cpu, gpu = _nets(tiny_space)
    x, y = _batch(tiny_space)
    archs = step_archs(tiny_space, 4, TrainConfig(num_random=2), 0)
    ref = sandwich_backward(cpu, x, y, archs, StepOptions())
    amp = sandwich_backward(gpu, x.to(CUDA), y.to(CUDA), archs, StepOptions.from_config(TrainConfig(), CUDA))
    assert amp.dtype == torch.float32 and bool(torch.isfinite(amp).all())
    torch.testing.assert_close(amp.cpu(), ref, rtol=5e-2, atol=5e-2)
    assert all(s.grad.dtype == torch.float32 for s in gpu.step_parameters() if s.grad is not None)


@pytest.mark.parametrize("amp", [False, True])
def test_training_steps_make_no_host_sync(tiny_space, amp):
    _, net = _nets(tiny_space)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainConfig(num_random=2, grad_clip=5.0, amp=amp)
    opts = StepOptions.from_config(cfg, CUDA)
    x, y = (t.to(CUDA) for t in _batch(tiny_space))
    train_step(net, opt, sched, params, x, y, step_archs(tiny_space, 4, cfg, 0), opts)  # initialise, compile
    with sync_errors():
        for step in (1, 2, 3):
            losses = train_step(net, opt, sched, params, x, y, step_archs(tiny_space, 4, cfg, step), opts)
    assert bool(torch.isfinite(losses).all())


def test_quantizer_makes_no_host_sync_after_initialisation():
    q = LSQQuantizer(4, signed=True).to(CUDA)
    x = torch.randn(32, 100, device=CUDA, requires_grad=True)
    q(x).sum().backward()
    with sync_errors():
        for act in (None, "relu", "h_swish"):
            q(x, act=act).sum().backward()


def test_extraction_on_cuda_matches_the_supernet(tiny_space, perturb):
    cpu, _ = _nets(tiny_space)
    rng = random.Random(0)
    cpu.train()
    cpu.set_arch(tiny_space.largest(4))
    cpu(torch.randn(2, 3, 32, 32))  # every quantizer initialised
    perturb(cpu, seed=1)
    net = copy.deepcopy(cpu).to(CUDA).eval()
    cpu.eval()
    for arch in [tiny_space.sample(rng, bits=4, resolution=r) for r in (24, 28, 32)] + [tiny_space.smallest(4)]:
        net.set_arch(arch)
        cpu.set_arch(arch)
        sub = net.extract(arch).eval()
        assert all(p.device.type == "cuda" for p in sub.parameters())
        assert all(b.device.type == "cuda" for b in sub.buffers())
        x = torch.randn(4, 3, arch.r, arch.r)
        with torch.no_grad():
            ref, out = net(x.to(CUDA)), sub(x.to(CUDA))
            on_cpu = cpu.extract(arch).eval()(x)
        assert (out - ref).abs().max().item() <= 1e-5
        assert (out.cpu() - on_cpu).abs().max().item() <= 1e-3


def test_device_jpeg_decoding_matches_the_cpu_path(tmp_path):
    from PIL import Image

    from oqat.data import DeviceImageLoader

    g = torch.Generator().manual_seed(0)
    files = []
    for i, (h, w) in enumerate([(48, 64), (70, 52), (40, 40)]):
        low = torch.rand(1, 3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        path = tmp_path / f"{i}.jpg"
        Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path, quality=90)
        files.append((str(path), i))
    kw = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=False)
    (xc, yc), = list(DeviceImageLoader(files, [[0, 1, 2]], "cpu", **kw))
    (xg, yg), = list(DeviceImageLoader(files, [[0, 1, 2]], CUDA, **kw))
    assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
    diff = (xg.cpu() - xc).abs() * 0.25 * 255  # in levels of 255; nvJPEG's IDCT is not libjpeg's
    assert diff.max() < 10 and diff.mean() < 1.5, (diff.max(), diff.mean())
    (xa, _), = list(DeviceImageLoader(files, [[0, 1, 2]], CUDA, **{**kw, "train": True}, seed=3))
    (xb, _), = list(DeviceImageLoader(files, [[0, 1, 2]], "cpu", **{**kw, "train": True}, seed=3))
    assert xa.shape == xb.shape == (3, 3, 32, 32)  # the same crops (drawn on the host)
    assert ((xa.cpu() - xb).abs() * 0.25 * 255).mean() < 3


def test_a_short_training_run_on_cuda(tmp_path):
    import yaml

    from oqat.models import load_checkpoint
    from oqat.training import load_train_config, train

    cfg = {"space": "mbv3-tiny", "bits": 4,
           "data": {"name": "synthetic", "image_size": 32, "holdout": 32, "synthetic_size": 96},
           "train": {"epochs": 1, "batch_size": 16, "num_random": 1, "eval_images": 32, "calib_images": 32,
                     "log_every": 2, "device": "cuda"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_train_config(path), tmp_path / "run", progress=False)
    assert result.steps == 4 and next(result.model.parameters()).device.type == "cuda"
    assert 0 <= result.metrics["holdout_top1_largest"] <= 100
    assert load_checkpoint(result.checkpoint).step == 4
