"""Joint training of a quantized supernet (method.md section 3).

Each optimizer step draws one input resolution (the same on every rank, from the seed and the
step number) and runs the *sandwich*: the largest subnet learns from the labels, the smallest
and ``num_random`` random subnets learn from the largest one's soft predictions (in-place
distillation). Gradients of all of them are accumulated, averaged over ranks, and one SGD step
follows. Full-precision training is the same loop with ``bits: 32``.

Everything needed to continue is checkpointed atomically: model, optimizer, scheduler, step and
every rank's RNG states; the data order is a pure function of (seed, epoch), so a resumed run
takes exactly the batches the interrupted one would have taken.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import DataConfig, build_data, calibration_subset, make_loader, resize_batch
from ..measure import measure
from ..models import Checkpoint, CheckpointError, Supernet, build_supernet, load_checkpoint, nonfinite_tensors
from ..space import FULL_PRECISION, Arch, SearchSpace, normalize_bits
from ..utils.config import to_dict
from ..utils.devices import resolve_device
from ..utils.files import append_line, ensure_output_dir, escaping_links, folder_lock, write_text_atomic
from . import distributed
from .config import TrainConfig, TrainRunConfig
from .schedule import GlobalBatchSampler, lr_factor, step_archs

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- helpers
def _param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".step") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _gather_rng_states(info: distributed.DistInfo) -> list[dict]:
    if not info.enabled:
        return [_rng_state()]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, _rng_state())
    return states


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


# ----------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    model: Supernet | None = None


def train(cfg: TrainRunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the supernet described by `cfg`, writing checkpoints and metrics to `out_dir`.

    A folder that already holds a run (``final.pt``, ``checkpoints/last.pt`` or ``metrics.jsonl``)
    is refused unless `resume` continues it or `overwrite` replaces those files (and only them).
    The folder is locked for the run (a second process on it is refused), and a link in it that
    points outside it is an error, not a place to write through.
    """
    out = Path(out_dir)
    device = resolve_device(cfg.train.device, "train.device")
    info = distributed.init_from_env(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    with ExitStack() as held:
        if info.is_main:
            ensure_output_dir(out)
            links = escaping_links(out)
            if links:
                raise ValueError(f"{links[0]}: a symbolic link to {links[0].resolve()}, outside the training folder; "
                                 f"oqat never writes through such links: remove it")
            held.enter_context(folder_lock(out, "training folder"))
        return _train(cfg, out, device, info, resume, overwrite, progress)


def _train(cfg: TrainRunConfig, out: Path, device: torch.device, info: distributed.DistInfo, resume: bool,
           overwrite: bool, progress: bool) -> TrainResult:
    tcfg = cfg.train
    data_cfg = DataConfig.from_dict(cfg.data)
    data = build_data(data_cfg)
    space = SearchSpace.resolve(cfg.space).replace(num_classes=data.num_classes, in_channels=data.in_channels)
    bits = normalize_bits(cfg.bits)
    ckpt_path = out / "checkpoints" / "last.pt"

    torch.manual_seed(tcfg.seed)
    net = build_supernet(space, bits, unsigned_activations=cfg.model.unsigned_activations, dropout=cfg.model.dropout)
    if tcfg.arch is not None:
        space.validate(Arch.from_dict({**tcfg.arch, "bits": bits}))
    full_config = {"space": space.to_dict(), "bits": bits, "data": data_cfg.to_dict(),
                   "model": to_dict(cfg.model), "train": to_dict(tcfg), "init": cfg.init}

    start_step = 0
    resume_state = None
    previous = [p for p in (out / "final.pt", ckpt_path, out / "metrics.jsonl") if p.exists() or p.is_symlink()]
    if previous and not resume:
        if not overwrite:
            raise ValueError(f"{out}: already holds a training run ({', '.join(p.name for p in previous)}); "
                             f"continue it with --resume, replace it with --overwrite, or choose another --out")
        if info.is_main:
            for p in previous:
                p.unlink()
    if resume:
        if not ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        resume_state = load_checkpoint(ckpt_path)
        lacking = [k for k in ("optimizer", "scheduler") if k not in resume_state.extra]
        if lacking:
            raise CheckpointError(f"{ckpt_path}: holds no {' or '.join(lacking)} state (a final or converted "
                                  f"checkpoint?); --resume needs the checkpoints/last.pt that training writes")
        if resume_state.space != space or resume_state.bits != bits:
            raise CheckpointError(f"{ckpt_path}: saved at {resume_state.bits} bit for another space or bit-width than "
                                  f"the config's {bits} bit (space differences: {resume_state.space.differences(space)})")
        net.load_state_dict(resume_state.model)
        start_step = resume_state.step
    elif cfg.init:
        init = load_checkpoint(cfg.init)
        if init.space != space:
            raise CheckpointError(f"{cfg.init}: the --init checkpoint's space differs from this run's (after setting "
                                  f"classes/channels from the data): {init.space.differences(space)}")
        if init.bits not in (FULL_PRECISION, bits):
            raise CheckpointError(f"{cfg.init}: a {init.bits}-bit checkpoint cannot start a {bits}-bit run (use a "
                                  f"full-precision one, or bit inheritance: oqat inherit)")
        init_unsigned = bool((init.config.get("model") or {}).get("unsigned_activations", False))
        if init_unsigned != cfg.model.unsigned_activations:
            raise CheckpointError(f"{cfg.init}: its model.unsigned_activations is {init_unsigned}, this run's "
                                  f"{cfg.model.unsigned_activations}; set model.unsigned_activations to match "
                                  f"(otherwise its quantizers would compute another network)")
        net.load_state_dict(init.model)
        log.info("initialised from %s (%s-bit, step %d)", cfg.init, init.bits, init.step)

    if tcfg.sync_bn:
        distributed.convert_sync_bn(net)
    net.to(device)
    if device.type == "cuda" and tcfg.channels_last:
        net.to(memory_format=torch.channels_last)
    distributed.broadcast_module(net)

    steps_per_epoch = len(data.train) // (tcfg.batch_size * info.world_size)
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size: {tcfg.batch_size} x {info.world_size} process(es) exceeds the "
                         f"{len(data.train)} training images")
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    warmup = int(tcfg.warmup_epochs * steps_per_epoch)

    optimizer = torch.optim.SGD(_param_groups(net, tcfg.weight_decay), lr=tcfg.lr, momentum=tcfg.momentum,
                                nesterov=tcfg.nesterov and tcfg.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tcfg.lr, tcfg.min_lr))
    torch.manual_seed(tcfg.seed * 7919 + 1 + info.rank)  # augmentation and dropout: per-rank streams
    if resume_state is not None:
        optimizer.load_state_dict(resume_state.extra["optimizer"])
        scheduler.load_state_dict(resume_state.extra["scheduler"])
        rng = resume_state.extra.get("rng") or []
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank])
        else:
            log.warning("resuming with %d process(es) instead of %d: data augmentation will differ",
                        info.world_size, len(rng))
        log.info("resumed from %s at step %d", ckpt_path, start_step)

    if info.is_main:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(full_config, sort_keys=False))
    metrics_file = out / "metrics.jsonl"

    def save(step: int, epoch: int) -> None:
        if not tcfg.sync_bn:
            distributed.average_buffers(net)  # per-rank BN statistics -> one set, as every rank's
        states = _gather_rng_states(info)
        state = net.state_dict()
        bad = nonfinite_tensors(state)
        if bad:  # the previous last.pt stays the last good one
            raise TrainingDiverged(f"step {step}: non-finite weights ({', '.join(bad[:3])}); not saved. The last good "
                                   f"checkpoint is {ckpt_path if ckpt_path.exists() else 'none (no step was saved)'} "
                                   f"(lower train.lr or add train.grad_clip)")
        if not info.is_main:
            return
        Checkpoint(space=space, bits=bits, model=state, step=step, epoch=epoch, config=full_config,
                   extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "rng": states}).save(ckpt_path)

    def emit(record: dict) -> None:
        if info.is_main:
            append_line(metrics_file, json.dumps(record))

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tcfg.amp
                else torch.autocast("cpu", enabled=False))
    params = list(net.parameters())
    model_dtype = params[0].dtype  # inputs follow the model (float64 runs check numerics)
    step = start_step
    net.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {bits}-bit" if bits != 32 else "train FP",
               unit="step", disable=not (progress and info.is_main), dynamic_ncols=True)
    last_metrics: dict = {}
    window_images, window_start = 0, time.perf_counter()
    while step < total_steps:
        epoch, start_batch = divmod(step, steps_per_epoch)
        sampler = GlobalBatchSampler(len(data.train), tcfg.batch_size, tcfg.seed, epoch, info.rank,
                                     info.world_size, start_batch)
        # Its own generator: a DataLoader without one draws its worker seed from the global RNG,
        # which would make a resumed run's augmentation differ from the uninterrupted run's.
        loader = DataLoader(data.train, batch_sampler=sampler, num_workers=data_cfg.workers,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(tcfg.seed * 1_000_003 + epoch))
        for x, y in loader:
            if step >= total_steps:
                break
            x, y = x.to(device, dtype=model_dtype, non_blocking=True), y.to(device, non_blocking=True)
            archs = step_archs(space, bits, tcfg, step)
            optimizer.zero_grad(set_to_none=True)
            losses = []
            teacher = None
            for i, arch in enumerate(archs):
                net.set_arch(arch)
                xi = resize_batch(x, arch.r)
                if device.type == "cuda" and tcfg.channels_last:
                    xi = xi.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = net(xi).float()
                if i == 0 or not tcfg.distill:
                    loss = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing)
                    if i == 0:
                        teacher = F.softmax(logits.detach(), dim=1)
                else:
                    loss = soft_cross_entropy(logits, teacher)
                if not torch.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"step {step}: loss of subnet {i} ({'largest' if i == 0 else arch.to_json()}) is "
                        f"{loss.item()}; stopped. The last good checkpoint is {ckpt_path} "
                        f"(lower train.lr or add train.grad_clip)")
                loss.backward()
                losses.append(loss.item())
            distributed.average_gradients(params)
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            window_images += x.size(0) * info.world_size
            if step % tcfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = {"step": step, "epoch": step / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                                "loss_largest": losses[0], "loss_smallest": losses[1] if len(losses) > 1 else None,
                                "loss_mean": sum(losses) / len(losses), "images_per_s": window_images / elapsed,
                                "resolution": archs[0].r}
                emit(last_metrics)
                bar.set_postfix(loss=f"{losses[0]:.3f}", lr=f"{last_metrics['lr']:.4f}",
                                img_s=f"{last_metrics['images_per_s']:.0f}")
                window_images, window_start = 0, time.perf_counter()
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0:
                save(step, step // steps_per_epoch)
        if step % steps_per_epoch == 0 or step == total_steps:
            save(step, step // steps_per_epoch)
            if tcfg.eval_images > 0:
                scores = evaluate_extremes(net, data, space, bits, tcfg, device)
                emit({"step": step, "epoch": step / steps_per_epoch, **scores})
                bar.write(f"epoch {step / steps_per_epoch:.2f}: " +
                          ", ".join(f"{k} {v:.2f}%" for k, v in scores.items()))
                last_metrics.update(scores)
    bar.close()
    if not tcfg.sync_bn:
        distributed.average_buffers(net)
    final = out / "final.pt"
    if info.is_main:
        Checkpoint(space=space, bits=bits, model=net.state_dict(), step=step, epoch=step // max(1, steps_per_epoch),
                   config=full_config, extra={"metrics": last_metrics}).save(final)
    if info.enabled:
        dist.barrier()
    return TrainResult(final, step, last_metrics, net)


@torch.no_grad()
def evaluate_extremes(net: Supernet, data, space: SearchSpace, bits: int, tcfg: TrainConfig,
                      device: torch.device) -> dict:
    """Held-out top-1 (percent) of the largest (at the largest resolution) and smallest subnets,
    each measured as a deployable subnet (its own BN re-calibration), so the supernet's
    statistics stay as training left them."""
    was_training = net.training
    calib = make_loader(calibration_subset(data.holdout, min(tcfg.calib_images, len(data.holdout)), tcfg.seed),
                        batch_size=100, shuffle=False)
    scored = calibration_subset(data.holdout, min(tcfg.eval_images, len(data.holdout)), tcfg.seed + 1)
    loader = make_loader(scored, batch_size=200, shuffle=False)
    out = {f"holdout_top1_{name}": measure(net, arch, calib, loader)["top1"]
           for name, arch in (("largest", space.largest(bits)), ("smallest", space.smallest(bits)))}
    net.train(was_training)
    return out


__all__ = ["evaluate_extremes", "soft_cross_entropy", "train", "TrainingDiverged", "TrainResult"]
