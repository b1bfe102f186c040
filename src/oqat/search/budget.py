"""Cost budgets: metrics, ``[NAME:]metric=value`` budgets, and the cost model that checks them."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..space import Arch, SearchSpace, cost

METRICS = ("macs", "bitops", "oqa_flops", "params", "size_bits", "latency_ms")


_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


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


def _limit(metric: str, value: object, where: str, space: SearchSpace | None, bits: int | None) -> float:
    """A budget limit from a number, ``"5M"`` or ``"40%"`` (of the way from the smallest to the
    largest subnet's cost at `bits` bit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: {metric}: expected a number or a string such as 5M or 40%, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {metric}: must be a positive number, got {value!r}")
        return float(value)
    text = value.strip()
    if not text.endswith("%"):
        return parse_number(text, f"{where}: {metric}")
    try:
        p = float(text[:-1])
    except ValueError:
        raise ValueError(f"{where}: {metric}: {value!r} is not a percentage") from None
    if not 0 <= p <= 100:
        raise ValueError(f"{where}: {metric}: {value!r} must lie in 0%..100%")
    if space is None or bits is None or metric == "latency_ms":
        raise ValueError(f"{where}: {metric}: a percentage needs the search space and bit-width "
                         f"(and a cost metric other than latency_ms); give an absolute value")
    lo, hi = (cost.summary(space, a)[metric] for a in (space.smallest(bits), space.largest(bits)))
    return lo + p / 100.0 * (hi - lo)


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
    def parse(cls, spec: str | dict, *, where: str | None = None, space: SearchSpace | None = None,
              bits: int | None = None) -> "Budget":
        """A budget from ``"[NAME:]metric=value[,...]"`` or ``{name: ..., metric: value, ...}``.

        Values are numbers with optional decimal suffixes (5M, 1.2G), or percentages: ``40%``
        means the smallest subnet's cost plus 40% of the way to the largest one's, which needs
        the `space` and `bits`. Errors name `where` (default: the spec itself).
        """
        where = where or f"budget {spec!r}"
        name = ""
        items: list[tuple[str, object]] = []
        if isinstance(spec, str):
            body = spec
            if ":" in spec:
                name, body = (t.strip() for t in spec.split(":", 1))
            for part in body.split(","):
                m = re.fullmatch(r"\s*([a-z_]+)\s*(?:<=|=|<)\s*(\S+)\s*", part)
                if not m:
                    raise ValueError(f"{where}: cannot read {part.strip()!r}; expected METRIC=VALUE (e.g. macs=5M, "
                                     f"bitops<=1.2G or bitops=40%) with METRIC in {list(METRICS)}")
                items.append(m.groups())
            derived = body
        elif isinstance(spec, dict):
            items = [(k, v) for k, v in spec.items() if k != "name"]
            name = str(spec.get("name") or "")
            if not items:
                raise ValueError(f"{where}: a budget needs at least one limit, e.g. {{name: small, macs: 5M}}")
            derived = "_".join(f"{k}{v}" for k, v in items)
        else:
            raise ValueError(f"{where}: expected a string like 'macs=5M' or a mapping, got {spec!r}")
        name = name or re.sub(r"[^A-Za-z0-9.+-]+", "_", derived).strip("_")  # a derived name is made safe
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise ValueError(f"{where}: budget name {name!r} may only contain letters, digits and . _ + -")
        constraints = []
        for metric, value in items:
            if metric not in METRICS:
                raise ValueError(f"{where}: metric {metric!r} is unknown; use one of {list(METRICS)}")
            constraints.append(Constraint(metric, _limit(metric, value, where, space, bits)))
        try:
            return cls(tuple(constraints), name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

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


class CostModel:
    """All cost metrics of an arch (analytic, plus ``latency_ms`` from `latency` when given), memoised.

    `latency` maps an arch to milliseconds (e.g. a latency table's prediction,
    :func:`oqat.measure.latency.table_latency`); the search itself never times anything.
    """

    def __init__(self, space: SearchSpace, latency: Callable[[Arch], float] | None = None):
        self.space = space
        self.latency = latency
        self._memo: dict[str, dict] = {}

    def __call__(self, arch: Arch) -> dict:
        key = self.space.key(arch)
        out = self._memo.get(key)
        if out is None:
            out = cost.summary(self.space, arch)
            if self.latency is not None:
                out["latency_ms"] = float(self.latency(arch))
            self._memo[key] = out
        return out

    def check(self, budget: Budget) -> None:
        if "latency_ms" in budget.metrics and self.latency is None:
            raise ValueError(f"budget {budget.name}: latency_ms needs a latency table (--latency-table FILE)")


def check_budget_feasible(budget: Budget, space: SearchSpace, costs: CostModel, bits: int) -> None:
    """ValueError naming the budget if even the smallest subnet breaks it."""
    costs.check(budget)
    smallest = space.smallest(bits)
    c = costs(smallest)
    if not budget.satisfied(c):
        raise ValueError(f"budget {budget.name} is impossible at {bits} bit: the smallest subnet already has "
                         f"{'; '.join(budget.violations(c))}")


__all__ = ["Budget", "check_budget_feasible", "Constraint", "CostModel", "METRICS", "parse_number"]
