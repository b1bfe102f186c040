"""Training stages: the full-precision supernet, the first quantized one, and every bit-inheritance
target (``oqat.training.inherit_checkpoint`` to ``init.pt``, then fine-tuning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...training import TrainConfig, TrainRunConfig, inherit_checkpoint, train
from ..context import StageContext
from ..plan import Stage, TrainPlan
from ..results import TrainOutcome


def start_weights(ctx: StageContext, plan: TrainPlan, folder: Path) -> str | None:
    """The checkpoint a training stage starts from: the fp stage's, a bit-inherited copy of its
    source stage's (written once to ``init.pt``), a configured file, or None (from scratch)."""
    if plan.init_from and plan.inherit_factor:
        init = folder / "init.pt"
        if ctx.info.is_main and not init.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            inherit_checkpoint(ctx.checkpoint(plan.init_from), plan.bits, init, factor=plan.inherit_factor)
        ctx.barrier()
        return str(init)
    if plan.init_from:
        return str(ctx.checkpoint(plan.init_from))
    return plan.init_path


def train_stage(ctx: StageContext, stage: Stage, folder: Path, resumed: bool, init: str | None,
                tc: TrainConfig | None = None) -> TrainOutcome:
    """Train (or resume) the stage's network into `folder`; `tc` replaces the planned schedule."""
    plan: TrainPlan = stage.plan
    tc = tc or plan.train
    cfg = TrainRunConfig(space=stage.spec["train_run"]["space"], bits=plan.bits, data=ctx.data.to_dict(),
                         model=dataclasses.replace(ctx.cfg.model), train=tc, init=init)
    resume = resumed and (folder / "checkpoints" / "last.pt").is_file()
    # the stage folder is the pipeline's own: whatever a killed attempt left there is replaced
    result = train(cfg, folder, resume=resume, overwrite=True, progress=ctx.progress)
    n, world = ctx.train_images, result.world_size
    images = result.steps * result.batch_size * world
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) or v is None}
    return TrainOutcome(checkpoint=ctx.relative(result.checkpoint), bits=plan.bits, steps=result.steps,
                        batch_size=result.batch_size, world_size=world, images_seen=images, train_images=n,
                        epochs_done=images / n if n else None, final_metrics=metrics, resumed=resume, init=init)


def run(ctx: StageContext, stage: Stage, folder: Path, resumed: bool) -> TrainOutcome:
    return train_stage(ctx, stage, folder, resumed, start_weights(ctx, stage.plan, folder))


__all__ = ["run", "start_weights", "train_stage"]
