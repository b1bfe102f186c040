"""Search and evaluation figures from trained supernet checkpoints.

For each checkpoint (--ckpt, repeatable) it reports:

* seconds per subnet evaluation (BN re-calibration + held-out evaluation, on this machine);
* evolutionary search versus random sampling with the same number of distinct subnets measured,
  under two MACs budgets (default: 25% and 50% of the way from the smallest to the largest
  subnet), best held-out top-1 for each, over --seeds seeds; the best subnets' test accuracy;
* the accuracy predictor's Kendall tau and RMSE on held-out subnets (fitted on --pred-samples
  uniformly random subnets, 20% held out).

All measurements go through one JSONL cache per checkpoint (in --out), so a rerun is cheap.

    python benchmarks/bench_search.py --ckpt runs/fmnist-4bit/final.pt --out runs/bench-search
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, help="supernet checkpoint (repeatable)")
    p.add_argument("--out", default="runs/bench-search")
    p.add_argument("--budget", action="append", default=None,
                   help="budgets (oqat search syntax); default: two MACs budgets at 25%% and 50%% of the range")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2, help="search / random-sampling repetitions")
    p.add_argument("--pred-samples", type=int, default=100, help="random subnets for the predictor (0: skip)")
    p.add_argument("--calib-images", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=1000, help="held-out images per evaluation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from oqat.measure import load_context, measure
    from oqat.search import Budget, CachedAccuracy, CostModel, EvolutionSearch, SearchConfig, random_search
    from oqat.search.predictor import fit_predictor, sample_distinct, split_holdout
    from oqat.space import cost

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, device {args.device}",
              "settings": {k: v for k, v in vars(args).items() if k != "ckpt"}, "checkpoints": []}
    lines = []
    for ckpt_path in args.ckpt:
        ctx = load_context(ckpt_path, split="holdout", calib_images=args.calib_images, eval_images=args.eval_images,
                           device=args.device)
        space, bits = ctx.space, ctx.bits
        direct = ctx.accuracy_fn()
        stem = Path(ckpt_path).stem
        acc = CachedAccuracy(direct, space, out / f"cache-{stem}-{bits}bit.jsonl",
                             {"source": "direct", **ctx.fingerprint()})
        costs = CostModel(space)
        lo, hi = cost.macs(space, space.smallest(bits)), cost.macs(space, space.largest(bits))
        texts = args.budget or [f"macs25:macs={lo + 0.25 * (hi - lo):.0f}", f"macs50:macs={lo + 0.5 * (hi - lo):.0f}"]
        budgets = [Budget.parse(t) for t in texts]
        entry = {"ckpt": str(ckpt_path), "space": space.name, "bits": bits, "budgets": []}
        test_ctx = load_context(ckpt_path, split="test", calib_images=args.calib_images, device=args.device)
        t0 = time.perf_counter()
        for b in budgets:
            evo, rnd = [], []
            for seed in range(args.seeds):
                cfg = SearchConfig(population=args.population, generations=args.generations, seed=seed)
                r = EvolutionSearch(space, bits, acc, costs, cfg).run(b)
                q = random_search(space, bits, acc, b, r.evaluations, costs=costs, seed=seed)
                evo.append(r)
                rnd.append(q)
            best = max(evo, key=lambda r: r.accuracy)
            test_top1 = measure(test_ctx.net, best.arch, test_ctx.calib, test_ctx.eval_data)["top1"]
            row = {"budget": b.to_dict(), "evaluations": [r.evaluations for r in evo],
                   "search_top1": [r.accuracy for r in evo], "random_top1": [q.accuracy for q in rnd],
                   "best_arch": best.arch.to_dict(), "best_macs": best.costs["macs"], "best_test_top1": test_top1}
            entry["budgets"].append(row)
            lines.append(f"| {stem} ({bits}-bit) | {b.name} ({b.constraints[0].limit / 1e6:.2f} M MACs) | "
                         f"{statistics.mean(row['evaluations']):.0f} | {statistics.mean(row['search_top1']):.2f} | "
                         f"{statistics.mean(row['random_top1']):.2f} | {test_top1:.2f} |")
        entry["search_seconds"] = time.perf_counter() - t0
        if args.pred_samples:
            archs = sample_distinct(space, args.pred_samples, bits, seed=12345)
            accs = []
            for i in range(0, len(archs), 16):
                accs += acc(archs[i:i + 16])
            tr, va = split_holdout(len(archs), 0.2, seed=0)
            pred = fit_predictor(space, [archs[i] for i in tr], [accs[i] for i in tr], bits=bits, seed=0)
            entry["predictor"] = pred.evaluate([archs[i] for i in va], [accs[i] for i in va])
            entry["predictor"]["train_n"] = len(tr)
        entry["measurements"] = acc.misses
        entry["seconds_per_evaluation"] = direct.seconds_per_eval if direct.calls else None
        report["checkpoints"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "budgets"}, indent=1), file=sys.stderr)

    print(f"machine: {report['machine']}")
    print(f"measurement: BN re-calibration on {args.calib_images} held-out images, top-1 on {args.eval_images} "
          f"held-out images; search population {args.population}, {args.generations} generations, "
          f"{args.seeds} seed(s)")
    print()
    print("| checkpoint | budget | subnets measured | evolution top-1 | random top-1 | best subnet test top-1 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    print()
    for e in report["checkpoints"]:
        s = f"{Path(e['ckpt']).stem} ({e['bits']}-bit): "
        if e.get("seconds_per_evaluation"):
            s += f"{e['seconds_per_evaluation']:.2f} s per subnet evaluation"
        if "predictor" in e:
            pr = e["predictor"]
            s += (f"; predictor on {pr['n']} held-out subnets (trained on {pr['train_n']}): "
                  f"Kendall tau {pr['kendall_tau']:.3f}, RMSE {pr['rmse']:.2f} points")
        print(s)
    (out / "bench_search.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
