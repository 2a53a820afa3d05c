"""Label-prior estimation on the simplex (GLA): q = argmin_q CE(z/T - log q, y) on labelled balanced data.

We parametrise q = softmax(theta) and note that log q = theta - logsumexp(theta) shifts every logit of a
sample by the same constant, so the objective is CE(z/T - theta, y): convex in theta, solved with L-BFGS
from the uniform start theta = 0. Classes without a labelled sample carry no information (their theta
would run off to +inf); they get the mean theta of the others, i.e. an average prior mass.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def few_threads_for_small(numel: int, limit: int = 2_000_000) -> Iterator[None]:
    """Full-batch L-BFGS on small problems runs thousands of tiny ops; OpenMP start-up per op then dominates
    (badly so on a shared machine), so such problems run single-threaded. Large ones keep every thread."""
    if numel >= limit or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def estimate_prior(logits: Tensor, labels: Tensor, temperature: float = 1.0, max_iter: int = 500,
                   reg: float = 0.0) -> Tensor:
    """(C,) float64 distribution q. `reg` (default 0) adds reg * ||theta - mean theta||^2, a pull towards
    uniform for very small labelled sets."""
    z = logits.double() / float(temperature)
    y = labels.long()
    num_classes = z.shape[1]
    present = torch.bincount(y, minlength=num_classes) > 0
    if not bool(present.all()):
        log.warning("%d classes have no labelled sample; they get an average prior", int((~present).sum()))
    theta_p = torch.zeros(int(present.sum()), dtype=torch.float64, requires_grad=True)

    def full(theta_present: Tensor) -> Tensor:
        theta = theta_present.mean().expand(num_classes).clone()
        theta[present] = theta_present
        return theta

    opt = torch.optim.LBFGS([theta_p], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        theta = full(theta_p)
        loss = torch.nn.functional.cross_entropy(z - theta, y)
        if reg > 0:
            loss = loss + reg * (theta_p - theta_p.mean()).pow(2).sum()
        loss.backward()
        return loss

    with few_threads_for_small(z.numel()):
        opt.step(closure)
    with torch.no_grad():
        q = full(theta_p).softmax(dim=0)
    return q.detach()


def prior_nll(logits: Tensor, labels: Tensor, temperature: float, prior: Tensor | None) -> float:
    """CE(z/T - log q, y) (q=None: uniform), to report how much the estimated prior explains."""
    z = logits.double() / temperature
    if prior is not None:
        z = z - prior.double().clamp_min(1e-300).log()
    return float(torch.nn.functional.cross_entropy(z, labels.long()))


def save_prior(run_dir: Path, prior: Tensor, classnames: Sequence[str], info: dict[str, Any] | None = None) -> Path:
    """Write prior.json (the run's plots/gla_prior.png draws it against the class counts)."""
    from ..io import write_json

    q = [float(v) for v in prior.tolist()]
    entropy = -sum(v * math.log(v) for v in q if v > 0)
    data = {"prior": q, "classnames": list(classnames), "entropy": entropy,
            "max_over_min": max(q) / max(min(q), 1e-300), **(info or {})}
    path = Path(run_dir) / "prior.json"
    write_json(path, data)
    return path
