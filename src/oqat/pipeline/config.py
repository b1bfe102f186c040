"""What ``oqat run CONFIG`` reads: the run and its stages as typed dataclasses, validated.

:func:`load_run_config` reads the YAML (with ``--set`` overrides), builds :class:`RunConfig`
(unknown keys and wrong types name the key path) and runs every check that needs no data
(bit-widths, budgets, the baseline arch, export formats) so that a bad config fails before
any training. Each stage's TrainConfig is resolved once, by :func:`stage_train_config`, when the
plan is made (:mod:`oqat.pipeline.plan`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataConfig
from ..export.deploy import FORMATS as EXPORT_FORMATS
from ..export.graph import FLOAT_WEIGHTS
from ..export.onnx import WEIGHT_MODES, check_int4_runtime
from ..search import METRICS, Budget, CostModel, SearchConfig, check_budget_feasible
from ..space import QUANT_BITS, Arch, SearchSpace
from ..training import ModelConfig, TrainConfig
from ..utils.config import apply_overrides, from_dict, load_yaml

# Stage keys that are shortcuts for the same key under the stage's `train` mapping.
_STAGE_SHORTCUTS = ("epochs", "max_steps", "lr")


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
    init: str | None = None                        # or from this checkpoint (e.g. a converted OFA supernet)
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
    finalists: int = 0                 # the N best of each budget re-measured on final_images decide the choice (0: off)
    final_images: int | None = None    # held-out images for the finalists (null: the whole split)
    seed: int = 0
    pareto: list[str] = field(default_factory=lambda: ["bitops", "macs"])


@dataclass
class ExportStage:
    enabled: bool = True
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    verify_images: int = 256
    onnx_weights: str = "int8"         # "int8" (codes stored as int8: 4x smaller, OpenVINO's integer kernels), "int4" or "float"
    float_weights: str = "float"       # SE / float classifier weights: "float" (as trained), "int8", "int8-classifier"
    opset: int | None = None           # 17, or 21 with onnx_weights int4
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
    threads: int | None = None         # torch intra-op threads per process (null: torch's default)
    procs: Any = "auto"                # CPU processes: "auto" (one single-threaded process per core) or N
    stages: StagesConfig = field(default_factory=StagesConfig)


def data_config(data: dict, where: str) -> DataConfig:
    """The run's DataConfig; errors name the key under `where`."""
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


def search_config(s: SearchStage, where: str = "stages.search") -> SearchConfig:
    """The stage's evolutionary-search settings as a SearchConfig (errors name the key)."""
    return SearchConfig.build(where, population=s.population, generations=s.generations,
                              parent_ratio=s.parent_ratio, mutation_ratio=s.mutation_ratio,
                              mutate_prob=s.mutate_prob, seed=s.seed)


def trained_bits(cfg: RunConfig) -> list[int]:
    return [cfg.stages.supernet.bits] + [t.bits for t in cfg.stages.inherit.targets]


def searched_bits(cfg: RunConfig) -> list[int]:
    s = cfg.stages.search
    if not s.enabled:
        return []
    return list(s.bits) if s.bits is not None else trained_bits(cfg)


def run_space(cfg: RunConfig, where: str = "config", base_dir: Path | None = None) -> SearchSpace:
    """The search space with the data's input channels and classes (when known without loading)."""
    try:
        space = SearchSpace.resolve(cfg.space, base_dir)
    except ValueError as exc:
        raise ValueError(f"{where}.space: {exc}") from None
    channels, classes = data_shape(data_config(cfg.data, where))
    changes = {k: v for k, v in (("in_channels", channels), ("num_classes", classes)) if v is not None}
    return space.replace(**changes) if changes else space


def _budget(spec: Any, space: SearchSpace, bits: int, where: str) -> Budget:
    """One budget of the config: ``Budget.parse`` plus what oqat run can offer (no latency table)
    and a check that the smallest subnet fits it."""
    budget = Budget.parse(spec, where=where, space=space, bits=bits)
    if "latency_ms" in budget.metrics:
        raise ValueError(f"{where}: latency_ms budgets need a latency table, which oqat run does not build; "
                         f"use oqat search --latency-table")
    try:
        check_budget_feasible(budget, space, CostModel(space), bits)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return budget


def budgets_for(cfg: RunConfig, space: SearchSpace, bits: int, where: str = "config") -> list:
    """The budgets searched at `bits` (common ones, then budgets_by_bits[bits]), validated."""
    s = cfg.stages.search
    out = []
    for i, spec in enumerate(s.budgets):
        out.append(_budget(spec, space, bits, f"{where}.stages.search.budgets[{i}]"))
    extra = s.budgets_by_bits.get(bits, s.budgets_by_bits.get(str(bits), []))
    for i, spec in enumerate(extra):
        out.append(_budget(spec, space, bits, f"{where}.stages.search.budgets_by_bits.{bits}[{i}]"))
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
    if cfg.procs != "auto" and (isinstance(cfg.procs, bool) or not isinstance(cfg.procs, int) or cfg.procs < 1):
        raise ValueError(f"{where}.procs: expected 'auto' or a positive integer, got {cfg.procs!r}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", cfg.name):
        raise ValueError(f"{where}.name: {cfg.name!r} may only contain letters, digits and . _ + -")
    data = data_config(cfg.data, where)
    if "arch" in cfg.train and cfg.train["arch"] is not None:
        raise ValueError(f"{where}.train.arch: not allowed in oqat run (supernets train every subnet); "
                         f"a single network is stages.baseline.arch")
    from_dict(TrainConfig, cfg.train, f"{where}.train")
    st = cfg.stages
    train_cfgs = []
    if st.fp.enabled:
        train_cfgs.append(("fp", stage_train_config(cfg.train, st.fp, f"{where}.stages.fp")))
    if st.supernet.init is not None:
        if st.fp.enabled and st.supernet.init_from_fp:
            raise ValueError(f"{where}.stages.supernet.init: the first quantized supernet starts either from "
                             f"stages.fp or from a checkpoint; set stages.fp.enabled: false to use {st.supernet.init}")
        if not Path(st.supernet.init).is_file():
            raise ValueError(f"{where}.stages.supernet.init: {st.supernet.init} is not a file")
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
    trained = trained_bits(cfg)
    for name in ("population", "generations", "calib_images", "calib_batch"):
        v = getattr(s, name)
        if v < (0 if name == "generations" else 1):
            raise ValueError(f"{where}.stages.search.{name}: must be >= {0 if name == 'generations' else 1}, got {v}")
    if isinstance(s.finalists, bool) or not isinstance(s.finalists, int) or s.finalists < 0:
        raise ValueError(f"{where}.stages.search.finalists: must be an integer >= 0 (0: no re-ranking), got {s.finalists!r}")
    for name in ("eval_images", "test_images", "final_images"):
        v = getattr(s, name)
        if v is not None and v < 1:
            raise ValueError(f"{where}.stages.search.{name}: must be >= 1 (or null for the whole split), got {v}")
    if s.finalists and (s.eval_images is None or (s.final_images is not None and s.final_images <= s.eval_images)):
        raise ValueError(f"{where}.stages.search.final_images: {s.final_images or 'the whole split'} is not more than "
                         f"eval_images ({s.eval_images or 'the whole split'}): the finalists would be measured on no more images")
    search_config(s, f"{where}.stages.search")
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
    for key, allowed in (("onnx_weights", WEIGHT_MODES), ("float_weights", FLOAT_WEIGHTS)):
        if getattr(e, key) not in allowed:
            raise ValueError(f"{where}.stages.export.{key}: {getattr(e, key)!r} is not one of {list(allowed)}")
    if e.enabled and e.onnx_weights == "int4" and "onnx" in e.formats:
        try:
            check_int4_runtime()        # at load time, not after the training stages
        except ValueError as exc:
            raise ValueError(f"{where}.stages.export.onnx_weights: {exc}") from None
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


def default_out(cfg: RunConfig, config_path: str | Path | None) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stem = Path(config_path).stem if config_path else cfg.name
    return Path("runs") / stem
