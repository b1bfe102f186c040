"""Does re-measuring each budget's best few subnets on more images choose better subnets?
(``oqat search --finalists``, ``stages.search.finalists``.)

For a pipeline run folder, per bit-width: the subnets its search measured (``evaluated.csv``, the
search's own held-out score) and its budgets (``search.json``). Each budget's plain choice is the
best-scoring measured subnet that fits it. The test split is cut into two halves: half A stands
in for a larger held-out split and re-ranks each budget's K best with the search's own function
(:func:`oqat.search.rerank_finalists`); half B, seen by neither choice, judges both. (Only this
benchmark looks at test images to choose; the pipeline never does.)

    python benchmarks/bench_finalists.py --run runs/quickstart --bits 4 2 --finalists 5
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="pipeline run folder (supernet-<b>bit/, search-<b>bit/)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--finalists", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    from oqat.measure import DirectAccuracy, load_context
    from oqat.search import Budget, CachedAccuracy, CostModel, SearchResult, rerank_finalists
    from oqat.space import Arch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    gains = []
    print(f"{'bits':>4} {'budget':<10} {'plain choice':>13} {'judged':>7} {'re-ranked':>10} {'judged':>7} {'gain':>6}")
    for bits in args.bits:
        folder = run / f"search-{bits}bit"
        summary = json.loads((folder / "search.json").read_text())
        src = summary["accuracy_source"]
        ctx = load_context(run / f"supernet-{bits}bit" / "final.pt", split="test", calib_images=src["calib_images"],
                           calib_batch=src["calib_batch"], calib_seed=src["calib_seed"])
        space, costs = ctx.space, CostModel(ctx.space)
        with (folder / "evaluated.csv").open() as f:
            measured = [(Arch.from_dict(json.loads(r["arch"])), float(r["accuracy"])) for r in csv.DictReader(f)]
        plain = []
        for b in (Budget.parse({"name": r["budget"]["name"], **r["budget"]["constraints"]}) for r in summary["results"]):
            arch, acc = max((p for p in measured if b.satisfied(costs(p[0]))), key=lambda p: p[1])
            plain.append(SearchResult(b, arch, acc, costs(arch)))
        half = len(ctx.eval_data) // 2
        pick, judge = (CachedAccuracy(DirectAccuracy(ctx.net, ctx.calib, part, calib_batch=src["calib_batch"]), space)
                       for part in (ctx.eval_data[:half], ctx.eval_data[half:]))
        reranked = rerank_finalists(space, plain, measured, pick, costs, args.finalists)
        for p, r in zip(plain, reranked):
            a, b = judge([p.arch, r.arch])
            gains.append(b - a)
            print(f"{bits:>4} {p.budget.name:<10} {p.costs['macs'] / 1e6:>9.2f} MMAC {a:>7.2f} "
                  f"{r.costs['macs'] / 1e6:>6.2f} MMAC {b:>7.2f} {b - a:>+6.2f}")
    print(f"judged on {sum(x[0].size(0) for x in ctx.eval_data[half:])} test images; re-ranked on the other "
          f"{sum(x[0].size(0) for x in ctx.eval_data[:half])}; {args.finalists} finalists per budget")
    print(f"mean gain {statistics.mean(gains):+.2f} points; better in {sum(g > 0 for g in gains)}, "
          f"worse in {sum(g < 0 for g in gains)} of {len(gains)} budgets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
