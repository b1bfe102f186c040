"""Runs the planned stages of a RunConfig in a run folder, skipping what is done.

A stage records its completion in ``RUN/<stage>/stage.json`` with its typed results, wall time
and hash (:mod:`oqat.pipeline.plan`). A completed stage with the same hash is skipped; one that
was interrupted is continued (training resumes from ``checkpoints/last.pt``, search reuses its
measurement cache). A stage whose configuration changed after it started is an error naming the
stages, unless ``redo_changed`` discards and recomputes them. ``RUN/run.json`` describes the
plan, so the report can be rebuilt from the folder alone (:mod:`oqat.pipeline.summary`).
Under torchrun every rank runs this loop; rank 0 alone writes files, and decisions are taken
on rank 0's reading of the markers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ..training import distributed
from ..training.distributed import DistInfo
from ..utils.config import apply_overrides, to_dict
from ..utils.devices import resolve_device, threads
from ..utils.files import ensure_output_dir, escaping_links, folder_lock, write_text_atomic
from ..utils.fmt import few, fmt_s
from .config import RunConfig, config_from_dict, data_config, default_out, load_run_config, run_space
from .context import StageContext
from .markers import DamagedMarker, StageMismatch, discard_outputs, files_in, load_marker, write_marker
from .plan import Stage, plan_stages
from .report import write_report
from .results import outcome_from_dict
from .stages import RUNNERS
from .summary import RUN_FILE, describe_run

_DAMAGED = {"status": "damaged"}   # the marker of a stage whose stage.json cannot be read


@dataclass
class RunResult:
    out: Path
    stages: dict                # name -> marker dict
    report: Path | None
    ran: list[str]
    skipped: list[str]


class Pipeline:
    """Plans the stages of a RunConfig, checks them against what RUN already holds, runs the rest."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True,
                 config_path: str | Path | None = None, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.echo = echo
        base = Path(config_path).parent if config_path else None
        self.space = run_space(cfg, "config", base)     # channels/classes of the data where known
        self.data = data_config(cfg.data, "config")
        self.stages = plan_stages(cfg, self.space, self.data)
        self._info: DistInfo | None = None

    def dir(self, name: str) -> Path:
        return self.out / name

    # ------------------------------------------------------------------ status
    def _markers(self) -> dict[str, dict | None]:
        """Every stage's marker as rank 0 reads it, once each (on every rank: a collective)."""
        return {s.name: self._marker(s) for s in self.stages}

    def status(self, markers: dict[str, dict | None] | None = None) -> dict[str, str]:
        """Per stage: "done", "partial" (started, same config), "changed", "damaged" or "pending"."""
        markers = self._markers() if markers is None else markers
        out = {}
        for s in self.stages:
            m = markers[s.name]
            if m is None:
                out[s.name] = "pending"
            elif m is _DAMAGED:
                out[s.name] = "damaged"
            elif m.get("hash") != s.hash:
                out[s.name] = "changed"
            else:
                out[s.name] = "done" if m.get("status") == "complete" else "partial"
        return out

    def check_changes(self, redo_changed: bool = False) -> list[tuple[Stage, dict]]:
        """The stages to discard and recompute, with their markers: changed or damaged ones, only
        with `redo_changed`. Every rank calls it (the markers are read through rank 0)."""
        markers = self._markers()
        status = self.status(markers)
        changed = [s for s in self.stages if status[s.name] == "changed"]
        damaged = [s for s in self.stages if status[s.name] == "damaged"]
        if (changed or damaged) and not redo_changed:
            details = [f"{s.name} ({markers[s.name].get('status', '?')} with another configuration)" for s in changed]
            details += [f"{s.name} (its {s.name}/stage.json is damaged; its outputs are kept)" for s in damaged]
            raise StageMismatch(
                f"{self.out}: stage(s) {', '.join(details)}. Rerun with --redo-changed to discard and recompute "
                f"them (and what depends on them), restore the marker, or use another --out")
        return [(s, markers[s.name]) for s in changed + damaged]

    # ------------------------------------------------------------------ running
    def run(self, *, redo_changed: bool = False) -> RunResult:
        with threads(self.cfg.threads, "threads"):
            return self._run(redo_changed)

    def _run(self, redo_changed: bool) -> RunResult:
        device = resolve_device(self.cfg.train.get("device", "auto"), "train.device")
        info = self._info = distributed.init_from_env(device)
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        with ExitStack() as held:
            if info.is_main:
                ensure_output_dir(self.out)
                links = escaping_links(self.out)
                if links:
                    raise ValueError(f"{links[0]}: a symbolic link to {links[0].resolve()}, outside the run folder; "
                                     f"oqat never writes through such links: remove it"
                                     + (f" (and {len(links) - 1} more)" if len(links) > 1 else ""))
                held.enter_context(folder_lock(self.out))  # one invocation at a time in this folder
            return self._run_stages(info, device, redo_changed)

    def _run_stages(self, info: DistInfo, device: torch.device, redo_changed: bool) -> RunResult:
        ctx = StageContext(self.out, self.cfg, self.space, self.data, device, info, self.echo, self.progress)
        changed = self.check_changes(redo_changed)
        if info.is_main:
            for stage, marker in changed:
                self._discard(stage, marker)
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            write_text_atomic(self.out / RUN_FILE, json.dumps(describe_run(self, device), indent=2) + "\n")
        self._barrier()
        ran, skipped = [], []
        t_run = time.perf_counter()
        for i, stage in enumerate(self.stages, 1):
            banner = f"== [{i}/{len(self.stages)}] {stage.name}"
            marker = self._marker(stage)  # every rank decides on the same marker
            upstream_ran = sorted(set(stage.inputs) & set(ran))
            if upstream_ran and marker is not None:
                # An input was (re)computed in this invocation: this stage's outputs may be stale.
                ctx.say(f"{banner}: recomputed because {', '.join(upstream_ran)} ran again")
                if info.is_main:
                    self._discard(stage, marker)
                self._barrier()
                marker = None
            if marker is not None and marker.get("status") == "complete" and marker.get("hash") == stage.hash:
                self._record(ctx, stage, marker)
                skipped.append(stage.name)
                ctx.say(f"{banner}: done earlier ({fmt_s(marker.get('wall_s', 0))}), skipped")
                continue
            if not stage.collective and not info.is_main:
                continue
            resumed = marker is not None and marker.get("hash") == stage.hash
            attempts = int((marker or {}).get("attempts", 0)) + 1
            # Files in the stage folder that this run did not write: recorded, left alone, reported.
            preexisting = (marker or {}).get("preexisting") if resumed else self._foreign(stage)
            if info.is_main:
                self.echo(f"{banner}: {stage.title}" + (" (continuing)" if resumed else ""))
                if preexisting and not resumed:
                    self.echo(f"   {self.dir(stage.name)} already holds {len(preexisting)} file(s) oqat did not "
                              f"write ({few(preexisting)}); left alone")
                write_marker(self.dir(stage.name), {"stage": stage.name, "status": "running", "hash": stage.hash,
                                                    "spec": stage.spec, "inputs": stage.inputs,
                                                    "started": time.time(), "attempts": attempts,
                                                    "preexisting": preexisting or []})
            if stage.collective:  # the last stages (export) run on rank 0 alone: no collectives there
                self._barrier()
            t0 = time.perf_counter()
            outcome = RUNNERS[stage.kind](ctx, stage, self.dir(stage.name), resumed)
            wall = time.perf_counter() - t0
            record = {"stage": stage.name, "status": "complete", "hash": stage.hash, "spec": stage.spec,
                      "inputs": stage.inputs, "title": stage.title, "results": outcome.to_dict(), "wall_s": wall,
                      "finished": time.time(), "attempts": attempts, "resumed": resumed,
                      "preexisting": preexisting or [],
                      "files": [f for f in files_in(self.dir(stage.name)) if f not in set(preexisting or [])]}
            if info.is_main:
                write_marker(self.dir(stage.name), record)
                self.echo(f"   {stage.name} finished in {fmt_s(wall)}")
            self._record(ctx, stage, record)
            ran.append(stage.name)
            if stage.collective:
                self._barrier()
        report = None
        if info.is_main:
            report = write_report(self.out)
            self.echo(f"== report: {report} ({self.out / 'report.html'}); this invocation took "
                      f"{fmt_s(time.perf_counter() - t_run)}")
        if info.enabled:  # the other ranks wait for rank 0's export and report, then all leave together
            self._barrier()
            dist.destroy_process_group()
        return RunResult(self.out, dict(ctx.markers), report, ran, skipped)

    @staticmethod
    def _record(ctx: StageContext, stage: Stage, marker: dict) -> None:
        ctx.markers[stage.name] = marker
        ctx.outcomes[stage.name] = outcome_from_dict(stage.kind, marker["results"], f"{stage.name}/stage.json")

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def _marker(self, stage: Stage) -> dict | None:
        """The stage marker as rank 0 reads it, on every rank (a rank reading the file itself could
        see rank 0's next write and take another branch, which deadlocks the collectives);
        ``_DAMAGED`` for a marker that exists but cannot be read."""
        def read():
            try:
                return load_marker(self.dir(stage.name))
            except DamagedMarker:
                return _DAMAGED

        if self._info is None or not self._info.enabled:
            return read()
        box = [read() if self._info.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def _keep(stage: Stage) -> frozenset[str]:
        """Files a discard keeps: a search's measurement cache (its entries carry their context)."""
        return frozenset({"cache.jsonl"}) if stage.kind == "search" else frozenset()

    def _foreign(self, stage: Stage) -> list[str]:
        """Files already in a stage's folder before it starts (not written by this stage)."""
        return [f for f in files_in(self.dir(stage.name)) if Path(f).name not in self._keep(stage)]

    def _barrier(self) -> None:
        if self._info is not None and self._info.enabled:
            dist.barrier()

    def _discard(self, stage: Stage, marker: dict) -> None:
        """Remove what the stage wrote (its marker says what) and report what stays. Rank 0 alone
        discards, so the marker is the one every rank read before (reading it here would be a
        collective that the other ranks never join)."""
        kept = discard_outputs(self.dir(stage.name), None if marker is _DAMAGED else marker, self._keep(stage))
        kept = [f for f in kept if Path(f).name not in self._keep(stage)]
        if kept:
            self.echo(f"   kept {len(kept)} file(s) in {self.dir(stage.name)} that oqat did not record writing: "
                      f"{few(kept)}")


def run_pipeline(config: str | Path | dict | RunConfig, out: str | Path | None = None, *,
                 overrides: list[str] | None = None, redo_changed: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print) -> RunResult:
    """Run (or continue) the pipeline described by a config file, dict or RunConfig."""
    path = None
    if isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(json.loads(json.dumps(config)), overrides or []))
    else:
        path = Path(config)
        cfg, _ = load_run_config(path, overrides)
    pipe = Pipeline(cfg, out if out is not None else default_out(cfg, path), progress=progress, config_path=path,
                    echo=echo)
    return pipe.run(redo_changed=redo_changed)


__all__ = ["Pipeline", "RunResult", "run_pipeline"]
