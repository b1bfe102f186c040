"""``oqat train CONFIG``: joint (sandwich) training of a supernet; works under torchrun."""

from __future__ import annotations

import sys

from ..args import add_procs_arg


def register(sub) -> None:
    p = sub.add_parser("train", help="train a (quantized) supernet; `torchrun ... -m oqat train` for DDP")
    p.add_argument("config", nargs="?", help="YAML training config (see configs/)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, final.pt")
    p.add_argument("--init", help="start from this checkpoint (FP supernet, or the output of `oqat inherit`)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the training run already in OUT (its final.pt, last.pt and metrics.jsonl only)")
    p.add_argument("--bits", type=int, help="override the config's bits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_procs_arg(p, "auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...training import TrainingDiverged, load_train_config, train
    from ...training.launch import choose_procs, launch

    overrides = list(args.set)
    if args.bits is not None:
        overrides.append(f"bits={args.bits}")
    if args.init:
        overrides.append(f"init={args.init}")
    cfg = load_train_config(args.config, overrides)
    procs = choose_procs(args.procs, "auto", cfg.train.device)
    if procs > 1:
        return launch(args.argv, procs)
    try:
        result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except TrainingDiverged as exc:
        print(f"oqat train: {exc}", file=sys.stderr)
        return 3
    print(f"trained {result.steps} steps; final checkpoint {result.checkpoint}")
    return 0
