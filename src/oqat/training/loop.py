"""Joint training of a quantized supernet (method.md section 3).

Each optimizer step draws one input resolution (the same on every rank, from the seed and the
step number) and runs the *sandwich*: the largest subnet learns from the labels, the smallest
and ``num_random`` random subnets learn from the largest one's soft predictions (in-place
distillation). Gradients of all of them are accumulated, averaged over ranks, and one SGD step
follows. Full-precision training is the same loop with ``bits: 32``.

Everything needed to continue is checkpointed atomically: model, optimizer, scheduler, step and
every rank's RNG states; the data order is a pure function of (seed, epoch), so a resumed run
takes exactly the batches the interrupted one would have taken.

A step reads nothing back from the device (:mod:`oqat.training.step`): the losses are read
once per log interval and before each checkpoint, which is when a NaN/inf stops the run,
naming the first bad step and subnet; a checkpoint is written only after the losses since the
previous one, and the weights, were found finite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import (
    DataConfig,
    DeviceImageLoader,
    build_data,
    calibration_subset,
    image_files,
    make_loader,
    probe_device_decode,
    resolve_decode,
)
from ..data.gpu_loader import warn_fallback
from ..measure import measure
from ..models import EDGE_LAYERS, Checkpoint, CheckpointError, Supernet, build_supernet, load_checkpoint
from ..quant import LSQQuantizer, kernel_impl
from ..space import FULL_PRECISION, Arch, SearchSpace, normalize_bits
from ..utils.config import to_dict
from ..utils.devices import resolve_device
from ..utils.files import append_line, ensure_output_dir, escaping_links, folder_lock, write_text_atomic
from . import distributed
from .config import TrainConfig, TrainRunConfig
from .launch import process_batch
from .schedule import GlobalBatchSampler, lr_factor, step_archs
from .step import LossWindow, StepLosses, StepOptions, all_finite, first_non_finite, soft_cross_entropy, train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- helpers
def _load_init(net: Supernet, state: dict, edge_only: bool, where) -> None:
    """Load an --init state; with `edge_only`, the edge layers' quantizer entries may be missing
    (they initialise on the first batch) or superfluous (the run keeps those layers float)."""
    if not edge_only:
        net.load_state_dict(state)
        return
    prefixes = tuple(f"{layer}.{q}." for layer in EDGE_LAYERS for q in ("act_quant", "weight_quant"))
    result = net.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefixes)}, strict=False)
    other = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if other or result.unexpected_keys:
        raise CheckpointError(f"{where}: its weights do not fit this run's supernet (missing {other[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
    log.info("%s: the stem and classifier quantizers (edge_bits %s) start afresh", where, net.space.edge_bits)


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


def _train_files(data_cfg: DataConfig, data, device: torch.device) -> list[tuple[str, int]] | None:
    """The training split's (path, label) pairs when its images are decoded on the device
    (data.decode), else None (the CPU DataLoader). A device that cannot decode falls back to the
    CPU loader with a warning."""
    if resolve_decode(data_cfg, device) != "device":
        return None
    files = image_files(data.train)
    if device.type == "cuda":
        reason = probe_device_decode(files[0][0], device)
        if reason is not None:
            warn_fallback(reason)
            return None
    elif data_cfg.decode == "gpu":
        log.warning("data.decode: gpu on a %s run: images are decoded and augmented with torchvision.io "
                    "on the %s", device.type, device.type)
    return files


def _bad_loss(bad: tuple[StepLosses, int] | None, bad_step: int) -> str:
    """What went wrong at `bad_step`: this rank's first non-finite loss there, or another rank's."""
    if bad is None or bad[0].step != bad_step:
        return "loss of subnet on another rank is not finite"
    row, i = bad
    return f"loss of subnet {i} ({'largest' if i == 0 else row.archs[i].to_json()}) is {row.values[i]}"


def _diverged_message(what: str, bad_step: int, step: int, every: int, last_good: tuple[Path, int] | None) -> str:
    good = (f"The last good checkpoint is {last_good[0]} (step {last_good[1]})" if last_good is not None
            else "No checkpoint of this run was written before it")
    return (f"step {bad_step}: {what}; stopped at step {step} (losses are read every {every} steps and before "
            f"each checkpoint). {good} (lower train.lr or add train.grad_clip)")


# ----------------------------------------------------------------------------- the loop
class Pace:
    """Notices when training runs far below its own usual rate (another program on the cores) and
    says so once, with the remedy that fits how the run uses the cores."""

    SLOW = 3.0          # a log window this many times slower than the median of the earlier ones

    def __init__(self, threads: int, processes: int):
        self.threads, self.processes = threads, processes
        self.rates: list[float] = []
        self.warned = False

    def window(self, images_per_s: float, say) -> None:
        if not self.warned and len(self.rates) >= 3 and images_per_s * self.SLOW < statistics.median(self.rates):
            usual = statistics.median(self.rates)
            remedy = ("with several threads on busy cores every parallel region waits for a descheduled thread: "
                      "run one single-threaded process per core (oqat train/run --procs auto, the default on CPUs)"
                      if self.threads > 1 else "free the cores or use fewer processes (--procs)")
            say(f"training runs at {images_per_s:.0f} images/s, {usual / images_per_s:.1f}x slower than its usual "
                f"{usual:.0f}: another program seems to use this run's CPU cores; {remedy}")
            self.warned = True
        self.rates.append(images_per_s)


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    model: Supernet | None = None
    batch_size: int = 0            # per process, as trained (the configured one split under oqat's launcher)
    world_size: int = 1


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
    local = process_batch(tcfg.batch_size, info.world_size)
    if local != tcfg.batch_size:  # started by oqat's launcher: the configured batch is split over the processes
        tcfg = dataclasses.replace(tcfg, batch_size=local)
        cfg = dataclasses.replace(cfg, train=tcfg)
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
        # A checkpoint whose space differs only in edge_bits (e.g. a converted OFA supernet, whose
        # stem and classifier are float) starts a run that quantizes them: their steps start afresh.
        if init.space.replace(edge_bits=space.edge_bits) != space:
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
        _load_init(net, init.model, init.space != space, cfg.init)
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

    window = LossWindow()  # the losses of the steps since they were last read, on the device
    last_good: tuple[Path, int] | None = (ckpt_path, start_step) if resume_state is not None else None

    def read_losses() -> list[StepLosses]:
        """The window's losses (one host sync); TrainingDiverged at the first NaN/inf of any rank."""
        rows = window.read()
        bad = first_non_finite(rows)
        bad_step = distributed.min_over_ranks(bad[0].step if bad else None, device)
        if bad_step is not None:
            bar.close()
            raise TrainingDiverged(_diverged_message(_bad_loss(bad, bad_step), bad_step, step, tcfg.log_every,
                                                     last_good))
        return rows

    def save(step: int, epoch: int) -> None:
        nonlocal last_good
        read_losses()
        if not tcfg.sync_bn:
            distributed.average_buffers(net)  # per-rank BN statistics -> one set, as every rank's
        optim_state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        if not all_finite([*net.state_dict().values(), *optim_state]):
            bar.close()
            raise TrainingDiverged(_diverged_message(
                "the weights are not finite after it although every loss up to it was finite", step - 1, step,
                tcfg.log_every, last_good))
        states = _gather_rng_states(info)
        last_good = (ckpt_path, step)
        if not info.is_main:
            return
        Checkpoint(space=space, bits=bits, model=net.state_dict(), step=step, epoch=epoch, config=full_config,
                   extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "rng": states}).save(ckpt_path)

    def emit(record: dict) -> None:
        if info.is_main:
            append_line(metrics_file, json.dumps(record))

    opts = StepOptions.from_config(tcfg, device)
    if bits != FULL_PRECISION:  # builds and self-tests the kernels on this device now, not in step 1
        impl = next((m.impl for m in net.modules() if isinstance(m, LSQQuantizer)), "auto")
        log.info("LSQ kernels on %s: %s", device, kernel_impl(device, impl, dtype=next(net.parameters()).dtype))
    files = _train_files(data_cfg, data, device)
    params = list(net.parameters())
    model_dtype = params[0].dtype  # inputs follow the model (float64 runs check numerics)
    step = start_step
    net.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {bits}-bit" if bits != 32 else "train FP",
               unit="step", disable=not (progress and info.is_main), dynamic_ncols=True)
    last_metrics: dict = {}
    window_images, window_start = 0, time.perf_counter()
    pace = Pace(torch.get_num_threads(), info.world_size)
    while step < total_steps:
        epoch, start_batch = divmod(step, steps_per_epoch)
        sampler = GlobalBatchSampler(len(data.train), tcfg.batch_size, tcfg.seed, epoch, info.rank,
                                     info.world_size, start_batch)
        if files is not None:  # decoded and augmented on the device, each batch at its step's resolution
            loader = DeviceImageLoader(
                files, sampler, device, image_size=data_cfg.image_size, mean=data.mean, std=data.std,
                train=data_cfg.augment, seed=tcfg.seed, epoch=epoch, rank=info.rank, first_batch=start_batch,
                resolution=lambda b, e=epoch: step_archs(space, bits, tcfg, e * steps_per_epoch + b)[0].r,
                threads=max(1, data_cfg.workers))
        else:
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
            window.add(step, archs, train_step(net, optimizer, scheduler, params, x, y, archs, opts))
            step += 1
            bar.update(1)
            window_images += x.size(0) * info.world_size
            if step % tcfg.log_every == 0 or step == total_steps:
                losses = read_losses()[-1].values  # the one host sync of the interval
                elapsed = time.perf_counter() - window_start
                last_metrics = {"step": step, "epoch": step / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                                "loss_largest": losses[0], "loss_smallest": losses[1] if len(losses) > 1 else None,
                                "loss_mean": sum(losses) / len(losses), "images_per_s": window_images / elapsed,
                                "resolution": archs[0].r}
                emit(last_metrics)
                pace.window(last_metrics["images_per_s"], bar.write if progress and info.is_main else log.warning)
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
    return TrainResult(final, step, last_metrics, net, tcfg.batch_size, info.world_size)


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
