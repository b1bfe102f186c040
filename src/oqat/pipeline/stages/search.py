"""The search stage of one bit-width: the evolutionary search of ``oqat search`` under every
budget (measurements cached in ``cache.jsonl``, so an interrupted search continues), then the
test-split figures of the largest, smallest and chosen subnets."""

from __future__ import annotations

from pathlib import Path

from ...measure import load_context
from ...search import (
    CachedAccuracy,
    CostModel,
    DistributedAccuracy,
    rerank_finalists,
    search_budgets,
    write_search_outputs,
)
from ...space import Arch, cost
from ..config import search_config
from ..context import StageContext
from ..plan import SearchPlan, Stage
from ..results import ChosenSubnet, SearchOutcome, SubnetScore


def run(ctx: StageContext, stage: Stage, folder: Path, resumed: bool) -> SearchOutcome:
    plan: SearchPlan = stage.plan
    s, bits = plan.settings, plan.bits
    source = f"supernet-{bits}bit"
    ckpt = ctx.checkpoint(source)
    kw = dict(calib_images=s.calib_images, calib_batch=s.calib_batch, calib_seed=s.seed, device=str(ctx.device))
    holdout = load_context(ckpt, split="holdout", eval_images=s.eval_images, **kw)
    space = holdout.space
    costs = CostModel(space)
    direct = holdout.accuracy_fn()
    context = {"source": "direct", **holdout.fingerprint()}
    # The checkpoint is named by its stage and completion time rather than its absolute path:
    # the run folder can move, and a retrained supernet never reuses old measurements.
    upstream = ctx.markers.get(source, {})
    context["ckpt"] = f"{source}/{ckpt.name}@{upstream.get('hash')}/{upstream.get('finished')}"
    accuracy = CachedAccuracy(DistributedAccuracy(direct), space, folder / "cache.jsonl", context)
    config = search_config(s)
    extremes = {"largest": space.largest(bits), "smallest": space.smallest(bits)}
    holdout_ext = dict(zip(extremes, accuracy(list(extremes.values()))))
    results, evaluated = search_budgets(space, bits, accuracy, costs, plan.budgets, config, progress=ctx.progress,
                                        measured_before=[(a, holdout_ext[k]) for k, a in extremes.items()])
    del holdout
    final_images = None
    if s.finalists:
        final = load_context(ckpt, split="holdout", eval_images=s.final_images, **kw)
        final_images = final.settings["eval_images"]
        fine = CachedAccuracy(DistributedAccuracy(final.accuracy_fn()), space, folder / "cache-finalists.jsonl",
                              {**context, **final.fingerprint(), "ckpt": context["ckpt"]})
        results = rerank_finalists(space, results, evaluated, fine, costs, s.finalists)
        holdout_ext = dict(zip(extremes, fine(list(extremes.values()))))  # their figures on the same images
        ctx.say(f"   the {s.finalists} best of each budget re-measured on {final_images} held-out images "
                f"({fine.misses} measured)")
    for r in results:
        ctx.say(f"   {r.budget}: best held-out top-1 {r.accuracy:.2f}% ({r.evaluations} subnets searched, "
                f"{len(evaluated)} measured in all)")
    source = {**context, "finalists": s.finalists, "final_images": final_images} if s.finalists else context
    meta = {"bits": bits, "ckpt": str(ckpt), "accuracy_source": source, "search": config.to_dict()}  # as oqat search
    if ctx.info.is_main:
        write_search_outputs(folder, space, results, evaluated, costs, pareto_metrics=s.pareto, meta=meta)
    # Test split: the final figures of the largest, smallest and chosen subnets.
    test = load_context(ckpt, split="test", eval_images=s.test_images, **kw)
    to_test: dict[str, Arch] = {}
    for a in list(extremes.values()) + [r.arch for r in results]:
        to_test.setdefault(space.key(a), a)
    test_acc = dict(zip(to_test, DistributedAccuracy(test.accuracy_fn())(list(to_test.values()))))
    supernet = {k: SubnetScore(a.to_dict(), holdout_ext[k], test_acc[space.key(a)], cost.summary(space, a))
                for k, a in extremes.items()}
    chosen = [ChosenSubnet(r.arch.to_dict(), r.accuracy, test_acc[space.key(r.arch)], cost.summary(space, r.arch),
                           budget=r.budget.to_dict(), evaluations=r.evaluations,
                           file=ctx.relative(folder / f"best_{r.budget.name}.json")) for r in results]
    for k, v in supernet.items():
        ctx.say(f"   {k} {bits}-bit subnet: held-out {v.holdout_top1:.2f}%, test {v.test_top1:.2f}%")
    for c in chosen:
        ctx.say(f"   best under {c.budget['name']}: held-out {c.holdout_top1:.2f}%, test {c.test_top1:.2f}%, "
                f"{c.costs['macs'] / 1e6:.2f} MMACs, {c.costs['bitops'] / 1e6:.1f} MBitOPs")
    return SearchOutcome(bits=bits, checkpoint=ctx.relative(ckpt), supernet=supernet, chosen=chosen,
                         evaluated=len(evaluated), measurements=accuracy.misses, cache_reused=accuracy.loaded,
                         seconds_per_evaluation=direct.seconds_per_eval if direct.calls else None,
                         calib_images=test.settings["calib_images"], holdout_images=s.eval_images,
                         test_images=test.settings["eval_images"], evaluated_csv=ctx.relative(folder / "evaluated.csv"),
                         finalists=s.finalists, final_images=final_images)


__all__ = ["run"]
