"""Zero-shot CLIP with prompt ensembles: logits = scale · cos(f_img, w_c).

Equations, the released protocol, the named options and every deliberate difference: docs/methods/zeroshot.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.base import TaskInfo
from .base import Method, Output, register_method


@dataclass
class ZeroShotConfig:
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)


def zeroshot_weights(backbone: Backbone, info: TaskInfo) -> Tensor:
    """(C, D) prompt-ensemble classifier for the task's class names and templates."""
    return backbone.text_classifier(info.classnames, info.templates)


@register_method("zeroshot")
class ZeroShot(Method):
    """Frozen CLIP; the classifier is the prompt ensemble of the task's templates. Nothing trains."""

    Config = ZeroShotConfig
    stateless = True

    def __init__(self, cfg: ZeroShotConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        self.scale = cfg.logit_scale if cfg.logit_scale is not None else float(backbone.logit_scale)
        self.register_buffer("text_weights", zeroshot_weights(backbone, info))

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        feats = self.backbone.encode_image(images).proj.float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = self.scale * feats @ self.text_weights.t()
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(logits, loss)
