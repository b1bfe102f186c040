#!/usr/bin/env python
"""Export one subnet at 2/3/4/8 bits and full precision; print file sizes, onnxruntime CPU
latency and the verification figures.

Each bit-width's subnet comes from a checkpoint (``--ckpt``, repeatable: a checkpoint is used at
its own bit-width) or, for bit-widths without one, from a freshly initialised supernet whose
step sizes and BN statistics are set by a few forwards on random inputs (sizes and latency do
not depend on the weights; verification figures of such random networks are a stress test,
see docs/export.md). Sizes: ONNX with float weights (QCDQ), ONNX with int8 weight codes, the
packed ``.oqat`` file, and the analytic size (``oqat.cost.size_bits``). Latency: onnxruntime,
CPU, all graph optimisations, ``--threads`` intra-op threads, median of ``--runs`` timed runs
after warm-up, batch 1 and 32.

    python benchmarks/bench_export.py --space mbv3-tiny
    python benchmarks/bench_export.py --space mbv3-tiny --train-steps 60   # verification with margins
    python benchmarks/bench_export.py --space mbv3-imagenet --oqa      # the OQA README subnet
    python benchmarks/bench_export.py --ckpt runs/x/ckpt4.pt --ckpt runs/x/ckpt2.pt --arch best.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oqat import Arch, SearchSpace, build_supernet
from oqat.export import deployable_from_checkpoint, export_subnet
from oqat.export.verify import VerificationError, ort_session
from oqat.measure import recalibrate_bn
from oqat.models import load_checkpoint
from oqat.space import cost

OQA_README = dict(ks=[3, 3, 5, 3, 3, 5, 5, 7, 3, 5, 5, 3, 5, 5, 3, 5, 3, 5, 7, 5],
                  e=[3, 3, 4, 4, 3, 4, 3, 3, 3, 3, 3, 4, 4, 3, 6, 6, 6, 4, 3, 3], d=[2, 2, 3, 2, 3], r=128)


def fresh_subnet(space: SearchSpace, arch: Arch, seed: int, train_steps: int = 0):
    """(subnet, config, calibration record) of a new supernet: steps initialised, optionally trained for
    `train_steps` SGD steps on synthetic data (then config names that data, so verification
    uses its held-out images), BN statistics re-estimated on the subnet."""
    from oqat import data as D

    torch.manual_seed(seed)
    net = build_supernet(space, arch.bits, impl="eager")
    net.train()
    with torch.no_grad():
        big = space.largest(arch.bits)
        net.set_arch(big)
        net(torch.randn(4, space.in_channels, big.r, big.r))          # initialises the step sizes
    net.set_arch(arch)
    config, calib = {}, [torch.randn(16, space.in_channels, arch.r, arch.r) for _ in range(2)]
    if train_steps:
        cfg = D.DataConfig(name="synthetic", image_size=max(space.resolutions), holdout=256, synthetic_size=1280,
                           synthetic_classes=space.num_classes, seed=seed)
        data = D.build_data(cfg)
        x = torch.stack([data.train[i][0] for i in range(len(data.train))])
        y = torch.tensor([data.train[i][1] for i in range(len(data.train))])
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(net(D.resize_batch(x[idx], arch.r)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        config = {"data": cfg.to_dict()}
        calib = [D.resize_batch(x[i:i + 64], arch.r) for i in range(0, 256, 64)]
    sub = net.extract(arch).eval()
    images = recalibrate_bn(sub, calib)
    calibration = {"recalibrated": True, "split": "synthetic" if train_steps else "random inputs", "images": images}
    return sub, config, calibration


def latency_ms(path: Path, shape: tuple[int, ...], runs: int, threads: int, fold: bool = True) -> float:
    session = ort_session(path, optimize=True, threads=threads, fold_weights=fold)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint (repeatable; used at its own bits)")
    p.add_argument("--space", default="mbv3-tiny", help="space preset when no checkpoint gives one")
    p.add_argument("--arch", help="arch JSON file (default: --oqa for mbv3-imagenet, else a seeded sample)")
    p.add_argument("--oqa", action="store_true", help="the 4-bit subnet of the OQA README (mbv3-imagenet)")
    p.add_argument("--largest", action="store_true")
    p.add_argument("--resolution", type=int, help="override the arch's resolution")
    p.add_argument("--bits", default="2,3,4,8,32", help="bit-widths (default 2,3,4,8,32)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per latency figure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verify-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="without a checkpoint: train the subnet this many SGD steps on synthetic data first, "
                        "so the verification figures are those of a network with real margins")
    p.add_argument("--out", help="folder for the exported files (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)

    ckpts = {load_checkpoint(c).bits: c for c in args.ckpt}
    space = load_checkpoint(args.ckpt[0]).space if args.ckpt else SearchSpace.preset(args.space)
    bits_list = [int(b) for b in args.bits.split(",")]
    if args.arch:
        base = Arch.load(args.arch)
    elif args.oqa or (space.name == "mbv3-imagenet" and not args.largest):
        base = Arch(**OQA_README, bits=4)
    elif args.largest:
        base = space.largest(4)
    else:
        base = space.sample(random.Random(args.seed), 4, resolution=max(space.resolutions))
    if args.resolution:
        base = base.replace(r=args.resolution)
    space.validate(base)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="oqat-bench-export-"))
    out.mkdir(parents=True, exist_ok=True)

    print(f"# bench_export: space {space.name}, arch {base.replace(bits=32).to_json()} (bits vary)")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}; onnxruntime "
          f"{__import__('onnxruntime').__version__}; {args.threads} threads, median of {args.runs} runs")
    rows = []
    for bits in bits_list:
        arch = base.replace(bits=bits)
        calibration = verification = None
        if bits in ckpts:  # BN re-calibrated on held-out images, as oqat export does by default
            dep = deployable_from_checkpoint(ckpts[bits], arch, verify_images=args.verify_images, verify_seed=args.seed)
            sub, config, calibration, verification = dep.sub, dep.ckpt.config, dep.calibration, dep.verification
            origin = f"checkpoint {ckpts[bits]}"
        else:
            sub, config, calibration = fresh_subnet(space, arch, args.seed, args.train_steps)
            origin = (f"fresh supernet, subnet trained {args.train_steps} steps on synthetic data"
                      if args.train_steps else "fresh random supernet")
        tag = "fp32" if bits == 32 else f"{bits}bit"
        row = {"bits": bits, "origin": origin, "macs_M": cost.macs(space, arch) / 1e6,
               "analytic_KiB": cost.size_bits(space, arch) / 8 / 1024}
        try:
            res = export_subnet(sub, out / f"{tag}.onnx", "onnx", config=config, verify_images=args.verify_images,
                                seed=args.seed, progress=False, calibration=calibration, verification=verification)
            report = res.report
        except VerificationError as exc:
            report = exc.report
            res = None
        onnx_path = out / f"{tag}.onnx" if res else out / f"{tag}.unverified.onnx"
        int8 = export_subnet(sub, out / f"{tag}-int8w.onnx", "onnx", config=config, verify=False, weights="int8")
        packed = export_subnet(sub, out / f"{tag}.oqat", "oqat", config=config, verify_images=16,
                               seed=args.seed)
        r = arch.r
        row.update(onnx_KiB=onnx_path.stat().st_size / 1024, onnx_int8w_KiB=int8.size / 1024,
                   packed_KiB=packed.size / 1024,
                   ort_b1_ms=latency_ms(onnx_path, (1, space.in_channels, r, r), args.runs, args.threads),
                   ort_b32_ms=latency_ms(onnx_path, (32, space.in_channels, r, r), max(5, args.runs // 3),
                                         args.threads),
                   ort_qdq_b1_ms=latency_ms(onnx_path, (1, space.in_channels, r, r), args.runs, args.threads,
                                            fold=False),
                   ort_qdq_b32_ms=latency_ms(onnx_path, (32, space.in_channels, r, r), max(5, args.runs // 3),
                                             args.threads, fold=False),
                   verified=report.ok, inputs=report.inputs, top1_agreement=report.top1_agreement,
                   max_abs_logit_diff=report.max_abs_diff, max_abs_logit=report.max_abs_logit,
                   codes=report.codes_compared, aligned_differing=report.codes_differing,
                   aligned_max_diff=report.max_code_diff, e2e_differing=report.e2e_codes_differing,
                   e2e_max_diff=report.e2e_max_code_diff, failures=report.failures,
                   packed_roundtrip_max_diff=packed.report.max_abs_diff)
        rows.append(row)
        print(f"  {tag}: done", file=sys.stderr, flush=True)

    print()
    print("| bits | MMACs | ONNX QCDQ KiB | ONNX int8-w KiB | packed .oqat KiB | analytic KiB | "
          "ORT b1 ms | ORT b32 ms | ORT b1 ms, QDQ on | ORT b32 ms, QDQ on |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in rows:
        print(f"| {'FP32' if w['bits'] == 32 else w['bits']} | {w['macs_M']:.1f} | {w['onnx_KiB']:.1f} | "
              f"{w['onnx_int8w_KiB']:.1f} | {w['packed_KiB']:.1f} | {w['analytic_KiB']:.1f} | {w['ort_b1_ms']:.2f} | "
              f"{w['ort_b32_ms']:.1f} | {w['ort_qdq_b1_ms']:.2f} | {w['ort_qdq_b32_ms']:.1f} |")
    print("(ORT: all graph optimisations with weight folding (session.disable_quant_qdq=1, what `oqat predict` "
          "uses); 'QDQ on': onnxruntime's default QDQ handling, which keeps every weight's Q/Clip/DQ at run time)")
    print()
    print("| bits | verified | inputs | top-1 agreement | max abs logit diff (max abs logit) | codes compared | "
          "aligned differing (max diff) | end-to-end differing (max diff) | packed round trip max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in rows:
        n = max(w["codes"], 1)
        print(f"| {'FP32' if w['bits'] == 32 else w['bits']} | {'yes' if w['verified'] else 'NO'} | {w['inputs']} | "
              f"{100 * w['top1_agreement']:.2f}% | {w['max_abs_logit_diff']:.3g} ({w['max_abs_logit']:.3g}) | "
              f"{w['codes']} | {w['aligned_differing']} = {100 * w['aligned_differing'] / n:.5f}% "
              f"({w['aligned_max_diff']}) | {w['e2e_differing']} = {100 * w['e2e_differing'] / n:.4f}% "
              f"({w['e2e_max_diff']}) | {w['packed_roundtrip_max_diff']:.3g} |")
    for w in rows:
        if w["failures"]:
            print(f"verification failures at {w['bits']} bits: {'; '.join(w['failures'][:3])}")
    print(f"\nsubnets: {rows[0]['origin'] if rows else ''}; files in {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
