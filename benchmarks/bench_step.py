#!/usr/bin/env python
"""Per-step training time of this tree against another revision, side by side (issue 16).

Two workloads, each timed as the training loop runs it (CPU, float32, one thread by default):

* ``quickstart``: one sandwich step of configs/quickstart.yaml's supernet (fmnist-quick, 4 bit,
  batch 64, 28 px; largest + smallest + one random subnet, a new random one each step; no
  distillation) with its SGD update;
* ``imagenet-smallest``: forward + backward of the smallest mbv3-imagenet subnet at 128 px,
  batch 16, 4 bit.

``--against REV`` checks REV out into a temporary git worktree and runs the same measurement
there, alternating rounds between the two trees (one child process per tree and round, so a
change in machine load hits both alike); it prints each tree's median and the speed-up. Each
tree's native LSQ kernels are its own (the kernel cache is keyed by their source and flags).

    python benchmarks/bench_step.py --against c5baebb --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("quickstart", "imagenet-smallest")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1099511627776"}  # as `make` sets them


def _workload(name: str):
    """A function that runs one training step of workload `name` (its model and data built once)."""
    import random

    import torch

    from oqat.models import build_supernet
    from oqat.training.step import StepOptions, sandwich_backward

    torch.manual_seed(0)
    opts = StepOptions(distill=False)
    if name == "quickstart":
        net = build_supernet("fmnist-quick", 4)
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        rng, space = random.Random(0), net.space
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            sandwich_backward(net, x, y, [space.largest(4), space.smallest(4), space.sample(rng, 4)], opts)
            optimizer.step()
    elif name == "imagenet-smallest":
        net = build_supernet("mbv3-imagenet", 4)
        x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 1000, (16,))
        arch = net.space.smallest(4).replace(r=128)

        def step() -> None:
            net.zero_grad(set_to_none=True)
            sandwich_backward(net, x, y, [arch], opts)
    else:
        raise ValueError(f"unknown workload {name!r}")
    net.train()
    return step


def child(args) -> None:
    """Time `args.steps` steps of each workload after `args.warmup` untimed ones; print JSON."""
    import torch

    import oqat

    torch.set_num_threads(args.threads)
    out = {"oqat": oqat.__file__}
    for name in args.workloads.split(","):
        step = _workload(name)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[name] = times
    print(json.dumps(out))


def _run_child(src: Path, args) -> dict[str, list[float]]:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--workloads", args.workloads]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src.parent)
    if proc.returncode != 0:
        raise SystemExit(f"bench_step: the run in {src.parent} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = Path(out.pop("oqat")).resolve()
    if not imported.is_relative_to(src.resolve()):  # an editable install may shadow PYTHONPATH
        raise SystemExit(f"bench_step: the child meant for {src} imported oqat from {imported}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=None, help="git revision to time side by side with this tree")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (one child process per tree each)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per workload and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel build)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"--workloads: {name!r} is not one of {list(WORKLOADS)}")
    trees = {"this tree": ROOT / "src"}
    with tempfile.TemporaryDirectory(prefix="oqat-bench-step-") as tmp:
        if args.against:
            worktree = Path(tmp) / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree), args.against],
                           check=True)
            trees = {args.against: worktree / "src", **trees}
        try:
            times: dict[str, dict[str, list[float]]] = {t: {w: [] for w in args.workloads.split(",")} for t in trees}
            for r in range(args.rounds):
                for tree, src in trees.items():
                    for w, ts in _run_child(src, args).items():
                        times[tree][w].extend(ts)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    print(f"# {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps per tree, median ms per step")
    head = " | ".join(trees)
    print(f"| workload | {head} |" + (" speed-up |" if args.against else ""))
    print("|---|" + "---:|" * (len(trees) + (1 if args.against else 0)))
    for w in args.workloads.split(","):
        med = [statistics.median(times[t][w]) * 1e3 for t in trees]
        cells = " | ".join(f"{m:.1f}" for m in med)
        print(f"| {w} | {cells} |" + (f" {med[0] / med[1]:.2f}x |" if args.against else ""))


if __name__ == "__main__":
    main()
