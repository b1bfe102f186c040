"""The baseline: a fixed hand-designed subnet trained alone with LSQ (the paper's comparison),
for as many training images as the whole OQAT run unless its schedule is given, and measured
exactly like the searched subnets."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ...measure import load_context
from ...space import Arch, cost
from ...training.launch import process_batch
from ..context import StageContext
from ..plan import Stage, TrainPlan
from ..results import BaselineOutcome
from .train import train_stage


def run(ctx: StageContext, stage: Stage, folder: Path, resumed: bool) -> BaselineOutcome:
    plan: TrainPlan = stage.plan
    tc = plan.train
    if plan.images_like:  # as many images as the OQAT training stages together
        images = sum(ctx.outcomes[s].images_seen for s in plan.images_like)
        per_step = process_batch(tc.batch_size, ctx.info.world_size) * ctx.info.world_size
        steps = max(1, round(images / per_step))
        per_epoch = max(1, ctx.train_images // per_step)
        tc = dataclasses.replace(tc, epochs=math.ceil(steps / per_epoch), max_steps=steps)
    trained = train_stage(ctx, stage, folder, resumed, None, tc)
    arch = Arch.from_dict({**tc.arch, "bits": plan.bits})
    s = ctx.cfg.stages.search
    scores = {}
    # Measured exactly like the searched subnets: BN re-calibration on the same held-out images.
    for split, n in (("holdout", s.eval_images), ("test", s.test_images)):
        measured = load_context(ctx.out / trained.checkpoint, split=split, calib_images=s.calib_images,
                                calib_batch=s.calib_batch, calib_seed=s.seed, eval_images=n, device=str(ctx.device))
        scores[split] = measured.accuracy_fn()([arch])[0]
        del measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = BaselineOutcome(name=stage.spec["name"], arch=arch.to_dict(), train=trained, epochs=trained.epochs_done,
                          costs=cost.summary(ctx.space, arch), holdout_top1=scores["holdout"], test_top1=scores["test"])
    ctx.say(f"   baseline {out.name}: held-out {out.holdout_top1:.2f}%, test {out.test_top1:.2f}% after "
            f"{trained.epochs_done:.2f} epoch(s)")
    return out


__all__ = ["run"]
