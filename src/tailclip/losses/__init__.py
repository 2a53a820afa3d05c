"""Classification losses for long-tailed training, each an nn.Module built from the training class counts.

Counts are turned into fixed (non-persistent) buffers: they are a property of the dataset, not trained state,
so checkpoints never carry them and a loss moves with `.to(device)` like any other module.

The registry here is the one list of losses. Every registered loss declares `balances_prior`: whether training
with it already removes the training label prior from the logits (LA, balanced softmax), so a model trained
with it predicts as if the classes were balanced. A method's `balances_prior()` reads it from the loss module it
trains with, checkpoint.json records it, and GLA's ensemble decides the source prior p_s of a fine-tuned run by it,
never by loss name. `options_for` hands each loss the options it takes."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

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


class Loss(nn.Module):
    """Base of the registered losses: `loss(logits, labels) -> scalar`, built from the training class counts."""

    balances_prior: ClassVar[bool]  # True: training with it removes the train label prior from the logits


LOSSES: Registry[type[Loss]] = Registry("loss")


LossT = TypeVar("LossT", bound=type[Loss])


def register_loss(name: str) -> Callable[[LossT], LossT]:
    """Register a Loss subclass under `name`; it must declare `balances_prior` (True or False)."""

    def deco(cls: LossT) -> LossT:
        if not isinstance(getattr(cls, "balances_prior", None), bool):
            raise TypeError(f"loss {name!r} ({cls.__name__}) must declare balances_prior: ClassVar[bool]")
        LOSSES.register(name)(cls)
        return cls

    return deco


@register_loss("ce")
class CrossEntropy(Loss):
    """Plain softmax cross-entropy (the LIFT-CE comparison row). Accepts and ignores class counts."""

    balances_prior = False  # the model learns the train label prior along with the classes

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


@register_loss("la")
class LogitAdjustedLoss(Loss):
    """Logit-adjusted loss (Menon et al. 2021): CE(z + tau * log pi, y). Only training logits are adjusted;
    prediction uses the raw z, which is what makes the classifier balanced at test time."""

    balances_prior = True  # exactly so at tau = 1 (the default everywhere); other tau over/under-correct

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("log_prior", log_prior(class_counts), persistent=False)

    def adjustment(self) -> Tensor:
        return self.tau * self.log_prior

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.adjustment(), labels)


@register_loss("bs")
class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al. 2020): CE(z + log n_c, y). Equals LA with tau = 1 up to a constant shift
    of every logit (log sum n), which softmax ignores; kept as its own name because papers report it so."""

    balances_prior = True

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, tau: float = 1.0) -> None:
        super().__init__(class_counts, tau)
        self.log_prior = _counts_tensor(class_counts).log().float()


@register_loss("cla")
class CompensatingLogitAdjustedLoss(LogitAdjustedLoss):
    """Candle's compensating LA loss: CE(z + tau * log pi, y) with pi_c = (n_c + 1) / sum_k (n_k + 1). The +1
    gives classes without training images (base-to-new's new classes, trained only through their virtual
    prototypes) a finite prior, the same for every such class, instead of LA's zero-count clamp."""

    balances_prior = True  # LA with the +1-smoothed prior

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, tau: float = 1.0) -> None:
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
        if counts.ndim != 1 or counts.numel() == 0 or (counts < 0).any():
            raise ValueError("class_counts must be a non-empty 1-D sequence of counts >= 0")
        super().__init__(counts + 1.0, tau)  # LA's prior of the +1-smoothed counts


def loss_names() -> tuple[str, ...]:
    """Every registered loss name (for a method's `check_choice` of its `loss` option)."""
    return tuple(LOSSES)


def build_loss(name: str, class_counts: Sequence[int] | np.ndarray | Tensor, **options: float) -> Loss:
    """`build_loss("la", task.class_counts, tau=1.0)`; names: `loss_names()` (ce, la, bs, ...)."""
    return LOSSES.get(name)(class_counts, **options)


def options_for(name: str, **candidates: Any) -> dict[str, Any]:
    """The options among `candidates` that loss `name` takes: a method hands over every loss option it has
    (tau, mu, ...) and each loss gets the ones its constructor declares, so no method chooses them by loss name."""
    params = inspect.signature(LOSSES.get(name).__init__).parameters
    return {k: v for k, v in candidates.items() if k in params}


def loss_balances_prior(name: str) -> bool:
    """Whether a model trained with loss `name` already predicts as if classes were balanced (unknown name:
    UnknownNameError listing the registered losses)."""
    return LOSSES.get(name).balances_prior


from .compensation import CompensatedLALoss  # registers "cf"; imported last: it needs the registry above

__all__ = [
    "LOSSES", "BalancedSoftmaxLoss", "CompensatedLALoss", "CompensatingLogitAdjustedLoss", "CrossEntropy",
    "LogitAdjustedLoss", "Loss", "build_loss", "log_prior", "loss_balances_prior", "loss_names", "options_for",
    "register_loss",
]
