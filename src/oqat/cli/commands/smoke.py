"""``oqat smoke``: a one-minute end-to-end check of the core on synthetic data.

Builds a 4-bit supernet, trains it for a few sandwich steps, extracts the largest, smallest and
a random subnet, checks each against the supernet and writes their costs. It proves the
installation works; the full method is ``oqat run``.
"""

from __future__ import annotations

import json
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...models import build_supernet
from ...space import cost
from ...utils.files import ensure_output_dir
from ..args import add_space_args, space_from_args


def register(sub) -> None:
    p = sub.add_parser("smoke", help="quick end-to-end check of the installation (synthetic data)")
    add_space_args(p, default="mbv3-tiny")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/smoke", help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    space = space_from_args(args)
    net = build_supernet(space, args.bits)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    # A learnable synthetic task: the class is written into the image as a bright square.
    def batch(r: int):
        y = torch.randint(0, space.num_classes, (args.batch_size,))
        x = torch.randn(args.batch_size, space.in_channels, r, r) * 0.5
        for i, label in enumerate(y.tolist()):
            row, col = divmod(label, 4)
            x[i, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] += 2.0
        return x, y

    start = time.time()
    net.train()
    for _ in tqdm(range(args.steps), desc="smoke training", unit="step"):
        r = rng.choice(space.resolutions)
        x, y = batch(r)
        opt.zero_grad()
        for arch in (space.largest(args.bits), space.smallest(args.bits), space.sample(rng, args.bits)):
            net.set_arch(arch.replace(r=r))
            F.cross_entropy(net(x), y).backward()
        opt.step()

    net.eval()
    results = []
    for name, arch in (("largest", space.largest(args.bits)), ("smallest", space.smallest(args.bits)),
                       ("random", space.sample(rng, args.bits))):
        x, y = batch(arch.r)
        net.set_arch(arch)
        with torch.no_grad():
            ref = net(x)
            sub = net.extract(arch)
            diff = (sub(x) - ref).abs().max().item()
        acc = (ref.argmax(1) == y).float().mean().item()
        results.append({"name": name, "arch": arch.to_dict(), "max_abs_diff": diff, "accuracy": acc,
                        **cost.summary(space, arch)})
        print(f"{name:8s} acc {acc:.2f}  MACs {results[-1]['macs'] / 1e6:7.2f} M  "
              f"extract max|diff| {diff:.1e}")
        if diff > 1e-4:
            raise RuntimeError(f"extracted {name} subnet disagrees with the supernet (max |diff| {diff})")
    out = ensure_output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps({"space": space.name, "bits": args.bits,
                                                "seconds": time.time() - start, "subnets": results}, indent=2))
    print(f"smoke test passed in {time.time() - start:.0f} s; results in {out / 'smoke.json'}")
    return 0
