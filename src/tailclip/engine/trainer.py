"""The one training loop of every method that trains by gradient steps (`Method.fit` calls `train(method, ctx)`).

Batches are images or cached features, as the method's `inputs` declares: image methods get (B, 3, H, W)
tensors of augmented crops; feature methods get dicts of named cached tensors described by their
`feature_spec()` (which tensors, how many augmented views, which view per epoch or per sample), held in memory
on the device and indexed per step, so a step costs little more than the method's own forward.

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
- Every `Output.extras` entry is averaged over the epoch (weighted like the loss) into the log, metrics.csv
  (one column per name, in order of first appearance) and TensorBoard; methods add entries without edits here.
- Model selection (`train.select_on`) is decided here for every method; see `Selection`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

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
from .evaluate import Predictions, autocast, autocast_dtype, in_label_space, predict
from .image_batches import ImageBatches, sample_seed
from .schedule import learning_rate

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..methods.base import FitContext, Inputs, Method

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
METRIC_COLUMNS = ("epoch", "lr", "loss", "train_acc", "val_top1", "images_per_s", "epoch_time_s")
HEADS_AMONG = "heads"
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


@dataclass
class MicroBatch:
    indices: np.ndarray  # positions in the train split to load on this rank
    real: int  # how many of them count (0: an empty share that still runs, so every rank makes the same number of passes)


@dataclass
class StepPlan:
    micro: list[MicroBatch]
    global_count: int  # images in this optimizer step over all ranks


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps of an epoch over n samples: every sample (the last batch partial), or with drop_last only
    full batches once n holds one (Dassl: `drop_last = is_train and len(data) >= batch_size`)."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return math.ceil(n / batch_size)


def plan_epoch(order: np.ndarray, batch_size: int, grad_accum: int, rank: int, world: int,
               drop_last: bool = False) -> list[StepPlan]:
    """Split an epoch's order into global batches, each into this rank's share, each into micro-batches.
    The last global batch may be partial (no image is dropped unless `drop_last`, see steps_per_epoch); empty
    shares become zero-weight passes."""
    steps = []
    for start in range(0, steps_per_epoch(len(order), batch_size, drop_last) * batch_size, batch_size):
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
    best_metric: float | None = None  # top-1 (%) of the chosen epoch/head on the selection split
    selected_on: str | None = None  # the split selection used (None: the last epoch was kept)
    resumed_from: str | None = None
    skipped_train_images: list[str] = field(default_factory=list)  # unreadable under data.on_bad_image=skip

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": len(self.history), "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "selected_on": self.selected_on, "resumed_from": self.resumed_from,
                "skipped_train_images": self.skipped_train_images}


@dataclass
class Selection:
    """How `train.select_on` applies to one method and task.

    split: where candidates are scored (None: keep the last epoch); among: "epochs", "heads" or both, as the
    method declares (`Method.select_among`, `Method.eval_heads`); paper: the method's named protocol that
    selects on the test split, which is read through `Task.unguarded()` and recorded as such."""

    split: str | None
    among: tuple[str, ...]
    paper: str = ""

    @property
    def on_test(self) -> bool:
        return self.split is not None and self.split.startswith("test")

    def record(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """The entry results.json carries under "selection"."""
        out: dict[str, Any] = {"on": self.split or "none", "among": " and ".join(self.among) or "nothing",
                               "chosen": chosen, "selected_on_test": self.on_test}
        if self.paper:
            out["protocol"] = self.paper
        return out


def resolve_selection(method: Method, task: Any, cfg: TrainConfig) -> Selection:
    """The selection `train.select_on` asks for, checked against the task's splits and the method's declarations."""
    among = tuple(a for a in ("epochs", HEADS_AMONG) if a in method.select_among
                  and (a != HEADS_AMONG or method.eval_heads()))
    mode = cfg.select_on
    if mode == "auto":
        mode = "val" if "val" in task.splits and cfg.val_every else "none"
    if mode == "none" or not among:
        return Selection(None, ("epochs",) if "epochs" in method.select_among else ())
    if mode == "val":
        if "val" not in task.splits:
            raise ConfigError(f"train.select_on=val needs a val split; {task.name} has: {', '.join(task.splits)}")
        return Selection("val", among)
    if not method.paper_protocol:  # mode == "paper"
        raise ConfigError(f"train.select_on=paper: method {method.name!r} declares no paper protocol; use val or none")
    if "test" not in task.splits:
        raise ConfigError(f"train.select_on=paper selects on the test split, which {task.name} lacks")
    return Selection("test", among, method.paper_protocol)


def top1(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


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


def metric_columns(history: list[dict[str, Any]]) -> list[str]:
    """The fixed columns, then every other key (extras, per-head and test metrics) in order of first appearance."""
    cols = list(METRIC_COLUMNS)
    for row in history:
        cols += [k for k in row if k not in cols]
    return cols


def write_metrics_csv(path: Any, history: list[dict[str, Any]]) -> None:
    cols = metric_columns(history)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
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


# ------------------------------------------------------------------------------------------------------
# batch sources: images or cached features, one micro-batch at a time in plan order
# ------------------------------------------------------------------------------------------------------
class _FeatureBatches:
    """The train split's cached tensors (every declared view) on the device; a micro-batch is an index gather.

    Rows are the images the cache could read, in split order; every view must hold the same rows."""

    def __init__(self, method: Method, ctx: FitContext, cfg: TrainConfig) -> None:
        self.spec = method.feature_spec()
        self.seed = cfg.seed
        sets = [method.cached_features(ctx, "train", view=v) for v in self.spec.view_names()]
        for fs in sets[1:]:
            if not torch.equal(fs.indices, sets[0].indices):
                raise RuntimeError("the cached views of the train split cover different images")
        device = ctx.device
        self.labels = sets[0].labels.to(device)
        self.skipped = set(sets[0].skipped)  # the cache lists the images it could not read
        # name -> (K, N, ...) float32 on the device
        self.views = {name: torch.stack([fs.get(name).float() for fs in sets]).to(device) for name in self.spec.tensors}
        self.num_views = len(sets)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def epoch(self, epoch: int, steps: list[StepPlan]) -> Iterator[tuple[Inputs, Tensor] | None]:
        device = self.labels.device
        choice = None
        if self.spec.per == "sample" and self.num_views > 1:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0))
            choice = torch.randint(self.num_views, (len(self),), generator=g).to(device)
        for st in steps:
            for mb in st.micro:
                idx = torch.as_tensor(mb.indices, dtype=torch.long).to(device)
                if self.spec.per == "all":
                    batch = {k: v.index_select(1, idx).transpose(0, 1) for k, v in self.views.items()}
                elif choice is not None:
                    batch = {k: v[choice[idx], idx] for k, v in self.views.items()}
                else:  # "epoch" (or a single view): a plain row gather, the cheapest indexing there is
                    view = epoch % self.num_views
                    batch = {k: v[view].index_select(0, idx) for k, v in self.views.items()}
                yield batch, self.labels[idx]


class _Totals:
    """Running sums of one epoch on this rank, kept on the device (no host sync per step): loss * n, correct, n,
    and each extra * n. `state()`/`load()` move them through the resume state; `reduced()` sums over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = torch.zeros(3, dtype=torch.float64, device=device)
        self.extras: dict[str, Tensor] = {}

    def zero(self) -> None:
        self.base.zero_()
        self.extras = {}

    @torch.no_grad()
    def add(self, loss: Tensor, logits: Tensor, labels: Tensor, extras: dict[str, Tensor], real: int) -> None:
        for name, value in extras.items():
            if value.numel() != 1:
                raise RuntimeError(f"Output.extras[{name!r}] must be a scalar tensor, got shape {tuple(value.shape)}")
            acc = self.extras.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.device))
            acc += value.detach().double().reshape(()) * real
        if real:
            correct = (logits[:real].argmax(dim=1) == labels[:real]).sum()
            self.base += torch.stack([loss.detach().double() * real, correct.double(),
                                      torch.tensor(float(real), dtype=torch.float64, device=self.device)])

    def load(self, state: dict[str, Any]) -> None:
        self.base = state["base"].to(self.device, torch.float64)
        self.extras = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in state["extras"].items()}

    def reduced(self, world: int) -> tuple[Tensor, dict[str, float]]:
        """(loss * n, correct, n) and each extra * n, summed over ranks (a collective: every rank calls it)."""
        names = sorted(self.extras)  # every rank runs every micro-step, so every rank holds the same names
        flat = torch.cat([self.base, torch.stack([self.extras[k] for k in names]) if names else self.base[:0]])
        flat = (distributed.all_reduce_sum(flat.clone()) if world > 1 else flat).cpu()
        sums = {k: float(flat[3 + i]) for i, k in enumerate(names)}
        return flat[:3].clone(), {k: sums[k] for k in self.extras}  # first-appearance order for the columns


def _backbone_trains(method: Method) -> bool:
    return any(p.requires_grad for p in method.backbone.parameters())


def _set_train_mode(method: Method) -> None:
    """Train mode for the method's own modules; a frozen backbone stays in eval mode (BatchNorm statistics of
    ResNet towers and any dropout must not change when nothing in the backbone trains)."""
    method.train()
    if not _backbone_trains(method):
        method.backbone.eval()


def _to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def train(method: Method, ctx: FitContext) -> TrainSummary:
    """Train `method` on ctx.task's train split with `method.train_config(ctx.cfg.train)`; leaves the selected
    weights (and head) in `method`, and the summary and selection record on it for results.json."""
    cfg = method.train_config(ctx.cfg.train)
    device = ctx.device
    distributed.init_distributed(device)
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main_process()
    selection = resolve_selection(method, ctx.task, cfg)
    eval_ctx = dataclasses.replace(ctx, task=ctx.task.unguarded()) if selection.on_test else ctx
    has_val = "val" in ctx.task.splits
    per_rank = cfg.batch_size / world
    if per_rank < 1:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is smaller than the number of processes ({world})")

    seed_everything(cfg.seed)
    source: ImageBatches | _FeatureBatches = (
        _FeatureBatches(method, ctx, cfg) if method.inputs == "features" else ImageBatches(method, ctx, cfg)
    )
    n = len(source)
    n_steps = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
    fingerprint = resume_fingerprint(ctx.cfg)

    fp16_weights = cfg.precision == "fp16_weights"
    if fp16_weights:
        weights_to(method, torch.float16)
    optimizer = build_optimizer(method, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    use_scaler = device.type == "cuda" and autocast_dtype(device, cfg.precision) == torch.float16 and not fp16_weights
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    summary = TrainSummary()
    method.train_summary = summary
    start_epoch, start_step, global_step = 0, 0, 0
    totals = _Totals(device)
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
            _finish_selection(method, selection, best, summary)
            weights_to(method, torch.float32)
            return summary
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and use_scaler:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        if main:  # other ranks start from zero: the epoch totals are summed over ranks at the end
            totals.load(state["totals"])
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
        base, extras = totals.reduced(world)
        return {
            "fingerprint": fingerprint, "epoch": epoch, "step": step, "global_step": global_step,
            "finished": finished, "trainable": method.checkpoint_state(),
            "optimizer": None if finished else optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler and not finished else None,
            "rng": rng_state(), "totals": {"base": base, "extras": extras}, "history": summary.history, "best": best,
            "world_size": world,
        }

    log.info(
        "training %d trainable parameters on %d %s: %d epochs x %d steps, global batch %d (%d process(es), "
        "grad_accum %d), %s, %s; selection: %s", method.num_trainable(), n,
        "cached feature rows" if method.inputs == "features" else "images", cfg.epochs, n_steps,
        cfg.batch_size, world, cfg.grad_accum, cfg.optimizer, cfg.precision,
        f"best of {' and '.join(selection.among)} on {selection.split}" if selection.split else "last epoch",
    )
    eval_loaders: dict = {}  # (split, tte) -> the validation loader, reused every epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            method.on_epoch_start(epoch, cfg.epochs)
            _set_train_mode(method)
            plan = plan_epoch(epoch_order(n, cfg.seed, epoch), cfg.batch_size, cfg.grad_accum, rank, world,
                              cfg.drop_last)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                totals.zero()
            batches = source.epoch(epoch, plan[first:])
            t0, seen = time.perf_counter(), 0
            lr = learning_rate(cfg, epoch, first, n_steps)
            bar = tqdm(total=n_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       leave=False, dynamic_ncols=True, disable=None if main else True)
            for step in range(first, n_steps):
                lr = learning_rate(cfg, epoch, step, n_steps)
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
                method.after_step(global_step)
                bar.update(1)
                if main and not bar.disable and (bar.n % 10 == 0 or step == n_steps - 1):
                    rate = seen * world / max(time.perf_counter() - t0, 1e-9)
                    running = float(totals.base[0]) / max(float(totals.base[2]), 1.0)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", per_s=f"{rate:.1f}")
                tb.scalar("train/lr", lr, global_step)
                if step < n_steps - 1 and _should_save(cfg, global_step, last_save, world):
                    save_resume_state(ctx.run_dir, resume_state(epoch, step + 1))
                    last_save = time.monotonic()
                if kill_after and global_step == kill_after:
                    log.warning("%s=%d: killing this process now (test hook)", KILL_ENV, kill_after)
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.close()
            elapsed = time.perf_counter() - t0
            base, extras = totals.reduced(world)
            count = max(float(base[2]), 1.0)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "lr": lr, "loss": float(base[0]) / count, "train_acc": 100.0 * float(base[1]) / count,
                "val_top1": None, "images_per_s": round(seen * world / max(elapsed, 1e-9), 2),
                "epoch_time_s": round(elapsed, 3),
            }
            clash = set(extras) & set(METRIC_COLUMNS)
            if clash:
                raise RuntimeError(f"Output.extras names {sorted(clash)} clash with metrics.csv columns")
            row.update({k: v / count for k, v in extras.items()})
            last = epoch == cfg.epochs - 1
            if cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last) or (selection.split and last):
                with autocast(device, cfg.precision) if fp16_weights else contextlib.nullcontext():
                    best = _evaluate_epoch(method, ctx, eval_ctx, selection, has_val, epoch, last, row, best,
                                           eval_loaders)
            summary.history.append(row)
            log.info("epoch %d/%d  lr %.3g  %s  (%.1f %s/s)", epoch + 1, cfg.epochs, lr,
                     "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                               if k not in ("epoch", "lr", "images_per_s", "epoch_time_s") and v is not None),
                     row["images_per_s"], "rows" if method.inputs == "features" else "img")
            for key, value in row.items():
                if key not in ("epoch", "lr") and isinstance(value, float):
                    tb.scalar(f"epoch/{key}", value, epoch + 1)
            if main:
                write_metrics_csv(ctx.run_dir / METRICS_CSV, summary.history)
            totals.zero()
            save_resume_state(ctx.run_dir, resume_state(epoch + 1, 0, finished=last))
            last_save = time.monotonic()
            start_step = 0
    finally:
        tb.close()
        if isinstance(source, ImageBatches):
            source.close()
        eval_loaders.clear()  # their persistent workers stop
    summary.skipped_train_images = sorted(source.skipped)
    _finish_selection(method, selection, best, summary)
    weights_to(method, torch.float32)  # fp16_weights: back to fp32 (exact) for evaluation and the checkpoint
    return summary


NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def weights_to(method: Method, dtype: torch.dtype) -> None:
    """Store the trainable weights in `dtype`: train.precision=fp16_weights keeps them in float16 while training,
    as the released fp16 CLIP code (CLIP's convert_weights: every weight but the normalisation layers', which stay
    float32), so an update smaller than half a float16 step is lost as it is there."""
    for module in method.modules():
        if isinstance(module, NORM_LAYERS):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def _evaluate_epoch(
    method: Method, ctx: FitContext, eval_ctx: FitContext, selection: Selection, has_val: bool, epoch: int,
    last: bool, row: dict[str, Any], best: dict[str, Any] | None, loaders: dict,
) -> dict[str, Any] | None:
    """Score the val split (reported) and the selection split; keep the best candidate (the first best wins, as
    in the released loops: a later epoch must be strictly better). `loaders` keeps the image loaders, and their
    workers, from one epoch to the next."""
    preds: dict[str, Predictions] = {}
    for split in dict.fromkeys(s for s in (("val" if has_val else None), selection.split) if s):
        raw = predict(method, eval_ctx if split == selection.split else ctx, split, tte="none",
                      desc=f"{split} {epoch + 1}", loaders=loaders)
        preds[split] = in_label_space(ctx.task, split, raw)  # base-to-new: val is scored among base classes
        row[f"{split}_top1"] = top1(preds[split].logits, preds[split].labels)
        for head, logits in preds[split].heads.items():
            row[f"{split}_top1_{head}"] = top1(logits, preds[split].labels)
    if selection.split is None or ("epochs" not in selection.among and not last):
        return best
    sel = preds[selection.split]
    candidates = sel.heads if HEADS_AMONG in selection.among else {None: sel.logits}
    for head, logits in candidates.items():
        metric = top1(logits, sel.labels)
        if best is None or metric > best["metric"]:
            best = {"metric": metric, "epoch": epoch + 1, "head": head,
                    "state": _snapshot(method) if "epochs" in selection.among else None}
    return best


def _snapshot(method: Method) -> dict[str, Tensor]:
    """A copy of the checkpoint state: on CPU `checkpoint_state()` shares storage with the live parameters, which
    the following epochs would overwrite in place."""
    return {k: v.clone() for k, v in method.checkpoint_state().items()}


def _micro_step(
    model: nn.Module, batch: tuple[Inputs, Tensor] | None, mb: MicroBatch, st: StepPlan, world: int,
    device: torch.device, precision: str, scaler: torch.amp.GradScaler, totals: _Totals,
) -> int:
    """Forward + backward of one micro-batch, its loss weighted by its share of the global batch."""
    if batch is None:  # every image of this micro-batch was a skipped bad image
        return 0
    inputs, labels = _to_device(batch[0], device), batch[1].to(device, non_blocking=True)
    real = min(mb.real, len(labels))
    with autocast(device, precision):
        out = model(inputs, labels)
    if out.loss is None:
        raise RuntimeError("the method's forward returned no loss for a labelled batch")
    weight = real * world / st.global_count
    scaler.scale(out.loss.float() * weight).backward()
    totals.add(out.loss, out.logits, labels, out.extras, real)
    return real


def _should_save(cfg: TrainConfig, global_step: int, last_save: float, world: int) -> bool:
    """Mid-epoch resume point? Step-based saving is deterministic; the time-based decision is rank 0's,
    broadcast so every rank takes part in the same collectives."""
    by_steps = bool(cfg.resume_every_steps) and global_step % cfg.resume_every_steps == 0
    by_time = bool(cfg.resume_every_minutes) and (time.monotonic() - last_save) >= 60.0 * cfg.resume_every_minutes
    if world > 1 and cfg.resume_every_minutes:
        by_time = bool(distributed.broadcast_object(by_time))
    return by_steps or by_time


def _finish_selection(method: Method, selection: Selection, best: dict[str, Any] | None,
                      summary: TrainSummary) -> None:
    """Load the chosen epoch's weights and head into the method and record the choice on it."""
    last_epoch = len(summary.history)
    if selection.split is None or best is None:
        method.selection = Selection(None, selection.among).record({"epoch": last_epoch})
        return
    device = next(method.parameters()).device
    if best["state"] is not None:
        method.load_checkpoint_state({k: v.to(device) for k, v in best["state"].items()})
    chosen: dict[str, Any] = {"epoch": best["epoch"] if best["state"] is not None else last_epoch}
    if best["head"] is not None:
        method.use_head(best["head"])
        chosen["head"] = best["head"]
    chosen[f"{selection.split}_top1"] = best["metric"]
    summary.best_epoch, summary.best_metric, summary.selected_on = chosen["epoch"], best["metric"], selection.split
    method.selection = selection.record(chosen)
    log.info("selected epoch %d%s on %s (top1 %.2f)%s", chosen["epoch"],
             f" head {best['head']}" if best["head"] is not None else "", selection.split, best["metric"],
             "  [on the TEST split: paper protocol]" if selection.on_test else "")
