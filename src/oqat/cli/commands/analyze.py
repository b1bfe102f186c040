"""``oqat analyze``: accuracy vs cost per bit-width and accuracy drop vs architecture factors."""

from __future__ import annotations

from pathlib import Path

from ...utils.files import ensure_output_dir
from .eval import add_context_args, context_from_args


def register(sub) -> None:
    p = sub.add_parser("analyze", help="quantization-friendliness study over random subnets of one or more checkpoints")
    p.add_argument("--ckpt", action="append", required=True,
                   help="supernet checkpoint, repeatable (one per bit-width, same search space)")
    p.add_argument("--samples", type=int, default=100, help="random subnets measured at every bit-width")
    p.add_argument("--out", default="runs/analyze", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    add_context_args(p, ckpt=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...search import CachedAccuracy
    from ...search.analyze import analyze

    if args.samples < 3:
        raise ValueError(f"--samples: need at least 3 subnets, got {args.samples}")
    ensure_output_dir(args.out)
    fns, labels, space = {}, {}, None
    for path in args.ckpt:
        ctx = context_from_args(args, ckpt=path)
        if space is None:
            space = ctx.space
        elif ctx.space.to_dict() != space.to_dict():
            raise ValueError(f"--ckpt {path}: its search space differs from the first checkpoint's ({ctx.space.differences(space)})")
        if ctx.bits in fns:
            raise ValueError(f"--ckpt {path}: two checkpoints are {ctx.bits}-bit ({labels[ctx.bits]} and {path}); "
                             "give one per bit-width")
        cache = Path(args.out) / "cache.jsonl"
        fns[ctx.bits] = CachedAccuracy(ctx.accuracy_fn(), ctx.space, cache,
                                       {"source": "direct", **ctx.fingerprint()})
        labels[ctx.bits] = f"{ctx.bits}-bit" if ctx.bits != 32 else "full precision"
    summary = analyze(space, fns, args.samples, args.out, seed=args.seed, labels=labels)
    for b, p in summary["per_bits"].items():
        print(f"{labels[int(b)]:>15s}: mean top-1 {p['mean_acc']:.2f}% over {args.samples} subnets")
    print(f"figures and summary.md in {args.out}")
    return 0
