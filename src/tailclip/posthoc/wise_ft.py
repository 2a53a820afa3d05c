"""WiSE-FT (Wortsman et al. 2022) weight interpolation: theta = (1 - alpha) * theta_zs + alpha * theta_ft.

In tailclip a checkpoint holds only what a method trained, so theta_zs is the method's own initial state
(the freshly built method before training: text-initialised head, zero-initialised adapters) and theta_ft its
checkpoint. This is WiSE-FT proper when that initial state *is* zero-shot CLIP (LIFT/Sage: cosine head from
text features + identity adapters; full or partial fine-tuning of backbone weights). It is meaningless for
heads that start random or from zero (the linear probe) and for parts with no zero-shot counterpart.
"""

from __future__ import annotations

import torch
from torch import Tensor


def interpolate_states(zs: dict[str, Tensor], ft: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """(1 - alpha) * zs + alpha * ft for floating tensors present in both; others are taken from ft."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = {}
    for k, v in ft.items():
        if k in zs and v.is_floating_point() and zs[k].shape == v.shape:
            out[k] = torch.lerp(zs[k].to(v.dtype), v, alpha)
        else:
            out[k] = v
    return out
