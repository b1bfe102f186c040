"""The stages of a run, planned once from the RunConfig: names, inputs, typed settings, hashes.

Each :class:`Stage` carries the typed configuration it runs with (``train`` for training
stages, ``budgets`` for searches, ...), resolved here and nowhere else, and ``spec``: the part
of it that determines the output, which is hashed together with the hashes of the stages it
reads. A completed stage whose hash is unchanged is skipped on the next invocation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..data import DataConfig
from ..export.onnx import default_opset
from ..search import Budget, Constraint
from ..space import FULL_PRECISION, Arch, SearchSpace, cost
from ..training import TrainConfig
from ..utils.config import to_dict
from .config import ExportStage, RunConfig, SearchStage, baseline_arch, budgets_for, searched_bits, stage_train_config

# Settings that change how a stage runs or what it logs, not what it computes: left out of hashes.
_UNHASHED_TRAIN = ("log_every", "device", "ckpt_every", "eval_images", "calib_images")
_UNHASHED_DATA = ("workers",)


@dataclass
class TrainPlan:
    """A training stage: bit-width, schedule, and where its weights start."""

    bits: int
    train: TrainConfig
    init_from: str | None = None       # a stage name ("fp", "supernet-4bit") or None
    init_path: str | None = None       # a checkpoint file given in the config
    inherit_factor: float | None = None  # bit inheritance from init_from (steps x factor per bit)
    inherit_from_bits: int | None = None
    images_like: list[str] = field(default_factory=list)  # baseline: as many images as these stages


@dataclass
class SearchPlan:
    bits: int
    budgets: list[Budget]
    settings: SearchStage
    baseline: Arch | None = None       # the baseline's arch, whose BitOPs become one more budget


@dataclass
class Stage:
    name: str
    kind: str                          # fp | train | search | baseline | export
    title: str                         # one-line description for the banner and the report
    spec: dict                         # what determines the output (hashed)
    plan: Any                          # TrainPlan | SearchPlan | ExportStage
    inputs: list[str] = field(default_factory=list)
    hash: str = ""
    collective: bool = True            # every torchrun rank takes part

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "title": self.title, "inputs": self.inputs}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed_train(tc: TrainConfig) -> dict:
    return {k: v for k, v in to_dict(tc).items() if k not in _UNHASHED_TRAIN}


def _schedule(tc: TrainConfig) -> str:
    steps = f", at most {tc.max_steps} steps" if tc.max_steps is not None else ""
    return f"{tc.epochs} epoch(s){steps}, lr {tc.lr:g}, batch {tc.batch_size}, {tc.num_random} random subnet(s)"


def plan_stages(cfg: RunConfig, space: SearchSpace, data: DataConfig) -> list[Stage]:
    """Every stage of the run in order, with typed settings and hashes."""
    st = cfg.stages
    hashed_data = {k: v for k, v in data.to_dict().items() if k not in _UNHASHED_DATA}
    if hashed_data.get("decode") == "auto":  # the default (today's behaviour): not part of older run hashes
        hashed_data.pop("decode")
    common = {"space": space.to_dict(), "data": hashed_data, "model": to_dict(cfg.model)}

    def train_stage(name: str, kind: str, title: str, p: TrainPlan, inputs: list[str], extra: dict | None = None):
        init = None
        if p.init_from and p.inherit_factor:
            init = {"from": p.init_from, "factor": p.inherit_factor, "from_bits": p.inherit_from_bits}
        elif p.init_from:
            init = {"from": p.init_from}
        elif p.init_path:
            init = {"path": p.init_path}
        spec = {"train_run": {**common, "bits": p.bits, "train": _hashed_train(p.train), "init": init}, **(extra or {})}
        return Stage(name, kind, title, spec, p, inputs)

    stages: list[Stage] = []
    trained: list[str] = []
    if st.fp.enabled:
        tc = stage_train_config(cfg.train, st.fp, "stages.fp")
        stages.append(train_stage("fp", "fp", f"full-precision supernet, {_schedule(tc)}", TrainPlan(FULL_PRECISION, tc), []))
        trained.append("fp")
    sb = st.supernet.bits
    tc = stage_train_config(cfg.train, st.supernet, "stages.supernet")
    from_fp = st.fp.enabled and st.supernet.init_from_fp
    origin = " from the FP one" if from_fp else (f" from {st.supernet.init}" if st.supernet.init else " from scratch")
    first = f"supernet-{sb}bit"
    stages.append(train_stage(first, "train", f"{sb}-bit supernet{origin}, {_schedule(tc)}",
                              TrainPlan(sb, tc, init_from="fp" if from_fp else None,
                                        init_path=None if from_fp else st.supernet.init),
                              ["fp"] if from_fp else []))
    trained.append(first)
    previous, prev_bits = first, sb
    for i, t in enumerate(st.inherit.targets):
        tc = stage_train_config(cfg.train, t, f"stages.inherit.targets[{i}]")
        src, src_bits = (previous, prev_bits) if st.inherit.chain else (first, sb)
        name = f"supernet-{t.bits}bit"
        stages.append(train_stage(name, "train", f"{t.bits}-bit supernet by bit inheritance from {src_bits} bit "
                                  f"(steps x{st.inherit.factor:g} per bit), fine-tune {_schedule(tc)}",
                                  TrainPlan(t.bits, tc, init_from=src, inherit_factor=st.inherit.factor,
                                            inherit_from_bits=src_bits), [src]))
        trained.append(name)
        previous, prev_bits = name, t.bits
    s = st.search
    barch = baseline_arch(cfg, space)
    for b in searched_bits(cfg):
        budgets = budgets_for(cfg, space, b)
        base = barch if barch is not None and barch.bits == b else None
        spec = {"bits": b, "budgets": [x.to_dict() for x in budgets],
                "baseline_budget": base.to_dict() if base is not None else None,
                **{k: getattr(s, k) for k in ("population", "generations", "parent_ratio", "mutation_ratio",
                                              "mutate_prob", "calib_images", "calib_batch", "eval_images",
                                              "test_images", "seed", "pareto")}}
        if s.finalists:  # only when on: the hashes of runs from before the re-ranking stay valid
            spec.update(finalists=s.finalists, final_images=s.final_images)
        if base is not None:  # one more budget: the baseline's BitOPs (from its arch, so not hashed again)
            budgets.append(Budget((Constraint("bitops", cost.bitops(space, base)),), "baseline"))
        title = (f"search at {b} bit: {len(budgets)} budget(s), population {s.population}, {s.generations} "
                 "generation(s)" + (f", the {s.finalists} best of each re-measured" if s.finalists else ""))
        stages.append(Stage(f"search-{b}bit", "search", title, spec, SearchPlan(b, budgets, s, base), [f"supernet-{b}bit"]))
    if barch is not None:
        bl = st.baseline
        explicit = bl.epochs is not None or bl.max_steps is not None or "epochs" in bl.train or "max_steps" in bl.train
        arch = {k: v for k, v in barch.to_dict().items() if k != "bits"}
        tc = stage_train_config(cfg.train, bl, "stages.baseline", arch=arch, eval_images=0)
        p = TrainPlan(bl.bits, tc, images_like=[] if explicit else list(trained))
        stages.append(train_stage("baseline", "baseline",
                                  f"baseline '{bl.name}' alone at {bl.bits} bit (LSQ, labels only), "
                                  + (_schedule(tc) if explicit else "as many epochs as the whole OQAT run"),
                                  p, [] if explicit else list(trained),
                                  {"name": bl.name, "schedule": "explicit" if explicit else "same images as the OQAT run"}))
    if st.export.enabled and s.enabled:
        e: ExportStage = st.export
        # bn_recalibration: files are exported BN-re-calibrated as the search measured them
        # (earlier runs exported the supernet's statistics; their export stage must not be reused).
        spec = {**{k: v for k, v in to_dict(e).items() if k not in ("enabled", "latency_runs")},
                "bn_recalibration": "as the search"}
        # the opset the files get, and float_weights only where it is not the default: the hash of
        # an export stage run before these settings existed stays the same
        spec["opset"] = default_opset(e.onnx_weights) if e.opset is None else e.opset
        if spec["float_weights"] == "float":
            spec.pop("float_weights")
        stages.append(Stage("export", "export", f"export of the chosen subnets ({', '.join(e.formats)})"
                            + (" and latency" if e.latency else ""), spec, e,
                            [x.name for x in stages if x.kind == "search"], collective=False))
    hashes: dict[str, str] = {}
    for stage in stages:
        stage.hash = _hash({"stage": stage.name, "spec": stage.spec, "inputs": {i: hashes[i] for i in stage.inputs}})
        hashes[stage.name] = stage.hash
    return stages


__all__ = ["SearchPlan", "Stage", "TrainPlan", "plan_stages"]
