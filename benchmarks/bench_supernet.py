#!/usr/bin/env python
"""Speed of the quantized supernet and of the LSQ quantizer on the CPU (a benchmark, not a test).

For each subnet row it prints the median time of a forward pass (eval mode, no_grad) and of a
forward+backward pass (train mode, cross-entropy) of the supernet with that subnet active, at
4 bit, 2 bit and with quantization off (bits=32), and the ratio quantized / full precision of
the forward+backward time (the target is <= 1.2 on every row). The three bit-widths are timed
round-robin (one repetition of each in turn) so that a change in machine load hits them alike.
A second table times ``lsq_quantize`` alone on a (16, 96, 56, 56) tensor: the native C kernels
(what ``impl="auto"`` uses on CPU), the ``torch.compile``'d kernels, the same autograd Function
with eager element-wise ops, and the plain-autograd reference ``lsq_reference``.

glibc's allocator returns large freed blocks to the OS and page-faults them back on every step
with tensors of these sizes; the script therefore re-executes itself with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776`` unless they are already set.

    python benchmarks/bench_supernet.py                 # full run (several minutes on 2 cores)
    python benchmarks/bench_supernet.py --quick         # a few rows, fewer repeats
    python benchmarks/bench_supernet.py --repeats 15 --rows imagenet-random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1099511627776"}


def _reexec_with_malloc_env() -> None:
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per cell (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (compilation, allocator)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="few rows, 3 repeats, 1 warm-up: a smoke run")
    p.add_argument("--rows", default=None,
                   help="comma-separated substrings; only rows whose name contains one of them run")
    p.add_argument("--bits", default="4,2", help="quantized bit-widths to compare with full precision")
    p.add_argument("--no-lsq", action="store_true", help="skip the lsq_quantize table")
    p.add_argument("--lsq-only", action="store_true", help="only the lsq_quantize table")
    p.add_argument("--impl", default="auto", choices=["auto", "eager", "compiled"],
                   help="LSQ kernels used inside the supernet")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: perf_counter (the default, what the target is about); cpu: this process's CPU "
                        "time, which a busy machine disturbs much less (use it with --threads 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subnet and the data")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def subnet_rows(quick: bool):
    """(row name, space preset, which subnet, resolution, batch)."""
    rows = []
    for r in (224, 128):
        for which in ("largest", "smallest", "random"):
            rows.append((f"imagenet-{which}-{r}", "mbv3-imagenet", which, r, 16))
    for preset in ("mbv3-cifar", "mbv3-tiny"):
        for which in ("largest", "smallest", "random"):
            rows.append((f"{preset[5:]}-{which}-32", preset, which, 32, 64))
    if quick:
        rows = [row for row in rows if row[0] in ("imagenet-random-128", "tiny-largest-32", "cifar-random-32")]
    return rows


CLOCK = time.perf_counter


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def bench_subnets(args, torch, F) -> list[dict]:
    from oqat import SearchSpace, build_supernet

    bit_modes = [int(b) for b in args.bits.split(",") if b] + [32]
    rows = subnet_rows(args.quick)
    if args.rows:
        keys = args.rows.split(",")
        rows = [row for row in rows if any(k in row[0] for k in keys)]
    nets: dict[tuple[str, int], object] = {}
    results = []
    header = ("| row | MMACs | " + " | ".join(f"fwd {b}b" if b != 32 else "fwd fp" for b in bit_modes)
              + " | " + " | ".join(f"f+b {b}b" if b != 32 else "f+b fp" for b in bit_modes)
              + " | " + " | ".join(f"ratio {b}b" for b in bit_modes[:-1])
              + " | " + " | ".join(f"min-ratio {b}b" for b in bit_modes[:-1]) + " | load |")
    print("\nSupernet, median ms (fwd: eval + no_grad; f+b: train forward + cross-entropy + backward);"
          " ratio = quantized f+b / fp f+b (medians); min-ratio = the same with the fastest repetitions")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, preset, which, r, batch in rows:
        from oqat.space import cost

        space = SearchSpace.preset(preset)
        if which == "random":
            base = space.sample(random.Random(args.seed), resolution=r)
        else:
            base = getattr(space, which)().replace(r=r)
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, space.in_channels, r, r, generator=gen)
        y = torch.randint(space.num_classes, (batch,), generator=gen)
        fwd = {b: [] for b in bit_modes}
        fb = {b: [] for b in bit_modes}
        for b in bit_modes:
            if (preset, b) not in nets:
                nets[(preset, b)] = build_supernet(space, bits=b, impl=args.impl)
        load0 = os.getloadavg()[0]
        for rep in range(args.warmup + args.repeats):
            for b in bit_modes:  # round-robin: load changes hit every bit-width alike
                net = nets[(preset, b)]
                net.set_arch(base.replace(bits=b))
                net.eval()
                t0 = CLOCK()
                with torch.no_grad():
                    net(x)
                t1 = CLOCK()
                net.train()
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                t2 = CLOCK()
                if rep >= args.warmup:
                    fwd[b].append(t1 - t0)
                    fb[b].append(t2 - t1)
        load = max(load0, os.getloadavg()[0])
        row = {"row": name, "space": preset, "subnet": which, "resolution": r, "batch": batch,
               "arch": base.to_dict(), "mmacs": cost.macs(space, base) / 1e6,
               "fwd_ms": {str(b): _median_ms(fwd[b]) for b in bit_modes},
               "fwd_bwd_ms": {str(b): _median_ms(fb[b]) for b in bit_modes},
               "fwd_bwd_all_ms": {str(b): [1e3 * t for t in fb[b]] for b in bit_modes},
               "loadavg": load}
        row["ratio"] = {str(b): row["fwd_bwd_ms"][str(b)] / row["fwd_bwd_ms"]["32"] for b in bit_modes[:-1]}
        # ratio of the fastest repetitions: what the code costs when nothing else got in the way
        row["ratio_min"] = {str(b): min(fb[b]) / min(fb[32]) for b in bit_modes[:-1]}
        results.append(row)
        cells = ([f"{row['fwd_ms'][str(b)]:.1f}" for b in bit_modes]
                 + [f"{row['fwd_bwd_ms'][str(b)]:.1f}" for b in bit_modes]
                 + [f"{row['ratio'][str(b)]:.2f}" for b in bit_modes[:-1]]
                 + [f"{row['ratio_min'][str(b)]:.2f}" for b in bit_modes[:-1]])
        print(f"| {name} (b{batch}) | {row['mmacs']:.1f} | " + " | ".join(cells) + f" | {load:.1f} |", flush=True)
    return results


def bench_lsq(args, torch) -> list[dict]:
    from oqat.quant import lsq_quantize, lsq_reference
    from oqat.quant import native as _lsq_cpu
    from oqat.quant.kernels import compiled_kernels as _compiled_kernels

    shape = (16, 96, 56, 56)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    impls = [("native (C, the default on CPU)", lambda x, s: lsq_quantize(x, s, 4, False, impl="native")),
             ("compiled (torch.compile)", lambda x, s: lsq_quantize(x, s, 4, False, impl="compiled")),
             ("eager (same Function, eager ops)", lambda x, s: lsq_quantize(x, s, 4, False, impl="eager")),
             ("lsq_reference (plain autograd ops)", lambda x, s: lsq_reference(x, s, 4, False))]
    if _compiled_kernels() is None:
        impls = [i for i in impls if not i[0].startswith("compiled")]
    if _lsq_cpu.library() is None:
        impls = [i for i in impls if not i[0].startswith("native")]
    print(f"\nlsq_quantize alone on {shape} (4 bit, unsigned), median ms")
    print("| implementation | fwd (no_grad) | fwd+bwd |")
    print("|---|---|---|")
    results = []
    for name, fn in impls:
        fwd, fb = [], []
        x = x0.clone().requires_grad_(True)
        s = torch.tensor(0.05, requires_grad=True)
        for rep in range(args.warmup + args.repeats):
            t0 = CLOCK()
            with torch.no_grad():
                fn(x, s)
            t1 = CLOCK()
            x.grad = s.grad = None
            fn(x, s).backward(g)
            t2 = CLOCK()
            if rep >= args.warmup:
                fwd.append(t1 - t0)
                fb.append(t2 - t1)
        row = {"impl": name, "shape": list(shape), "fwd_ms": _median_ms(fwd), "fwd_bwd_ms": _median_ms(fb)}
        results.append(row)
        print(f"| {name} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} |", flush=True)
    return results


def main(argv=None) -> int:
    _reexec_with_malloc_env()
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"torch {torch.__version__}, {args.threads} threads, CPU: {cpu} ({os.cpu_count()} logical),"
          f" repeats {args.repeats}, warm-up {args.warmup}, impl {args.impl}, clock {args.clock},"
          f" MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_')}"
          f" MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_')}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (the 'load' column: 1-min load average"
          f" around each row; above {os.cpu_count()} means other processes share the cores)")
    t_start = time.time()
    out = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu, "argv": sys.argv[1:]}
    if not args.lsq_only:
        out["subnets"] = bench_subnets(args, torch, F)
    if not args.no_lsq:
        out["lsq"] = bench_lsq(args, torch)
    out["dynamo_frames_compiled"] = counters["stats"].get("unique_graphs", 0)
    print(f"\ncompiled graphs: {out['dynamo_frames_compiled']}; total {time.time() - t_start:.0f} s;"
          f" load average at end {os.getloadavg()[0]:.2f}")
    if out.get("subnets"):
        worst = max((v for row in out["subnets"] for v in row["ratio"].values()), default=float("nan"))
        print(f"worst quantized/fp forward+backward ratio: {worst:.2f} (target <= 1.2)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
