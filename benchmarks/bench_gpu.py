"""Training throughput on a GPU (issue 14): images/s of the sandwich step and of one extracted
subnet, quantized vs full precision, on synthetic data and through the input pipeline.

On a GPU, one command with the defaults (mbv3-imagenet, 224 px, batch 256, 4 bit, bf16 autocast,
channels-last; a generated JPEG folder unless ``--jpeg-folder`` names an ImageFolder tree):

    python benchmarks/bench_gpu.py --out runs/bench-gpu.json

CPU smoke run (what the tests run):

    python benchmarks/bench_gpu.py --device cpu --batch-size 8 --steps 3 --image-size 64

Measured, each after ``--warmup`` untimed steps, over ``--steps`` timed ones (the device is
synchronised only at the ends of the timed span):

* ``sandwich``: the training step of oqat.training (largest + smallest + ``--num-random`` random
  subnets, in-place distillation, SGD), the same subnets at ``--bits`` and at full precision;
  the ratio of their step times (target: at most 1.3).
* ``loader``: the input pipeline alone (device-side decode + augmentation of oqat.data.gpu_loader,
  and the CPU DataLoader with ``--workers`` PIL workers), images/s.
* ``sandwich_loader``: the quantized sandwich step fed by the device-side pipeline (target:
  as fast as with synthetic data, i.e. the pipeline is not the bottleneck).
* ``subnet``: one standalone extracted subnet (``--subnet-seed``) trained alone, quantized and
  full precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from oqat import SearchSpace
from oqat.data import DeviceImageLoader, build_data, image_files, make_loader
from oqat.data.config import DataConfig
from oqat.models import build_supernet
from oqat.quant import kernel_impl
from oqat.training import TrainConfig, step_archs
from oqat.training.step import StepOptions, train_step
from oqat.utils.devices import resolve_device, threads
from oqat.utils.files import write_text_atomic


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, opts: StepOptions, bits: int) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "amp": str(opts.amp_dtype).replace("torch.", "") if opts.amp_dtype else "float32",
           "channels_last": opts.channels_last, "lsq_kernels": kernel_impl(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
    else:
        env.update(cpu=platform.processor() or platform.machine())
    return env


def timed(device: torch.device, warmup: int, steps: int, run_step) -> float:
    """Seconds of `steps` calls of run_step(i) after `warmup` untimed ones."""
    for i in range(warmup):
        run_step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run_step(i)
    sync(device)
    return time.perf_counter() - start


def supernet(space: SearchSpace, bits: int, device: torch.device, opts: StepOptions):
    torch.manual_seed(0)
    net = build_supernet(space, bits).to(device)
    if opts.channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=3e-5)
    return net, params, opt


def bench_sandwich(space, bits, cfg, opts, device, args, batches=None) -> float:
    """Images/s of the sandwich step; `batches` (an iterator of (x, y)) or one synthetic batch."""
    net, params, opt = supernet(space, bits, device, opts)
    g = torch.Generator().manual_seed(1)
    fixed = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
             torch.randint(0, space.num_classes, (args.batch_size,), generator=g).to(device))

    images = [0]

    def run_step(i: int) -> None:
        x, y = next(batches) if batches is not None else fixed
        train_step(net, opt, None, params, x, y, step_archs(space, bits, cfg, i), opts)
        images[0] += x.size(0) if i >= args.warmup else 0
    seconds = timed(device, args.warmup, args.steps, run_step)
    return images[0] / seconds


def bench_subnet(space, bits, opts, device, args) -> float:
    """Images/s of a training step of one extracted subnet on synthetic data."""
    arch = space.sample(random.Random(args.subnet_seed), bits, resolution=args.image_size)
    net, _, _ = supernet(space, bits, device, opts)
    net.set_arch(space.largest(bits).replace(r=args.image_size))
    with torch.no_grad():  # every quantizer initialised from data before extracting
        net(torch.randn(2, 3, args.image_size, args.image_size, device=device))
    sub = net.extract(arch).train()
    if opts.channels_last:
        sub.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(sub.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    if opts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.num_classes, (args.batch_size,), generator=g).to(device)
    def run_step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=opts.amp_dtype, enabled=opts.amp_dtype is not None):
            logits = sub(x).float()
        F.cross_entropy(logits, y, label_smoothing=0.1).backward()
        opt.step()
    return args.batch_size * args.steps / timed(device, args.warmup, args.steps, run_step)


def jpeg_folder(args, tmp: Path) -> Path:
    """``--jpeg-folder``, or a generated ImageFolder tree of JPEGs at ImageNet's typical size."""
    if args.jpeg_folder:
        return Path(args.jpeg_folder)
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    h, w = args.jpeg_size
    for split, n in (("train", args.jpeg_images), ("val", 2)):
        for c in range(2):
            folder = tmp / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n // 2):
                low = torch.rand(1, 3, 8, 8, generator=g)
                img = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
                img = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
                Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.jpg", quality=90)
    return tmp


def endless(loader_fn):
    while True:
        yield from loader_fn()


def bench_loaders(root: Path, device: torch.device, args) -> tuple[dict, DeviceImageLoader]:
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=args.image_size, holdout=1, decode="gpu")
    data = build_data(cfg)
    files = image_files(data.train)
    batch = min(args.batch_size, len(files))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + batch] for i in range(0, len(files) - batch + 1, batch)]

    def device_loader(epoch: int = 0):
        return DeviceImageLoader(files, batches, device, image_size=args.image_size, mean=data.mean, std=data.std,
                                 seed=0, epoch=epoch, threads=max(1, args.workers))

    def drain(loader) -> float:
        sync(device)
        start, n = time.perf_counter(), 0
        for x, _ in loader:
            n += x.size(0)
        sync(device)
        return n / (time.perf_counter() - start)
    drain(device_loader())  # warm-up: file cache, decoder
    out = {"device_images_per_s": drain(device_loader(1)), "images": len(files)}
    cpu_loader = make_loader(data.train, batch, shuffle=True, drop_last=True, workers=args.workers)
    out["cpu_dataloader_images_per_s"] = drain(cpu_loader)
    return out, device_loader


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--space", default="mbv3-imagenet")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--image-size", type=int, default=224, help="the one resolution of every step")
    p.add_argument("--num-random", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN, caches)")
    p.add_argument("--no-amp", action="store_true", help="float32 convs on CUDA (default: bf16 autocast)")
    p.add_argument("--jpeg-folder", help="an ImageFolder tree with train/ (default: generated JPEGs)")
    p.add_argument("--jpeg-images", type=int, default=None, help="generated JPEGs (default: 4 batches)")
    p.add_argument("--jpeg-size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=8, help="file-reading threads / CPU DataLoader workers")
    p.add_argument("--subnet-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--skip-loader", action="store_true", help="synthetic data only")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.jpeg_images is None:
        args.jpeg_images = 4 * args.batch_size
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    space = SearchSpace.preset(args.space) if not args.space.endswith((".yaml", ".yml")) else SearchSpace.resolve(args.space)
    space = space.replace(resolutions=(args.image_size,))
    tcfg = TrainConfig(num_random=args.num_random, amp=not args.no_amp)
    opts = StepOptions.from_config(tcfg, device)
    with threads(args.threads):
        result = {"environment": environment(device, opts, args.bits),
                  "settings": {"space": space.name, "batch_size": args.batch_size, "image_size": args.image_size,
                               "bits": args.bits, "subnets_per_step": 2 + args.num_random, "steps": args.steps,
                               "warmup": args.warmup}}
        print(json.dumps(result["environment"]), flush=True)
        q = bench_sandwich(space, args.bits, tcfg, opts, device, args)
        fp = bench_sandwich(space, 32, tcfg, opts, device, args)
        result["sandwich"] = {"quantized_images_per_s": q, "fp_images_per_s": fp, "step_time_ratio": fp / q}
        print(f"sandwich step: {args.bits}-bit {q:.1f} img/s, FP {fp:.1f} img/s, time ratio {fp / q:.2f}", flush=True)
        sq = bench_subnet(space, args.bits, opts, device, args)
        sfp = bench_subnet(space, 32, opts, device, args)
        result["subnet"] = {"quantized_images_per_s": sq, "fp_images_per_s": sfp, "step_time_ratio": sfp / sq}
        print(f"one subnet: {args.bits}-bit {sq:.1f} img/s, FP {sfp:.1f} img/s, time ratio {sfp / sq:.2f}", flush=True)
        if not args.skip_loader:
            with tempfile.TemporaryDirectory(prefix="oqat-bench-jpeg-") as tmp:
                loaders, device_loader = bench_loaders(jpeg_folder(args, Path(tmp)), device, args)
                result["loader"] = loaders
                print(f"input pipeline: device {loaders['device_images_per_s']:.1f} img/s, CPU DataLoader "
                      f"({args.workers} workers) {loaders['cpu_dataloader_images_per_s']:.1f} img/s", flush=True)
                epochs = iter(range(1 << 30))
                batches = endless(lambda: device_loader(next(epochs)))
                ql = bench_sandwich(space, args.bits, tcfg, opts, device, args, batches=batches)
                result["sandwich_loader"] = {"quantized_images_per_s": ql, "vs_synthetic": ql / q}
                print(f"sandwich step fed by the device pipeline: {ql:.1f} img/s ({ql / q:.2f} of synthetic)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
