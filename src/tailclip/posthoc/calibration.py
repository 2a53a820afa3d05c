"""Temperature calibration. GLA calibrates with the temperature that makes the mean max-softmax confidence
equal the accuracy on labelled, class-balanced data (accuracy does not depend on T, confidence falls
monotonically as T grows, so a bisection in log T finds it)."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def mean_confidence(logits: Tensor, temperature: float) -> float:
    return float((logits.double() / temperature).softmax(dim=-1).max(dim=-1).values.mean())


def confidence_temperature(logits: Tensor, labels: Tensor, low: float = 1e-3, high: float = 1e3,
                           iters: int = 100) -> float:
    """T with mean max-softmax(z/T) == accuracy. Clamped to [low, high] when accuracy is out of reach
    (e.g. 100% accuracy, or accuracy at or below chance)."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits = logits.double()
    acc = float(logits.argmax(dim=-1).eq(labels.long()).double().mean())
    if mean_confidence(logits, low) <= acc:
        log.warning("accuracy %.4f is reached only as T -> 0; using T=%g", acc, low)
        return low
    if mean_confidence(logits, high) >= acc:
        log.warning("accuracy %.4f is at or below the confidence of T=%g; using it", acc, high)
        return high
    lo, hi = math.log(low), math.log(high)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean_confidence(logits, math.exp(mid)) > acc:
            lo = mid  # too confident: raise T
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return math.exp(0.5 * (lo + hi))


def nll_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """Classic temperature scaling (Guo et al. 2017): T minimising NLL; offered for comparison."""
    logits = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels.long())
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())
