"""Latency lookup table: per-block latency measured on this device, summed to predict a subnet's.

A subnet is a chain of pieces whose latency depends only on their own configuration: the stem
(at each input resolution), the fixed first block, each MBConv block -- identified by
``(in/out channels, hidden channels, kernel, stride, input size, squeeze-excite, activation)``
-- and the head (final 1x1 expand, pooling, feature mix, classifier). :func:`build_table`
extracts every distinct piece of the space from a supernet (random weights unless a checkpoint
is given; latency does not depend on the values), times it with PyTorch on the current device
(eager, eval mode, ``torch.no_grad``, fixed thread count) *inside* running subnets -- each
piece is timed as it executes within a full forward pass, over repeated passes -- and stores
milliseconds per key in a JSON table. The representative subnets are also timed end to end;
the median ratio of whole-subnet time to the sum of its pieces (the overhead between pieces,
typically 1.1-1.2 on a CPU) is stored as ``scale``. :func:`predict_latency` is ``scale`` times
the sum of a subnet's entries; :func:`check_table` compares predictions with measured
end-to-end latencies of random subnets.

Timing on a shared machine: when other processes compete for the cores, a long run (a whole
subnet) is preempted far more often than a short one (one block), so wall-clock times of pieces
and of whole subnets disagree. With one CPU thread the default clock is therefore the thread's
CPU time (``time.thread_time``, blind to preemption; wall time otherwise or on request); the
statistic over the repeats is the median (``stat="min"`` helps with the wall clock on a busy
machine).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..models import build_supernet
from ..space import Arch, SearchSpace
from ..utils.config import load_json
from ..utils.devices import threads as threads_set
from ..utils.stats import kendall_tau

FORMAT = "oqat-latency-table"
VERSION = 1


def _down(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _key(kind: str, **fields) -> str:
    return kind + "|" + "|".join(f"{k}={v}" for k, v in fields.items())


def pieces(space: SearchSpace, arch: Arch) -> list[tuple[str, dict]]:
    """(key, description) of every piece of `arch`, in execution order."""
    space.validate(arch)
    out = []
    r = arch.r
    size = _down(r, space.stem_stride)
    out.append((_key("stem", cin=space.in_channels, cout=space.stem_channels, stride=space.stem_stride, input=r),
                {"kind": "stem", "input": r}))
    out.append((_key("first", c=space.stem_channels, cout=space.first_block_channels, input=size),
                {"kind": "first", "input": size}))
    c = space.first_block_channels
    active = set(space.active_blocks(arch))
    for s, stage in enumerate(space.stages):
        for i, slot in enumerate(space.block_slots(s)):
            cin, c = c, stage.width
            if slot not in active:
                continue
            stride = stage.stride if i == 0 else 1
            hidden = space.hidden_channels(cin, arch.e[slot])
            k = arch.ks[slot]
            out.append((_key("mbconv", cin=cin, cout=c, hidden=hidden, k=k, stride=stride, input=size,
                              se=int(stage.se), act=stage.act),
                        {"kind": "mbconv", "slot": slot, "hidden": hidden, "k": k, "input": size, "cin": cin}))
            size = _down(size, stride)
    out.append((_key("head", cin=c, cmid=space.final_expand_channels, cmix=space.feature_mix_channels,
                      classes=space.num_classes, input=size), {"kind": "head", "input": size, "cin": c}))
    return out


def predict_latency(table: dict, space: SearchSpace, arch: Arch) -> float:
    """Predicted latency (ms) of `arch`: the sum of its pieces' table entries, times the
    table's ``scale`` (1 when absent)."""
    entries = table["entries"]
    total = 0.0
    for key, _ in pieces(space, arch):
        if key not in entries:
            raise ValueError(f"latency table{_where(table)}: no entry {key!r} (built for another space or "
                             f"resolution range?)")
        total += entries[key]
    return total * float(table.get("scale", 1.0))


def table_latency(table: dict, space: SearchSpace):
    """``arch -> predicted ms`` from `table`: the latency function of a search's CostModel."""
    return lambda arch: predict_latency(table, space, arch)


def _where(table: dict) -> str:
    return f" {table['path']}" if table.get("path") else ""


class _Head(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.final_expand, self.feature_mix, self.classifier = net.final_expand, net.feature_mix, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_expand(x)
        x = self.feature_mix(x.mean((2, 3), keepdim=True))
        return self.classifier(torch.flatten(x, 1))


STATS = {"min": min, "median": statistics.median}


def _stat(name: str):
    if name not in STATS:
        raise ValueError(f"--stat: {name!r} is not one of {list(STATS)}")
    return STATS[name]


def resolve_clock(clock: str, device: torch.device, threads: int | None) -> str:
    """"auto" -> "cpu" (thread CPU time) for single-threaded CPU timing, else "wall"."""
    if clock not in ("auto", "cpu", "wall"):
        raise ValueError(f"--clock: {clock!r} is not one of 'auto', 'cpu', 'wall'")
    if clock == "cpu" and (device.type != "cpu" or threads != 1):
        raise ValueError("--clock cpu needs --device cpu and --threads 1 (thread CPU time misses other threads)")
    if clock == "auto":
        return "cpu" if device.type == "cpu" and threads == 1 else "wall"
    return clock


def _timer(clock: str):
    return time.thread_time if clock == "cpu" else time.perf_counter


def time_call(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, stat: str = "median",
              clock: str = "wall", sync: Callable[[], None] = lambda: None) -> float:
    """Time (ms) of ``fn()``: the `stat` (min or median) of `repeats` timed calls after `warmup`
    untimed ones, on the "wall" or thread-"cpu" clock (`sync` waits for queued device work)."""
    now = _timer(clock)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        sync()
        times.append((now() - t0) * 1e3)
    return _stat(stat)(times)


def time_module(module: nn.Module, x: torch.Tensor, warmup: int = 3, repeats: int = 20, stat: str = "median",
                clock: str = "wall") -> float:
    """:func:`time_call` of ``module(x)`` in eval mode under no_grad."""
    module.eval()
    with torch.no_grad():
        return time_call(lambda: module(x), warmup, repeats, stat, clock,
                         torch.cuda.synchronize if x.is_cuda else (lambda: None))


def _ready_supernet(space: SearchSpace, bits: int, net: nn.Module | None, device: torch.device) -> nn.Module:
    if net is None:
        net = build_supernet(space, bits, impl="eager")
    net = net.to(device).eval()
    # Quantizers never used yet initialise on a first pass over the largest subnet.
    net.set_arch(space.largest(net.bits))
    with torch.no_grad():
        net(torch.randn(2, space.in_channels, max(space.resolutions), max(space.resolutions), device=device))
    return net


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({platform.system()})"


def build_table(space: SearchSpace, bits: int = 4, *, net: nn.Module | None = None,
                resolutions: Iterable[int] | None = None, batch_size: int = 1, threads: int | None = 1,
                warmup: int = 3, repeats: int = 20, device: str | torch.device = "cpu", stat: str = "median",
                clock: str = "auto", progress: bool = True) -> dict:
    """Measure every piece of `space` (at the given `resolutions`, default all) and return the table."""
    from tqdm import tqdm

    device = torch.device(device)
    _stat(stat)
    clock = resolve_clock(clock, device, threads)
    resolutions = sorted(set(resolutions)) if resolutions is not None else list(space.resolutions)
    bad = [r for r in resolutions if r not in space.resolutions]
    if bad:
        raise ValueError(f"--resolutions: {bad} not in the space's resolutions {list(space.resolutions)}")
    net = _ready_supernet(space, bits, net, device)
    # One representative arch per (resolution, kernel, expand) covers every piece: all slots use
    # the same kernel and expand ratio and every stage its maximum depth. Pieces are timed inside
    # the running subnet (not one by one in a tight loop, which keeps a single block's weights in
    # cache and underestimates the real chain by a factor of 2-3 on CPUs).
    archs = [Arch(ks=[k] * space.num_blocks, e=[e] * space.num_blocks,
                  d=[max(space.depth_choices)] * space.num_stages, r=r, bits=net.bits)
             for r in resolutions for k in space.kernel_choices for e in space.expand_choices]
    samples: dict[str, list[float]] = {}
    sums, whole = [], []
    agg = _stat(stat)
    with threads_set(threads if device.type == "cpu" else None):
        for arch in tqdm(archs, desc="latency table", unit="subnet", disable=None if progress else True):
            keys = [key for key, _ in pieces(space, arch)]
            sub = net.extract(arch).to(device)
            times = time_pieces(sub, arch, batch_size, warmup, repeats, clock)
            for key, ts in zip(keys, times):
                samples.setdefault(key, []).extend(ts)
            sums.append(sum(agg(ts) for ts in times))
            x = torch.randn(batch_size, space.in_channels, arch.r, arch.r, device=device)
            whole.append(time_module(sub, x, warmup, repeats, stat, clock))
    entries = {key: agg(ts) for key, ts in samples.items()}
    scale = statistics.median(w / p for w, p in zip(whole, sums))
    return {"format": FORMAT, "version": VERSION, "space": space.to_dict(), "bits": net.bits,
            "device": str(device), "device_name": device_description(device), "threads": threads,
            "batch_size": batch_size, "warmup": warmup, "repeats": repeats, "stat": stat, "clock": clock, "torch": torch.__version__,
            "resolutions": resolutions, "scale": scale, "entries": entries}


def subnet_pieces(sub: nn.Module) -> list[nn.Module]:
    """The modules of an extracted subnet in the order of :func:`pieces`."""
    return [sub.stem, sub.first_block, *sub.blocks, _Head(sub)]


def time_pieces(sub: nn.Module, arch: Arch, batch_size: int = 1, warmup: int = 3, repeats: int = 20,
                clock: str = "wall") -> list[list[float]]:
    """Per-piece times (ms) of `repeats` forward passes of the extracted subnet `sub`."""
    now = _timer(clock)
    sub.eval()
    mods = subnet_pieces(sub)
    device = next(sub.parameters()).device
    x = torch.randn(batch_size, sub.space.in_channels, arch.r, arch.r, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: list[list[float]] = [[] for _ in mods]
    with torch.no_grad():
        for i in range(warmup + repeats):
            h = x
            for j, m in enumerate(mods):
                sync()
                t0 = now()
                h = m(h)
                sync()
                if i >= warmup:
                    out[j].append((now() - t0) * 1e3)
    return out


def save_table(table: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in table.items() if k != "path"}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_table(path: str | Path, space: SearchSpace | None = None) -> dict:
    """Read a table; with `space`, check that it was built for that space (ValueError otherwise)."""
    path = Path(path)
    table = load_json(path, "latency table")
    if not isinstance(table, dict) or table.get("format") != FORMAT or "entries" not in table:
        raise ValueError(f"{path}: not an oqat latency table (no '{FORMAT}' format tag)")
    if table.get("version") != VERSION:
        raise ValueError(f"{path}: latency table version {table.get('version')!r} is not supported")
    if space is not None:
        mine = {k: v for k, v in space.to_dict().items() if k != "name"}
        theirs = {k: v for k, v in (table.get("space") or {}).items() if k != "name"}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{path}: latency table was built for another search space (differs in {diff})")
    table["path"] = str(path)
    return table


def measure_latency(net: nn.Module, arch: Arch, *, batch_size: int = 1, threads: int | None = 1, warmup: int = 3,
                    repeats: int = 20, device: str | torch.device = "cpu", stat: str = "median",
                    clock: str = "auto") -> float:
    """End-to-end latency (ms) of the extracted subnet `arch`."""
    device = torch.device(device)
    clock = resolve_clock(clock, device, threads)
    sub = net.extract(arch).to(device).eval()
    x = torch.randn(batch_size, net.space.in_channels, arch.r, arch.r, device=device)
    with threads_set(threads if device.type == "cpu" else None):
        return time_module(sub, x, warmup, repeats, stat, clock)


def check_table(table: dict, space: SearchSpace, n: int = 20, *, net: nn.Module | None = None, seed: int = 0,
                progress: bool = True, on_result: Callable[[Arch, float, float], None] | None = None) -> dict:
    """Predicted vs measured latency of `n` random subnets (at the table's resolutions)."""
    from tqdm import tqdm

    device = torch.device(table.get("device", "cpu"))
    net = _ready_supernet(space, int(table["bits"]), net, device)
    rng = random.Random(seed)
    rows = []
    for _ in tqdm(range(n), desc="latency check", unit="subnet", disable=None if progress else True):
        arch = space.sample(rng, net.bits, resolution=rng.choice(table["resolutions"]))
        pred = predict_latency(table, space, arch)
        meas = measure_latency(net, arch, batch_size=table["batch_size"], threads=table["threads"],
                               warmup=table["warmup"], repeats=table["repeats"], device=device,
                               stat=table.get("stat", "median"), clock=table.get("clock", "wall"))
        rows.append({"arch": arch.to_dict(), "predicted_ms": pred, "measured_ms": meas})
        if on_result:
            on_result(arch, pred, meas)
    errs = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
    bias = [(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
    return {"n": n, "mean_abs_rel_error": statistics.mean(errs), "max_abs_rel_error": max(errs),
            "mean_rel_bias": statistics.mean(bias),
            "kendall_tau": kendall_tau([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]),
            "subnets": rows}


__all__ = ["table_latency", "time_call", "build_table", "check_table", "load_table", "measure_latency", "pieces", "predict_latency",
           "save_table", "time_module"]
