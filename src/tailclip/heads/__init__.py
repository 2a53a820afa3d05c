"""Classifier heads on image features, in a registry (`HEADS`: cosine, linear; `build_head(name, ...)`).

Text initialisation maps CLIP's D-dim text classifier back to the d-dim pre-projection space through
visual_proj^T (LIFT), so a fine-tuned head starts at zero-shot quality. Random initialisation follows LIFT's
`models/classifiers.py`, so `head_init=random` rows match it too."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..registry import Registry

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


class Head(nn.Module, ABC):
    """A classifier head: `from_weights(weights, scale)` makes a text-initialised one, the constructor
    `(in_dim, num_classes, scale)` a random one; forward maps (B, in_dim) features to (B, C) logits."""

    name: ClassVar[str] = ""

    @classmethod
    def from_weights(cls, weights: Tensor, scale: float = 25.0) -> Head:
        """A head whose class weights start at the rows of `weights` (C, in_dim), normalised."""
        head = cls(weights.shape[1], weights.shape[0], scale)
        head.set_weights(F.normalize(weights.float(), dim=-1))
        return head

    @abstractmethod
    def set_weights(self, weights: Tensor) -> None:
        """Copy (C, in_dim) class weights in (LIFT's `apply_weight`)."""

    @abstractmethod
    def class_weights(self) -> Tensor:
        """The trainable (C, in_dim) class-weight parameter itself (not a copy): Sage's SG-Adapter reads its mean
        as guidance every step, with gradients flowing back into the head."""

    @abstractmethod
    def forward(self, features: Tensor) -> Tensor:
        """(B, in_dim) features -> (B, C) logits."""


HEADS: Registry[type[Head]] = Registry("head")


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    def deco(cls: type[Head]) -> type[Head]:
        cls.name = name
        return HEADS.register(name)(cls)

    return deco


@register_head("cosine")
class CosineClassifier(Head):
    """logits = sigma * cos(f, w_c), no bias (LIFT: sigma = 25). The weight is normalised in the forward, so
    its norm never matters and weight decay only shrinks it harmlessly. Random init as LIFT: rows uniform in
    [-1, 1]^d, renormalised to norm 1."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        with torch.no_grad():
            self.weight.uniform_(-1, 1)
            self.weight.copy_(F.normalize(self.weight, dim=-1))

    @torch.no_grad()
    def set_weights(self, weights: Tensor) -> None:
        self.weight.copy_(weights)

    def class_weights(self) -> Tensor:
        return self.weight

    def forward(self, features: Tensor) -> Tensor:
        f = F.normalize(features.float(), dim=-1)
        w = F.normalize(self.weight.float(), dim=-1)
        return self.scale * f @ w.t()

    def extra_repr(self) -> str:
        return f"in_dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, scale={self.scale}"


@register_head("linear")
class LinearHead(Head):
    """Plain linear classifier z = W f + b. Text-initialised: weight = the normalised text features, bias 0
    (LIFT's `apply_weight`); random: Kaiming-normal weight, zero bias (LIFT's LinearClassifier). It learns its
    own scale, so `scale` is not used."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @torch.no_grad()
    def set_weights(self, weights: Tensor) -> None:
        self.fc.weight.copy_(weights)
        self.fc.bias.zero_()

    def class_weights(self) -> Tensor:
        return self.fc.weight

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features.float())


def build_head(
    name: str, in_dim: int, num_classes: int, init_weights: Tensor | None = None, scale: float = 25.0
) -> Head:
    """A registered head; `init_weights` (C, in_dim) text features, or None for a random start."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    if init_weights is not None and tuple(init_weights.shape) != (num_classes, in_dim):
        raise ConfigError(f"head init weights are {tuple(init_weights.shape)}, expected {(num_classes, in_dim)}")
    cls = HEADS.get(name)
    return cls(in_dim, num_classes, scale) if init_weights is None else cls.from_weights(init_weights, scale)


__all__ = [
    "HEADS", "LIFT_TEMPLATES", "CosineClassifier", "Head", "LinearHead", "build_head", "map_text_to_pre_proj",
    "register_head", "text_init_weights",
]
