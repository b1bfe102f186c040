"""Evolutionary architecture search under cost budgets, evaluation cache, Pareto fronts.

The search maximises accuracy under a *budget*: one or more upper limits on the cost metrics
``macs``, ``bitops``, ``oqa_flops``, ``params``, ``size_bits`` (analytic, :mod:`oqat.cost`) and
``latency_ms`` (a latency lookup table, :mod:`oqat.latency`). It follows the scheme of OFA's
evolution finder:

1. an initial population of ``population`` feasible subnets drawn by rejection sampling;
2. each generation keeps the best ``parent_ratio`` of the population as parents, adds
   ``mutation_ratio * population`` children made by mutating random parents (each gene
   resampled with ``mutate_prob``) and fills the rest with uniform crossovers of two random
   parents; a child that breaks the budget is redrawn (rejection sampling);
3. after ``generations`` generations the best subnet ever evaluated is returned.

Everything random flows from one seed, so a search is reproducible (and identical on every
rank of a distributed job). Accuracy comes from an *accuracy function* -- anything callable as
``list[Arch] -> list[float]`` (:class:`AccuracyFn`): direct measurement
(:class:`oqat.evaluate.DirectAccuracy`) or the predictor (:class:`oqat.predictor.PredictorAccuracy`).
:class:`CachedAccuracy` keys results by the canonical architecture (unused slots normalised),
so no subnet is measured twice, and can persist them to a JSONL file that later runs reuse.
:class:`DistributedAccuracy` spreads the measurements of a batch over torchrun ranks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import cost
from .space import Arch, SearchSpace

log = logging.getLogger(__name__)

METRICS = ("macs", "bitops", "oqa_flops", "params", "size_bits", "latency_ms")
_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


# ----------------------------------------------------------------------------- budgets
def parse_number(text: str, where: str = "value") -> float:
    """``"5M"`` -> 5e6, ``"1.5G"`` -> 1.5e9, ``"3e6"`` -> 3e6 (decimal suffixes k/K, M, G, T)."""
    t = text.strip()
    scale = 1.0
    if t and t[-1] in _SUFFIX:
        scale, t = _SUFFIX[t[-1]], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number (e.g. 5e6, 5M, 1.2G)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {text!r} must be a positive number")
    return value


@dataclass(frozen=True)
class Constraint:
    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"budget metric {self.metric!r} is unknown; use one of {list(METRICS)}")

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit:g}"


@dataclass(frozen=True)
class Budget:
    """Upper limits on one or more cost metrics (all must hold)."""

    constraints: tuple[Constraint, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.constraints:
            raise ValueError("budget: at least one constraint is required")
        metrics = [c.metric for c in self.constraints]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"budget {self.name or self}: a metric appears twice ({metrics})")
        if not self.name:
            object.__setattr__(self, "name", "_".join(f"{c.metric}{c.limit:g}" for c in self.constraints))

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``"macs=5M"``, ``"macs<=5M,bitops<=200M"``; an optional ``"NAME:"`` prefix names it."""
        name = ""
        body = text
        if ":" in text:
            name, body = text.split(":", 1)
            name = name.strip()
        constraints = []
        for part in body.split(","):
            part = part.strip()
            m = re.fullmatch(r"([a-z_]+)\s*(<=|=|<)\s*(\S+)", part)
            if not m:
                raise ValueError(f"--budget {text!r}: cannot read {part!r}; expected METRIC=VALUE "
                                 f"(e.g. macs=5M or bitops<=1.2G) with METRIC in {list(METRICS)}")
            metric, _, value = m.groups()
            if metric not in METRICS:
                raise ValueError(f"--budget {text!r}: metric {metric!r} is unknown; use one of {list(METRICS)}")
            constraints.append(Constraint(metric, parse_number(value, f"--budget {text!r}")))
        if not name:
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", body).strip("_")
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise ValueError(f"--budget {text!r}: name {name!r} may only contain letters, digits and . _ + -")
        return cls(tuple(constraints), name)

    @property
    def metrics(self) -> list[str]:
        return [c.metric for c in self.constraints]

    def satisfied(self, costs: dict) -> bool:
        return all(costs[c.metric] <= c.limit for c in self.constraints)

    def violations(self, costs: dict) -> list[str]:
        return [f"{c.metric} {costs[c.metric]:g} > {c.limit:g}" for c in self.constraints if costs[c.metric] > c.limit]

    def to_dict(self) -> dict:
        return {"name": self.name, "constraints": {c.metric: c.limit for c in self.constraints}}

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(str(c) for c in self.constraints)})"


def arch_key(space: SearchSpace, arch: Arch) -> str:
    """The canonical architecture (unused slots normalised, bits included) as a compact JSON key."""
    return json.dumps(space.canonical(arch).to_dict(), sort_keys=True, separators=(",", ":"))


class CostModel:
    """All cost metrics of an arch (analytic, plus latency when a table is given), memoised."""

    def __init__(self, space: SearchSpace, latency_table: dict | None = None):
        self.space = space
        self.latency_table = latency_table
        self._memo: dict[str, dict] = {}

    def __call__(self, arch: Arch) -> dict:
        key = arch_key(self.space, arch)
        out = self._memo.get(key)
        if out is None:
            out = cost.summary(self.space, arch)
            if self.latency_table is not None:
                from .latency import predict_latency

                out["latency_ms"] = predict_latency(self.latency_table, self.space, arch)
            self._memo[key] = out
        return out

    def check(self, budget: Budget) -> None:
        if "latency_ms" in budget.metrics and self.latency_table is None:
            raise ValueError(f"budget {budget.name}: latency_ms needs a latency table (--latency-table FILE)")


def check_budget_feasible(budget: Budget, space: SearchSpace, costs: CostModel, bits: int) -> None:
    """ValueError naming the budget if even the smallest subnet breaks it."""
    costs.check(budget)
    smallest = space.smallest(bits)
    c = costs(smallest)
    if not budget.satisfied(c):
        raise ValueError(f"budget {budget.name} is impossible: the smallest {bits}-bit subnet already has "
                         f"{'; '.join(budget.violations(c))}")


# ----------------------------------------------------------------------------- accuracy sources
class AccuracyFn(Protocol):
    """Anything that maps architectures to accuracies (higher is better), in order."""

    def __call__(self, archs: list[Arch]) -> list[float]: ...


class CachedAccuracy:
    """Memoises an AccuracyFn by canonical arch; optionally persists results as JSONL.

    Each line of the file is ``{"key", "arch", "accuracy", "context"}``; lines whose context
    differs from this run's (another checkpoint, split or calibration setting) are ignored, so
    one file can collect the measurements of several checkpoints. `calls` counts requested
    archs, `misses` the ones passed to the wrapped function. Only rank 0 writes the file.
    """

    def __init__(self, fn: AccuracyFn, space: SearchSpace, path: str | Path | None = None,
                 context: dict | None = None):
        self.fn, self.space = fn, space
        self.path = Path(path) if path else None
        self.context = context or {}
        self.values: dict[str, float] = {}
        self.archs: dict[str, Arch] = {}
        self.calls = 0
        self.misses = 0
        self.loaded = 0
        if self.path and self.path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        ignored = 0
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                arch = Arch.from_dict(row["arch"])
                acc = float(row["accuracy"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                if i == len(lines):  # a run interrupted while writing its last line
                    log.warning("%s:%d: ignoring a truncated last line", self.path, i)
                    continue
                raise ValueError(f"{self.path}:{i}: not a valid cache line ({exc})") from None
            if row.get("context", {}) != self.context:
                ignored += 1
                continue
            key = arch_key(self.space, arch)
            self.values[key], self.archs[key] = acc, arch
        self.loaded = len(self.values)
        log.info("cache %s: %d measurements reused, %d from other runs ignored", self.path, self.loaded, ignored)

    def __contains__(self, arch: Arch) -> bool:
        return arch_key(self.space, arch) in self.values

    def __call__(self, archs: list[Arch]) -> list[float]:
        keys = [arch_key(self.space, a) for a in archs]
        self.calls += len(archs)
        todo: dict[str, Arch] = {}
        for k, a in zip(keys, archs):
            if k not in self.values and k not in todo:
                todo[k] = a
        if todo:
            new = list(self.fn(list(todo.values())))
            if len(new) != len(todo):
                raise RuntimeError(f"accuracy function returned {len(new)} values for {len(todo)} archs")
            self.misses += len(todo)
            rows = []
            for (k, a), acc in zip(todo.items(), new):
                self.values[k], self.archs[k] = float(acc), a
                rows.append(json.dumps({"key": k, "arch": a.to_dict(), "accuracy": float(acc), "context": self.context}))
            if self.path and is_main_process():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as fh:
                    fh.write("\n".join(rows) + "\n")
        return [self.values[k] for k in keys]

    def items(self) -> list[tuple[Arch, float]]:
        return [(self.archs[k], self.values[k]) for k in self.values]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    d = _dist()
    return d is None or d.get_rank() == 0


class DistributedAccuracy:
    """Spread a batch of archs over torch.distributed ranks (rank i measures archs i, i+W, ...);
    the results are all-gathered so every rank returns the full, identical list."""

    def __init__(self, fn: AccuracyFn):
        self.fn = fn

    def __call__(self, archs: list[Arch]) -> list[float]:
        d = _dist()
        if d is None or d.get_world_size() == 1:
            return list(self.fn(archs))
        rank, world = d.get_rank(), d.get_world_size()
        mine = list(self.fn(archs[rank::world])) if archs[rank::world] else []
        gathered: list[Any] = [None] * world
        d.all_gather_object(gathered, mine)
        out = [0.0] * len(archs)
        for r, values in enumerate(gathered):
            for j, v in enumerate(values):
                out[r + j * world] = float(v)
        return out


# ----------------------------------------------------------------------------- the search
@dataclass
class SearchConfig:
    population: int = 64
    generations: int = 20
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    max_tries: int = 5000        # rejection-sampling attempts per candidate before a fallback
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ValueError(f"--population: need at least 2, got {self.population}")
        if self.generations < 0:
            raise ValueError(f"--generations: must be >= 0, got {self.generations}")
        for name in ("parent_ratio", "mutation_ratio", "mutate_prob"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"--{name.replace('_', '-')}: must lie in (0, 1], got {v}")
        if self.parent_ratio + self.mutation_ratio > 1:
            raise ValueError(f"--parent-ratio + --mutation-ratio must be <= 1, got {self.parent_ratio + self.mutation_ratio}")

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class SearchResult:
    budget: Budget
    arch: Arch
    accuracy: float
    costs: dict
    history: list[float] = field(default_factory=list)   # best accuracy after each generation
    evaluations: int = 0                                   # distinct archs measured for this budget
    candidates: list[tuple[Arch, float]] = field(default_factory=list)  # every (arch, acc) seen

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "accuracy": self.accuracy, "budget": self.budget.to_dict(),
                "cost": self.costs, "evaluations": self.evaluations, "history": self.history}


class _Feasible:
    """Rejection sampling of subnets that satisfy a budget."""

    def __init__(self, space: SearchSpace, bits: int, costs: CostModel, budget: Budget, max_tries: int):
        self.space, self.bits, self.costs, self.budget, self.max_tries = space, bits, costs, budget, max_tries

    def ok(self, arch: Arch) -> bool:
        return self.budget.satisfied(self.costs(arch))

    def sample(self, rng: random.Random, prob: float) -> Arch:
        for _ in range(self.max_tries):
            arch = self.space.sample(rng, self.bits)
            if self.ok(arch):
                return arch
        # Tight budget: uniform samples almost never fit; grow from the smallest subnet instead.
        smallest = self.space.smallest(self.bits)
        for _ in range(self.max_tries):
            arch = self.space.mutate(smallest, rng, prob)
            if self.ok(arch):
                return arch
        return smallest

    def mutate(self, parent: Arch, rng: random.Random, prob: float) -> Arch:
        for _ in range(self.max_tries):
            child = self.space.mutate(parent, rng, prob)
            if self.ok(child):
                return child
        return parent

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        for _ in range(self.max_tries):
            child = self.space.crossover(a, b, rng)
            if self.ok(child):
                return child
        return a


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="gen", disable=None if is_main_process() else True, leave=False)


def _seeded_rng(seed: int, budget: Budget) -> random.Random:
    return random.Random(f"{seed}/{budget.name}")


class EvolutionSearch:
    """OFA-style evolutionary search of `space` at `bits` (see the module docstring)."""

    def __init__(self, space: SearchSpace, bits: int, accuracy: AccuracyFn, costs: CostModel | None = None,
                 config: SearchConfig | None = None):
        self.space, self.bits = space, bits
        self.accuracy = accuracy
        self.costs = costs or CostModel(space)
        self.config = config or SearchConfig()

    def _measure(self, archs: list[Arch], seen: dict[str, tuple[Arch, float]]) -> list[float]:
        accs = list(self.accuracy(archs))
        for a, acc in zip(archs, accs):
            seen.setdefault(arch_key(self.space, a), (a, acc))
        return accs

    def run(self, budget: Budget, progress: bool = True) -> SearchResult:
        cfg = self.config
        check_budget_feasible(budget, self.space, self.costs, self.bits)
        rng = _seeded_rng(cfg.seed, budget)
        feasible = _Feasible(self.space, self.bits, self.costs, budget, cfg.max_tries)
        n_parents = max(1, int(round(cfg.parent_ratio * cfg.population)))
        n_mutate = int(round(cfg.mutation_ratio * cfg.population))
        n_cross = max(0, cfg.population - n_parents - n_mutate)
        seen: dict[str, tuple[Arch, float]] = {}

        population = [feasible.sample(rng, cfg.mutate_prob) for _ in range(cfg.population)]
        accs = self._measure(population, seen)
        best_i = max(range(len(population)), key=lambda i: (accs[i], -i))
        best_arch, best_acc = population[best_i], accs[best_i]
        history = [best_acc]
        bar = _progress(cfg.generations, f"search {budget.name}") if progress else None
        for _ in range(cfg.generations):
            order = sorted(range(len(population)), key=lambda i: -accs[i])  # stable: ties keep order
            parents = [population[i] for i in order[:n_parents]]
            parent_accs = [accs[i] for i in order[:n_parents]]
            children = [feasible.mutate(rng.choice(parents), rng, cfg.mutate_prob) for _ in range(n_mutate)]
            children += [feasible.crossover(rng.choice(parents), rng.choice(parents), rng) for _ in range(n_cross)]
            child_accs = self._measure(children, seen)
            population, accs = parents + children, parent_accs + child_accs
            for a, acc in zip(children, child_accs):
                if acc > best_acc:
                    best_arch, best_acc = a, acc
            history.append(best_acc)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{best_acc:.2f}", evals=len(seen))
        if bar is not None:
            bar.close()
        return SearchResult(budget, best_arch, best_acc, self.costs(best_arch), history, len(seen), list(seen.values()))


def distinct_measured(space: SearchSpace, pairs: Iterable[tuple[Arch, float]]) -> list[tuple[Arch, float]]:
    """(arch, accuracy) pairs with each network once (its first occurrence), by `arch_key`."""
    seen: dict[str, tuple[Arch, float]] = {}
    for arch, acc in pairs:
        seen.setdefault(arch_key(space, arch), (arch, acc))
    return list(seen.values())


def best_of_measured(results: list[SearchResult], measured: Sequence[tuple[Arch, float]],
                     costs: CostModel) -> list[SearchResult]:
    """Each result's choice replaced by the most accurate of `measured` that fits its budget.

    Searches under several budgets measure many subnets that fit more than one of them, and with
    the same accuracy function a subnet found by one budget's search (or measured beforehand, like
    the largest and smallest) is as good a choice for any budget it fits as the search's own best.
    Ties keep the search's own choice; `evaluations` and `history` stay the search's own.
    """
    out = []
    for r in results:
        for arch, acc in measured:
            if acc > r.accuracy and r.budget.satisfied(costs(arch)):
                r = dataclasses.replace(r, arch=arch, accuracy=acc, costs=costs(arch))
        out.append(r)
    return out


def random_search(space: SearchSpace, bits: int, accuracy: AccuracyFn, budget: Budget, evaluations: int, *,
                  costs: CostModel | None = None, seed: int = 0, max_tries: int = 5000,
                  batch: int = 64) -> SearchResult:
    """Baseline: the best of `evaluations` distinct feasible subnets drawn uniformly at random."""
    costs = costs or CostModel(space)
    check_budget_feasible(budget, space, costs, bits)
    rng = random.Random(f"random/{seed}/{budget.name}")
    feasible = _Feasible(space, bits, costs, budget, max_tries)
    seen: dict[str, tuple[Arch, float]] = {}
    picked: dict[str, Arch] = {}
    stall = 0
    while len(picked) < evaluations and stall < max_tries:
        a = feasible.sample(rng, 0.1)
        k = arch_key(space, a)
        if k in picked:
            stall += 1
            continue
        picked[k] = a
    archs = list(picked.values())
    accs: list[float] = []
    for i in range(0, len(archs), batch):
        accs += list(accuracy(archs[i:i + batch]))
    for a, acc in zip(archs, accs):
        seen[arch_key(space, a)] = (a, acc)
    best = max(range(len(archs)), key=lambda i: (accs[i], -i))
    history = [max(accs[: i + 1]) for i in range(len(accs))]
    return SearchResult(budget, archs[best], accs[best], costs(archs[best]), history, len(archs), list(seen.values()))


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
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
    plt.close(fig)
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


__all__ = ["AccuracyFn", "Budget", "CachedAccuracy", "Constraint", "CostModel", "DistributedAccuracy",
           "EvolutionSearch", "METRICS", "SearchConfig", "SearchResult", "arch_key", "best_of_measured",
           "check_budget_feasible", "distinct_measured", "is_main_process", "pareto_front", "parse_number", "random_search", "write_pareto",
           "write_search_outputs"]
