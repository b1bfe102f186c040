"""The whole OQAT method from one YAML config: ``oqat run CONFIG``.

Stages, each writing into ``RUN/<stage>/`` (see docs/pipeline.md):

``fp``                optional full-precision supernet (``oqat.train`` at 32 bit)
``supernet-<b>bit``   the first quantized supernet (usually 4 bit; initialised from ``fp``)
``supernet-<b>bit``   for every inheritance target (3, 2): ``oqat.inherit`` then fine-tuning
``search-<b>bit``     evolutionary search under the budgets at each bit-width, plus held-out and
                      test accuracy of the largest, smallest and chosen subnets
``baseline``          a fixed hand-designed subnet trained alone with LSQ (the paper's comparison)
``export``            the chosen subnets as verified ONNX and/or packed files, with latency
and finally ``report.md`` / ``report.html`` (:mod:`oqat.report`), regenerated on every run.

A stage records its completion in ``RUN/<stage>/stage.json`` with its results, wall time and a
hash of everything that determines its output (its own settings and the hashes of the stages it
reads). A completed stage with the same hash is skipped; one that was interrupted is continued
(training resumes from ``checkpoints/last.pt``, search reuses its measurement cache). A stage
whose configuration changed after it started is an error naming the stages, unless
``redo_changed`` discards and recomputes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..space import FULL_PRECISION, QUANT_BITS, Arch, SearchSpace
from ..training import ModelConfig, TrainConfig
from ..utils.config import apply_overrides, from_dict, load_yaml, to_dict
from ..utils.fmt import fmt_s

log = logging.getLogger(__name__)

MARKER = "stage.json"
MARKER_FORMAT = "oqat-stage"
# Settings that change how a stage runs or what it logs, not what it computes: left out of hashes.
_UNHASHED_TRAIN = ("log_every", "device", "ckpt_every", "eval_images", "calib_images")
_UNHASHED_DATA = ("workers",)
_STAGE_SHORTCUTS = ("epochs", "max_steps", "lr")
EXPORT_FORMATS = ("onnx", "oqat")


# ============================================================================ configuration
@dataclass
class FPStage:
    """Optional full-precision supernet, the starting point of the first quantized one."""

    enabled: bool = True
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    train: dict = field(default_factory=dict)    # further oqat.train.TrainConfig overrides


@dataclass
class SupernetStage:
    """The first quantized supernet."""

    bits: int = 4
    init_from_fp: bool = True                      # start from the fp stage when it is enabled
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    train: dict = field(default_factory=dict)


@dataclass
class InheritTarget:
    """One lower bit-width reached by bit inheritance, with its fine-tuning schedule."""

    bits: int
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    train: dict = field(default_factory=dict)


def _default_targets() -> list:
    return [InheritTarget(bits=3), InheritTarget(bits=2)]


@dataclass
class InheritStage:
    factor: float = 2.0          # step sizes multiplied by factor per bit removed (paper: 2)
    chain: bool = True           # 4 -> 3 -> 2 (each from the previous); false: each from the first
    targets: list[InheritTarget] = field(default_factory=_default_targets)


@dataclass
class SearchStage:
    enabled: bool = True
    bits: list[int] | None = None      # bit-widths searched (default: every trained one)
    budgets: list[Any] = field(default_factory=list)  # "NAME:metric=value,..." or {name:, metric: value}
    budgets_by_bits: dict = field(default_factory=dict)  # {2: [...]}: extra budgets at one bit-width
    population: int = 16
    generations: int = 4
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    calib_images: int = 500            # held-out images for each subnet's BN re-calibration
    calib_batch: int = 100
    eval_images: int | None = 1000     # held-out images scored per subnet (null: the whole split)
    test_images: int | None = None     # test images for the final figures (null: the whole split)
    seed: int = 0
    pareto: list[str] = field(default_factory=lambda: ["bitops", "macs"])


@dataclass
class ExportStage:
    enabled: bool = True
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    verify_images: int = 256
    onnx_weights: str = "float"        # "float" (QCDQ) or "int8" (codes stored as int8)
    opset: int = 17
    latency: bool = True               # time the chosen subnets (batch 1, one thread)
    latency_runs: int = 20


@dataclass
class BaselineStage:
    """A fixed hand-designed subnet trained on its own with LSQ (labels only)."""

    enabled: bool = True
    name: str = "baseline"
    arch: dict | None = None           # ks / e / d / r of the space (bits come from `bits`)
    bits: int = 2
    epochs: int | None = None          # null: as many epochs (images seen) as the whole OQAT run
    max_steps: int | None = None
    lr: float | None = None
    train: dict = field(default_factory=dict)


@dataclass
class StagesConfig:
    fp: FPStage = field(default_factory=lambda: FPStage(enabled=False))
    supernet: SupernetStage = field(default_factory=SupernetStage)
    inherit: InheritStage = field(default_factory=InheritStage)
    search: SearchStage = field(default_factory=SearchStage)
    export: ExportStage = field(default_factory=ExportStage)
    baseline: BaselineStage = field(default_factory=lambda: BaselineStage(enabled=False))


@dataclass
class RunConfig:
    """What ``oqat run CONFIG`` reads (docs/pipeline.md lists every key)."""

    name: str = "oqat-run"
    description: str = ""
    out: str | None = None             # default run folder (``--out`` overrides; default runs/<config name>)
    space: Any = "mbv3-tiny"           # preset name, YAML file, or an inline mapping
    data: dict = field(default_factory=lambda: {"name": "synthetic"})
    model: ModelConfig = field(default_factory=ModelConfig)
    train: dict = field(default_factory=dict)   # common oqat.train.TrainConfig settings
    threads: int | None = None         # torch intra-op threads (null: torch's default)
    stages: StagesConfig = field(default_factory=StagesConfig)


# ---------------------------------------------------------------------------- validation helpers
def _data_config(data: dict, where: str):
    from ..data import DataConfig

    try:
        return DataConfig.from_dict(data)
    except ValueError as exc:
        msg = str(exc)  # DataConfig names its keys as data.<key>
        raise ValueError(f"{where}.{msg}" if msg.startswith("data.") else f"{where}.data: {msg}") from None


def data_shape(data_cfg) -> tuple[int | None, int | None]:
    """(input channels, classes) of a dataset without loading it (None where unknown)."""
    name = data_cfg.name
    if name == "fashion-mnist":
        return 1, 10
    if name == "cifar10":
        return 3, 10
    if name == "cifar100":
        return 3, 100
    if name == "synthetic":
        return 3, data_cfg.synthetic_classes
    if name == "imagefolder" and data_cfg.root:
        train = Path(data_cfg.root) / "train"
        if train.is_dir():
            return 3, sum(1 for p in train.iterdir() if p.is_dir()) or None
        return 3, None
    return None, None


def resolve_space_spec(spec: Any, where: str, base_dir: Path | None = None) -> SearchSpace:
    """A SearchSpace from a preset name, a YAML path (relative to the CWD or the config file) or a mapping."""
    try:
        if isinstance(spec, dict):
            return SearchSpace.from_dict(spec)
        if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
            path = Path(spec)
            if not path.is_file() and base_dir is not None and (base_dir / spec).is_file():
                path = base_dir / spec
            return SearchSpace.from_yaml(path)
        if isinstance(spec, str):
            return SearchSpace.preset(spec)
    except ValueError as exc:
        raise ValueError(f"{where}.space: {exc}") from None
    raise ValueError(f"{where}.space: expected a preset name, a YAML path or a mapping, got {spec!r}")


def stage_train_config(common: dict, stage: Any, where: str, **forced: Any) -> TrainConfig:
    """The TrainConfig of one stage: common settings, then the stage's overrides and shortcuts."""
    overrides = dict(stage.train or {})
    for key in _STAGE_SHORTCUTS:
        value = getattr(stage, key, None)
        if value is not None:
            if key in overrides:
                raise ValueError(f"{where}.{key}: given twice (also as {where}.train.{key}); keep one")
            overrides[key] = value
    merged = {**common, **overrides, **forced}
    cfg = from_dict(TrainConfig, merged, f"{where}.train")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"{where}.train.max_steps: must be >= 1 (or null), got {cfg.max_steps}")
    return cfg


def _parse_value(metric: str, text: Any, lo: float, hi: float, where: str) -> float:
    from ..search import parse_number

    if isinstance(text, bool):
        raise ValueError(f"{where}: {metric}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {metric}: must be a positive number, got {text!r}")
        return value
    if not isinstance(text, str):
        raise ValueError(f"{where}: {metric}: expected a number or a string such as 5M or 40%, got {text!r}")
    t = text.strip()
    if t.endswith("%"):
        try:
            p = float(t[:-1])
        except ValueError:
            raise ValueError(f"{where}: {metric}: {text!r} is not a percentage") from None
        if not 0 <= p <= 100:
            raise ValueError(f"{where}: {metric}: {text!r} must lie in 0%..100%")
        return lo + p / 100.0 * (hi - lo)
    return parse_number(t, f"{where}: {metric}")


def parse_budget(spec: Any, space: SearchSpace, bits: int, where: str):
    """A search Budget from ``"[NAME:]metric=value[,...]"`` or ``{name: ..., metric: value, ...}``.

    Values take decimal suffixes (5M, 1.2G) or a percentage: ``40%`` means the smallest subnet's
    cost plus 40% of the way to the largest one's, at this bit-width.
    """
    from ..search import METRICS, Budget, Constraint
    from ..space import cost

    name = ""
    items: list[tuple[str, Any]] = []
    if isinstance(spec, str):
        body = spec
        if ":" in spec:
            name, body = (s.strip() for s in spec.split(":", 1))
        for part in body.split(","):
            m = re.fullmatch(r"\s*([a-z_]+)\s*(?:<=|=|<)\s*(\S+)\s*", part)
            if not m:
                raise ValueError(f"{where}: cannot read {part.strip()!r}; expected METRIC=VALUE "
                                 f"(e.g. macs=5M, bitops=40%) with METRIC in {list(METRICS)}")
            items.append((m.group(1), m.group(2)))
        if not name:
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", body).strip("_")
    elif isinstance(spec, dict):
        spec = dict(spec)
        name = str(spec.pop("name", "") or "")
        if not spec:
            raise ValueError(f"{where}: a budget needs at least one limit, e.g. {{name: small, macs: 5M}}")
        items = list(spec.items())
        if not name:
            name = "_".join(f"{k}{v}" for k, v in items)
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")
    else:
        raise ValueError(f"{where}: expected a string like 'macs=5M' or a mapping, got {spec!r}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ValueError(f"{where}: budget name {name!r} may only contain letters, digits and . _ + -")
    smallest, largest = cost.summary(space, space.smallest(bits)), cost.summary(space, space.largest(bits))
    constraints = []
    for metric, value in items:
        if metric not in METRICS:
            raise ValueError(f"{where}: metric {metric!r} is unknown; use one of {list(METRICS)}")
        if metric == "latency_ms":
            raise ValueError(f"{where}: latency_ms budgets need a latency table, which oqat run does not build; "
                             f"use oqat search --latency-table")
        constraints.append(Constraint(metric, _parse_value(metric, value, smallest[metric], largest[metric], where)))
    try:
        budget = Budget(tuple(constraints), name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    bad = budget.violations(smallest)
    if bad:
        raise ValueError(f"{where}: budget {name} is impossible at {bits} bit: the smallest subnet already has "
                         f"{'; '.join(bad)}")
    return budget


def _trained_bits(cfg: RunConfig) -> list[int]:
    return [cfg.stages.supernet.bits] + [t.bits for t in cfg.stages.inherit.targets]


def searched_bits(cfg: RunConfig) -> list[int]:
    s = cfg.stages.search
    if not s.enabled:
        return []
    return list(s.bits) if s.bits is not None else _trained_bits(cfg)


def run_space(cfg: RunConfig, where: str = "config", base_dir: Path | None = None) -> SearchSpace:
    """The search space with the data's input channels and classes (when known without loading)."""
    space = resolve_space_spec(cfg.space, where, base_dir)
    channels, classes = data_shape(_data_config(cfg.data, where))
    changes = {k: v for k, v in (("in_channels", channels), ("num_classes", classes)) if v is not None}
    return space.replace(**changes) if changes else space


def budgets_for(cfg: RunConfig, space: SearchSpace, bits: int, where: str = "config") -> list:
    """The budgets searched at `bits` (common ones, then budgets_by_bits[bits]), validated."""
    s = cfg.stages.search
    out = []
    for i, spec in enumerate(s.budgets):
        out.append(parse_budget(spec, space, bits, f"{where}.stages.search.budgets[{i}]"))
    extra = s.budgets_by_bits.get(bits, s.budgets_by_bits.get(str(bits), []))
    for i, spec in enumerate(extra):
        out.append(parse_budget(spec, space, bits, f"{where}.stages.search.budgets_by_bits.{bits}[{i}]"))
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}.stages.search.budgets: budget name(s) {dup} used twice at {bits} bit; "
                         f"name them NAME:metric=value")
    return out


def baseline_arch(cfg: RunConfig, space: SearchSpace, where: str = "config") -> Arch | None:
    b = cfg.stages.baseline
    if not b.enabled:
        return None
    key = f"{where}.stages.baseline.arch"
    if b.arch is None:
        raise ValueError(f"{key}: required when the baseline is enabled (ks, e, d, r of a subnet of the space)")
    data = dict(b.arch)
    if "bits" in data and data["bits"] != b.bits:
        raise ValueError(f"{key}.bits: {data['bits']} differs from stages.baseline.bits {b.bits}; give bits once")
    data["bits"] = b.bits
    try:
        return space.validate(Arch.from_dict(data))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def validate_run_config(cfg: RunConfig, where: str = "config", base_dir: Path | None = None) -> None:
    """Every check that needs no data: raises ValueError naming the key."""
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"{where}.threads: must be >= 1 (or null), got {cfg.threads}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", cfg.name):
        raise ValueError(f"{where}.name: {cfg.name!r} may only contain letters, digits and . _ + -")
    data = _data_config(cfg.data, where)
    if "arch" in cfg.train and cfg.train["arch"] is not None:
        raise ValueError(f"{where}.train.arch: not allowed in oqat run (supernets train every subnet); "
                         f"a single network is stages.baseline.arch")
    from_dict(TrainConfig, cfg.train, f"{where}.train")
    st = cfg.stages
    train_cfgs = []
    if st.fp.enabled:
        train_cfgs.append(("fp", stage_train_config(cfg.train, st.fp, f"{where}.stages.fp")))
    sb = st.supernet.bits
    if isinstance(sb, bool) or sb not in QUANT_BITS:
        raise ValueError(f"{where}.stages.supernet.bits: {sb!r} is not a quantized bit-width ({list(QUANT_BITS)})")
    train_cfgs.append(("supernet", stage_train_config(cfg.train, st.supernet, f"{where}.stages.supernet")))
    if not st.inherit.factor > 0:
        raise ValueError(f"{where}.stages.inherit.factor: must be positive, got {st.inherit.factor}")
    previous = sb
    for i, t in enumerate(st.inherit.targets):
        key = f"{where}.stages.inherit.targets[{i}]"
        if isinstance(t.bits, bool) or t.bits not in QUANT_BITS:
            raise ValueError(f"{key}.bits: {t.bits!r} is not a quantized bit-width ({list(QUANT_BITS)})")
        if t.bits >= previous:
            raise ValueError(f"{key}.bits: {t.bits} must be lower than {previous} (inheritance only removes bits; "
                             f"list targets in decreasing order)")
        previous = t.bits
        train_cfgs.append((f"inherit {t.bits}", stage_train_config(cfg.train, t, key)))
    for _, tc in train_cfgs:
        if data.train_limit is not None and tc.batch_size > data.train_limit:
            raise ValueError(f"{where}.train.batch_size: {tc.batch_size} exceeds data.train_limit "
                             f"{data.train_limit} (no full batch per epoch)")
    space = run_space(cfg, where, base_dir)
    s = st.search
    trained = _trained_bits(cfg)
    for name in ("population", "generations", "calib_images", "calib_batch"):
        v = getattr(s, name)
        if v < (0 if name == "generations" else 1):
            raise ValueError(f"{where}.stages.search.{name}: must be >= {0 if name == 'generations' else 1}, got {v}")
    for name in ("eval_images", "test_images"):
        v = getattr(s, name)
        if v is not None and v < 1:
            raise ValueError(f"{where}.stages.search.{name}: must be >= 1 (or null for the whole split), got {v}")
    try:
        from ..search import SearchConfig

        SearchConfig(population=s.population, generations=s.generations, parent_ratio=s.parent_ratio,
                     mutation_ratio=s.mutation_ratio, mutate_prob=s.mutate_prob, seed=s.seed)
    except ValueError as exc:
        raise ValueError(f"{where}.stages.search: {str(exc).lstrip('-').replace('-', '_', 2)}") from None
    from ..search import METRICS

    for m in s.pareto:
        if m not in METRICS or m == "latency_ms":
            raise ValueError(f"{where}.stages.search.pareto: {m!r} is not one of {[x for x in METRICS if x != 'latency_ms']}")
    for key in s.budgets_by_bits:
        b = int(key) if isinstance(key, str) and key.isdigit() else key
        if b not in searched_bits(cfg):
            raise ValueError(f"{where}.stages.search.budgets_by_bits.{key}: {key} bit is not searched "
                             f"(searched: {searched_bits(cfg)})")
    if s.enabled:
        for i, b in enumerate(searched_bits(cfg)):
            if b not in trained:
                raise ValueError(f"{where}.stages.search.bits[{i}]: {b} bit is not trained (trained: {trained})")
            budgets = budgets_for(cfg, space, b, where)
            if st.baseline.enabled and st.baseline.bits == b and "baseline" in [x.name for x in budgets]:
                raise ValueError(f"{where}.stages.search.budgets: the name 'baseline' is reserved for the budget "
                                 f"at the baseline's BitOPs (added automatically); rename that budget")
            if not budgets and not (st.baseline.enabled and st.baseline.bits == b):
                raise ValueError(f"{where}.stages.search.budgets: no budget to search at {b} bit; "
                                 f"give at least one, e.g. 'macs=50%'")
    e = st.export
    for i, f in enumerate(e.formats):
        if f not in EXPORT_FORMATS:
            raise ValueError(f"{where}.stages.export.formats[{i}]: {f!r} is not one of {list(EXPORT_FORMATS)}")
    if e.onnx_weights not in ("float", "int8"):
        raise ValueError(f"{where}.stages.export.onnx_weights: {e.onnx_weights!r} is not 'float' or 'int8'")
    if e.verify_images < 1 or e.latency_runs < 1:
        raise ValueError(f"{where}.stages.export.{'verify_images' if e.verify_images < 1 else 'latency_runs'}: "
                         f"must be >= 1")
    if e.enabled and not s.enabled:
        raise ValueError(f"{where}.stages.export.enabled: export needs the search stage (stages.search.enabled)")
    b = st.baseline
    if b.enabled:
        if isinstance(b.bits, bool) or b.bits not in QUANT_BITS:
            raise ValueError(f"{where}.stages.baseline.bits: {b.bits!r} is not a quantized bit-width ({list(QUANT_BITS)})")
        baseline_arch(cfg, space, where)
        stage_train_config(cfg.train, b, f"{where}.stages.baseline")
        if s.enabled and b.bits not in searched_bits(cfg):
            raise ValueError(f"{where}.stages.baseline.bits: {b.bits} bit is not searched "
                             f"(stages.search.bits {searched_bits(cfg)}), so there is no OQAT subnet to compare with")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """(validated RunConfig, the raw dict after overrides) from a YAML file and --set overrides."""
    raw = load_yaml(path)
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw, str(path), Path(path).parent), raw


def config_from_dict(raw: dict, where: str = "config", base_dir: Path | None = None) -> RunConfig:
    """Validated RunConfig from a dict (keys and types by oqat.config.from_dict, then the checks
    that involve several keys: bit-widths, budgets, the baseline arch, ...)."""
    cfg = from_dict(RunConfig, raw, where)
    validate_run_config(cfg, where, base_dir)
    return cfg


# ============================================================================ stages and markers
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    kind: str                                  # fp | train | search | baseline | export
    title: str                                 # one-line description for the banner
    spec: dict                                 # what determines the output (hashed)
    inputs: list[str] = field(default_factory=list)
    hash: str = ""
    collective: bool = True                    # every torchrun rank takes part


def read_marker(stage_dir: Path) -> dict | None:
    path = stage_dir / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker cut short by a crash counts as absent
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def write_marker(stage_dir: Path, data: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"format": MARKER_FORMAT, **data}, indent=2, default=str) + "\n")
    tmp.replace(stage_dir / MARKER)


class StageMismatch(ValueError):
    """Completed or started stages whose configuration has changed since."""


@dataclass
class RunResult:
    out: Path
    stages: dict                # name -> marker dict
    report: Path | None
    ran: list[str]
    skipped: list[str]


def _clean_train(tc: TrainConfig) -> dict:
    d = to_dict(tc)
    for k in _UNHASHED_TRAIN:
        d.pop(k, None)
    return d


def _clean_data(data: dict) -> dict:
    d = dict(data)
    for k in _UNHASHED_DATA:
        d.pop(k, None)
    return d


def _bits_name(bits: int) -> str:
    return "fp" if bits == FULL_PRECISION else f"{bits}bit"


class Pipeline:
    """Plans the stages of a RunConfig, checks them against what RUN already holds, runs the rest."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, raw: dict | None = None, progress: bool = True,
                 config_path: str | Path | None = None, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(out)
        self.raw = raw if raw is not None else to_dict(cfg)
        self.progress = progress
        self.config_path = Path(config_path) if config_path else None
        self.echo = echo
        base = self.config_path.parent if self.config_path else None
        self.space = run_space(cfg, "config", base)     # channels/classes of the data where known
        self.data_cfg = _data_config(cfg.data, "config")
        self.stages = self._plan()
        self.markers: dict[str, dict] = {}

    # ------------------------------------------------------------------ planning
    def _train_spec(self, bits: int, tc: TrainConfig, init: dict | None) -> dict:
        return {"space": self.space.to_dict(), "bits": bits, "data": _clean_data(self.data_cfg.to_dict()),
                "model": to_dict(self.cfg.model), "train": _clean_train(tc), "init": init}

    def _plan(self) -> list[Stage]:
        cfg, st = self.cfg, self.cfg.stages
        stages: list[Stage] = []
        train_names: list[str] = []
        if st.fp.enabled:
            tc = stage_train_config(cfg.train, st.fp, "stages.fp")
            stages.append(Stage("fp", "fp", f"full-precision supernet, {self._schedule(tc)}",
                                {"train_run": self._train_spec(FULL_PRECISION, tc, None)}))
            train_names.append("fp")
        sb = st.supernet.bits
        tc = stage_train_config(cfg.train, st.supernet, "stages.supernet")
        from_fp = st.fp.enabled and st.supernet.init_from_fp
        name = f"supernet-{sb}bit"
        stages.append(Stage(name, "train", f"{sb}-bit supernet{' from the FP one' if from_fp else ' from scratch'}, "
                            f"{self._schedule(tc)}",
                            {"train_run": self._train_spec(sb, tc, {"from": "fp"} if from_fp else None)},
                            ["fp"] if from_fp else []))
        train_names.append(name)
        first, previous = name, name
        prev_bits = sb
        for i, t in enumerate(st.inherit.targets):
            tc = stage_train_config(cfg.train, t, f"stages.inherit.targets[{i}]")
            src = previous if st.inherit.chain else first
            src_bits = prev_bits if st.inherit.chain else sb
            name = f"supernet-{t.bits}bit"
            stages.append(Stage(name, "train", f"{t.bits}-bit supernet by bit inheritance from {src_bits} bit "
                                f"(steps x{st.inherit.factor:g} per bit), fine-tune {self._schedule(tc)}",
                                {"train_run": self._train_spec(t.bits, tc, {"from": src, "factor": st.inherit.factor,
                                                                            "from_bits": src_bits})},
                                [src]))
            train_names.append(name)
            previous, prev_bits = name, t.bits
        self.train_stages = train_names
        s = st.search
        barch = baseline_arch(cfg, self.space)
        for b in searched_bits(cfg):
            budgets = [x.to_dict() for x in budgets_for(cfg, self.space, b)]
            spec = {"bits": b, "budgets": budgets, "baseline_budget": barch.to_dict() if barch and barch.bits == b else None,
                    **{k: getattr(s, k) for k in ("population", "generations", "parent_ratio", "mutation_ratio",
                                                  "mutate_prob", "calib_images", "calib_batch", "eval_images",
                                                  "test_images", "seed", "pareto")}}
            n = len(budgets) + (1 if spec["baseline_budget"] else 0)
            stages.append(Stage(f"search-{b}bit", "search",
                                f"search at {b} bit: {n} budget(s), population {s.population}, "
                                f"{s.generations} generation(s)", spec, [f"supernet-{b}bit"]))
        if barch is not None:
            bl = st.baseline
            explicit = bl.epochs is not None or bl.max_steps is not None or "epochs" in bl.train or "max_steps" in bl.train
            tc = stage_train_config(cfg.train, bl, "stages.baseline", arch={k: v for k, v in barch.to_dict().items()
                                                                             if k != "bits"}, eval_images=0)
            spec = {"train_run": self._train_spec(bl.bits, tc, None), "name": bl.name,
                    "schedule": "explicit" if explicit else "same images as the OQAT run"}
            stages.append(Stage("baseline", "baseline",
                                f"baseline '{bl.name}' alone at {bl.bits} bit (LSQ, labels only), "
                                + (self._schedule(tc) if explicit else "as many epochs as the whole OQAT run"),
                                spec, [] if explicit else list(train_names)))
        if st.export.enabled and s.enabled:
            # bn_recalibration: files are exported BN-re-calibrated as the search measured them
            # (earlier runs exported the supernet's statistics; their export stage must not be reused).
            spec = {**to_dict(st.export), "bn_recalibration": "as the search"}
            spec.pop("enabled", None)
            spec.pop("latency_runs", None)
            stages.append(Stage("export", "export", f"export of the chosen subnets ({', '.join(st.export.formats)})"
                                + (" and latency" if st.export.latency else ""), spec,
                                [x.name for x in stages if x.kind == "search"], collective=False))
        hashes: dict[str, str] = {}
        for stage in stages:
            stage.hash = _hash({"stage": stage.name, "spec": stage.spec, "inputs": {i: hashes[i] for i in stage.inputs}})
            hashes[stage.name] = stage.hash
        return stages

    @staticmethod
    def _schedule(tc: TrainConfig) -> str:
        steps = f", at most {tc.max_steps} steps" if tc.max_steps is not None else ""
        return f"{tc.epochs} epoch(s){steps}, lr {tc.lr:g}, batch {tc.batch_size}, {tc.num_random} random subnet(s)"

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def dir(self, name: str) -> Path:
        return self.out / name

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, str]:
        """Per stage: "done", "partial" (started, same config), "changed" or "pending"."""
        out = {}
        for s in self.stages:
            m = self._marker(self.dir(s.name))
            if m is None:
                out[s.name] = "pending"
            elif m.get("hash") != s.hash:
                out[s.name] = "changed"
            else:
                out[s.name] = "done" if m.get("status") == "complete" else "partial"
        return out

    def check_changes(self, redo_changed: bool = False) -> list[str]:
        changed = [n for n, v in self.status().items() if v == "changed"]
        if changed and not redo_changed:
            details = []
            for n in changed:
                m = self._marker(self.dir(n)) or {}
                details.append(f"{n} ({m.get('status', '?')} with another configuration)")
            raise StageMismatch(
                f"{self.out}: stage(s) {', '.join(details)}: the configuration changed since they ran. "
                f"Rerun with --redo-changed to discard and recompute them (and what depends on them), "
                f"or use another --out")
        return changed

    # ------------------------------------------------------------------ running
    def run(self, *, redo_changed: bool = False) -> RunResult:
        import torch

        from ..training import distributed
        from ..utils.devices import resolve_device

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        common = from_dict(TrainConfig, self.cfg.train, "train")
        self.device = resolve_device(common.device)
        info = distributed.init_from_env(self.device)
        if self.device.type == "cuda" and info.enabled:
            self.device = torch.device("cuda", info.local_rank)
        self.info = info
        changed = self.check_changes(redo_changed)
        if info.is_main:
            for n in changed:
                self._discard(n)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self._barrier()
        ran, skipped = [], []
        t_run = time.perf_counter()
        total = len(self.stages)
        for i, stage in enumerate(self.stages, 1):
            d = self.dir(stage.name)
            marker = self._marker(d)  # every rank decides on the same marker
            upstream_ran = sorted(set(stage.inputs) & set(ran))
            if upstream_ran and marker is not None:
                # An input was (re)computed in this invocation: this stage's outputs may be stale.
                if info.is_main:
                    self.echo(f"== [{i}/{total}] {stage.name}: recomputed because {', '.join(upstream_ran)} ran again")
                    self._discard(stage.name)
                self._barrier()
                marker = None
            if marker is not None and marker.get("status") == "complete" and marker.get("hash") == stage.hash:
                self.markers[stage.name] = marker
                skipped.append(stage.name)
                if info.is_main:
                    self.echo(f"== [{i}/{total}] {stage.name}: done earlier ({fmt_s(marker.get('wall_s', 0))}), skipped")
                continue
            if not stage.collective and not info.is_main:
                continue
            resumed = marker is not None and marker.get("hash") == stage.hash
            if info.is_main:
                if marker is None and d.exists():
                    self._discard(stage.name)  # leftovers without a marker: start the stage afresh
                self.echo(f"== [{i}/{total}] {stage.name}: {stage.title}" + (" (continuing)" if resumed else ""))
                write_marker(d, {"stage": stage.name, "status": "running", "hash": stage.hash, "spec": stage.spec,
                                 "inputs": stage.inputs, "started": time.time(),
                                 "attempts": int((marker or {}).get("attempts", 0)) + 1})
            if stage.collective:  # the last stages (export) run on rank 0 alone: no collectives there
                self._barrier()
            t0 = time.perf_counter()
            results = getattr(self, f"_run_{stage.kind}")(stage, d, resumed)
            wall = time.perf_counter() - t0
            record = {"stage": stage.name, "status": "complete", "hash": stage.hash, "spec": stage.spec,
                      "inputs": stage.inputs, "title": stage.title, "results": results, "wall_s": wall,
                      "finished": time.time(), "attempts": int((marker or {}).get("attempts", 0)) + 1,
                      "resumed": resumed}
            if info.is_main:
                write_marker(d, record)
                self.echo(f"   {stage.name} finished in {fmt_s(wall)}")
            self.markers[stage.name] = record
            ran.append(stage.name)
            if stage.collective:
                self._barrier()
        report = None
        if info.is_main:
            from .report import write_report

            report = write_report(self.out, self)
            self.echo(f"== report: {report} ({self.out / 'report.html'}); this invocation took "
                      f"{fmt_s(time.perf_counter() - t_run)}")
        if info.enabled:  # the other ranks wait for rank 0's export and report, then all leave together
            import torch.distributed as dist

            self._barrier()
            dist.destroy_process_group()
        return RunResult(self.out, dict(self.markers), report, ran, skipped)

    def _marker(self, d: Path) -> dict | None:
        """The stage marker as rank 0 reads it, on every rank (a rank reading the file itself could
        see rank 0's next write and take another branch, which deadlocks the collectives)."""
        if getattr(self, "info", None) is None or not self.info.enabled:
            return read_marker(d)
        import torch.distributed as dist

        box = [read_marker(d) if self.info.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if getattr(self, "info", None) is not None and self.info.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _discard(self, name: str) -> None:
        """Remove a stage's outputs; a search keeps its measurement cache (its entries carry their context)."""
        d = self.dir(name)
        if not d.exists():
            return
        keep = {"cache.jsonl"} if name.startswith("search-") else set()
        for p in d.iterdir():
            if p.name in keep:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # ------------------------------------------------------------------ training stages
    def _train_run_config(self, stage: Stage, init: str | None):
        from ..training import TrainRunConfig

        spec = stage.spec["train_run"]
        tc = self._full_train(stage)
        return TrainRunConfig(space=spec["space"], bits=spec["bits"], data=self.data_cfg.to_dict(),
                              model=dataclasses.replace(self.cfg.model), train=tc, init=init)

    def _full_train(self, stage: Stage) -> TrainConfig:
        """The stage's TrainConfig including the unhashed settings (log_every, device, ...)."""
        st = self.cfg.stages
        if stage.kind == "fp":
            return stage_train_config(self.cfg.train, st.fp, "stages.fp")
        if stage.kind == "baseline":
            arch = {k: v for k, v in stage.spec["train_run"]["train"]["arch"].items()}
            return stage_train_config(self.cfg.train, st.baseline, "stages.baseline", arch=arch, eval_images=0)
        bits = stage.spec["train_run"]["bits"]
        if bits == st.supernet.bits:
            return stage_train_config(self.cfg.train, st.supernet, "stages.supernet")
        i, t = next((i, t) for i, t in enumerate(st.inherit.targets) if t.bits == bits)
        return stage_train_config(self.cfg.train, t, f"stages.inherit.targets[{i}]")

    def _train(self, stage: Stage, d: Path, resumed: bool, init: str | None, tc: TrainConfig | None = None) -> dict:
        from ..training import train

        cfg = self._train_run_config(stage, init)
        if tc is not None:
            cfg.train = tc
        resume = resumed and (d / "checkpoints" / "last.pt").is_file()
        result = train(cfg, d, resume=resume, progress=self.progress)
        data_n = self._train_images()
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) or v is None}
        world = self.info.world_size
        return {"checkpoint": str(result.checkpoint.relative_to(self.out)) if result.checkpoint.is_relative_to(self.out)
                else str(result.checkpoint), "bits": cfg.bits if cfg.bits is not None else FULL_PRECISION,
                "steps": result.steps, "batch_size": cfg.train.batch_size, "world_size": world,
                "images_seen": result.steps * cfg.train.batch_size * world, "train_images": data_n,
                "epochs_done": (result.steps * cfg.train.batch_size * world / data_n) if data_n else None,
                "final_metrics": metrics, "resumed": resume, "init": init}

    def _train_images(self) -> int:
        if not hasattr(self, "_n_train"):
            from ..data import build_data

            self._n_train = len(build_data(self.data_cfg).train)
        return self._n_train

    def _ckpt(self, stage_name: str) -> Path:
        m = self.markers.get(stage_name) or read_marker(self.dir(stage_name))
        if m is None or m.get("status") != "complete":
            raise ValueError(f"stage {stage_name} has not completed; cannot continue")
        return self.out / m["results"]["checkpoint"]

    def _run_fp(self, stage: Stage, d: Path, resumed: bool) -> dict:
        return self._train(stage, d, resumed, None)

    def _run_train(self, stage: Stage, d: Path, resumed: bool) -> dict:
        init_spec = stage.spec["train_run"]["init"]
        init = None
        if init_spec is not None and init_spec["from"] == "fp":
            init = str(self._ckpt("fp"))
        elif init_spec is not None:
            from ..training import inherit_checkpoint

            init_path = d / "init.pt"
            if self.info.is_main and not init_path.is_file():
                d.mkdir(parents=True, exist_ok=True)
                inherit_checkpoint(self._ckpt(init_spec["from"]), stage.spec["train_run"]["bits"], init_path,
                                   factor=init_spec["factor"])
            self._barrier()
            init = str(init_path)
        return self._train(stage, d, resumed, init)

    # ------------------------------------------------------------------ baseline
    def _run_baseline(self, stage: Stage, d: Path, resumed: bool) -> dict:
        import torch

        from ..measure import DirectAccuracy, load_context

        tc = self._full_train(stage)
        auto = stage.spec["schedule"] != "explicit"
        n = self._train_images()
        if auto:
            images = sum(self.markers[s]["results"]["images_seen"] for s in self.train_stages)
            per_step = tc.batch_size * self.info.world_size
            steps = max(1, round(images / per_step))
            per_epoch = max(1, n // per_step)
            tc = dataclasses.replace(tc, epochs=math.ceil(steps / per_epoch), max_steps=steps)
        res = self._train(stage, d, resumed, None, tc)
        arch = Arch.from_dict({**stage.spec["train_run"]["train"]["arch"], "bits": stage.spec["train_run"]["bits"]})
        s = self.cfg.stages.search
        out = {"name": stage.spec["name"], "arch": arch.to_dict(), "train": res, "epochs": res["epochs_done"]}
        # Measured exactly like the searched subnets: BN re-calibration on the same held-out images.
        for split, n_img in (("holdout", s.eval_images), ("test", s.test_images)):
            ctx = load_context(self.out / res["checkpoint"], split=split, calib_images=s.calib_images,
                               calib_batch=s.calib_batch, calib_seed=s.seed, eval_images=n_img,
                               device=str(self.device))
            out["costs"] = _costs(ctx.space, arch)
            out[f"{split}_top1"] = DirectAccuracy(ctx.net, ctx.calib, ctx.eval_data, calib_batch=s.calib_batch)([arch])[0]
            del ctx
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.info.is_main:
            self.echo(f"   baseline {stage.spec['name']}: held-out {out['holdout_top1']:.2f}%, "
                      f"test {out['test_top1']:.2f}% after {res['epochs_done']:.2f} epoch(s)")
        return out

    # ------------------------------------------------------------------ search
    def _run_search(self, stage: Stage, d: Path, resumed: bool) -> dict:
        from ..measure import load_context
        from ..search import (
            Budget,
            CachedAccuracy,
            Constraint,
            CostModel,
            DistributedAccuracy,
            EvolutionSearch,
            SearchConfig,
            best_of_measured,
            check_budget_feasible,
            distinct_measured,
            write_search_outputs,
        )

        spec = stage.spec
        bits = spec["bits"]
        ckpt = self._ckpt(f"supernet-{bits}bit")
        s = self.cfg.stages.search
        kw = dict(calib_images=s.calib_images, calib_batch=s.calib_batch, calib_seed=s.seed, device=str(self.device))
        ctx = load_context(ckpt, split="holdout", eval_images=s.eval_images, **kw)
        space = ctx.space
        budgets = budgets_for(self.cfg, space, bits)   # exact costs: the checkpoint's space
        barch = None
        if spec["baseline_budget"]:
            barch = Arch.from_dict(spec["baseline_budget"])
            limit = _costs(space, barch)["bitops"]
            budgets.append(Budget((Constraint("bitops", limit),), "baseline"))
        costs = CostModel(space)
        for b in budgets:
            check_budget_feasible(b, space, costs, bits)
        direct = ctx.accuracy_fn()
        context = {"source": "direct", **ctx.fingerprint()}
        # The checkpoint is named by its stage and completion time rather than its absolute path:
        # the run folder can move, and a retrained supernet never reuses old measurements.
        upstream = self.markers.get(f"supernet-{bits}bit") or {}
        context["ckpt"] = f"{upstream.get('stage')}/{ckpt.name}@{upstream.get('hash')}/{upstream.get('finished')}"
        accuracy = CachedAccuracy(DistributedAccuracy(direct), space, d / "cache.jsonl", context)
        config = SearchConfig(population=s.population, generations=s.generations, parent_ratio=s.parent_ratio,
                              mutation_ratio=s.mutation_ratio, mutate_prob=s.mutate_prob, seed=s.seed)
        search = EvolutionSearch(space, bits, accuracy, costs, config)
        extremes = {"largest": space.largest(bits), "smallest": space.smallest(bits)}
        holdout_ext = dict(zip(extremes, accuracy(list(extremes.values()))))
        results = [search.run(b, progress=self.progress) for b in budgets]
        evaluated = distinct_measured(space, [(a, holdout_ext[k]) for k, a in extremes.items()]
                                      + [p for r in results for p in r.candidates])
        results = best_of_measured(results, evaluated, costs)  # other budgets' finds count too
        if self.info.is_main:
            for r in results:
                self.echo(f"   {r.budget}: best held-out top-1 {r.accuracy:.2f}% "
                          f"({r.evaluations} subnets searched, {len(evaluated)} measured in all)")
        meta = {"bits": bits, "ckpt": str(ckpt), "accuracy_source": context, "search": config.to_dict()}
        if self.info.is_main:
            write_search_outputs(d, space, results, evaluated, costs, pareto_metrics=s.pareto, meta=meta)
        del ctx
        # Test split: the final figures of the largest, smallest and chosen subnets.
        tctx = load_context(ckpt, split="test", eval_images=s.test_images, **kw)
        key = lambda a: space.key(a)  # noqa: E731
        to_test: dict[str, Arch] = {}
        for a in list(extremes.values()) + [r.arch for r in results]:
            to_test.setdefault(key(a), a)
        test_fn = DistributedAccuracy(tctx.accuracy_fn())
        test_acc = dict(zip(to_test, test_fn(list(to_test.values()))))
        supernet = {k: {"arch": a.to_dict(), "holdout_top1": holdout_ext[k], "test_top1": test_acc[key(a)],
                        "costs": _costs(space, a)} for k, a in extremes.items()}
        chosen = [{"budget": r.budget.to_dict(), "arch": r.arch.to_dict(), "holdout_top1": r.accuracy,
                   "test_top1": test_acc[key(r.arch)], "costs": _costs(space, r.arch), "evaluations": r.evaluations,
                   "file": str((d / f"best_{r.budget.name}.json").relative_to(self.out))} for r in results]
        if self.info.is_main:
            for k, v in supernet.items():
                self.echo(f"   {k} {bits}-bit subnet: held-out {v['holdout_top1']:.2f}%, test {v['test_top1']:.2f}%")
            for c in chosen:
                self.echo(f"   best under {c['budget']['name']}: held-out {c['holdout_top1']:.2f}%, "
                          f"test {c['test_top1']:.2f}%, {c['costs']['macs'] / 1e6:.2f} MMACs, "
                          f"{c['costs']['bitops'] / 1e6:.1f} MBitOPs")
        return {"bits": bits, "checkpoint": str(ckpt.relative_to(self.out)), "supernet": supernet, "chosen": chosen,
                "evaluated": len(evaluated), "measurements": accuracy.misses, "cache_reused": accuracy.loaded,
                "seconds_per_evaluation": direct.seconds_per_eval if direct.calls else None,
                "calib_images": tctx.settings["calib_images"], "holdout_images": s.eval_images,
                "test_images": tctx.settings["eval_images"], "evaluated_csv": str((d / "evaluated.csv").relative_to(self.out))}

    # ------------------------------------------------------------------ export
    def _run_export(self, stage: Stage, d: Path, resumed: bool) -> dict:
        from ..export import export_subnet
        from ..export.deploy import context_verification, unverified_path
        from ..export.predict import ExportedModel
        from ..export.verify import VerificationError
        from ..measure import load_context

        e, s = self.cfg.stages.export, self.cfg.stages.search
        d.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict] = {}
        rows = []
        for sname in stage.inputs:
            res = self.markers[sname]["results"]
            ckpt = self.out / res["checkpoint"]
            # Each subnet is exported as the search measured it: BN re-calibrated on the same
            # held-out images (count, batch, seed); the file is then scored on the same test images.
            ctx = load_context(ckpt, split="holdout", calib_images=s.calib_images, calib_batch=s.calib_batch,
                               calib_seed=s.seed, eval_images=e.verify_images, device="cpu")
            test = ctx.with_split("test", s.test_images)
            for c in res["chosen"]:
                arch = Arch.from_dict(c["arch"])
                k = ctx.space.key(arch)
                row = {"bits": arch.bits, "budget": c["budget"]["name"], "arch": arch.to_dict(),
                       "search_test_top1": c["test_top1"]}
                if k in done:
                    rows.append({**row, **done[k], "same_as": done[k]["first_budget"]})
                    continue
                sub = ctx.deployable(arch)
                verification = context_verification(ctx, arch)
                base = f"{arch.bits}bit-{c['budget']['name']}"
                files = {}
                for fmt in e.formats:
                    path = d / f"{base}.{'onnx' if fmt == 'onnx' else 'oqat'}"
                    try:
                        r = export_subnet(sub, path, fmt, config=ctx.ckpt.config, verification=verification,
                                          calibration=ctx.calibration(), accuracy=c["test_top1"],
                                          source={"checkpoint": str(ckpt), "step": ctx.ckpt.step, "run": str(self.out)},
                                          opset=e.opset, weights=e.onnx_weights, progress=False)
                    except VerificationError as exc:
                        # Recorded and reported, not fatal: the other subnets and the report still come.
                        bad = unverified_path(path)
                        rep = exc.report
                        files[fmt] = {"path": str(bad.relative_to(self.out)), "verified": False,
                                      "size_bytes": bad.stat().st_size if bad.is_file() else 0,
                                      "verification": rep.summary() if rep is not None else str(exc),
                                      "top1_agreement": rep.top1_agreement if rep is not None else None, "notes": []}
                        self.echo(f"   WARNING: {exc}")
                        continue
                    scored = ExportedModel(path).top1(test.eval_data)
                    rep = r.report
                    files[fmt] = {"path": str(path.relative_to(self.out)), "size_bytes": r.size, "verified": rep.ok,
                                  "verification": rep.summary(), "top1_agreement": rep.top1_agreement,
                                  "holdout_top1_file": rep.exported_top1, "holdout_top1_torch": rep.reference_top1,
                                  "test_top1": scored["top1"], "test_images": scored["n"], "notes": r.notes}
                    self.echo(f"   wrote {path.relative_to(self.out)} ({r.size / 1024:.1f} KiB), verification passed; "
                              f"the file's test top-1 {scored['top1']:.2f}% (search: {c['test_top1']:.2f}%)")
                lat = {}
                if e.latency:
                    lat = self._latency(sub, arch, files, e.latency_runs)
                info = {"files": files, **lat, "first_budget": c["budget"]["name"]}
                done[k] = info
                rows.append({**row, **info})
            del ctx, test
        return {"exports": rows, "calib_images": s.calib_images, "calib_batch": s.calib_batch, "calib_seed": s.seed}

    def _latency(self, sub, arch: Arch, files: dict, runs: int) -> dict:
        import torch

        from ..measure.latency import time_module

        out = {}
        x = torch.randn(1, sub.space.in_channels, arch.r, arch.r)
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["latency_ms_torch"] = time_module(sub.cpu().eval(), x, warmup=3, repeats=runs, clock="cpu")
            if "onnx" in files and files["onnx"]["verified"] is not False:
                from ..export.verify import ort_session

                sess = ort_session(str(self.out / files["onnx"]["path"]), threads=1)
                name = sess.get_inputs()[0].name
                xn = x.numpy()
                for _ in range(3):
                    sess.run(None, {name: xn})
                times = []  # one intra-op thread runs in this thread: its CPU time, as for PyTorch
                for _ in range(runs):
                    t0 = time.thread_time()
                    sess.run(None, {name: xn})
                    times.append((time.thread_time() - t0) * 1e3)
                times.sort()
                out["latency_ms_onnx"] = times[len(times) // 2]
        finally:
            torch.set_num_threads(old)
        return out


def _costs(space: SearchSpace, arch: Arch) -> dict:
    from ..space import cost

    return cost.summary(space, arch)


def default_out(cfg: RunConfig, config_path: str | Path | None) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stem = Path(config_path).stem if config_path else cfg.name
    return Path("runs") / stem


def run_pipeline(config: str | Path | dict | RunConfig, out: str | Path | None = None, *,
                 overrides: list[str] | None = None, redo_changed: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print) -> RunResult:
    """Run (or continue) the pipeline described by a config file, dict or RunConfig."""
    path = None
    if isinstance(config, RunConfig):
        cfg, raw = config, to_dict(config)
    elif isinstance(config, dict):
        raw = apply_overrides(json.loads(json.dumps(config)), overrides or [])
        cfg = config_from_dict(raw)
    else:
        path = Path(config)
        cfg, raw = load_run_config(path, overrides)
    pipe = Pipeline(cfg, out if out is not None else default_out(cfg, path), raw=raw, progress=progress,
                    config_path=path, echo=echo)
    return pipe.run(redo_changed=redo_changed)


__all__ = ["RunConfig", "Pipeline", "RunResult", "StageMismatch", "load_run_config", "config_from_dict",
           "run_pipeline", "parse_budget", "read_marker", "validate_run_config", "default_out"]
