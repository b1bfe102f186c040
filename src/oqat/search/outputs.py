"""Search results as files: Pareto fronts (CSV, JSON, PNG), the evaluated set, best-subnet JSONs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ..space import Arch, SearchSpace
from .budget import METRICS, CostModel
from .evolution import SearchResult


# ----------------------------------------------------------------------------- Pareto fronts
def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points not dominated by another (lower-or-equal cost and higher-or-equal
    accuracy, one of them strictly), sorted by increasing cost; of exact duplicates the first
    is kept."""
    if len(costs) != len(accuracies):
        raise ValueError(f"pareto_front: {len(costs)} costs but {len(accuracies)} accuracies")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i], i))
    front, best = [], -math.inf
    for i in order:
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return front


# ----------------------------------------------------------------------------- outputs
def _row(space: SearchSpace, arch: Arch, acc: float, costs: dict) -> dict:
    return {"accuracy": acc, **{m: costs[m] for m in METRICS if m in costs}, "depth": sum(arch.d), "r": arch.r,
            "bits": arch.bits, "arch": json.dumps(space.canonical(arch).to_dict(), separators=(",", ":"))}


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_pareto(out: Path, metric: str, space: SearchSpace, points: list[tuple[Arch, float]],
                 costs: CostModel, best: list[SearchResult] = (), title: str = "") -> list[dict]:
    """pareto_<metric>.csv/.json/.png: the front of accuracy vs `metric` over `points`."""
    values = [costs(a)[metric] for a, _ in points]
    accs = [acc for _, acc in points]
    idx = pareto_front(values, accs)
    rows = [_row(space, points[i][0], accs[i], costs(points[i][0])) for i in idx]
    write_csv(out / f"pareto_{metric}.csv", rows)
    (out / f"pareto_{metric}.json").write_text(json.dumps(
        [{"arch": points[i][0].to_dict(), "accuracy": accs[i], "cost": costs(points[i][0])} for i in idx], indent=1) + "\n")

    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    ax.scatter(values, accs, s=8, c="0.7", label=f"evaluated ({len(points)})")
    ax.plot([values[i] for i in idx], [accs[i] for i in idx], "o-", c="tab:blue", ms=4, drawstyle="steps-post",
            label="Pareto front")
    for r in best:
        if metric in r.costs:
            ax.scatter([r.costs[metric]], [r.accuracy], marker="*", s=120, zorder=5, label=f"best {r.budget.name}")
            for c in r.budget.constraints:
                if c.metric == metric:
                    ax.axvline(c.limit, ls="--", lw=0.8, c="0.4")
    ax.set_xlabel(metric)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or f"accuracy vs {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"pareto_{metric}.png", dpi=120)
    return rows


def write_search_outputs(out: str | Path, space: SearchSpace, results: list[SearchResult],
                         evaluated: list[tuple[Arch, float]], costs: CostModel, *,
                         pareto_metrics: Sequence[str] = ("macs",), meta: dict | None = None) -> dict:
    """best_<budget>.json (loadable by --arch), evaluated.csv, pareto_<metric>.* and search.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for r in results:
        path = out / f"best_{r.budget.name}.json"
        path.write_text(json.dumps({**r.to_dict(), "space": space.name, **(meta or {})}, indent=2) + "\n")
        files[r.budget.name] = str(path)
    write_csv(out / "evaluated.csv", [_row(space, a, acc, costs(a)) for a, acc in evaluated])
    for metric in pareto_metrics:
        write_pareto(out, metric, space, evaluated, costs, results)
    summary = {"space": space.name, **(meta or {}), "results": [r.to_dict() for r in results],
               "best_files": files, "evaluated": len(evaluated), "pareto_metrics": list(pareto_metrics)}
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["pareto_front", "write_csv", "write_pareto", "write_search_outputs"]
