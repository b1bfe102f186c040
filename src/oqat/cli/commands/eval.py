"""``oqat eval``: re-calibrate a subnet's BN statistics and measure its accuracy and cost."""

from __future__ import annotations

import argparse
import json

from ...space import cost
from ..args import add_arch_args, arch_from_args


def add_context_args(p: argparse.ArgumentParser, *, split: bool = True, ckpt: bool = True) -> None:
    """Flags shared by the verbs that measure subnets of a checkpoint."""
    if ckpt:
        p.add_argument("--ckpt", required=True, help="supernet checkpoint")
    if split:
        p.add_argument("--split", default="holdout", choices=("holdout", "test"),
                       help="data to measure accuracy on (search always uses holdout)")
    g = p.add_argument_group("measurement")
    g.add_argument("--calib-images", type=int, default=2000, help="BN re-calibration images (held-out split)")
    g.add_argument("--calib-batch", type=int, default=100, help="BN re-calibration batch size")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the fixed calibration subset")
    g.add_argument("--eval-images", type=int, default=None,
                   help="measure accuracy on a fixed seeded subset of this many images (default: the whole split)")
    g.add_argument("--batch-size", type=int, default=200, help="evaluation batch size")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--data", default=None, help="dataset name, overriding the checkpoint's config")
    g.add_argument("--data-root", default=None, help="dataset folder, overriding the checkpoint's config")
    g.add_argument("--workers", type=int, default=0, help="data-loading workers")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")


def context_from_args(args: argparse.Namespace, ckpt: str | None = None, split: str | None = None):
    from ...measure import load_context

    return load_context(ckpt or args.ckpt, split=split or getattr(args, "split", "holdout"),
                        calib_images=args.calib_images, calib_batch=args.calib_batch, calib_seed=args.calib_seed,
                        eval_images=args.eval_images, batch_size=args.batch_size, device=args.device,
                        data=args.data, data_root=args.data_root, workers=args.workers)


def register(sub) -> None:
    p = sub.add_parser("eval", help="re-calibrate BN and measure a subnet's accuracy and cost")
    add_context_args(p)
    add_arch_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...measure import measure

    ctx = context_from_args(args)
    arch = arch_from_args(args, ctx.space, default_bits=ctx.bits)
    if arch.bits != ctx.bits:
        raise ValueError(f"--bits: the checkpoint {args.ckpt} is a {ctx.bits}-bit supernet, the subnet asks for {arch.bits}")
    result = measure(ctx.net, arch, ctx.calib, ctx.eval_data)
    costs = cost.summary(ctx.space, arch)
    if args.json:
        print(json.dumps({"ckpt": args.ckpt, "split": args.split, "arch": arch.to_dict(), **result,
                          "cost": costs, "settings": {k: v for k, v in ctx.settings.items() if k != "data"}}, indent=2))
        return 0
    print(f"checkpoint {args.ckpt} ({ctx.space.name}, {ctx.bits}-bit), split {args.split} "
          f"({result['n']} images), BN re-calibrated on {result['calib_images']} held-out images")
    print(f"arch {arch.to_json()}")
    print(f"top-1      {result['top1']:10.2f} %")
    print(f"top-5      {result['top5']:10.2f} %")
    print(f"loss       {result['loss']:10.4f}")
    print(cost.format_summary(costs))
    print(f"({result['seconds']:.2f} s to calibrate and evaluate)")
    return 0
