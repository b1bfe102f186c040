"""Recipe probe: how fast does a supernet learn under a training setting? (docs/pipeline.md)

Trains the quickstart's space on Fashion-MNIST for a few hundred sandwich steps with the
quickstart's settings plus ``--set`` overrides, then prints the test top-1 of the largest and
smallest subnets (BN re-calibrated on 500 held-out images, 3000 test images) and appends it to
OUT/results.jsonl. Used to choose the quickstart's recipe, e.g.

    .venv/bin/python benchmarks/bench_recipe.py signed-nodistill --set train.distill=false
    .venv/bin/python benchmarks/bench_recipe.py fp --set bits=32
    .venv/bin/python benchmarks/bench_recipe.py b3 --set bits=3 --set init=runs/recipe/x/final.pt
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import yaml

from oqat.data import DataConfig, build_data, calibration_subset, make_loader
from oqat.measure import measure
from oqat.space import Arch, SearchSpace
from oqat.training import load_train_config, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="run name (folder OUT/NAME)")
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"),
                   help="pipeline config whose space, data, model and train sections are used")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training-config override, e.g. train.lr=0.2, bits=32, init=CKPT")
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--random", type=int, default=4, help="random subnets scored besides largest and smallest")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    run = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"{args.name}.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "space": run["space"], "bits": 4, "data": run["data"], "model": run.get("model", {}),
        "train": {**run.get("train", {}), "epochs": 1, "max_steps": args.steps, "eval_images": 0}}))
    cfg = load_train_config(cfg_path, args.overrides)
    start = time.time()
    result = train(cfg, out / args.name, progress=True)
    seconds = time.time() - start

    data = build_data(DataConfig.from_dict(cfg.data))
    space = SearchSpace.resolve(cfg.space).replace(num_classes=data.num_classes, in_channels=data.in_channels)
    calib = make_loader(calibration_subset(data.holdout, 500, 0), batch_size=100, shuffle=False)
    test = make_loader(calibration_subset(data.test, 3000, 1), batch_size=500, shuffle=False)
    if cfg.train.arch:
        archs = {"arch": Arch.from_dict({**cfg.train.arch, "bits": cfg.bits})}
    else:
        archs = {"largest": space.largest(cfg.bits), "smallest": space.smallest(cfg.bits)}
        rng = random.Random(12345)  # the same random subnets in every probe
        archs.update({f"random{i}": space.sample(rng, cfg.bits) for i in range(args.random)})
    row = {"name": args.name, "overrides": args.overrides, "steps": result.steps, "train_s": round(seconds, 1)}
    for key, arch in archs.items():
        row[f"test_top1_{key}"] = round(measure(result.model, arch, calib, test)["top1"], 2)
    if args.random:
        row["test_top1_random_mean"] = round(sum(row[f"test_top1_random{i}"] for i in range(args.random)) / args.random, 2)
    print(json.dumps(row))
    with (out / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
