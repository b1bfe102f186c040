#!/usr/bin/env python
"""The OQA README's Pareto table, measured: each published subnet (configs/oqa-subnets/*.json)
evaluated on a converted OQA supernet, our ImageNet top-1 next to the published one.

Convert the published files first (README, "Start from the published supernets"), then

    python benchmarks/eval_oqa_table.py --ckpt oqa-b4.pt --ckpt oqa-b3.pt --ckpt oqa-b2.pt \
        --data-root /data/imagenet --device cuda

Each checkpoint evaluates the subnets of its bit-width (and, for the 2-bit one, the three 3-bit
subnets whose published row also gives a 2-bit top-1). Measurement is oqat's: BN re-calibrated on
``--calib-images`` held-out training images (OFA: 2000), top-1 on ImageNet val (``--split test``;
``--eval-images N`` for a seeded subset). oqat loads val images at the space's largest resolution
(Resize(256) + CenterCrop(224)) and resizes each batch to the subnet's r, where OFA/OQA resize
every image to ceil(r/0.875) and centre-crop r: figures at r < 224 may differ slightly from the
published ones for that reason alone (docs/interop.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oqat.measure import load_context, measure
from oqat.space import Arch, cost
from oqat.utils.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent


def rows(folder: Path) -> list[dict]:
    """The table's rows: {"name", "arch", "published"} from each file, smallest first per bit-width."""
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        out.append({"name": data["name"], "arch": Arch.load(path), "published": data["published"]})
    if not out:
        raise ValueError(f"{folder}: no arch files (*.json)")
    return sorted(out, key=lambda r: (-r["arch"].bits, r["published"]["mmacs"]))


def jobs(table: list[dict], bits: int) -> list[tuple[str, Arch, float]]:
    """(name, arch at `bits`, published top-1) of every row a `bits`-bit supernet evaluates."""
    out = [(r["name"], r["arch"], r["published"]["top1"]) for r in table if r["arch"].bits == bits]
    if bits == 2:
        out += [(f"{r['name']}@2bit", r["arch"].replace(bits=2), r["published"]["top1_at_2bit"])
                for r in table if "top1_at_2bit" in r["published"]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, help="converted OQA supernet (repeatable)")
    p.add_argument("--data-root", required=True, help="ImageNet as an ImageFolder (train/, val/)")
    p.add_argument("--archs", default=str(ROOT / "configs" / "oqa-subnets"), help="folder of arch files")
    p.add_argument("--split", default="test", choices=("test", "holdout"))
    p.add_argument("--calib-images", type=int, default=2000)
    p.add_argument("--calib-batch", type=int, default=100)
    p.add_argument("--eval-images", type=int, default=None, help="seeded subset of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    table = rows(Path(args.archs))
    results = []
    print(f"{'subnet':16s} {'bits':>4s} {'r':>4s} {'MMACs':>8s} {'published':>9s} {'oqat':>7s} {'diff':>6s}")
    for path in args.ckpt:
        ctx = load_context(path, split=args.split, calib_images=args.calib_images, calib_batch=args.calib_batch,
                           eval_images=args.eval_images, batch_size=args.batch_size, device=args.device,
                           data_root=args.data_root, workers=args.workers)
        todo = jobs(table, ctx.bits)
        if not todo:
            print(f"{path}: a {ctx.bits}-bit supernet; no published subnet of that bit-width", file=sys.stderr)
        for name, arch, published in todo:
            got = measure(ctx.net, arch, ctx.calib, ctx.eval_data, calib_batch=args.calib_batch)
            mmacs = cost.macs(ctx.space, arch) / 1e6
            results.append({"name": name, "ckpt": str(path), "arch": arch.to_dict(), "mmacs": mmacs,
                            "published_top1": published, "top1": got["top1"], "images": got["n"]})
            print(f"{name:16s} {arch.bits:4d} {arch.r:4d} {mmacs:8.3f} {published:9.3f} {got['top1']:7.3f} "
                  f"{got['top1'] - published:+6.2f}", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"eval_oqa_table: error: {exc}", file=sys.stderr)
        sys.exit(2)
