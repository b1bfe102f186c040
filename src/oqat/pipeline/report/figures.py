"""The report's figures: accuracy-versus-cost fronts of every bit-width and the training curves,
drawn on matplotlib Figures (no pyplot state, no backend switch) into PNG files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ...search import pareto_front
from ...utils.fmt import si

# ============================================================================ figures
_COLORS = {4: "tab:blue", 3: "tab:green", 2: "tab:red", 5: "tab:purple", 6: "tab:brown", 8: "tab:gray"}



def read_points(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: (float(v) if k in ("accuracy", "macs", "bitops", "params", "size_bits", "oqa_flops") else v)
                 for k, v in row.items()} for row in csv.DictReader(fh)]



def pareto_figure(out: Path, metric: str, series: dict[int, list[dict]], chosen: dict[int, list],
                  baseline, label: str) -> None:
    """Accuracy vs `metric`: every measured subnet, the front per bit-width, chosen subnets, the baseline."""

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for bits in sorted(series, reverse=True):
        pts = series[bits]
        if not pts:
            continue
        c = _COLORS.get(bits, None)
        xs, ys = [p[metric] for p in pts], [p["accuracy"] for p in pts]
        ax.scatter(xs, ys, s=10, color=c, alpha=0.25, linewidths=0)
        idx = pareto_front(xs, ys)
        ax.plot([xs[i] for i in idx], [ys[i] for i in idx], "o-", color=c, ms=3.5, lw=1.4, drawstyle="steps-post",
                label=f"{bits}-bit front ({len(pts)} subnets)")
        for ch in chosen.get(bits, []):
            ax.scatter([ch.costs[metric]], [ch.holdout_top1], marker="*", s=140, color=c, edgecolors="black",
                       linewidths=0.6, zorder=5)
    if baseline is not None:
        ax.scatter([baseline.costs[metric]], [baseline.holdout_top1], marker="X", s=110, color="black",
                   zorder=6, label=f"baseline {baseline.name} ({baseline.arch['bits']}-bit, alone)")
    ax.scatter([], [], marker="*", s=110, color="white", edgecolors="black", label="chosen subnets")
    if metric == "bitops":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: si(v, 2) if str(v)[0] in "2357" else ""))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v, 3)))
    ax.tick_params(axis="x", which="both", labelsize=7.5)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"Accuracy vs {label}, every bit-width")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)



def training_figure(out: Path, curves: dict[str, list[tuple[float, float]]]) -> bool:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    offset = 0.0
    for name, pts in curves.items():
        if name == "baseline":  # trained alone from scratch: drawn from 0 for comparison
            ax.plot([x for x, _ in pts], [y for _, y in pts], "--", c="black", lw=1.0, label="baseline (alone)")
            continue
        xs = [offset + x for x, _ in pts]
        ax.plot(xs, [y for _, y in pts], lw=1.2, label=name)
        offset = xs[-1]
    ax.set_xlabel("epochs (OQAT stages one after the other)")
    ax.set_ylabel("training loss of the largest subnet")
    ax.set_title("Training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True



def read_curve(metrics: Path) -> list[tuple[float, float]]:
    pts = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss_largest" in r and r.get("loss_largest") is not None:
                pts.append((float(r["epoch"]), float(r["loss_largest"])))
    pts.sort()
    return pts


__all__ = ["pareto_figure", "read_curve", "read_points", "training_figure"]
