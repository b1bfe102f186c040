"""``oqat predictor fit|eval``: collect (subnet, accuracy) pairs, train and check the accuracy MLP."""

from __future__ import annotations

import json
from pathlib import Path

from ...utils.files import ensure_output_file
from .eval import add_context_args, context_from_args


def register(sub) -> None:
    p = sub.add_parser("predictor", help="accuracy predictor: fit it on measured subnets, or evaluate it")
    verbs = p.add_subparsers(dest="predictor_command", metavar="{fit,eval}", required=True)

    f = verbs.add_parser("fit", help="measure N random subnets of a checkpoint and train the predictor")
    f.add_argument("--samples", type=int, default=500, help="random subnets to measure")
    f.add_argument("--out", default="runs/predictor.pt", help="predictor file")
    f.add_argument("--cache", default=None, help="JSONL measurement cache (default: OUT with .cache.jsonl)")
    f.add_argument("--val-frac", type=float, default=0.2, help="fraction of the subnets held out to report tau/RMSE")
    f.add_argument("--hidden", type=int, default=400)
    f.add_argument("--layers", type=int, default=3)
    f.add_argument("--epochs", type=int, default=300)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--seed", type=int, default=0)
    add_context_args(f, split=False)
    f.set_defaults(func=run_fit)

    e = verbs.add_parser("eval", help="Kendall tau and RMSE of a predictor on measured subnets")
    e.add_argument("--predictor", required=True, help="predictor file")
    e.add_argument("--samples", type=int, default=100, help="fresh random subnets to measure (with --ckpt)")
    e.add_argument("--seed", type=int, default=1, help="sampling seed (use another than fit's)")
    e.add_argument("--cache", default=None, help="JSONL cache of measurements: with --ckpt reused and extended "
                   "(default: PREDICTOR.eval.cache.jsonl), without it the subnets to score")
    e.add_argument("--json", action="store_true")
    e.add_argument("--ckpt", default=None, help="supernet checkpoint to measure fresh subnets with")
    add_context_args(e, split=False, ckpt=False)
    e.set_defaults(func=run_eval)


def _measurer(args, default_cache: Path):
    from ...search import CachedAccuracy, DistributedAccuracy
    from ...training.distributed import init_from_env
    from ...utils.devices import resolve_device

    init_from_env(resolve_device(args.device))
    ctx = context_from_args(args, split="holdout")
    direct = ctx.accuracy_fn()
    cache_path = Path(args.cache) if args.cache else default_cache
    acc = CachedAccuracy(DistributedAccuracy(direct), ctx.space, cache_path, {"source": "direct", **ctx.fingerprint()})
    return ctx, direct, acc


def _measure_all(acc, archs, desc: str) -> list[float]:
    from tqdm import tqdm

    out: list[float] = []
    chunk = 16
    with tqdm(total=len(archs), desc=desc, unit="subnet", disable=None) as bar:
        for i in range(0, len(archs), chunk):
            out += acc(archs[i:i + chunk])
            bar.update(len(archs[i:i + chunk]))
    return out


def run_fit(args) -> int:
    from ...search import is_main_process
    from ...search.predictor import fit_predictor, sample_distinct, split_holdout

    if args.samples < 5:
        raise ValueError(f"--samples: need at least 5 subnets to fit and check a predictor, got {args.samples}")
    out = ensure_output_file(args.out, "--out")
    ctx, direct, acc = _measurer(args, out.with_suffix(".cache.jsonl"))
    archs = sample_distinct(ctx.space, args.samples, ctx.bits, args.seed)
    accs = _measure_all(acc, archs, "measuring subnets")
    train_idx, val_idx = split_holdout(len(archs), args.val_frac, args.seed)
    pred = fit_predictor(ctx.space, [archs[i] for i in train_idx], [accs[i] for i in train_idx], bits=ctx.bits,
                         hidden=args.hidden, layers=args.layers, epochs=args.epochs, lr=args.lr, seed=args.seed)
    val = pred.evaluate([archs[i] for i in val_idx], [accs[i] for i in val_idx])
    train = pred.evaluate([archs[i] for i in train_idx], [accs[i] for i in train_idx])
    pred.metrics = {"val": val, "train": train}
    pred.meta = {"ckpt": str(Path(args.ckpt).resolve()), "samples": args.samples, "seed": args.seed,
                 "measurements": acc.misses, "seconds_per_evaluation": direct.seconds_per_eval if direct.calls else None,
                 "measure_settings": {k: v for k, v in ctx.settings.items() if k != "data"}}
    if is_main_process():
        pred.save(out)
        print(f"measured {len(archs)} subnets ({acc.misses} new, {acc.loaded} from {acc.path})"
              + (f", {direct.seconds_per_eval:.2f} s each" if direct.calls else ""))
        print(f"held-out subnets ({val['n']}): Kendall tau {val['kendall_tau']:.3f}, RMSE {val['rmse']:.3f} points")
        print(f"training subnets ({train['n']}): Kendall tau {train['kendall_tau']:.3f}, RMSE {train['rmse']:.3f} points")
        print(f"predictor saved to {out}")
    return 0


def run_eval(args) -> int:
    from ...search.predictor import Predictor, sample_distinct

    pred = Predictor.load(args.predictor)
    if args.ckpt:
        ctx, _, acc = _measurer(args, Path(args.predictor).with_suffix(".eval.cache.jsonl"))
        if ctx.space.to_dict() != pred.space.to_dict() or ctx.bits != pred.bits:
            raise ValueError(f"--predictor {args.predictor} was fitted for {pred.space.name} at {pred.bits} bits, "
                             f"the checkpoint is {ctx.space.name} at {ctx.bits} bits")
        # Fresh subnets: never those the predictor's own cache holds (its training data).
        train_cache = Path(args.predictor).with_suffix(".cache.jsonl")
        exclude = set()
        if train_cache.is_file() and (not args.cache or Path(args.cache) != train_cache):
            for line in train_cache.read_text().splitlines():
                try:
                    exclude.add(json.loads(line)["key"])
                except (json.JSONDecodeError, KeyError):
                    pass
        archs = sample_distinct(pred.space, args.samples, pred.bits, args.seed, exclude=exclude)
        accs = _measure_all(acc, archs, "measuring subnets")
    elif args.cache:
        from ...space import Arch

        path = Path(args.cache)
        if not path.is_file():
            raise ValueError(f"--cache: {path} not found")
        seen = {}
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                a = Arch.from_dict(row["arch"])
                seen[pred.space.key(a)] = (a, float(row["accuracy"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{i}: not a valid cache line ({exc})") from None
        archs, accs = [v[0] for v in seen.values()], [v[1] for v in seen.values()]
    else:
        raise ValueError("give --ckpt (measure fresh subnets) or --cache FILE (reuse measured ones)")
    m = pred.evaluate(archs, accs)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(f"{m['n']} subnets: Kendall tau {m['kendall_tau']:.3f}, RMSE {m['rmse']:.3f} points")
    return 0
