"""Accuracy predictor: encoding, Kendall tau, fitting a known function, save/load, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from oqat import build_supernet
from oqat.search.predictor import (
    Predictor,
    PredictorAccuracy,
    encode,
    encode_batch,
    encoding_size,
    fit_predictor,
    sample_distinct,
    split_holdout,
)
from oqat.utils.stats import kendall_tau, pearson, rmse


def test_kendall_tau_known_cases():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 5 concordant, 1 discordant pair: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in x: S = 2, 2 untied pairs in x, 3 in y -> 2 / sqrt(6) (scipy's value)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau([1, 2], [3, 3]) != kendall_tau([1, 2], [3, 3])  # NaN: constant sequence
    with pytest.raises(ValueError):
        kendall_tau([1, 2, 3], [1, 2])


def test_kendall_tau_matches_pair_counting():
    rng = random.Random(0)
    x = [rng.randint(0, 5) for _ in range(40)]
    y = [v + rng.randint(-3, 3) for v in x]
    conc = disc = tx = ty = 0
    for i in range(40):
        for j in range(i + 1, 40):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx and dy:
                conc += dx * dy > 0
                disc += dx * dy < 0
            tx += dx != 0
            ty += dy != 0
    assert kendall_tau(x, y) == pytest.approx((conc - disc) / (tx * ty) ** 0.5)


def test_rmse_pearson():
    assert rmse([1, 2, 3], [1, 2, 5]) == pytest.approx((4 / 3) ** 0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_encoding(space):
    arch = space.sample(random.Random(0), 4).replace(d=(2, 3, 4, 2, 3))
    v = encode(space, arch)
    nk, ne = len(space.kernel_choices), len(space.expand_choices)
    assert len(v) == encoding_size(space) == space.num_blocks * (nk + ne) + len(space.resolutions)
    active = set(space.active_blocks(arch))
    for slot in range(space.num_blocks):
        chunk = v[slot * (nk + ne):(slot + 1) * (nk + ne)]
        if slot in active:
            assert chunk[space.kernel_choices.index(arch.ks[slot])] == 1 and sum(chunk[:nk]) == 1
            assert chunk[nk + space.expand_choices.index(arch.e[slot])] == 1 and sum(chunk[nk:]) == 1
        else:
            assert sum(chunk) == 0
    res = v[space.num_blocks * (nk + ne):]
    assert res[space.resolutions.index(arch.r)] == 1 and sum(res) == 1
    assert encode(space, space.canonical(arch)) == v   # unused slots do not matter
    assert encode_batch(space, [arch, arch]).shape == (2, len(v))


def _synthetic(space, n, seed):
    """accuracy = a fixed linear function of the encoding (plus a depth/resolution effect)."""
    g = torch.Generator().manual_seed(123)
    w = torch.randn(encoding_size(space), generator=g)
    archs = sample_distinct(space, n, 4, seed)
    x = encode_batch(space, archs)
    return archs, (60 + 2 * (x @ w)).tolist()


def test_predictor_fits_a_known_function(space, tmp_path):
    archs, accs = _synthetic(space, 360, seed=0)
    train, val = split_holdout(len(archs), 0.25, seed=0)
    assert not set(train) & set(val) and len(val) == 90
    pred = fit_predictor(space, [archs[i] for i in train], [accs[i] for i in train], hidden=64, layers=2,
                         epochs=150, seed=0)
    m = pred.evaluate([archs[i] for i in val], [accs[i] for i in val])
    spread = torch.tensor(accs).std().item()
    assert m["kendall_tau"] > 0.8, m
    assert m["rmse"] < 0.5 * spread, (m, spread)
    # deterministic: same data and seed, same predictor
    again = fit_predictor(space, [archs[i] for i in train], [accs[i] for i in train], hidden=64, layers=2,
                          epochs=150, seed=0)
    assert again.predict(archs[:5]) == pred.predict(archs[:5])
    # save / load (weights_only) round trip
    pred.metrics = {"val": m}
    path = pred.save(tmp_path / "p.pt")
    loaded = Predictor.load(path)
    assert loaded.predict(archs[:20]) == pred.predict(archs[:20])
    assert loaded.bits == 4 and loaded.space == space and loaded.metrics["val"]["n"] == 90
    fn = PredictorAccuracy(loaded)
    assert fn(archs[:3]) == pred.predict(archs[:3])
    with pytest.raises(ValueError, match="fitted on 4-bit"):
        fn([archs[0].replace(bits=2)])


def test_predictor_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Predictor.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable predictor"):
        Predictor.load(bad)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an oqat predictor"):
        Predictor.load(tmp_path / "other.pt")


def test_sample_distinct(space):
    archs = sample_distinct(space, 50, 4, seed=3)
    assert len({space.key(a) for a in archs}) == 50
    assert sample_distinct(space, 50, 4, seed=3) == archs
    excl = {space.key(a) for a in archs[:10]}
    assert not excl & {space.key(a) for a in sample_distinct(space, 20, 4, seed=3, exclude=excl)}


def test_cli_fit_and_eval(space, tmp_path, capsys):
    from oqat.cli import main
    from oqat.data import DataConfig
    from oqat.models import Checkpoint

    torch.manual_seed(0)
    net = build_supernet(space, 4, impl="eager")
    net.train()
    with torch.no_grad():
        for a in (space.largest(4), space.smallest(4)):
            net.set_arch(a)
            net(torch.randn(4, 3, a.r, a.r))
    cfg = DataConfig(name="synthetic", image_size=32, holdout=32, synthetic_size=64, synthetic_classes=10)
    ckpt = tmp_path / "c.pt"
    Checkpoint(space=space, bits=4, model=net.state_dict(), config={"data": cfg.to_dict()}).save(ckpt)
    measure = ["--calib-images", "16", "--calib-batch", "16", "--eval-images", "16", "--threads", "1"]
    out = tmp_path / "p.pt"
    assert main(["predictor", "fit", "--ckpt", str(ckpt), "--samples", "8", "--out", str(out), "--hidden", "16",
                 "--layers", "1", "--epochs", "5", *measure]) == 0
    text = capsys.readouterr().out
    assert "Kendall tau" in text and out.is_file()
    cache = out.with_suffix(".cache.jsonl")
    assert len(cache.read_text().splitlines()) == 8
    p = Predictor.load(out)
    assert p.metrics["val"]["n"] == 2 and p.meta["measurements"] == 8
    assert main(["predictor", "eval", "--predictor", str(out), "--cache", str(cache), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 8
    # the predictor as the search's accuracy source (no checkpoint needed)
    from oqat import Arch
    from oqat.space import cost

    lo = cost.macs(space, space.smallest(4))
    assert main(["search", "--predictor", str(out), "--budget", f"macs={2 * lo:.0f}", "--population", "4",
                 "--generations", "1", "--out", str(tmp_path / "s")]) == 0
    best = json.loads((tmp_path / "s" / f"best_macs_{2 * lo:.0f}.json").read_text())
    assert best["accuracy_source"]["source"] == "predictor" and best["cost"]["macs"] <= 2 * lo
    assert best["accuracy"] == pytest.approx(p.predict([Arch.from_dict(best["arch"])])[0], rel=1e-5)
