"""Learning-rate schedules as pure functions of progress: resuming never needs scheduler objects, and the
learning rate of any step is reproducible from (config, epoch, step) alone."""

from __future__ import annotations

import math

from ..config import TrainConfig


def _cosine(base: float, floor: float, t: float) -> float:
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def learning_rate(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """LR for optimizer step `step` (0-based within the epoch) of `epoch` (0-based).

    sched_unit=epoch: constant within an epoch, cosine over epochs like torch's CosineAnnealingLR stepped per
    epoch (LIFT); sched_unit=step: cosine over every optimizer step. Warm-up (warmup_epochs > 0) holds
    warmup_lr (constant, CoOp/Candle) or ramps warmup_lr -> lr (linear); the cosine then spans the rest
    (cosine_span=after_warmup) or as many epochs as the whole run (cosine_span=epochs: Dassl's
    CosineAnnealingLR(T_max=max_epoch) started after its warm-up wrapper, so the last epoch stops short of 0)."""
    total_epochs = cfg.epochs
    warm = min(cfg.warmup_epochs, total_epochs)
    if cfg.sched_unit == "epoch":
        t_now, t_warm, t_total = float(epoch), float(warm), float(total_epochs)
    else:
        t_now = float(epoch * steps_per_epoch + step)
        t_warm, t_total = float(warm * steps_per_epoch), float(total_epochs * steps_per_epoch)
    if t_now < t_warm:
        if cfg.warmup_type == "linear":
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * t_now / t_warm
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(t_total - t_warm if cfg.cosine_span == "after_warmup" else t_total, 1.0)
    return _cosine(cfg.lr, cfg.min_lr, (t_now - t_warm) / span)
