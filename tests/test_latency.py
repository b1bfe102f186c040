"""Latency lookup table: pieces, prediction = sum of entries, table round trip, search budget."""

from __future__ import annotations

import random

import pytest

from oqat.measure.latency import build_table, load_table, pieces, predict_latency, save_table, table_latency
from oqat.search import Budget, CostModel, EvolutionSearch, SearchConfig


@pytest.fixture(scope="module")
def table(space):
    return build_table(space, 4, resolutions=[24], warmup=0, repeats=1, progress=False)


def test_pieces_follow_the_arch(space):
    arch = space.sample(random.Random(0), 4)
    ps = pieces(space, arch)
    kinds = [d["kind"] for _, d in ps]
    assert kinds == ["stem", "first"] + ["mbconv"] * sum(arch.d) + ["head"]
    blocks = [d for _, d in ps if d["kind"] == "mbconv"]
    assert [d["slot"] for d in blocks] == space.active_blocks(arch)
    assert all(d["k"] == arch.ks[d["slot"]] for d in blocks)
    # equal networks, equal pieces
    assert [k for k, _ in pieces(space, space.canonical(arch))] == [k for k, _ in ps]


def test_prediction_is_the_sum_of_entries(space):
    rng = random.Random(1)
    arch = space.sample(rng, 4)
    keys = [k for k, _ in pieces(space, arch)]
    entries = {k: rng.uniform(0.1, 2.0) for k in set(keys)}
    table = {"entries": entries}
    assert predict_latency(table, space, arch) == pytest.approx(sum(entries[k] for k in keys))
    table["scale"] = 1.25   # the measured overhead factor multiplies the sum
    assert predict_latency(table, space, arch) == pytest.approx(1.25 * sum(entries[k] for k in keys))
    del entries[keys[-1]]
    with pytest.raises(ValueError, match="no entry 'head"):
        predict_latency(table, space, arch)


def test_built_table_covers_the_space_and_round_trips(space, table, tmp_path):
    assert table["resolutions"] == [24] and table["bits"] == 4
    # every piece of every subnet at 24 px is in the table; 3 x 9 MBConv variants per stage position
    n_block_entries = sum(1 for k in table["entries"] if k.startswith("mbconv"))
    assert n_block_entries == space.num_stages * 2 * len(space.kernel_choices) * len(space.expand_choices)
    assert all(v > 0 for v in table["entries"].values()) and table["scale"] > 0
    rng = random.Random(2)
    for _ in range(20):
        arch = space.sample(rng, 4, resolution=24)
        keys = [k for k, _ in pieces(space, arch)]
        assert predict_latency(table, space, arch) == pytest.approx(table["scale"] * sum(table["entries"][k] for k in keys))
    with pytest.raises(ValueError, match="no entry"):
        predict_latency(table, space, space.largest(4))       # 32 px was not measured
    path = save_table(table, tmp_path / "lat.json")
    loaded = load_table(path, space)
    assert loaded.pop("path") == str(path)
    assert loaded == table
    with pytest.raises(ValueError, match="another search space"):
        load_table(path, space.replace(num_classes=100))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an oqat latency table"):
        load_table(tmp_path / "bad.json")


def test_latency_budget_in_search(space, table):
    costs = CostModel(space, table_latency(table, space))
    small = costs(space.smallest(4).replace(r=24))["latency_ms"]
    large = costs(space.largest(4).replace(r=24))["latency_ms"]
    assert small < large
    space24 = space.replace(resolutions=(24,))
    costs24 = CostModel(space24, table_latency(table, space24))
    budget = Budget.parse(f"latency_ms={(small + large) / 2}")
    r = EvolutionSearch(space24, 4, lambda archs: [float(sum(a.d)) for a in archs], costs24,
                        SearchConfig(population=6, generations=2)).run(budget, progress=False)
    assert costs24(r.arch)["latency_ms"] <= (small + large) / 2
