"""GLA's post-hoc combinations (Zhu et al., NeurIPS 2023) and plain logit adjustment, on logits only.

debiased zero-shot:  z_zs/T_zs - log q
GLA ensemble:        z_ft/T_ft + z_zs/T_zs - log q - log p_s (+ log p_t)
where q is the estimated pretraining label prior, p_s the label distribution the fine-tuned model was trained
on (uniform when its loss already balanced it) and p_t a non-uniform target prior (uniform: term dropped).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from ..errors import TailclipError

log = logging.getLogger(__name__)


def _log_prior(prior: Tensor | np.ndarray | None, like: Tensor) -> Tensor | float:
    if prior is None:
        return 0.0
    p = torch.as_tensor(np.asarray(prior, dtype=np.float64) if not isinstance(prior, Tensor) else prior)
    p = p.double() / p.double().sum()
    return p.clamp_min(1e-12).log().to(like.dtype)


def debias_zeroshot(zs_logits: Tensor, temperature: float, prior: Tensor, target_prior: Tensor | None = None) -> Tensor:
    z = zs_logits.double()
    return (z / temperature - _log_prior(prior, z) + _log_prior(target_prior, z)).float()


def gla_ensemble(ft_logits: Tensor, zs_logits: Tensor, t_ft: float, t_zs: float, prior: Tensor,
                 source_prior: Tensor | np.ndarray | None = None, target_prior: Tensor | None = None) -> Tensor:
    ft, zs = ft_logits.double(), zs_logits.double()
    if ft.shape != zs.shape:
        raise ValueError(f"fine-tuned logits {tuple(ft.shape)} and zero-shot logits {tuple(zs.shape)} differ")
    out = ft / t_ft + zs / t_zs - _log_prior(prior, zs) - _log_prior(source_prior, zs) + _log_prior(target_prior, zs)
    return out.float()


def logit_adjust(logits: Tensor, class_counts: np.ndarray | Tensor, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment (Menon et al.): z - tau * log pi, pi the training label distribution."""
    z = logits.double()
    return (z - tau * _log_prior(torch.as_tensor(np.asarray(class_counts, dtype=np.float64)), z)).float()


def align(indices_a: Tensor, indices_b: Tensor) -> tuple[Tensor, Tensor]:
    """Row positions (pa, pb) such that indices_a[pa] == indices_b[pb], sorted by split index: two runs that
    skipped different bad images are compared on the images both have."""
    pos_a = {int(i): k for k, i in enumerate(indices_a.tolist())}
    pos_b = {int(i): k for k, i in enumerate(indices_b.tolist())}
    common = sorted(set(pos_a) & set(pos_b))
    if not common:
        raise TailclipError("the two sets of logits share no image of the split")
    if len(common) < max(len(pos_a), len(pos_b)):
        log.warning("aligning logits on %d common images (%d and %d given)", len(common), len(pos_a), len(pos_b))
    return (torch.tensor([pos_a[i] for i in common], dtype=torch.long),
            torch.tensor([pos_b[i] for i in common], dtype=torch.long))
