"""Sage's compensation factor (Peng, Zhang, Cheung; equations 21-22) inside the logit-adjusted loss.

    Lambda_i = mu * n_i^gamma * S_N / (C * n_min)
    loss     = -log( e^{z_y} n_y Lambda_y / sum_k e^{z_k} n_k Lambda_k ) = CE(z + log n + log Lambda, y)

S_N = sum_k n_k, n_min the smallest class count. mu and S_N / (C n_min) shift every logit by the same amount, so
softmax ignores them: only gamma changes the loss, which is LA with the prior raised to 1 + gamma. They are kept
in the formula so the module is the paper's equation, term by term. `tau` scales the LA part (tau log n) as in
`la`; the paper's loss is tau = 1.

Yet the paper's Fig. 8 reports a sensitivity to mu, which this reading cannot have. `reading="additive"` is the
other reading: Lambda added to the logits without the log, CE(z + tau log n + Lambda, y), where mu and S_N / (C
n_min) scale the per-class push (docs/methods/sage.md compares both)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from . import Loss, _counts_tensor, register_loss

CF_READINGS = ("product", "additive")  # eq. 22 as printed (log Lambda in the logits) | Lambda added to the logits


@register_loss("cf")
class CompensatedLALoss(Loss):
    """LA loss with Sage's distribution-mismatch compensation factor Lambda (eq. 22)."""

    balances_prior = True  # LA's prior removal, plus a gamma * log n_i push towards the tail (over-corrects a little)

    def __init__(self, class_counts: Sequence[int] | np.ndarray | Tensor, mu: float = 0.5, gamma: float = 0.05,
                 tau: float = 1.0, reading: str = "product") -> None:
        super().__init__()
        if mu <= 0:
            raise ValueError(f"cf loss: mu={mu} must be > 0 (log Lambda)")
        if reading not in CF_READINGS:
            raise ValueError(f"cf loss: reading={reading!r} is not one of {', '.join(CF_READINGS)}")
        self.mu, self.gamma, self.tau, self.reading = float(mu), float(gamma), float(tau), reading
        counts = _counts_tensor(class_counts)
        lam = self.mu * counts.pow(self.gamma) * counts.sum() / (counts.numel() * counts.min())
        self.register_buffer("log_counts", counts.log().float(), persistent=False)
        self.register_buffer("log_lambda", lam.log().float(), persistent=False)

    def compensation(self) -> Tensor:
        """Lambda_i (C,), equation 21 with equality."""
        return self.log_lambda.exp()

    def adjustment(self) -> Tensor:
        """What is added to every logit in training: tau * log n_i + log Lambda_i (product reading, eq. 22 as
        printed) or tau * log n_i + Lambda_i (additive reading)."""
        extra = self.log_lambda if self.reading == "product" else self.log_lambda.exp()
        return self.tau * self.log_counts + extra

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.adjustment(), labels)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, gamma={self.gamma}, tau={self.tau}, reading={self.reading}"
