"""Classification losses for long-tailed training, each an nn.Module built from the training class counts.

Counts are turned into fixed (non-persistent) buffers: they are a property of the dataset, not trained state,
so checkpoints never carry them and a loss moves with `.to(device)` like any other module."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry

log = logging.getLogger(__name__)


def _counts_tensor(class_counts: Sequence[int] | np.ndarray | Tensor) -> Tensor:
    """Counts as float64 with zeros replaced by one: a class never seen in training still needs a finite prior
    (log 0 = -inf would remove it from the softmax); the replacement is logged so it is never silent."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("class_counts must be >= 0")
    zeros = int((counts == 0).sum())
    if zeros:
        log.warning("%d class(es) have no training images; their count is taken as 1 for the label prior", zeros)
    return counts.clamp(min=1.0)


def log_prior(class_counts: Sequence[int] | np.ndarray | Tensor) -> Tensor:
    """log pi_c with pi_c = n_c / sum_k n_k (float32)."""
    counts = _counts_tensor(class_counts)
    return (counts / counts.sum()).log().float()


class CrossEntropy(nn.Module):
    """Plain softmax cross-entropy (the LIFT-CE comparison row). Accepts and ignores class counts."""

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al. 2021): CE(z + tau * log pi, y). Only training logits are adjusted;
    prediction uses the raw z, which is what makes the classifier balanced at test time."""

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("log_prior", log_prior(class_counts), persistent=False)

    def adjustment(self) -> Tensor:
        return self.tau * self.log_prior

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.adjustment(), labels)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al. 2020): CE(z + log n_c, y). Equals LA with tau = 1 up to a constant shift
    of every logit (log sum n), which softmax ignores; kept as its own name because papers report it so."""

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, tau: float = 1.0) -> None:
        super().__init__(class_counts, tau)
        self.log_prior = _counts_tensor(class_counts).log().float()


LossBuilder = Callable[..., nn.Module]
LOSSES: Registry[LossBuilder] = Registry("loss")
LOSSES.register("ce")(CrossEntropy)
LOSSES.register("la")(LogitAdjustedLoss)
LOSSES.register("bs")(BalancedSoftmaxLoss)


def build_loss(name: str, class_counts: Sequence[int] | np.ndarray | Tensor, **options: float) -> nn.Module:
    """`build_loss("la", task.class_counts, tau=1.0)`; names: ce, la (logit-adjusted), bs (balanced softmax)."""
    return LOSSES.get(name)(class_counts, **options)


__all__ = [
    "LOSSES", "BalancedSoftmaxLoss", "CrossEntropy", "LogitAdjustedLoss", "build_loss", "log_prior",
]
