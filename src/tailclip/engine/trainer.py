"""The one training loop of every method that trains by gradient steps (`engine.fit` calls `train(method, ctx)`).

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
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..contract import FitContext, FitResult, Inputs, Method, Predictions, SelectionRecord, TrainSummary
from ..errors import ConfigError
from ..io import atomic_write_text
from ..runfiles import METRICS_CSV, TENSORBOARD
from ..runtime import autocast, autocast_dtype, distributed
from .checkpoint import (
    find_resume_state,
    load_resume_state,
    resume_fingerprint,
    rng_state,
    save_resume_state,
    set_rng_state,
)
from .evaluate import in_label_space, predict
from .image_batches import ImageBatches, sample_seed
from .schedule import learning_rate

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "lr", "loss", "train_acc", "val_top1", "images_per_s", "epoch_time_s")
HEADS_AMONG = "heads"


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
    real: int  # how many of them count (0: an empty share that still runs: every rank makes the same passes)


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

    def record(self, chosen: dict[str, Any]) -> SelectionRecord:
        """The entry results.json carries under "selection"."""
        return SelectionRecord(self.split or "none", " and ".join(self.among) or "nothing", chosen, self.on_test,
                               self.paper)


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
        sets = method.cached_views(ctx, "train").views
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


StepCallback = Callable[[int], None]  # called after every optimizer step with the global step count


@dataclass
class Best:
    """The best candidate so far: its score on the selection split, epoch (1-based), head, and weights (None when
    only heads are selected among)."""

    metric: float
    epoch: int
    head: str | None
    state: dict[str, Tensor] | None

    def to_dict(self) -> dict[str, Any]:
        """For the resume state (the weights by reference: `dataclasses.asdict` would deep-copy them)."""
        return {"metric": self.metric, "epoch": self.epoch, "head": self.head, "state": self.state}


@dataclass
class Position:
    """Where this process starts training (a resumed run: the epoch and the step in it) and the optimizer steps
    taken over the whole run."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def train(method: Method, ctx: FitContext, callbacks: Sequence[StepCallback] = ()) -> FitResult:
    """Train `method` on ctx.task's train split with `method.train_config(ctx.cfg.train)`; leaves the selected
    weights (and head) in `method` and returns the training summary and the selection record. `callbacks` run after
    every optimizer step (tests kill the process there)."""
    run = _Training(method, ctx, callbacks)
    try:
        if not run.restore():  # (a finished run restored from its resume state trains no further)
            run.log_start()
            for epoch in range(run.pos.epoch, run.cfg.epochs):
                run.run_epoch(epoch)
            run.summary.skipped_train_images = sorted(run.source.skipped)
    finally:
        run.close()
    selection = _finish_selection(method, run.selection, run.best, run.summary)
    weights_to(method, torch.float32)  # fp16_weights: back to fp32 (exact) for evaluation and the checkpoint
    return FitResult(run.summary, selection)


class _Training:
    """One training run's state: the batch source, optimizer, epoch totals, best candidate and position."""

    def __init__(self, method: Method, ctx: FitContext, callbacks: Sequence[StepCallback]) -> None:
        self.method, self.ctx, self.callbacks = method, ctx, list(callbacks)
        self.cfg = cfg = method.train_config(ctx.cfg.train)
        self.device = ctx.device
        distributed.init_distributed(self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = distributed.is_main_process()
        self.selection = resolve_selection(method, ctx.task, cfg)
        self.eval_ctx = dataclasses.replace(ctx, task=ctx.task.unguarded()) if self.selection.on_test else ctx
        if cfg.batch_size / self.world < 1:
            raise ConfigError(f"train.batch_size={cfg.batch_size} is smaller than the number of processes "
                              f"({self.world})")
        seed_everything(cfg.seed)
        self.source: ImageBatches | _FeatureBatches = (
            _FeatureBatches(method, ctx, cfg) if method.inputs == "features" else ImageBatches(method, ctx, cfg)
        )
        self.n = len(self.source)
        self.n_steps = steps_per_epoch(self.n, cfg.batch_size, cfg.drop_last)
        self.fingerprint = resume_fingerprint(ctx.cfg)
        self.fp16_weights = cfg.precision == "fp16_weights"
        if self.fp16_weights:
            weights_to(method, torch.float16)
        self.optimizer = build_optimizer(method, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.use_scaler = (self.device.type == "cuda" and not self.fp16_weights
                           and autocast_dtype(self.device, cfg.precision) == torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.summary = TrainSummary()
        self.pos = Position()
        self.totals = _Totals(self.device)
        self.best: Best | None = None
        self.model: nn.Module = method
        self.tb: _TensorBoard | None = None
        self.last_save = time.monotonic()
        self.eval_loaders: dict = {}  # (split, tte) -> the validation loader, reused every epoch

    def restore(self) -> bool:
        """Continue from the resume state `resume` points to, if any; True when that state had finished training."""
        ctx, method = self.ctx, self.method
        path = find_resume_state(ctx.cfg.resume, ctx.run_dir)
        if path is not None:
            state = load_resume_state(path, self.fingerprint)
            method.load_checkpoint_state({k: v.to(self.device) for k, v in state["trainable"].items()})
            self.summary.history = list(state["history"])
            self.summary.resumed_from = f"{path} (epoch {state['epoch']}, step {state['step']})"
            self.best = Best(**state["best"]) if state.get("best") else None
            if state.get("finished"):
                log.info("resume: %s holds a finished training run; nothing left to train", path)
                return True
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.use_scaler:
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.pos = Position(state["epoch"], state["step"], state["global_step"])
            if self.main:  # other ranks start from zero: the epoch totals are summed over ranks at the end
                self.totals.load(state["totals"])
            log.info("resumed from %s", self.summary.resumed_from)
        if self.world > 1:
            self.model = DistributedDataParallel(
                method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True,
            )
        self.tb = _TensorBoard(self.cfg.tensorboard, ctx.run_dir / TENSORBOARD)
        self.last_save = time.monotonic()
        return False

    def log_start(self) -> None:
        cfg, method, sel = self.cfg, self.method, self.selection
        log.info(
            "training %d trainable parameters on %d %s: %d epochs x %d steps, global batch %d (%d process(es), "
            "grad_accum %d), %s, %s; selection: %s", method.num_trainable(), self.n,
            "cached feature rows" if method.inputs == "features" else "images", cfg.epochs, self.n_steps,
            cfg.batch_size, self.world, cfg.grad_accum, cfg.optimizer, cfg.precision,
            f"best of {' and '.join(sel.among)} on {sel.split}" if sel.split else "last epoch",
        )

    def resume_state(self, epoch: int, step: int, finished: bool = False) -> dict[str, Any]:
        base, extras = self.totals.reduced(self.world)
        return {
            "fingerprint": self.fingerprint, "epoch": epoch, "step": step, "global_step": self.pos.global_step,
            "finished": finished, "trainable": self.method.checkpoint_state(),
            "optimizer": None if finished else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler and not finished else None,
            "rng": rng_state(), "totals": {"base": base, "extras": extras}, "history": self.summary.history,
            "best": self.best.to_dict() if self.best is not None else None, "world_size": self.world,
        }

    def run_epoch(self, epoch: int) -> None:
        """The epoch's optimizer steps (from the resumed step in a resumed epoch), then `end_epoch`."""
        cfg, method = self.cfg, self.method
        method.on_epoch_start(epoch, cfg.epochs)
        _set_train_mode(method)
        plan = plan_epoch(epoch_order(self.n, cfg.seed, epoch), cfg.batch_size, cfg.grad_accum, self.rank,
                          self.world, cfg.drop_last)
        first = self.pos.step if epoch == self.pos.epoch else 0
        if first == 0:
            self.totals.zero()
        batches = self.source.epoch(epoch, plan[first:])
        t0, seen = time.perf_counter(), 0
        lr = learning_rate(cfg, epoch, first, self.n_steps)
        bar = tqdm(total=self.n_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   leave=False, dynamic_ncols=True, disable=None if self.main else True)
        for step in range(first, self.n_steps):
            lr = learning_rate(cfg, epoch, step, self.n_steps)
            seen += self.optimizer_step(plan[step], batches, lr)
            bar.update(1)
            if self.main and not bar.disable and (bar.n % 10 == 0 or step == self.n_steps - 1):
                rate = seen * self.world / max(time.perf_counter() - t0, 1e-9)
                running = float(self.totals.base[0]) / max(float(self.totals.base[2]), 1.0)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", per_s=f"{rate:.1f}")
            assert self.tb is not None
            self.tb.scalar("train/lr", lr, self.pos.global_step)
            if step < self.n_steps - 1 and _should_save(cfg, self.pos.global_step, self.last_save, self.world):
                save_resume_state(self.ctx.run_dir, self.resume_state(epoch, step + 1))
                self.last_save = time.monotonic()
            for callback in self.callbacks:
                callback(self.pos.global_step)
        bar.close()
        self.end_epoch(epoch, lr, seen, time.perf_counter() - t0)

    def optimizer_step(self, st: StepPlan, batches: Iterator[tuple[Inputs, Tensor] | None], lr: float) -> int:
        """One optimizer step over the step's micro-batches; returns the images this rank trained on."""
        cfg, world, optimizer, scaler = self.cfg, self.world, self.optimizer, self.scaler
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        seen = 0
        for j, mb in enumerate(st.micro):
            batch = next(batches)
            sync = j == len(st.micro) - 1
            no_sync = self.model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with no_sync:
                seen += _micro_step(self.model, batch, mb, st, world, self.device, cfg.precision, scaler, self.totals)
        if cfg.clip_grad_norm:
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.pos.global_step += 1
        self.method.after_step(self.pos.global_step)
        return seen

    def end_epoch(self, epoch: int, lr: float, seen: int, elapsed: float) -> None:
        """The epoch's metrics row (validation and selection included), its logs, and the resume state."""
        cfg, method = self.cfg, self.method
        base, extras = self.totals.reduced(self.world)
        count = max(float(base[2]), 1.0)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "loss": float(base[0]) / count, "train_acc": 100.0 * float(base[1]) / count,
            "val_top1": None, "images_per_s": round(seen * self.world / max(elapsed, 1e-9), 2),
            "epoch_time_s": round(elapsed, 3),
        }
        clash = set(extras) & set(METRIC_COLUMNS)
        if clash:
            raise RuntimeError(f"Output.extras names {sorted(clash)} clash with metrics.csv columns")
        row.update({k: v / count for k, v in extras.items()})
        last = epoch == cfg.epochs - 1
        if cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last) or (self.selection.split and last):
            with autocast(self.device, cfg.precision) if self.fp16_weights else contextlib.nullcontext():
                self.best = _evaluate_epoch(method, self.ctx, self.eval_ctx, self.selection, epoch, last, row,
                                            self.best, self.eval_loaders)
        self.summary.history.append(row)
        log.info("epoch %d/%d  lr %.3g  %s  (%.1f %s/s)", epoch + 1, cfg.epochs, lr,
                 "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                           if k not in ("epoch", "lr", "images_per_s", "epoch_time_s") and v is not None),
                 row["images_per_s"], "rows" if method.inputs == "features" else "img")
        assert self.tb is not None
        for key, value in row.items():
            if key not in ("epoch", "lr") and isinstance(value, float):
                self.tb.scalar(f"epoch/{key}", value, epoch + 1)
        if self.main:
            write_metrics_csv(self.ctx.run_dir / METRICS_CSV, self.summary.history)
        self.totals.zero()
        save_resume_state(self.ctx.run_dir, self.resume_state(epoch + 1, 0, finished=last))
        self.last_save = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if isinstance(self.source, ImageBatches):
            self.source.close()
        self.eval_loaders.clear()  # their persistent workers stop


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
    method: Method, ctx: FitContext, eval_ctx: FitContext, selection: Selection, epoch: int, last: bool,
    row: dict[str, Any], best: Best | None, loaders: dict,
) -> Best | None:
    """Score the val split (reported) and the selection split; keep the best candidate (the first best wins, as
    in the released loops: a later epoch must be strictly better). `loaders` keeps the image loaders, and their
    workers, from one epoch to the next."""
    preds: dict[str, Predictions] = {}
    for split in dict.fromkeys(s for s in (("val" if "val" in ctx.task.splits else None), selection.split) if s):
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
        if best is None or metric > best.metric:
            best = Best(metric, epoch + 1, head, _snapshot(method) if "epochs" in selection.among else None)
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


def _finish_selection(method: Method, selection: Selection, best: Best | None,
                      summary: TrainSummary) -> SelectionRecord:
    """Load the chosen epoch's weights and head into the method; returns the record of the choice."""
    last_epoch = len(summary.history)
    if selection.split is None or best is None:
        return Selection(None, selection.among).record({"epoch": last_epoch})
    device = next(method.parameters()).device
    if best.state is not None:
        method.load_checkpoint_state({k: v.to(device) for k, v in best.state.items()})
    chosen: dict[str, Any] = {"epoch": best.epoch if best.state is not None else last_epoch}
    if best.head is not None:
        method.use_head(best.head)
        chosen["head"] = best.head
    chosen[f"{selection.split}_top1"] = best.metric
    summary.best_epoch, summary.best_metric, summary.selected_on = chosen["epoch"], best.metric, selection.split
    log.info("selected epoch %d%s on %s (top1 %.2f)%s", chosen["epoch"],
             f" head {best.head}" if best.head is not None else "", selection.split, best.metric,
             "  [on the TEST split: paper protocol]" if selection.on_test else "")
    return selection.record(chosen)
