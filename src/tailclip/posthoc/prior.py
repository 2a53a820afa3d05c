"""Label-prior estimation on the simplex (GLA): q = argmin_q CE(z/T - log q, y) on labelled balanced data.

We parametrise q = softmax(theta) and note that log q = theta - logsumexp(theta) shifts every logit of a
sample by the same constant, so the objective is CE(z/T - theta, y): convex in theta, solved with damped Newton
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

from ..runfiles import PRIOR_JSON

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


def estimate_prior(logits: Tensor, labels: Tensor, temperature: float = 1.0, max_iter: int = 100,
                   reg: float = 0.0, tol: float = 1e-10) -> Tensor:
    """(C,) float64 distribution q. `reg` (default 0) adds reg * ||theta - mean theta||^2, a pull towards
    uniform for very small labelled sets.

    Damped Newton in float64 with the exact Hessian mean_i(diag p_i - p_i p_i^T) (+ the regulariser's), solved with
    the all-ones direction pinned (the objective is shift-invariant), until the gradient's max-norm is below `tol`:
    a handful of (C, C) solves instead of hundreds of L-BFGS passes over the N x C logits (benchmarks/README.md). The
    Hessian is formed in float32 (it only steers the step); the gradient and the line search stay float64, so the
    optimum is exact."""
    z = logits.double() / float(temperature)
    y = labels.long()
    num_classes = z.shape[1]
    present = torch.bincount(y, minlength=num_classes) > 0
    if not bool(present.all()):
        log.warning("%d classes have no labelled sample; they get an average prior", int((~present).sum()))
    n_p = int(present.sum())
    # theta_full = A theta_p: present classes their own entry, absent ones the mean of the present entries
    a = torch.zeros(num_classes, n_p, dtype=torch.float64)
    a[present] = torch.eye(n_p, dtype=torch.float64)
    a[~present] = 1.0 / n_p
    ones = torch.ones(n_p, dtype=torch.float64) / math.sqrt(n_p)
    centre = torch.eye(n_p, dtype=torch.float64) - ones[:, None] * ones[None, :]

    def loss_of(theta_p: Tensor) -> Tensor:
        theta = a @ theta_p
        loss = torch.nn.functional.cross_entropy(z - theta, y)
        return loss + reg * (theta_p - theta_p.mean()).pow(2).sum() if reg > 0 else loss

    theta_p = torch.zeros(n_p, dtype=torch.float64)
    loss = loss_of(theta_p)
    for _ in range(max_iter):
        p = (z - a @ theta_p).softmax(dim=1)
        freq = torch.bincount(y, minlength=num_classes).double() / len(y)
        grad = a.t() @ (freq - p.mean(dim=0)) + 2 * reg * (centre @ theta_p)  # d loss / d theta_p
        log.debug("prior Newton: |grad| %.3g loss %.10f", float(grad.abs().max()), float(loss))
        if float(grad.abs().max()) < tol:
            break
        p32 = p.float()
        hess = torch.diag(p32.mean(dim=0)) - p32.t() @ p32 / len(y)
        hess = a.t() @ hess.double() @ a + 2 * reg * centre + ones[:, None] * ones[None, :]  # pin the shift
        step = -torch.linalg.solve(hess, grad)
        step -= (step @ ones) * ones
        t = 1.0
        while True:  # backtracking (Armijo) on the float64 objective
            cand = theta_p + t * step
            new = loss_of(cand)
            if float(new) <= float(loss) + 1e-4 * t * float(grad @ step) or t < 1e-8:
                break
            t *= 0.5
        if float(new) > float(loss):
            break
        theta_p, loss = cand, new
    q = (a @ theta_p).softmax(dim=0)
    return q.detach()


def prior_nll(logits: Tensor, labels: Tensor, temperature: float, prior: Tensor | None) -> float:
    """CE(z/T - log q, y) (q=None: uniform), to report how much the estimated prior explains."""
    z = logits.double() / temperature
    if prior is not None:
        z = z - prior.double().clamp_min(1e-300).log()
    return float(torch.nn.functional.cross_entropy(z, labels.long()))


def save_prior(run_dir: Path, prior: Tensor, classnames: Sequence[str], info: dict[str, Any] | None = None) -> Path:
    """Write prior.json (`runfiles.PRIOR_JSON`; the run's plots/gla_prior.png draws it against the class counts)."""
    from ..io import write_json

    q = [float(v) for v in prior.tolist()]
    entropy = -sum(v * math.log(v) for v in q if v > 0)
    data = {"prior": q, "classnames": list(classnames), "entropy": entropy,
            "max_over_min": max(q) / max(min(q), 1e-300), **(info or {})}
    path = Path(run_dir) / PRIOR_JSON
    write_json(path, data)
    return path
