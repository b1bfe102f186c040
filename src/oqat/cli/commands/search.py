"""``oqat search``: evolutionary search for the most accurate subnet under cost budgets."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ...utils.files import ensure_output_dir
from .eval import add_context_args, context_from_args

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("search", help="evolutionary search under MACs/BitOPs/size/latency budgets")
    p.add_argument("--ckpt", help="supernet checkpoint (accuracy by direct evaluation on the held-out split)")
    p.add_argument("--predictor", help="accuracy predictor file (oqat predictor fit) used instead of direct "
                                       "evaluation; with --ckpt the best subnets are then also measured")
    p.add_argument("--budget", action="append", required=True, metavar="[NAME:]METRIC=VALUE[,...]",
                   help="budget, repeatable (one search each), e.g. macs=5M or 'small:bitops=200M,params=1M'; "
                        "metrics: macs, bitops, oqa_flops, params, size_bits, latency_ms")
    p.add_argument("--out", default="runs/search", help="output folder")
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--parent-ratio", type=float, default=0.25)
    p.add_argument("--mutation-ratio", type=float, default=0.5)
    p.add_argument("--mutate-prob", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="JSONL evaluation cache (default: OUT/cache.jsonl)")
    p.add_argument("--no-cache-file", action="store_true", help="keep the cache in memory only")
    p.add_argument("--latency-table", default=None, help="latency table (oqat latency-table) for latency_ms budgets")
    p.add_argument("--pareto", default=None, help="comma-separated cost metrics for Pareto fronts "
                                                  "(default: the budgets' metrics and macs)")
    p.add_argument("--finalists", type=int, default=0, metavar="K",
                   help="re-measure the K best subnets of each budget on --final-images held-out images and "
                        "choose among them by that figure (needs --ckpt; default 0: off)")
    p.add_argument("--final-images", type=int, default=None, metavar="N",
                   help="held-out images for the finalists (default: the whole held-out split)")
    p.add_argument("--random-baseline", action="store_true",
                   help="also report random sampling with the same number of evaluations")
    add_context_args(p, split=False, ckpt=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...search import (
        METRICS,
        Budget,
        CachedAccuracy,
        CostModel,
        DistributedAccuracy,
        SearchConfig,
        best_of_measured,
        check_budget_feasible,
        distinct_measured,
        is_main_process,
        random_search,
        rerank_finalists,
        search_budgets,
        write_search_outputs,
    )
    from ...training.distributed import current, init_from_env
    from ...utils.devices import resolve_device

    if not args.ckpt and not args.predictor:
        raise ValueError("give --ckpt (direct evaluation) and/or --predictor")
    if args.finalists < 0:
        raise ValueError(f"--finalists: must be >= 0 (0: no re-ranking), got {args.finalists}")
    if args.finalists and not args.ckpt:
        raise ValueError("--finalists: needs --ckpt (the finalists are measured on its held-out images)")
    if args.final_images is not None and args.final_images < 1:
        raise ValueError(f"--final-images: must be >= 1, got {args.final_images}")
    if args.finalists and (args.eval_images is None or (args.final_images is not None
                                                         and args.final_images <= args.eval_images)):
        raise ValueError(f"--final-images: {args.final_images or 'the whole split'} is not more than --eval-images "
                         f"({args.eval_images or 'the whole split'}): the finalists would be measured on no more images")
    budgets = [Budget.parse(t) for t in args.budget]
    names = [b.name for b in budgets]
    if len(set(names)) != len(names):
        raise ValueError(f"--budget: two budgets have the same name ({names}); name them NAME:METRIC=VALUE")
    config = SearchConfig.build(flags=True, population=args.population, generations=args.generations,
                                parent_ratio=args.parent_ratio, mutation_ratio=args.mutation_ratio,
                                mutate_prob=args.mutate_prob, seed=args.seed)
    init_from_env(resolve_device(args.device))
    out = ensure_output_dir(args.out)  # before any measurement: an unwritable folder fails now, not later

    ctx = context_from_args(args, split="holdout") if args.ckpt else None
    direct = None
    if args.predictor:
        from ...search.predictor import Predictor, PredictorAccuracy

        predictor = Predictor.load(args.predictor)
        space, bits = predictor.space, predictor.bits
        if ctx is not None and (ctx.space.to_dict() != space.to_dict() or ctx.bits != bits):
            raise ValueError(f"--predictor {args.predictor} was fitted for {space.name} at {bits} bits, "
                             f"the checkpoint is {ctx.space.name} at {ctx.bits} bits")
        accuracy = CachedAccuracy(PredictorAccuracy(predictor), space)
        source = {"source": "predictor", "predictor": str(Path(args.predictor).resolve())}
    else:
        space, bits = ctx.space, ctx.bits
        direct = ctx.accuracy_fn()
        context = {"source": "direct", **ctx.fingerprint()}
        path = None if args.no_cache_file else Path(args.cache or out / "cache.jsonl")
        accuracy = CachedAccuracy(DistributedAccuracy(direct), space, path, context)
        source = context
    table = None
    if args.latency_table:
        from ...measure.latency import load_table, table_latency

        table = load_table(args.latency_table, space)
    costs = CostModel(space, table_latency(table, space) if table is not None else None)
    for b in budgets:  # every budget checked before any measurement
        check_budget_feasible(b, space, costs, bits)
    pareto = args.pareto.split(",") if args.pareto else list(dict.fromkeys([m for b in budgets for m in b.metrics] + ["macs"]))
    for m in pareto:
        if m not in METRICS or (m == "latency_ms" and table is None):
            raise ValueError(f"--pareto: {m!r} is not an available metric ({list(METRICS)}; latency_ms needs --latency-table)")

    results, evaluated = search_budgets(space, bits, accuracy, costs, budgets, config)
    if args.finalists:
        final = context_from_args(argparse.Namespace(**{**vars(args), "eval_images": args.final_images}),
                                  split="holdout")
        fine = CachedAccuracy(DistributedAccuracy(final.accuracy_fn()), space,
                              None if args.no_cache_file else out / "cache-finalists.jsonl",
                              {"source": "direct", **final.fingerprint()})
        results = rerank_finalists(space, results, evaluated, fine, costs, args.finalists)
        source = {**source, "finalists": args.finalists, "final_images": final.settings["eval_images"]}
    baselines = []
    if args.random_baseline:  # random sampling with as many distinct subnets as each search measured
        baselines = [random_search(space, bits, accuracy, r.budget, r.evaluations, costs=costs, seed=args.seed)
                     for r in results]
        # each baseline's choice: the best of the random samples that fits it, like for like
        sampled = distinct_measured(space, [p for r in baselines for p in r.candidates])
        baselines = best_of_measured(baselines, sampled, costs)
        evaluated = distinct_measured(space, evaluated + sampled)

    measured = {}
    if args.predictor and ctx is not None:  # predicted best subnets, measured for real
        fn = ctx.accuracy_fn()
        for r in results:
            measured[r.budget.name] = fn([r.arch])[0]

    meta = {"bits": bits, "ckpt": args.ckpt, "accuracy_source": source, "search": config.to_dict()}
    if is_main_process():
        summary = write_search_outputs(out, space, results, evaluated, costs, pareto_metrics=pareto,
                                       meta=meta)
        if baselines or measured or direct is not None:
            summary["random_baseline"] = [x.to_dict() for x in baselines]
            summary["measured_top1"] = measured
            summary["measurements"] = accuracy.misses
            if direct is not None and direct.calls:
                summary["seconds_per_evaluation"] = direct.seconds_per_eval
            (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
        for i, r in enumerate(results):
            line = f"{r.budget}: top-1 {r.accuracy:.2f}%"
            if r.budget.name in measured:
                line += f" (predicted; measured {measured[r.budget.name]:.2f}%)"
            line += "  " + "  ".join(f"{m}={r.costs[m]:.4g}" for m in r.budget.metrics)
            line += f"  [{r.evaluations} subnets]"
            if baselines:
                line += f"  random sampling: {baselines[i].accuracy:.2f}%"
            print(line)
            print(f"  -> {out / f'best_{r.budget.name}.json'}")
        if direct is not None and direct.calls:
            ranks = f" over {current().world_size} ranks" if current().enabled else ""
            print(f"{accuracy.misses} subnets measured{ranks} ({accuracy.loaded} reused from the cache), "
                  f"{direct.seconds_per_eval:.2f} s per measurement" + (" on rank 0" if ranks else ""))
        print(f"Pareto fronts and the evaluated set in {out}")
    return 0
