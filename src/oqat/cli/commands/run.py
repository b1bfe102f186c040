"""``oqat run CONFIG``: the whole OQAT pipeline (supernets, inheritance, search, baseline, export,
report) from one YAML file; rerunning the same command continues an interrupted run."""

from __future__ import annotations

import sys

from ..args import add_procs_arg


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="the whole pipeline from one config: supernets, inheritance, search, export, report",
        description="Run every stage of an OQAT experiment described by CONFIG (see configs/ and "
                    "docs/pipeline.md) into the run folder. Completed stages are skipped, interrupted ones "
                    "continue, so the same command resumes a run. Writes RUN/report.md and RUN/report.html.")
    p.add_argument("config", nargs="?", help="pipeline YAML (e.g. configs/quickstart.yaml); optional with "
                                              "--report-only --out RUN")
    p.add_argument("--out", help="run folder (default: the config's `out`, else runs/<config name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.supernet.epochs=3 (repeatable)")
    p.add_argument("--redo-changed", action="store_true",
                   help="discard and recompute stages whose configuration changed since they ran "
                        "(without it such a run stops with an error naming them)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the stages and their state")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report from the run folder (its run.json and stage markers; no config, "
                        "data or checkpoints needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_procs_arg(p, "the config's `procs`, else auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...pipeline import Pipeline, default_out, load_run_config, write_report
    from ...training import TrainingDiverged
    from ...training.launch import choose_procs, launch

    if args.report_only and args.config is None:
        if not args.out:
            raise ValueError("--report-only: give the run folder with --out RUN (or the config)")
        print(f"report: {write_report(args.out)}")
        return 0
    if args.config is None:
        raise ValueError("CONFIG: the pipeline YAML is required (e.g. configs/quickstart.yaml)")
    cfg, _ = load_run_config(args.config, args.set)
    out = args.out or default_out(cfg, args.config)
    if args.report_only:
        print(f"report: {write_report(out)}")
        return 0
    pipe = Pipeline(cfg, out, progress=not args.no_progress, config_path=args.config)
    procs = 1 if args.dry_run else choose_procs(args.procs, cfg.procs, cfg.train.get("device", "auto"))
    if procs > 1:
        return launch(args.argv, procs)
    if args.dry_run:
        status = pipe.status()
        width = max(len(s.name) for s in pipe.stages)
        print(f"run folder {pipe.out}")
        for i, s in enumerate(pipe.stages, 1):
            print(f"  [{i}/{len(pipe.stages)}] {s.name:{width}s}  {status[s.name]:8s} {s.title}")
        return 0
    try:
        result = pipe.run(redo_changed=args.redo_changed)
    except TrainingDiverged as exc:
        print(f"oqat run: {exc}. Fix the stage's settings and rerun with --redo-changed", file=sys.stderr)
        return 3
    if result.report is not None:
        print(f"done: {len(result.ran)} stage(s) run, {len(result.skipped)} skipped; report {result.report}")
    return 0
