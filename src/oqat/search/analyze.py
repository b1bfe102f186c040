"""The "quantization-friendly architecture" study: which subnets lose least when quantized?

:func:`analyze` measures the same N random subnets with every given supernet checkpoint (one per
bit-width, e.g. the 4-, 3- and 2-bit supernets of a bit-inheritance run), then relates accuracy
to cost and the accuracy *drop* (relative to the highest-bit checkpoint) to architecture factors:
total depth, mean expand ratio and mean kernel size of the active blocks, and input resolution.
It writes PNG figures, a CSV of every measurement and a Markdown summary whose statements are
computed (Kendall tau and Pearson correlation), not written by hand. "At equal compute" is
examined by correlating each factor with the accuracy residual after a linear fit on log MACs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..space import Arch, SearchSpace, cost
from ..utils.stats import kendall_tau, pearson
from .outputs import write_csv
from .predictor import sample_distinct

FACTORS = ("depth", "mean_expand", "mean_kernel", "resolution")
FACTOR_LABELS = {"depth": "total depth (blocks)", "mean_expand": "mean expand ratio",
                 "mean_kernel": "mean kernel size", "resolution": "input resolution (px)"}
FACTOR_NAMES = {"depth": "total depth", "mean_expand": "mean expand ratio", "mean_kernel": "mean kernel size",
                "resolution": "input resolution"}


def factors(space: SearchSpace, arch: Arch) -> dict:
    active = space.active_blocks(arch)
    return {"depth": sum(arch.d), "mean_expand": float(np.mean([arch.e[i] for i in active])),
            "mean_kernel": float(np.mean([arch.ks[i] for i in active])), "resolution": arch.r}


def _residual(values: Sequence[float], macs: Sequence[float]) -> np.ndarray:
    """`values` minus their least-squares linear fit on log(MACs)."""
    x = np.log(np.asarray(macs, dtype=np.float64))
    y = np.asarray(values, dtype=np.float64)
    if x.std() == 0:
        return y - y.mean()
    slope, intercept = np.polyfit(x, y, 1)
    return y - (slope * x + intercept)


def _strength(tau: float) -> str | None:
    if math.isnan(tau) or abs(tau) < 0.1:
        return None
    return "strongly " if abs(tau) >= 0.3 else ""


def _drop_trend(tau: float, what: str) -> str:
    s = _strength(tau)
    if s is None:
        return f"shows no clear trend with {what} (tau {tau:+.2f})"
    return f"{s}{'grows' if tau > 0 else 'shrinks'} with {what} (tau {tau:+.2f})"


def _equal_compute(tau: float, what: str) -> str:
    s = _strength(tau)
    if s is None:
        return f"{what} shows no clear effect (tau {tau:+.2f})"
    return f"more {what} gives {s}{'higher' if tau > 0 else 'lower'} accuracy (tau {tau:+.2f})"


def analyze(space: SearchSpace, accuracy_fns: dict[int, Callable[[list[Arch]], list[float]]], samples: int,
            out: str | Path, *, seed: int = 0, labels: dict[int, str] | None = None) -> dict:
    """Measure `samples` random subnets at each bit-width of `accuracy_fns` ({bits: fn}) and write
    samples.csv, acc_vs_macs.png, acc_vs_bitops.png, drop_vs_factors.png (two or more bit-widths),
    summary.md and summary.json into `out`."""
    if not accuracy_fns:
        raise ValueError("analyze: at least one checkpoint is required")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bits_list = sorted(accuracy_fns, reverse=True)
    ref_bits = bits_list[0]
    archs = sample_distinct(space, samples, ref_bits, seed)
    acc: dict[int, list[float]] = {}
    for b in bits_list:
        acc[b] = list(accuracy_fns[b]([a.replace(bits=b) for a in archs]))
    rows = []
    for i, a in enumerate(archs):
        row = {"arch": json.dumps(space.canonical(a).replace(bits=32).to_dict(), separators=(",", ":")),
               "macs": cost.macs(space, a), **factors(space, a)}
        for b in bits_list:
            row[f"acc_{b}bit"] = acc[b][i]
            row[f"bitops_{b}bit"] = cost.bitops(space, a.replace(bits=b))
            if b != ref_bits:
                row[f"drop_{b}bit"] = acc[ref_bits][i] - acc[b][i]
        rows.append(row)
    write_csv(out / "samples.csv", rows)
    summary = _summarise(rows, bits_list, labels or {})
    _plots(rows, bits_list, out, labels or {})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(_markdown(summary, space, samples, bits_list))
    return summary


def _summarise(rows: list[dict], bits_list: list[int], labels: dict[int, str]) -> dict:
    ref = bits_list[0]
    macs = [r["macs"] for r in rows]
    out: dict = {"reference_bits": ref, "bits": bits_list, "labels": {str(b): labels.get(b, f"{b}-bit") for b in bits_list},
                 "per_bits": {}, "drops": {}}
    for b in bits_list:
        a = [r[f"acc_{b}bit"] for r in rows]
        resid = _residual(a, macs)
        out["per_bits"][str(b)] = {
            "mean_acc": float(np.mean(a)), "min_acc": float(np.min(a)), "max_acc": float(np.max(a)),
            "tau_acc_macs": kendall_tau(a, macs),
            "tau_residual": {f: kendall_tau(resid, [r[f] for r in rows]) for f in FACTORS},
        }
    for b in bits_list[1:]:
        d = [r[f"drop_{b}bit"] for r in rows]
        out["drops"][str(b)] = {
            "mean_drop": float(np.mean(d)), "max_drop": float(np.max(d)), "min_drop": float(np.min(d)),
            "tau": {f: kendall_tau(d, [r[f] for r in rows]) for f in FACTORS + ("macs",)},
            "pearson": {f: pearson(d, [r[f] for r in rows]) for f in FACTORS + ("macs",)},
        }
    return out


def _markdown(summary: dict, space: SearchSpace, samples: int, bits_list: list[int]) -> str:
    lab = summary["labels"]
    lines = [f"# Quantization-friendliness analysis ({space.name}, {samples} random subnets)", ""]
    lines += ["| checkpoint | mean top-1 | min | max | tau(acc, MACs) |", "|---|---|---|---|---|"]
    for b in bits_list:
        p = summary["per_bits"][str(b)]
        lines.append(f"| {lab[str(b)]} | {p['mean_acc']:.2f} | {p['min_acc']:.2f} | {p['max_acc']:.2f} | "
                     f"{p['tau_acc_macs']:+.2f} |")
    if summary["drops"]:
        ref = lab[str(summary["reference_bits"])]
        lines += ["", f"## Accuracy drop versus {ref}", "",
                  "| checkpoint | mean drop | " + " | ".join(f"tau({f})" for f in FACTORS + ("macs",)) + " |",
                  "|---|---|" + "---|" * (len(FACTORS) + 1)]
        for b, d in summary["drops"].items():
            lines.append(f"| {lab[b]} | {d['mean_drop']:.2f} | "
                         + " | ".join(f"{d['tau'][f]:+.2f}" for f in FACTORS + ("macs",)) + " |")
        lines += ["", "Trends (Kendall tau of the drop with each factor; |tau| < 0.1 counts as no trend, "
                  "|tau| >= 0.3 as strong):", ""]
        for b, d in summary["drops"].items():
            for f in FACTORS:
                lines.append(f"- {lab[b]}: the drop " + _drop_trend(d["tau"][f], FACTOR_NAMES[f]))
    lines += ["", "## At equal compute", "",
              "Kendall tau between each factor and the accuracy residual after a linear fit of accuracy on "
              "log MACs (tau > 0: at equal MACs, more of the factor is better):", "",
              "| checkpoint | " + " | ".join(FACTORS) + " |", "|---|" + "---|" * len(FACTORS)]
    for b in bits_list:
        t = summary["per_bits"][str(b)]["tau_residual"]
        lines.append(f"| {lab[str(b)]} | " + " | ".join(f"{t[f]:+.2f}" for f in FACTORS) + " |")
    lowest = str(bits_list[-1])
    t = summary["per_bits"][lowest]["tau_residual"]
    lines += ["", f"At {lab[lowest]} and equal MACs: " + _equal_compute(t["depth"], "depth") + "; "
              + _equal_compute(t["resolution"], "input resolution") + ".", "",
              "Figures: acc_vs_macs.png, acc_vs_bitops.png" + (", drop_vs_factors.png" if summary["drops"] else "")
              + "; data: samples.csv.", ""]
    return "\n".join(lines)


def _plots(rows: list[dict], bits_list: list[int], out: Path, labels: dict[int, str]) -> None:

    label = lambda b: labels.get(b, f"{b}-bit")  # noqa: E731
    for xkey, fname, xlabel in (("macs", "acc_vs_macs.png", "MACs"), ("bitops", "acc_vs_bitops.png", "BitOPs")):
        fig = Figure(figsize=(6, 4.2))
        ax = fig.subplots()
        for b in bits_list:
            xs = [r["macs"] if xkey == "macs" else r[f"bitops_{b}bit"] for r in rows]
            ax.scatter(xs, [r[f"acc_{b}bit"] for r in rows], s=10, label=label(b))
        if xkey == "bitops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"accuracy vs {xlabel} per bit-width")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
    if len(bits_list) < 2:
        return
    fig = Figure(figsize=(9, 7))
    axes = fig.subplots(2, 2)
    for ax, f in zip(axes.flat, FACTORS):
        for b in bits_list[1:]:
            xs = [r[f] for r in rows]
            ys = [r[f"drop_{b}bit"] for r in rows]
            ax.scatter(xs, ys, s=10, alpha=0.7, label=f"{label(b)} (tau {kendall_tau(ys, xs):+.2f})")
        ax.set_xlabel(FACTOR_LABELS[f])
        ax.set_ylabel(f"drop vs {label(bits_list[0])} (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("accuracy drop against architecture factors")
    fig.tight_layout()
    fig.savefig(out / "drop_vs_factors.png", dpi=120)


__all__ = ["FACTORS", "analyze", "factors"]
