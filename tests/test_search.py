"""Evolutionary search: budgets, determinism, constraints, the evaluation cache, Pareto fronts,
outputs, the random baseline, the analysis study, and the eval/search CLI on a tiny checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random

import pytest
import torch

from oqat import Arch, SearchSpace, build_supernet
from oqat.search import (
    Budget,
    CachedAccuracy,
    CostModel,
    DistributedAccuracy,
    EvolutionSearch,
    SearchConfig,
    best_of_measured,
    check_budget_feasible,
    pareto_front,
    parse_number,
    random_search,
    rerank_finalists,
    write_search_outputs,
)
from oqat.search.analyze import analyze, factors
from oqat.space import cost


class FakeAccuracy:
    """Deterministic accuracy: grows with log MACs, shrinks with depth, plus per-arch 'noise'
    derived from the canonical arch (so equal networks get equal accuracy). Counts calls."""

    def __init__(self, space):
        self.space = space
        self.calls = 0
        self.batches = []

    def one(self, a: Arch) -> float:
        key = self.space.key(a)
        noise = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32
        return 20 + 8 * math.log(cost.macs(self.space, a) / 1e6) - 0.3 * sum(a.d) + 2 * noise

    def __call__(self, archs):
        self.calls += len(archs)
        self.batches.append(len(archs))
        return [self.one(a) for a in archs]


def _mid_budget(space, metric="macs", frac=0.3, bits=4):
    lo = cost.summary(space, space.smallest(bits))[metric]
    hi = cost.summary(space, space.largest(bits))[metric]
    return lo + frac * (hi - lo)


SMALL = dict(population=12, generations=4, seed=0)


# ----------------------------------------------------------------------------- budgets
def test_parse_number_and_budget():
    assert parse_number("5M") == 5e6 and parse_number("1.5G") == 1.5e9 and parse_number("3e6") == 3e6
    assert parse_number("200k") == 2e5
    with pytest.raises(ValueError, match="not a number"):
        parse_number("five")
    b = Budget.parse("macs=5M")
    assert b.name == "macs_5M" and b.constraints[0].metric == "macs" and b.constraints[0].limit == 5e6
    b = Budget.parse("small:bitops<=200M, params<=1M")
    assert b.name == "small" and b.metrics == ["bitops", "params"]
    assert b.satisfied({"bitops": 2e8, "params": 1e6}) and not b.satisfied({"bitops": 2e8 + 1, "params": 1})
    with pytest.raises(ValueError, match="flops"):
        Budget.parse("flops=5M")
    with pytest.raises(ValueError, match="METRIC=VALUE"):
        Budget.parse("macs 5M")
    with pytest.raises(ValueError, match="twice"):
        Budget.parse("macs=5M,macs=6M")


def test_impossible_budget_names_the_budget(space):
    lo = cost.macs(space, space.smallest(4))
    b = Budget.parse(f"tiny:macs={lo * 0.9:.0f}")
    with pytest.raises(ValueError, match="budget tiny is impossible"):
        check_budget_feasible(b, space, CostModel(space), 4)
    with pytest.raises(ValueError, match="tiny is impossible"):
        EvolutionSearch(space, 4, FakeAccuracy(space), config=SearchConfig(**SMALL)).run(b)
    # the smallest subnet itself is feasible at exactly its cost
    check_budget_feasible(Budget.parse(f"macs={lo}"), space, CostModel(space), 4)
    with pytest.raises(ValueError, match="latency table"):
        check_budget_feasible(Budget.parse("latency_ms=3"), space, CostModel(space), 4)


def test_search_config_validation():
    with pytest.raises(ValueError, match="population"):
        SearchConfig(population=1)
    with pytest.raises(ValueError, match="mutate_prob: must lie in"):
        SearchConfig(mutate_prob=0)
    with pytest.raises(ValueError, match="^--mutate-prob: must lie in"):      # as a command-line flag
        SearchConfig.build(flags=True, mutate_prob=0)
    with pytest.raises(ValueError, match=r"^stages\.search\.population: need at least 2"):  # as a config key
        SearchConfig.build("stages.search", population=1)
    with pytest.raises(ValueError, match="must be <= 1"):
        SearchConfig(parent_ratio=0.6, mutation_ratio=0.6)


# ----------------------------------------------------------------------------- search
def test_search_is_deterministic(space):
    budget = Budget.parse(f"macs={_mid_budget(space):.0f}")
    runs = [EvolutionSearch(space, 4, FakeAccuracy(space), config=SearchConfig(**SMALL)).run(budget, progress=False)
            for _ in range(2)]
    assert runs[0].arch == runs[1].arch and runs[0].accuracy == runs[1].accuracy
    assert runs[0].history == runs[1].history
    assert [a for a, _ in runs[0].candidates] == [a for a, _ in runs[1].candidates]
    other = EvolutionSearch(space, 4, FakeAccuracy(space), config=SearchConfig(**{**SMALL, "seed": 1})).run(
        budget, progress=False)
    assert [a for a, _ in other.candidates] != [a for a, _ in runs[0].candidates]


def test_search_with_direct_measurement_is_deterministic(space):
    """Real measurements (extract, re-calibrate, evaluate) on a tiny supernet: same seed, same search."""
    from torch.utils.data import TensorDataset

    from oqat.measure import DirectAccuracy, calibration_batches

    torch.manual_seed(0)
    net = build_supernet(space, 4, impl="eager")
    net.train()
    with torch.no_grad():
        for a in (space.largest(4), space.smallest(4)):
            net.set_arch(a)
            net(torch.randn(8, 3, a.r, a.r))
    net.eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    calib = calibration_batches(data, 16, 16)
    batches = [data.tensors]
    budget = Budget.parse(f"macs={_mid_budget(space):.0f}")
    runs = []
    for _ in range(2):
        fn = DirectAccuracy(net, calib, batches)
        runs.append(EvolutionSearch(space, 4, CachedAccuracy(fn, space), config=SearchConfig(population=4, generations=1))
                    .run(budget, progress=False))
        assert fn.calls == runs[-1].evaluations
    assert runs[0].arch == runs[1].arch and runs[0].accuracy == runs[1].accuracy
    assert runs[0].candidates == runs[1].candidates


def test_every_returned_and_evaluated_arch_respects_its_budget(space):
    costs = CostModel(space)
    budgets = [Budget.parse(f"macs={_mid_budget(space, 'macs', 0.1):.0f}"),
               Budget.parse(f"b:bitops={_mid_budget(space, 'bitops', 0.4):.0f},params={_mid_budget(space, 'params', 0.5):.0f}"),
               Budget.parse(f"size_bits={_mid_budget(space, 'size_bits', 0.05):.0f}")]
    fake = FakeAccuracy(space)
    search = EvolutionSearch(space, 4, fake, costs, SearchConfig(**SMALL))
    for b in budgets:
        r = search.run(b, progress=False)
        assert b.satisfied(costs(r.arch)) and r.arch.bits == 4
        space.validate(r.arch)
        assert all(b.satisfied(costs(a)) for a, _ in r.candidates)
        assert r.accuracy == pytest.approx(fake.one(r.arch))
        assert r.accuracy == max(acc for _, acc in r.candidates)
        assert r.history == sorted(r.history) and len(r.history) == SMALL["generations"] + 1


def _two_budget_search(space, population: int):
    """(costs, small budget, unlimited budget, the fake accuracy, one search result per budget)."""
    costs = CostModel(space)
    small, large = Budget.parse(f"s:macs={_mid_budget(space, 'macs', 0.3):.0f}"), Budget.parse("l:macs=1e12")
    fake = FakeAccuracy(space)
    search = EvolutionSearch(space, 4, fake, costs, SearchConfig(population=population, generations=1, seed=0))
    return costs, small, large, fake, [search.run(b, progress=False) for b in (small, large)]


def test_best_of_measured_takes_any_fitting_subnet_found_under_another_budget(space):
    costs, small, large, fake, results = _two_budget_search(space, 6)
    best_small = max(results[0].candidates, key=lambda p: p[1])
    # a subnet that fits the small budget and beats everything measured, as if found elsewhere
    found = max((space.sample(random.Random(i), 4) for i in range(400)),
                key=lambda a: fake.one(a) if small.satisfied(costs(a)) else -1)
    too_big, too_big_acc = space.largest(4), 1000.0  # the best of all, but fits only the large budget
    assert fake.one(found) > best_small[1] and not small.satisfied(costs(too_big))
    measured = [(too_big, too_big_acc), (found, fake.one(found))] + results[0].candidates + results[1].candidates
    chosen = best_of_measured(results, measured, costs)
    assert chosen[0].arch == found and chosen[0].accuracy == fake.one(found)
    assert chosen[0].costs == costs(found) and small.satisfied(chosen[0].costs)
    assert chosen[1].arch == too_big and chosen[1].accuracy == too_big_acc
    assert [c.evaluations for c in chosen] == [r.evaluations for r in results]  # the search's own count
    # nothing better that fits: the search's own choice stays (ties included)
    assert best_of_measured(results[:1], results[0].candidates, costs)[0] == results[0]


def test_rerank_finalists_lets_more_images_decide_among_the_best_few(space):
    costs, small, large, fake, results = _two_budget_search(space, 8)
    measured = [p for r in results for p in r.candidates]
    ranked = {b.name: sorted((p for p in measured if b.satisfied(costs(p[0]))), key=lambda p: -p[1])
              for b in (small, large)}
    # the finer measurement prefers each budget's third-best subnet; anything else scores lower
    favourite = {space.key(ranked[b][2][0]) for b in ("s", "l")}
    asked = []

    def fine(archs):
        asked.extend(space.key(a) for a in archs)
        return [90.0 if space.key(a) in favourite else 50.0 + fake.one(a) / 100 for a in archs]

    out = rerank_finalists(space, results, measured, fine, costs, 3)
    for r, o, b in zip(results, out, (small, large)):
        top3 = [a for a, _ in ranked[b.name][:3]]
        assert o.arch == top3[2] and o.accuracy == 90.0 and o.costs == costs(o.arch) and b.satisfied(o.costs)
        assert [a for a, _ in o.finalists] == [r.arch] + [a for a in top3 if a != r.arch][:2]
        assert o.history == r.history and o.candidates == r.candidates and o.evaluations == r.evaluations
        assert o.to_dict()["finalists"][2] == {"arch": o.arch.to_dict(), "accuracy": 90.0}
    assert len(asked) == len(set(asked)) <= 6  # each finalist measured once, over all budgets
    # ties keep the search's own choice; one finalist re-measures only that choice
    same = rerank_finalists(space, results, measured, lambda archs: [70.0] * len(archs), costs, 3)
    assert [o.arch for o in same] == [r.arch for r in results] and all(o.accuracy == 70.0 for o in same)
    assert [len(o.finalists) for o in rerank_finalists(space, results, measured, fine, costs, 1)] == [1, 1]
    with pytest.raises(ValueError, match="finalists: need at least 1"):
        rerank_finalists(space, results, measured, fine, costs, 0)


def test_search_improves_over_its_initial_population(space):
    budget = Budget.parse(f"macs={_mid_budget(space, 'macs', 0.5):.0f}")
    r = EvolutionSearch(space, 4, FakeAccuracy(space), config=SearchConfig(population=16, generations=8)).run(
        budget, progress=False)
    assert r.history[-1] > r.history[0]


def test_tight_budget_falls_back_to_growing_the_smallest(space):
    lo = cost.macs(space, space.smallest(4))
    budget = Budget.parse(f"macs={lo * 1.02:.0f}")
    r = EvolutionSearch(space, 4, FakeAccuracy(space), config=SearchConfig(population=4, generations=1,
                                                                          max_tries=50)).run(budget, progress=False)
    assert cost.macs(space, r.arch) <= lo * 1.02


def test_cache_avoids_reevaluation_and_persists(space, tmp_path):
    budget = Budget.parse(f"macs={_mid_budget(space):.0f}")
    fake = FakeAccuracy(space)
    path = tmp_path / "cache.jsonl"
    cached = CachedAccuracy(fake, space, path, {"ckpt": "a"})
    r1 = EvolutionSearch(space, 4, cached, config=SearchConfig(**SMALL)).run(budget, progress=False)
    # each distinct arch measured exactly once, in batches per generation
    assert fake.calls == cached.misses == len(cached.values) == r1.evaluations
    assert cached.calls > cached.misses
    assert len(fake.batches) <= SMALL["generations"] + 1
    # the same search again: everything comes from the cache
    r2 = EvolutionSearch(space, 4, cached, config=SearchConfig(**SMALL)).run(budget, progress=False)
    assert fake.calls == r1.evaluations and r2.arch == r1.arch
    # a new process reuses the file; a different context ignores it
    fresh = FakeAccuracy(space)
    again = CachedAccuracy(fresh, space, path, {"ckpt": "a"})
    assert again.loaded == r1.evaluations
    r3 = EvolutionSearch(space, 4, again, config=SearchConfig(**SMALL)).run(budget, progress=False)
    assert fresh.calls == 0 and r3.arch == r1.arch and r3.accuracy == r1.accuracy
    other = CachedAccuracy(FakeAccuracy(space), space, path, {"ckpt": "b"})
    assert other.loaded == 0


def test_cache_keys_are_canonical(space):
    fake = FakeAccuracy(space)
    cached = CachedAccuracy(fake, space)
    a = space.smallest(4)
    b = a.replace(ks=(7,) * space.num_blocks)  # only the slots beyond each depth... and the active ones
    c = space.canonical(a).replace(ks=tuple(7 if i not in space.active_blocks(a) else k for i, k in enumerate(a.ks)))
    cached([a, c, a])
    assert fake.calls == 1                     # c differs from a only in unused slots
    cached([b])
    assert fake.calls == 2


def test_cache_file_errors(space, tmp_path):
    path = tmp_path / "bad.jsonl"
    row = json.dumps({"key": "k", "arch": space.smallest(4).to_dict(), "accuracy": 1.0, "context": {}})
    path.write_text("not json\n" + row + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        CachedAccuracy(FakeAccuracy(space), space, path)
    path.write_text(row + "\n" + '{"key": "trunc')   # interrupted last line: tolerated
    assert CachedAccuracy(FakeAccuracy(space), space, path).loaded == 1


def test_distributed_accuracy_single_process_passthrough(space):
    fake = FakeAccuracy(space)
    archs = [space.sample(random.Random(i), 4) for i in range(5)]
    assert DistributedAccuracy(fake)(archs) == fake(archs)


def test_random_search_baseline(space):
    budget = Budget.parse(f"macs={_mid_budget(space):.0f}")
    fake = FakeAccuracy(space)
    r = random_search(space, 4, fake, budget, 20, seed=0)
    assert r.evaluations == 20 == fake.calls
    keys = {space.key(a) for a, _ in r.candidates}
    assert len(keys) == 20
    assert all(budget.satisfied(cost.summary(space, a)) for a, _ in r.candidates)
    assert r.accuracy == max(acc for _, acc in r.candidates)
    assert random_search(space, 4, FakeAccuracy(space), budget, 20, seed=0).arch == r.arch


# ----------------------------------------------------------------------------- Pareto
def test_pareto_front_hand_made():
    #         0    1    2    3    4    5    6
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 1.0]
    accs = [10., 30., 20., 25., 40., 40., 10.]
    # 2 is dominated by 1 (same cost, lower acc), 3 by 1 (cheaper and better), 5 by 4,
    # 6 duplicates 0 (the first is kept)
    assert pareto_front(costs, accs) == [0, 1, 4]
    assert pareto_front([], []) == []
    assert pareto_front([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]) == [1, 2, 0]
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def test_pareto_front_brute_force(space):
    rng = random.Random(0)
    c = [rng.randint(0, 20) for _ in range(60)]
    a = [rng.randint(0, 20) for _ in range(60)]
    front = set(pareto_front(c, a))
    for i in range(60):
        dominated = any((c[j] <= c[i] and a[j] >= a[i]) and (c[j] < c[i] or a[j] > a[i]) for j in range(60))
        duplicate_of_earlier = any(c[j] == c[i] and a[j] == a[i] for j in range(i))
        assert (i in front) == (not dominated and not duplicate_of_earlier), i


def test_outputs(space, tmp_path):
    costs = CostModel(space)
    budgets = [Budget.parse(f"m:macs={_mid_budget(space):.0f}"), Budget.parse(f"b:bitops={_mid_budget(space, 'bitops'):.0f}")]
    search = EvolutionSearch(space, 4, CachedAccuracy(FakeAccuracy(space), space), costs, SearchConfig(**SMALL))
    results = [search.run(b, progress=False) for b in budgets]
    evaluated = {space.key(a): (a, acc) for r in results for a, acc in r.candidates}
    summary = write_search_outputs(tmp_path, space, results, list(evaluated.values()), costs,
                                   pareto_metrics=["macs", "bitops"])
    for r in results:
        loaded = Arch.load(tmp_path / f"best_{r.budget.name}.json")
        assert loaded == r.arch
        data = json.loads((tmp_path / f"best_{r.budget.name}.json").read_text())
        assert data["accuracy"] == r.accuracy and data["cost"]["macs"] == cost.macs(space, r.arch)
    rows = list(csv.DictReader((tmp_path / "evaluated.csv").open()))
    assert len(rows) == len(evaluated) == summary["evaluated"]
    front = list(csv.DictReader((tmp_path / "pareto_macs.csv").open()))
    vals = list(evaluated.values())
    expect = pareto_front([cost.macs(space, a) for a, _ in vals], [acc for _, acc in vals])
    assert [float(r["accuracy"]) for r in front] == [vals[i][1] for i in expect]
    assert len(json.loads((tmp_path / "pareto_bitops.json").read_text())) >= 1
    assert (tmp_path / "pareto_macs.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- analysis
def test_analyze_writes_figures_and_computed_summary(space, tmp_path):
    hi = FakeAccuracy(space)
    fns = {4: hi, 2: lambda archs: [hi.one(a.replace(bits=4)) - 0.5 * sum(a.d) for a in archs]}  # drop = depth/2
    summary = analyze(space, fns, 12, tmp_path, seed=0)
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert len(rows) == 12
    for r in rows:
        assert float(r["drop_2bit"]) == pytest.approx(0.5 * int(r["depth"]))
        assert float(r["acc_4bit"]) - float(r["acc_2bit"]) == pytest.approx(float(r["drop_2bit"]))
    assert summary["drops"]["2"]["tau"]["depth"] == pytest.approx(1.0)
    assert summary["drops"]["2"]["pearson"]["depth"] == pytest.approx(1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "the drop strongly grows with total depth (tau +1.00)" in md
    for f in ("acc_vs_macs.png", "acc_vs_bitops.png", "drop_vs_factors.png"):
        assert (tmp_path / f).stat().st_size > 1000
    f = factors(space, space.smallest(4))
    assert f == {"depth": 2 * space.num_stages, "mean_expand": 3.0, "mean_kernel": 3.0, "resolution": 24}


# ----------------------------------------------------------------------------- CLI on a tiny checkpoint
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, space):
    from oqat.data import DataConfig
    from oqat.models import Checkpoint

    torch.manual_seed(0)
    net = build_supernet(space, 4, impl="eager")
    net.train()
    with torch.no_grad():
        for a in (space.largest(4), space.smallest(4)):
            net.set_arch(a)
            net(torch.randn(8, 3, a.r, a.r))
    cfg = DataConfig(name="synthetic", image_size=32, holdout=48, synthetic_size=96, synthetic_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    Checkpoint(space=space, bits=4, model=net.state_dict(), config={"data": cfg.to_dict(), "model": {}}).save(path)
    return path


MEASURE = ["--calib-images", "32", "--calib-batch", "16", "--eval-images", "32", "--threads", "1"]


def test_cli_eval_json(tiny_ckpt, capsys):
    from oqat.cli import main

    assert main(["eval", "--ckpt", str(tiny_ckpt), "--smallest", "--json", *MEASURE]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 32 and out["calib_images"] == 32 and 0 <= out["top1"] <= out["top5"] <= 100
    space = SearchSpace.preset("mbv3-tiny")
    assert out["cost"]["macs"] == cost.macs(space, space.smallest(4))
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--smallest", "--bits", "2", *MEASURE]) == 2
    assert "4-bit supernet" in capsys.readouterr().err


def test_cli_search(tiny_ckpt, tmp_path, capsys, space):
    from oqat.cli import main

    limit = _mid_budget(space)
    out = tmp_path / "s"
    args = ["search", "--ckpt", str(tiny_ckpt), "--budget", f"macs={limit:.0f}", "--population", "4",
            "--generations", "1", "--out", str(out), "--random-baseline", *MEASURE]
    assert main(args) == 0
    best = Arch.load(out / f"best_macs_{limit:.0f}.json")
    assert cost.macs(space, best) <= limit
    summary = json.loads((out / "search.json").read_text())
    n = summary["measurements"]
    assert n >= 4 and summary["seconds_per_evaluation"] > 0
    assert len((out / "cache.jsonl").read_text().splitlines()) == n
    capsys.readouterr()
    # rerun: the cache file answers everything, same best arch
    assert main(args) == 0
    assert json.loads((out / "search.json").read_text())["measurements"] == 0
    assert Arch.load(out / f"best_macs_{limit:.0f}.json") == best
    # the best arch file feeds `oqat eval --arch`
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--arch", str(out / f"best_macs_{limit:.0f}.json"), *MEASURE]) == 0
    # an impossible budget is one clear error line
    assert main(["search", "--ckpt", str(tiny_ckpt), "--budget", "macs=1", "--out", str(out), *MEASURE]) == 2
    assert "budget macs_1 is impossible" in capsys.readouterr().err


def test_cli_search_finalists_are_re_measured_on_the_whole_held_out_split(tiny_ckpt, tmp_path, capsys, space):
    from oqat.cli import main

    out = tmp_path / "s"
    args = ["search", "--ckpt", str(tiny_ckpt), "--budget", "all:macs=1e12", "--population", "4", "--generations", "1",
            "--out", str(out), "--finalists", "3", *MEASURE]
    assert main(args) == 0
    best = json.loads((out / "best_all.json").read_text())
    assert len(best["finalists"]) == 3 and best["accuracy"] == max(f["accuracy"] for f in best["finalists"])
    assert best["arch"] == max(best["finalists"], key=lambda f: f["accuracy"])["arch"]
    assert best["accuracy_source"]["final_images"] == 48  # the checkpoint's whole held-out split
    assert len((out / "cache-finalists.jsonl").read_text().splitlines()) == 3
    for bad, message in ((["--finalists", "-1"], "--finalists: must be >= 0"),
                         (["--finalists", "2", "--final-images", "0"], "--final-images: must be >= 1"),
                         (["--finalists", "2", "--final-images", "32"], "--final-images: 32 is not more than")):
        capsys.readouterr()
        assert main(args[:-len(MEASURE) - 2] + bad + MEASURE) == 2
        assert message in capsys.readouterr().err
