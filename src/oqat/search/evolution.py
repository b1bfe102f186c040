"""Evolutionary search (OFA's EvolutionFinder scheme) for the most accurate subnet under a budget.

Population of feasible subnets, the best ``parent_ratio`` kept each generation, children by
mutation and crossover, every candidate checked against the budget; accuracy comes from an
:class:`~oqat.search.accuracy.AccuracyFn`. The same seed gives the same search on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..space import Arch, SearchSpace
from .accuracy import AccuracyFn, is_main_process
from .budget import Budget, CostModel, check_budget_feasible

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the search
class SearchConfigError(ValueError):
    """A search setting out of range; `field` names it so callers can say which key or flag."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


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
            raise SearchConfigError("population", f"need at least 2, got {self.population}")
        if self.generations < 0:
            raise SearchConfigError("generations", f"must be >= 0, got {self.generations}")
        for name in ("parent_ratio", "mutation_ratio", "mutate_prob"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise SearchConfigError(name, f"must lie in (0, 1], got {v}")
        if self.parent_ratio + self.mutation_ratio > 1:
            raise SearchConfigError("mutation_ratio", f"parent_ratio + mutation_ratio must be <= 1, got "
                                                      f"{self.parent_ratio + self.mutation_ratio}")

    @classmethod
    def build(cls, where: str = "", *, flags: bool = False, **settings) -> "SearchConfig":
        """``SearchConfig(**settings)`` whose errors name the key as ``<where>.<field>``, or as the
        command-line flag ``--<field-with-dashes>`` with `flags`."""
        try:
            return cls(**settings)
        except SearchConfigError as exc:
            key = f"--{exc.field.replace('_', '-')}" if flags else ".".join(x for x in (where, exc.field) if x)
            raise ValueError(f"{key}: {exc.message}") from None

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
    finalists: list[tuple[Arch, float]] = field(default_factory=list)   # re-measured: (arch, acc on more images)

    def to_dict(self) -> dict:
        out = {"arch": self.arch.to_dict(), "accuracy": self.accuracy, "budget": self.budget.to_dict(),
               "cost": self.costs, "evaluations": self.evaluations, "history": self.history}
        if self.finalists:
            out["finalists"] = [{"arch": a.to_dict(), "accuracy": acc} for a, acc in self.finalists]
        return out


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
            seen.setdefault(self.space.key(a), (a, acc))
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
    """(arch, accuracy) pairs with each network once (its first occurrence), by ``SearchSpace.key``."""
    seen: dict[str, tuple[Arch, float]] = {}
    for arch, acc in pairs:
        seen.setdefault(space.key(arch), (arch, acc))
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


def rerank_finalists(space: SearchSpace, results: list[SearchResult], measured: Sequence[tuple[Arch, float]],
                     accuracy: AccuracyFn, costs: CostModel, finalists: int) -> list[SearchResult]:
    """Each budget's choice decided again among its `finalists` most accurate measured subnets, by
    `accuracy` (the same measurement on more images).

    The search scores each candidate on a small sample, and the best score of many near-equal
    subnets is mostly that sample's luck (a 1500-image sample cannot tell apart subnets a point
    apart on the test split). Re-measuring only the few best is cheap and removes most of that
    luck. The first finalist is the search's own choice; ties keep the earlier one. The result's
    `accuracy` becomes the re-measured figure; `history` and `candidates` stay the search's own.
    """
    if finalists < 1:
        raise ValueError(f"finalists: need at least 1, got {finalists}")
    pools = []
    for r in results:
        ranked = sorted((p for p in measured if r.budget.satisfied(costs(p[0]))), key=lambda p: -p[1])
        others = [a for a, _ in ranked if space.key(a) != space.key(r.arch)]
        pools.append([r.arch] + others[:finalists - 1])
    unique = {space.key(a): a for pool in pools for a in pool}
    fine = dict(zip(unique, accuracy(list(unique.values()))))
    out = []
    for r, pool in zip(results, pools):
        best = max(pool, key=lambda a: fine[space.key(a)])  # max keeps the first of equal ones
        out.append(dataclasses.replace(r, arch=best, accuracy=fine[space.key(best)], costs=costs(best),
                                       finalists=[(a, fine[space.key(a)]) for a in pool]))
    return out


def search_budgets(space: SearchSpace, bits: int, accuracy: AccuracyFn, costs: CostModel, budgets: Sequence[Budget],
                   config: SearchConfig, *, measured_before: Sequence[tuple[Arch, float]] = (),
                   progress: bool = True) -> tuple[list[SearchResult], list[tuple[Arch, float]]]:
    """The search of ``oqat search`` and of the pipeline: one evolutionary search per budget
    (all checked feasible first), then each budget's choice is the best subnet measured at this
    bit-width that fits it (:func:`best_of_measured`, over every budget's candidates and
    `measured_before`, e.g. the largest and smallest subnets).

    Returns (results, every distinct (arch, accuracy) measured).
    """
    for b in budgets:
        check_budget_feasible(b, space, costs, bits)
    search = EvolutionSearch(space, bits, accuracy, costs, config)
    results = []
    for b in budgets:
        r = search.run(b, progress=progress)
        log.info("budget %s: best top-1 %.2f%% after %d distinct subnets", b.name, r.accuracy, r.evaluations)
        results.append(r)
    evaluated = distinct_measured(space, list(measured_before) + [p for r in results for p in r.candidates])
    return best_of_measured(results, evaluated, costs), evaluated


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
        k = space.key(a)
        if k in picked:
            stall += 1
            continue
        picked[k] = a
    archs = list(picked.values())
    accs: list[float] = []
    for i in range(0, len(archs), batch):
        accs += list(accuracy(archs[i:i + batch]))
    for a, acc in zip(archs, accs):
        seen[space.key(a)] = (a, acc)
    best = max(range(len(archs)), key=lambda i: (accs[i], -i))
    history = [max(accs[: i + 1]) for i in range(len(accs))]
    return SearchResult(budget, archs[best], accs[best], costs(archs[best]), history, len(archs), list(seen.values()))


__all__ = ["best_of_measured", "distinct_measured", "EvolutionSearch", "random_search", "rerank_finalists", "search_budgets", "SearchConfig",
           "SearchResult"]
