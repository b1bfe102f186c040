"""Training figures (issue 3): [FP ->] 4 -> 3 -> 2 bit with bit inheritance, versus a 2-bit
supernet trained from the FP one (or from scratch with ``--epochs-fp 0``) for as many quantized
epochs, and training throughput.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 \
    .venv/bin/python benchmarks/bench_train.py --out runs/bench-train

Accuracies are top-1 (%) of the largest and smallest subnets, each BN-re-calibrated on 2000
held-out images, on the held-out split and on the test split. ``--throughput-only`` measures
images/s per sandwich step only (e.g. ``--space mbv3-imagenet --data synthetic --image-size
224`` on a GPU); the script runs unchanged on CPU or CUDA.

``--rates`` measures how a CPU training run uses the cores (issue 16): ``oqat train`` of the
quickstart's recipe (fmnist-quick, 4 bit, batch 64, largest + smallest + 1 random subnet) for
every combination of ``--threads`` and ``--procs``, on the idle machine and then with
``--contend N`` busy processes started by this script, printing steps/s and the ratio:

    .venv/bin/python benchmarks/bench_train.py --rates --space fmnist-quick --image-size 28 \
        --batch-size 64 --num-random 1 --threads 1,2 --procs 1,2 --contend 1 --max-steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from oqat.data import DataConfig, build_data, calibration_subset, make_loader
from oqat.measure import evaluate, recalibrate_bn
from oqat.models import load_supernet
from oqat.training import TrainRunConfig, inherit_checkpoint, train
from oqat.utils.config import from_dict


def run_stage(name: str, args, out: Path, bits: int, epochs: int, init: str | None, lr: float) -> dict:
    stage_dir = out / name
    final = stage_dir / "final.pt"
    cfg = from_dict(TrainRunConfig, {
        "space": args.space, "bits": bits, "init": init,
        "data": {"name": args.data, "image_size": args.image_size, "holdout": args.holdout,
                 "train_limit": args.train_limit, "workers": args.workers, "augment": args.augment,
                 **({"synthetic_size": args.synthetic_size} if args.data == "synthetic" else {})},
        "model": {"dropout": 0.0, "unsigned_activations": args.unsigned_activations},
        "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": lr, "warmup_epochs": 0.0 if init else args.warmup,
                  "num_random": args.num_random, "distill": args.distill, "eval_images": 0, "seed": args.seed, "log_every": 10, "ckpt_every": 50,
                  "max_steps": args.max_steps, "device": args.device},
    })
    start = time.time()
    if not final.exists():  # an interrupted stage continues from its last checkpoint
        train(cfg, stage_dir, progress=True, resume=(stage_dir / "checkpoints" / "last.pt").exists())
    seconds = time.time() - start
    records = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    return {"stage": name, "bits": bits, "epochs": epochs, "init": init, "seconds": round(seconds, 1),
            "images_per_s": round(statistics.median(speeds), 1) if speeds else None, "checkpoint": str(final)}


def score(ckpt: str, args, data) -> dict:
    net, meta = load_supernet(ckpt)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    calib = make_loader(calibration_subset(data.holdout, min(2000, len(data.holdout)), 0), 100, shuffle=False)
    out = {}
    for name, arch in (("largest", meta.space.largest(meta.bits)), ("smallest", meta.space.smallest(meta.bits))):
        sub = net.extract(arch).to(device)
        recalibrate_bn(sub, calib, arch.r)
        for split in ("holdout", "test"):
            loader = make_loader(getattr(data, split), 500, shuffle=False)
            out[f"{split}_{name}"] = round(evaluate(sub, loader, arch.r)["top1"], 2)
    return out


def _train_rate(args, out: Path, threads: int, procs: int) -> float:
    """Median steps/s (log windows after the first) of an `oqat train` run in its own process(es)."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = {"space": args.space, "bits": 4,
           "data": {"name": args.data, "image_size": args.image_size, "holdout": args.holdout,
                    "train_limit": args.train_limit, "augment": False,
                    **({"synthetic_size": args.synthetic_size} if args.data == "synthetic" else {})},
           "train": {"epochs": 1, "max_steps": args.max_steps or 60, "batch_size": args.batch_size, "lr": 0.05,
                     "warmup_epochs": 0.05, "num_random": args.num_random, "log_every": 10, "eval_images": 0,
                     "device": "cpu", "seed": args.seed}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OQAT_PROCS", None)
    cmd = [sys.executable, "-m", "oqat", "train", str(out / "cfg.yaml"), "--out", str(out / "run"), "--overwrite",
           "--no-progress", "--procs", str(procs)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    windows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in windows if "images_per_s" in r][1:]
    return statistics.median(speeds) / args.batch_size


def rates(args) -> None:
    """Idle and contended training rates of one process with N threads and of N processes."""
    import os
    import subprocess
    import sys

    combos = [(int(t), 1) for t in args.threads.split(",")] + [(1, int(n)) for n in args.procs.split(",") if int(n) > 1]
    out = Path(args.out)
    print(f"# {args.space} 4-bit, batch {args.batch_size}, {args.num_random} random subnet(s), "
          f"{args.max_steps or 60} steps per run; {os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}")
    rows = []
    for threads, procs in combos:
        idle = _train_rate(args, out / f"t{threads}-p{procs}-idle", threads, procs)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
        try:
            loaded = _train_rate(args, out / f"t{threads}-p{procs}-busy", threads, procs)
        finally:
            for b in busy:
                b.kill()
        rows.append((threads, procs, idle, loaded))
        print(f"  {procs} process(es) x {threads} thread(s): idle {idle:.2f} steps/s, with {args.contend} busy "
              f"process(es) {loaded:.2f} steps/s ({100 * loaded / idle:.0f}% of idle)", flush=True)
    print("\n| processes x threads | idle steps/s | contended steps/s | contended / idle |\n|---|---:|---:|---:|")
    for threads, procs, idle, loaded in rows:
        print(f"| {procs} x {threads} | {idle:.2f} | {loaded:.2f} | {100 * loaded / idle:.0f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--space", default="mbv3-tiny")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--train-limit", type=int, default=15000)
    p.add_argument("--synthetic-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-random", type=int, default=2)
    p.add_argument("--epochs-fp", type=int, default=2, help="0: no FP stage (4 and 2 bit from scratch)")
    p.add_argument("--epochs-4", type=int, default=2)
    p.add_argument("--epochs-3", type=int, default=1)
    p.add_argument("--epochs-2", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune-lr", type=float, default=0.02, help="LR of the inherited 3- and 2-bit stages")
    p.add_argument("--warmup", type=float, default=0.2, help="warm-up epochs of the stages not started from a checkpoint")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="in-place distillation from the largest subnet")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--unsigned-activations", action="store_true", help="OQA's all-unsigned activation quantizers")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--throughput-only", action="store_true")
    p.add_argument("--rates", action="store_true", help="steps/s per --threads x --procs, idle and with --contend")
    p.add_argument("--threads", default="1,2", help="--rates: intra-op threads to try (one process)")
    p.add_argument("--procs", default="1,2", help="--rates: single-threaded processes to try")
    p.add_argument("--contend", type=int, default=1, help="--rates: busy processes started for the contended runs")
    args = p.parse_args()
    if args.rates:
        return rates(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.throughput_only:
        row = run_stage("throughput-4bit", args, out, 4, 1, None, args.lr)
        print(json.dumps(row, indent=2))
        return

    rows = [run_stage("fp", args, out, 32, args.epochs_fp, None, args.lr)] if args.epochs_fp > 0 else []
    fp = rows[0]["checkpoint"] if rows else None
    rows.append(run_stage("b4", args, out, 4, args.epochs_4, fp, args.lr))
    inherit_checkpoint(rows[-1]["checkpoint"], 3, out / "inherit-3.pt")
    rows.append(run_stage("b3-inherited", args, out, 3, args.epochs_3, str(out / "inherit-3.pt"), args.finetune_lr))
    inherit_checkpoint(rows[-1]["checkpoint"], 2, out / "inherit-2.pt")
    rows.append(run_stage("b2-inherited", args, out, 2, args.epochs_2, str(out / "inherit-2.pt"), args.finetune_lr))
    scratch_epochs = args.epochs_4 + args.epochs_3 + args.epochs_2
    rows.append(run_stage("b2-from-fp" if fp else "b2-scratch", args, out, 2, scratch_epochs, fp, args.lr))

    data = build_data(DataConfig(name=args.data, image_size=args.image_size, holdout=args.holdout,
                                 train_limit=args.train_limit,
                                 **({"synthetic_size": args.synthetic_size} if args.data == "synthetic" else {})))
    for row in rows:
        row.update(score(row["checkpoint"], args, data))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| stage | bits | epochs | init | held-out L/S | test L/S | img/s | s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        init = Path(r["init"]).name if r["init"] else "-"
        print(f"| {r['stage']} | {r['bits']} | {r['epochs']} | {init} | {r['holdout_largest']:.2f} / {r['holdout_smallest']:.2f} "
              f"| {r['test_largest']:.2f} / {r['test_smallest']:.2f} | {r['images_per_s']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
