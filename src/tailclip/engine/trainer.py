"""The one training loop every image-level method uses (`Method.fit` calls `train(method, ctx)`).

Design choices that make runs reproducible and resumable:
- `train.batch_size` is the *global* batch of one optimizer step (the paper's 128), whatever the number of
  processes and `grad_accum` micro-steps; each micro-batch loss is weighted by its share of the global batch,
  so 1 process, N processes and any accumulation compute the same gradient (up to float summation order).
- The data order of epoch e is a permutation drawn from (seed, e) alone, and every training image's random
  augmentation is seeded by (seed, e, index): neither depends on process RNG state, ranks or workers. A run
  resumed mid-epoch therefore sees exactly the images and crops it would have seen.
- The learning rate is a pure function of (epoch, step) (engine.schedule), so there is no scheduler to restore.
- The resume state (engine.checkpoint) is written atomically after epochs and every N steps / minutes;
  it carries the running epoch totals, so a resumed run writes the same metrics.csv as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.base import LabeledImages, collate_skip_none
from ..errors import ConfigError
from ..io import atomic_write_text
from . import distributed
from .checkpoint import (
    find_resume_state,
    load_resume_state,
    resume_fingerprint,
    rng_state,
    save_resume_state,
    set_rng_state,
)
from .evaluate import autocast, autocast_dtype, predict_images
from .schedule import learning_rate

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..methods.base import FitContext, Method

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
METRIC_COLUMNS = ("epoch", "lr", "loss", "train_acc", "val_top1", "images_per_s", "epoch_time_s")
# Test hook: SIGKILL this process right after the given global optimizer step (resume-after-kill tests).
KILL_ENV = "TAILCLIP_DEBUG_KILL_AFTER_STEP"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The training order of epoch `epoch`: a permutation that depends on (seed, epoch) only."""
    if not shuffle:
        return np.arange(n)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).numpy()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one image's augmentation in one epoch (a simple injective-enough mix, < 2**63)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(index)) % (2**63 - 1)


class SeededItems(torch.utils.data.Dataset):
    """Yields LabeledImages items keyed by (epoch, index), running the random transform under a private seed.

    fork_rng restores the caller's RNG afterwards, so augmentation never perturbs the training RNG stream."""

    def __init__(self, items: LabeledImages, seed: int) -> None:
        self.items = items
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.items[index]


@dataclass
class MicroBatch:
    indices: np.ndarray  # positions in the train split to load on this rank
    real: int  # how many of them count (0: an empty share that still runs, so every rank makes the same number of passes)


@dataclass
class StepPlan:
    micro: list[MicroBatch]
    global_count: int  # images in this optimizer step over all ranks


def plan_epoch(order: np.ndarray, batch_size: int, grad_accum: int, rank: int, world: int) -> list[StepPlan]:
    """Split an epoch's order into global batches, each into this rank's share, each into micro-batches.
    The last global batch may be partial (no image is dropped); empty shares become zero-weight passes."""
    steps = []
    for start in range(0, len(order), batch_size):
        gb = order[start : start + batch_size]
        mine = distributed.shard(gb, rank, world)
        micro = []
        for chunk in np.array_split(mine, grad_accum):
            micro.append(MicroBatch(chunk, len(chunk)) if len(chunk) else MicroBatch(gb[:1], 0))
        steps.append(StepPlan(micro, len(gb)))
    return steps


@dataclass
class TrainSummary:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_top1: float | None = None
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": len(self.history), "best_epoch": self.best_epoch, "best_val_top1": self.best_val_top1,
                "resumed_from": self.resumed_from}


def build_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the method's parameter groups (`Method.param_groups`: "params" and an optional
    "lr_scale" applied on top of the schedule)."""
    groups = [dict(g) for g in method.param_groups()]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError(f"method {method.name!r} has no trainable parameters to optimise")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def make_train_transform(method: Method, epoch: int) -> Callable:
    """The method's own train transform for this epoch (LIFT+ crop schedules), else RandomResizedCrop + flip
    from the backbone's preprocessing."""
    own = method.train_transform(epoch)
    if own is not None:
        return own
    from ..data.transforms import train_transform

    return train_transform(method.backbone.preprocess)


def write_metrics_csv(path: Any, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    atomic_write_text(path, buf.getvalue())


class _TensorBoard:
    def __init__(self, enabled: bool, log_dir: Any) -> None:
        self.writer = None
        if enabled and distributed.is_main_process():
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir))
            except ImportError:  # pragma: no cover
                log.warning("train.tensorboard=true but tensorboard is not installed; only metrics.csv is written")

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _backbone_trains(method: Method) -> bool:
    return any(p.requires_grad for p in method.backbone.parameters())


def _set_train_mode(method: Method) -> None:
    """Train mode for the method's own modules; a frozen backbone stays in eval mode (BatchNorm statistics of
    ResNet towers and any dropout must not change when nothing in the backbone trains)."""
    method.train()
    if not _backbone_trains(method):
        method.backbone.eval()


def train(method: Method, ctx: FitContext) -> TrainSummary:
    """Train `method` on ctx.task's train split with ctx.cfg.train; leaves the selected weights in `method`."""
    cfg = ctx.cfg.train
    device = ctx.device
    distributed.init_distributed(device)
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main_process()
    has_val = "val" in ctx.task.splits
    if cfg.select_on == "val" and not has_val:
        raise ConfigError(f"train.select_on=val needs a val split; {ctx.task.name} has: {', '.join(ctx.task.splits)}")
    per_rank = cfg.batch_size / world
    if per_rank < 1:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is smaller than the number of processes ({world})")

    seed_everything(cfg.seed)
    split = ctx.task.split("train")
    n = len(split)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    fingerprint = resume_fingerprint(ctx.cfg)

    optimizer = build_optimizer(method, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    use_scaler = device.type == "cuda" and autocast_dtype(device, cfg.precision) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    summary = TrainSummary()
    start_epoch, start_step, global_step = 0, 0, 0
    totals = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n  (this epoch, global over ranks)
    best: dict[str, Any] | None = None
    resume_path = find_resume_state(ctx.cfg.resume, ctx.run_dir)
    if resume_path is not None:
        state = load_resume_state(resume_path, fingerprint)
        method.load_checkpoint_state({k: v.to(device) for k, v in state["trainable"].items()})
        summary.history = list(state["history"])
        summary.resumed_from = f"{resume_path} (epoch {state['epoch']}, step {state['step']})"
        best = state.get("best")
        if state.get("finished"):
            log.info("resume: %s holds a finished training run; nothing left to train", resume_path)
            _finish_selection(method, cfg, best, summary)
            return summary
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and use_scaler:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        if main:  # other ranks start from zero: the epoch totals are summed over ranks at the end
            totals = state["totals"].clone()
        log.info("resumed from %s", summary.resumed_from)

    model: nn.Module = method
    if world > 1:
        model = DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=True,
        )
    tb = _TensorBoard(cfg.tensorboard, ctx.run_dir / "tensorboard")
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    last_save = time.monotonic()

    def resume_state(epoch: int, step: int, finished: bool = False) -> dict[str, Any]:
        glob_totals = distributed.all_reduce_sum(totals.clone()) if world > 1 else totals.clone()
        return {
            "fingerprint": fingerprint, "epoch": epoch, "step": step, "global_step": global_step,
            "finished": finished, "trainable": method.checkpoint_state(),
            "optimizer": None if finished else optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler and not finished else None,
            "rng": rng_state(), "totals": glob_totals, "history": summary.history, "best": best,
            "world_size": world,
        }

    log.info(
        "training %d trainable parameters: %d images, %d epochs x %d steps, global batch %d (%d process(es), "
        "grad_accum %d), %s, %s", method.num_trainable(), n, cfg.epochs, steps_per_epoch, cfg.batch_size, world,
        cfg.grad_accum, cfg.optimizer, cfg.precision,
    )
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _set_train_mode(method)
            plan = plan_epoch(epoch_order(n, cfg.seed, epoch), cfg.batch_size, cfg.grad_accum, rank, world)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                totals.zero_()
            items = SeededItems(LabeledImages(split, make_train_transform(method, epoch), ctx.cfg.data.on_bad_image),
                                cfg.seed)
            batch_sampler = [[(epoch, int(i)) for i in mb.indices] for st in plan[first:] for mb in st.micro]
            loader = torch.utils.data.DataLoader(
                items, batch_sampler=batch_sampler, num_workers=ctx.cfg.data.num_workers,
                collate_fn=collate_skip_none, pin_memory=device.type == "cuda",
                generator=torch.Generator(),  # own generator: creating the iterator draws nothing from the global RNG
            )
            batches = iter(loader)
            t0, seen = time.perf_counter(), 0
            lr = learning_rate(cfg, epoch, first, steps_per_epoch)
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       leave=False, dynamic_ncols=True, disable=None if main else True)
            for step in range(first, steps_per_epoch):
                lr = learning_rate(cfg, epoch, step, steps_per_epoch)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                st = plan[step]
                for j, mb in enumerate(st.micro):
                    batch = next(batches)
                    sync = j == len(st.micro) - 1
                    ctx_sync = model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                    with ctx_sync:
                        seen += _micro_step(model, batch, mb, st, world, device, cfg.precision, scaler, totals)
                if cfg.clip_grad_norm:
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                if scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                bar.update(1)
                if main and (bar.n % 10 == 0 or step == steps_per_epoch - 1):
                    rate = seen * world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                tb.scalar("train/lr", lr, global_step)
                if step < steps_per_epoch - 1 and _should_save(cfg, global_step, last_save, world):
                    save_resume_state(ctx.run_dir, resume_state(epoch, step + 1))
                    last_save = time.monotonic()
                if kill_after and global_step == kill_after:
                    log.warning("%s=%d: killing this process now (test hook)", KILL_ENV, kill_after)
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.close()
            elapsed = time.perf_counter() - t0
            glob = distributed.all_reduce_sum(totals.clone()) if world > 1 else totals.clone()
            count = max(float(glob[2]), 1.0)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "lr": lr, "loss": float(glob[0]) / count, "train_acc": 100.0 * float(glob[1]) / count,
                "val_top1": None, "images_per_s": round(seen * world / max(elapsed, 1e-9), 2),
                "epoch_time_s": round(elapsed, 3),
            }
            last = epoch == cfg.epochs - 1
            if has_val and cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last):
                preds = predict_images(method, ctx, "val", tte="none", desc=f"val {epoch + 1}")
                row["val_top1"] = 100.0 * float((preds.logits.argmax(1) == preds.labels).float().mean())
                if cfg.select_on == "val" and (best is None or row["val_top1"] > best["metric"]):
                    best = {"metric": row["val_top1"], "epoch": epoch + 1, "state": method.checkpoint_state()}
            summary.history.append(row)
            log.info(
                "epoch %d/%d  lr %.3g  loss %.4f  train acc %.2f%s  (%.1f img/s)", epoch + 1, cfg.epochs, lr,
                row["loss"], row["train_acc"],
                "" if row["val_top1"] is None else f"  val top1 {row['val_top1']:.2f}", row["images_per_s"],
            )
            for key in ("loss", "train_acc", "val_top1"):
                tb.scalar(f"epoch/{key}", row[key], epoch + 1)
            if main:
                write_metrics_csv(ctx.run_dir / METRICS_CSV, summary.history)
            totals.zero_()
            save_resume_state(ctx.run_dir, resume_state(epoch + 1, 0, finished=last))
            last_save = time.monotonic()
            start_step = 0
    finally:
        tb.close()
    _finish_selection(method, cfg, best, summary)
    return summary


def _micro_step(
    model: nn.Module, batch: Any, mb: MicroBatch, st: StepPlan, world: int, device: torch.device, precision: str,
    scaler: torch.amp.GradScaler, totals: Tensor,
) -> int:
    """Forward + backward of one micro-batch, its loss weighted by its share of the global batch."""
    if batch is None:  # every image of this micro-batch was a skipped bad image
        return 0
    images, labels, _ = batch
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    real = min(mb.real, len(labels))
    with autocast(device, precision):
        out = model(images, labels)
    if out.loss is None:
        raise RuntimeError("the method's forward returned no loss for a labelled batch")
    weight = real * world / st.global_count
    scaler.scale(out.loss.float() * weight).backward()
    if real:
        with torch.no_grad():
            correct = (out.logits[:real].argmax(dim=1) == labels[:real]).sum()
            totals += torch.tensor([float(out.loss.detach()) * real, float(correct), float(real)], dtype=torch.float64)
    return real


def _should_save(cfg: TrainConfig, global_step: int, last_save: float, world: int) -> bool:
    """Mid-epoch resume point? Step-based saving is deterministic; the time-based decision is rank 0's,
    broadcast so every rank takes part in the same collectives."""
    by_steps = bool(cfg.resume_every_steps) and global_step % cfg.resume_every_steps == 0
    by_time = bool(cfg.resume_every_minutes) and (time.monotonic() - last_save) >= 60.0 * cfg.resume_every_minutes
    if world > 1 and cfg.resume_every_minutes:
        by_time = bool(distributed.broadcast_object(by_time))
    return by_steps or by_time


def _finish_selection(method: Method, cfg: TrainConfig, best: dict[str, Any] | None, summary: TrainSummary) -> None:
    """select_on=val: load the best validation epoch's weights (the test split is never looked at)."""
    if cfg.select_on == "val" and best is not None:
        method.load_checkpoint_state({k: v.to(next(method.parameters()).device) for k, v in best["state"].items()})
        summary.best_epoch, summary.best_val_top1 = best["epoch"], best["metric"]
        log.info("selected epoch %d on validation (val top1 %.2f)", best["epoch"], best["metric"])
