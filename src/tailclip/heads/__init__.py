"""Classifier heads on image features. Text initialisation maps CLIP's D-dim text classifier back to the
d-dim pre-projection space through visual_proj^T (LIFT), so a fine-tuned head starts at zero-shot quality."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone

log = logging.getLogger(__name__)

LIFT_TEMPLATES = ("a photo of a {}.",)


def map_text_to_pre_proj(text_weights: Tensor, visual_proj: Tensor | None) -> Tensor:
    """(C, D) normalised text features -> (C, d) by w @ proj^T, re-normalised. Without a separable projection
    (ResNets: pre_proj == proj) the text features are used as they are."""
    w = text_weights.float()
    if visual_proj is not None:
        w = w @ visual_proj.detach().float().t()
    return F.normalize(w, dim=-1)


@torch.no_grad()
def text_init_weights(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str] = LIFT_TEMPLATES, space: str = "pre_proj"
) -> Tensor:
    """Text-classifier weights for the head: (C, d) in `pre_proj` space (LIFT) or (C, D) in `proj` space."""
    text = backbone.text_classifier(list(classnames), list(templates))
    if space == "proj":
        return F.normalize(text.float(), dim=-1)
    return map_text_to_pre_proj(text, backbone.visual_proj)


class CosineClassifier(nn.Module):
    """logits = sigma * cos(f, w_c), no bias (LIFT: sigma = 25). The weight is normalised in the forward, so
    its norm never matters and weight decay only shrinks it harmlessly."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.normal_(self.weight, std=in_dim**-0.5)

    @classmethod
    def from_weights(cls, weights: Tensor, scale: float = 25.0) -> CosineClassifier:
        head = cls(weights.shape[1], weights.shape[0], scale)
        with torch.no_grad():
            head.weight.copy_(F.normalize(weights.float(), dim=-1))
        return head

    def forward(self, features: Tensor) -> Tensor:
        f = F.normalize(features.float(), dim=-1)
        w = F.normalize(self.weight.float(), dim=-1)
        return self.scale * f @ w.t()

    def extra_repr(self) -> str:
        return f"in_dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, scale={self.scale}"


class LinearHead(nn.Module):
    """Plain linear classifier z = W f + b; optionally text-initialised (weight = scale * normalised text
    feature, bias 0) so that it starts from the same decision rule as the cosine head up to feature norms."""

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=bias)

    @classmethod
    def from_weights(cls, weights: Tensor, scale: float = 1.0, bias: bool = True) -> LinearHead:
        head = cls(weights.shape[1], weights.shape[0], bias)
        with torch.no_grad():
            head.fc.weight.copy_(scale * F.normalize(weights.float(), dim=-1))
            if head.fc.bias is not None:
                head.fc.bias.zero_()
        return head

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features.float())


def build_head(
    kind: str, in_dim: int, num_classes: int, init_weights: Tensor | None = None, scale: float = 25.0
) -> nn.Module:
    """`cosine` or `linear`; `init_weights` (C, in_dim) text features, or None for a random start."""
    if kind == "cosine":
        return CosineClassifier.from_weights(init_weights, scale) if init_weights is not None else CosineClassifier(
            in_dim, num_classes, scale
        )
    if kind == "linear":
        return LinearHead.from_weights(init_weights) if init_weights is not None else LinearHead(in_dim, num_classes)
    from ..errors import ConfigError

    raise ConfigError(f"unknown head {kind!r}; choose one of: cosine, linear")


__all__ = [
    "LIFT_TEMPLATES", "CosineClassifier", "LinearHead", "build_head", "map_text_to_pre_proj", "text_init_weights",
]
