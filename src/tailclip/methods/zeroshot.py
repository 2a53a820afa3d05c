"""Zero-shot CLIP with prompt ensembles: logits = scale · cos(f_img, w_c).

Equations, the released protocol, the named options and every deliberate difference: docs/methods/zeroshot.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import Backbone
from ..contract import Output, register_method
from ..data.base import TaskInfo
from .clip_kit import TextClassifierMethod


@dataclass
class ZeroShotConfig:
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)


@register_method("zeroshot")
class ZeroShot(TextClassifierMethod):
    """Frozen CLIP; the classifier is the prompt ensemble of the task's templates. Nothing trains."""

    Config = ZeroShotConfig
    stateless = True

    def __init__(self, cfg: ZeroShotConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        self.init_text_classifier(backbone, info, cfg.logit_scale)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        logits = self.zeroshot_logits(self.backbone.encode_image(images).proj)
        return Output(logits, F.cross_entropy(logits, labels) if labels is not None else None)
